"""The main job at GPU scale on one CUDA machine in under 10 minutes; on a CPU, the same code as a dry run in seconds.

What it runs (GPU profile; one process, then an optional 2-GPU smoke):
  1. dependencies: `import stlm_nb.trainer` needs, beyond PyTorch, transformers and accelerate (and their own
     dependencies: numpy, tokenizers, safetensors, huggingface_hub, tqdm, fsspec), the distributions datasets,
     pyarrow, pandas and plotly (`NEEDS`: stlm_nb.data and stlm_nb.eval import them at module level) and what those
     need: dill, multiprocess, xxhash, narwhals, python-dateutil, six (measured: `wheel_list()`, and
     tests/test_gpu_check.py imports the trainer in a venv holding only these). Whatever of that is missing or too
     old here is unpacked from the folder `--wheels DIR` (made by `bench/prepare_gpu_wheels.sh DIR`) into
     `<work>/py3.N/site-packages`, put first on sys.path; nothing is fetched, pip is not needed, and the
     interpreter's own packages are not touched. A box without torch >= 2.4, transformers 5 or accelerate >= 1.0 is
     refused with a message.
  2. tokenizer: `--tokenizer DIR`, else `<wheels>/tokenizer` (the packaged SmolLM2 tokenizer, 49,152 tokens, copied
     there by the wheel script), else a byte-level BPE trained here on the train split (`stlm_nb.tokenizer.train_bpe`).
  3. teacher: the packaged teachers' weights cannot be brought, so a teacher is TRAINED HERE FIRST, from random init:
     a LlamaForCausalLM of the `llama-124m` preset's shape (hidden 768, 12 layers, 12 heads, MLP 2048, tied
     embeddings: 122.7M parameters with the SmolLM2 vocabulary), bf16 autocast, AdamW (peak lr 6e-4, warm-up 50
     steps, cosine to 10%, clip 1), on the corpus's train split only (blocks of 512 tokens, 64 per step), for at most
     4 epochs or 120 s (`teacher_budget_s`), whichever ends first (the cosine schedule is fitted to the budget once
     the warm-up steps are timed); saved with save_pretrained, its tokenizer beside it, in `<work>/teacher`.
  4. the main job: `stlm_nb.trainer.run_distillation(DistillConfig.from_parameters(...))` with that teacher, the
     `stlm-50m` student preset (52.4M parameters with the SmolLM2 vocabulary; >= 20M), 3 paired seeds (KD and
     CE-only per seed), one epoch over 5.5M training tokens (batch 256 x 128), the teacher cache over every training
     block plus the validation blocks, offline tasks, the untrained floor, bits per byte per domain; then KD - CE.
  5. when torch.cuda.device_count() >= 2: `accelerate launch --multi_gpu --num_processes 2` of a tiny run of the
     same job (the ranks' students must agree); otherwise one printed line says it was skipped.
  Output in `--out`: gpu_check.json (machine, versions, timings per stage, tokens/s, cache tokens, student
  parameters, KD - CE per seed, which targets were met) and summary.md; the job's own metrics.json is copied beside
  them as distill_metrics.json. Heavy files (teacher, teacher caches, students) stay in `--work`.

Corpus: the embedded sample holds 1.13M SmolLM2 tokens (4.38 MB of text), far below 5M, so the wheel script also
builds the sample's nine domains with `stlm_nb.corpus.build_corpus` (Debian and PyPI packages) capped at 3.2 MB of
text per domain: 25.3 MB of text, xz-compressed into `<wheels>/corpus` (6.4 MiB); this script decompresses it into
`<work>/corpus` and passes it as `corpus=`. Measured with prepare_data: 42,968 training blocks of 128 (the 5.5M
budget filled) and 1,055 validation blocks, so the cache covers 5.63M tokens. Without the corpus the job runs on the
embedded sample and gpu_check.json says the cache target was missed.

The folder's size (measured 2026-12 with `pip download`; the wheel script prints it): pyarrow's wheel alone is 52.5
MiB for one Python version and pandas' 11.5 MiB, so wheels over 2 MB are stored unzipped and xz-compressed
(`NAME.whl.xz`: 29.4 and 7.2 MiB) and decompressed here before unpacking. For Python 3.12 (the lent H100/H200
image's) the whole folder is 48.7 MiB (wheels 41.8, tokenizer 0.4, corpus 6.4), which with the repository (~12 MB)
stays under a 64 MiB transfer; each further Python version adds ~39 MiB, so three do not fit. A box whose image
already has pyarrow, pandas and xxhash (the lent image has them) needs only the small wheels:
`SKIP="pyarrow pandas xxhash" bash bench/prepare_gpu_wheels.sh DIR` makes a folder for Python 3.10-3.13 of 12.0 MiB.
Decided so, rather than a GPU path that avoids datasets/pyarrow, because that would not be the main job:
prepare_data, the teacher caches' inputs and the evaluation all run on datasets.

Time budget on an H100 (estimates written before any GPU run; gpu_check.json records the real ones):
  FLOPs = 6 * N * tokens for training, 2 * N * tokens for a forward (Kaplan et al. 2020; N = matmul parameters, the
  LM head included); H100 bf16 ~400 TFLOP/s dense at ~40% => ~160 TFLOP/s for the 123M teacher, ~100 TFLOP/s for the
  52M students (smaller matmuls, the 49k-vocabulary KD loss, Trainer overheads).
    teacher:  6 * 122.7M * 4 epochs * ~5.9M tokens = 17 PFLOP                  -> ~110 s (capped at 120 s)
    cache:    2 * 122.7M * 5.63M tokens = 1.4 PFLOP, ~5,500 forwards of 8 blocks, top-k, 1.5 GB written -> ~50 s
    students: 6 runs * 6 * 52.4M * 5.5M tokens = 10.4 PFLOP                     -> ~105 s (~17 s per run)
    data (tokenising 25 MB twice, ~20 s each), imports, wheels, tasks, floor    -> ~90 s
  total ~6 min, under the 10-minute limit with ~4 min to spare.

Run on a CUDA box (a copy of this repository plus the wheel folder; nothing else is installed or fetched):
    python3 bench/gpu_check.py --wheels gpu_wheels/ --out bench/results/gpu_check/
then commit bench/results/gpu_check/{gpu_check.json,summary.md,distill_metrics.json} with the machine named.
On a CPU (CI, `make gpu-check`): `python bench/gpu_check.py --dry-run` (automatic without CUDA): toy sizes (the
embedded sample, a 512-token BPE, a 0.25M-parameter teacher, llama-tiny students), the same files written into
runs/gpu_check_dry/, in about 20-40 s on two busy cores.
"""
from __future__ import annotations

import argparse
import email.parser
import json
import lzma
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "stlm_nb.gpu_check/1"
# requirement floors as in settings.ini; the folder carries the closure of NEEDS, the box must bring PROVIDED
NEEDS = ("datasets>=3", "pyarrow", "pandas", "plotly")  # what `import stlm_nb.trainer` needs beyond torch, transformers, accelerate
PROVIDED = ("torch>=2.4", "transformers>=5,<6", "accelerate>=1.0")  # what the GPU box is assumed to have (with their own dependencies)
EXTRA_WHEELS = ("fsspec",)  # datasets caps fsspec's version: carried in case the box's is newer
# the unpacked wheels' directory: its name must contain "site-packages", or dill (datasets' fingerprints) takes its
# modules for the user's own and pickles them by value (pyarrow's then fail: "Can't pickle <class 'MonthDayNano'>")
SITE = "site-packages"

def site_dir(work)->Path:
    "Where the wheels are unpacked: one directory per Python version (binary wheels are per version)."
    return Path(work) / f"py{sys.version_info.major}.{sys.version_info.minor}" / SITE
TARGETS = {"cache_tokens": 5_000_000, "student_parameters": 20_000_000, "seeds": 3, "wall_s": 600}

PROFILES = {
    "gpu": dict(teacher_preset="llama-124m", teacher_block=512, teacher_batch=64, teacher_lr=6e-4, teacher_warmup=50,
                teacher_epochs=4, teacher_budget_s=120.0, teacher_doc_stride=1, teacher_val_blocks=256, bpe_vocab=16_000,
                student="stlm-50m", seeds=[0, 1, 2],
                train_tokens=5_500_000, eval_tokens_per_domain=16_384, block_size=128, top_k=32, alpha=0.5,
                num_train_epochs=1.0, per_device_train_batch_size=256, learning_rate=2e-3, tasks_per_domain=64),
    "dry": dict(teacher_preset="llama-1m", teacher_block=64, teacher_batch=16, teacher_lr=1e-2, teacher_warmup=5,
                teacher_epochs=1, teacher_budget_s=8.0, teacher_max_steps=20, teacher_doc_stride=8, teacher_val_blocks=16,
                bpe_vocab=512, student="llama-tiny",
                seeds=[0, 1, 2], train_tokens=2_048, eval_tokens_per_domain=256, block_size=64, top_k=8, alpha=0.5,
                num_train_epochs=1.0, per_device_train_batch_size=8, learning_rate=3e-3, tasks_per_domain=2),
}
DDP_SMOKE = dict(student="llama-tiny", seeds=[0], train_tokens=8_192, eval_tokens_per_domain=256, block_size=128,
                 top_k=8, alpha=0.5, num_train_epochs=1.0, per_device_train_batch_size=8, learning_rate=3e-3,
                 tasks_per_domain=0)


class MissingDependencies(RuntimeError):
    "A distribution `import stlm_nb.trainer` needs is missing or too old here, and the wheel folder cannot supply it."


# ---------------------------------------------------------------------------------------------------------------
# dependencies: pick wheels from a folder for what is missing, unpack them into a site directory (no network, no pip)

def _canon(name:str)->str:
    from packaging.utils import canonicalize_name
    return str(canonicalize_name(name))

def installed_version(name:str)->str|None:
    "The version of an installed distribution, None when it is not installed (importlib.metadata; nothing imported)."
    import importlib.metadata as md
    try: return md.version(name)
    except md.PackageNotFoundError: return None

def wheel_index(wheel_dir, tags=None)->dict:
    "{canonical name: [(Version, path)]} of the wheels in `wheel_dir` (`*.whl` and `*.whl.xz`) this interpreter can use."
    from packaging.tags import sys_tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    supported = set(sys_tags()) if tags is None else set(tags)
    index = {}
    for f in sorted(Path(wheel_dir).iterdir()):
        name = f.name[:-3] if f.name.endswith(".whl.xz") else f.name
        if not name.endswith(".whl"): continue
        try: dist, version, _, wtags = parse_wheel_filename(name)
        except InvalidWheelFilename: continue
        if wtags & supported: index.setdefault(_canon(dist), []).append((version, f))
    return index

def _wheel_file(path:Path, unpack_dir:Path)->Path:
    "A plain wheel for `path`: itself, or its `.whl.xz` decompressed into `unpack_dir` (once)."
    if not path.name.endswith(".xz"): return path
    out = unpack_dir / path.name[:-3]
    if not out.exists():
        unpack_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with lzma.open(path) as src, open(tmp, "wb") as dst: shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, out)
    return out

def wheel_requirements(wheel:Path)->list[str]:
    "The Requires-Dist lines of a wheel's METADATA."
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.count("/") == 1 and n.split("/")[0].endswith(".dist-info") and n.endswith("/METADATA")), None)
        if meta is None: raise ValueError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
        msg = email.parser.BytesParser().parsebytes(z.read(meta), headersonly=True)
    return msg.get_all("Requires-Dist") or []

def plan_wheels(
    needs, # requirement strings ("datasets", "pyarrow>=24")
    wheel_dir=None, # folder of wheels (`prepare_gpu_wheels.sh`); None: none (only check)
    unpack_dir=None, # where `.whl.xz` wheels are decompressed (default: `wheel_dir/.unpacked`)
    installed=installed_version, # name -> installed version or None
    tags=None, # supported wheel tags (default: this interpreter's)
)->list[Path]: # the wheels to unpack, dependencies resolved; [] when everything is installed
    """The wheels that make `needs` importable here: a requirement installed at a satisfying version is kept, any other
    is taken from the folder (its highest fitting version for this interpreter) with its own requirements.
    MissingDependencies lists what neither has; ValueError for a folder that does not exist."""
    from packaging.requirements import Requirement
    from packaging.version import Version
    if wheel_dir is not None:
        wheel_dir = Path(wheel_dir)
        if not wheel_dir.is_dir():
            raise ValueError(f"wheels={str(wheel_dir)!r}: no such directory; make it with: bash bench/prepare_gpu_wheels.sh {wheel_dir}")
    index = wheel_index(wheel_dir, tags) if wheel_dir is not None else {}
    unpack_dir = Path(unpack_dir) if unpack_dir is not None else (wheel_dir / ".unpacked" if wheel_dir is not None else None)
    todo, chosen, missing = [(r, "stlm_nb") for r in needs], {}, []
    while todo:
        req_s, parent = todo.pop(0)
        req = Requirement(req_s)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}): continue
        name = _canon(req.name)
        if name in chosen:
            if not req.specifier.contains(chosen[name][0], prereleases=True):
                missing.append(f"{req} (needed by {parent}; the folder's {name} {chosen[name][0]} was chosen for another requirement)")
            continue
        have = installed(req.name)
        if have is not None and req.specifier.contains(Version(have), prereleases=True): continue
        fits = sorted((v, p) for v, p in index.get(name, []) if req.specifier.contains(v, prereleases=True))
        if not fits:
            missing.append(f"{req} (needed by {parent}; installed: {have or 'none'})")
            continue
        version, path = fits[-1]
        chosen[name] = (version, path)
        todo += [(r, f"{name} {version}") for r in wheel_requirements(_wheel_file(path, unpack_dir))]
    if missing:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        where = (f"the wheel folder {str(wheel_dir)!r} ({sum(len(v) for v in index.values())} usable wheels for Python {py}) cannot supply it"
                 if wheel_dir is not None else "and no wheel folder was given (--wheels DIR)")
        raise MissingDependencies(
            f"this Python ({py}, {sys.executable}) lacks what stlm_nb needs: " + "; ".join(missing) + f"; {where}. "
            f"On a machine with PyPI access run `bash bench/prepare_gpu_wheels.sh DIR {py}` (without SKIP, which leaves out "
            f"pyarrow, pandas and xxhash) and pass --wheels DIR")
    return [_wheel_file(p, unpack_dir) for _, p in chosen.values()]

def unpack_wheels(
    wheels:list, # plain .whl files (`plan_wheels` output)
    site, # target directory, put first on sys.path by `ensure_dependencies`
)->list[str]: # the wheels' file names
    """Unpack wheels into `site` as `pip install --target` would lay them out (purelib/platlib of `.data` moved up;
    scripts, headers and data files skipped): no pip needed."""
    site = Path(site); site.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for info in z.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"): continue
                    parts = parts[2:]
                dest = site.joinpath(*parts)
                if info.is_dir(): dest.mkdir(parents=True, exist_ok=True); continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as dst: shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                if mode: os.chmod(dest, mode)
    return [Path(w).name for w in wheels]

def ensure_dependencies(wheel_dir, site)->dict:
    """Make `import stlm_nb.trainer` work here: check `PROVIDED` and `NEEDS`, unpack what is missing from `wheel_dir`
    into `site`, and put `site` first on sys.path (and PYTHONPATH, for subprocesses). Returns what was unpacked."""
    site = Path(site)
    if site.is_dir():  # an earlier run's unpacked wheels count as installed
        sys.path.insert(0, str(site)); os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    import importlib
    importlib.invalidate_caches()
    t0 = time.time()
    wheels = plan_wheels(list(PROVIDED + NEEDS), wheel_dir, unpack_dir=site.parent / "wheels_unpacked" if wheel_dir is not None else None)
    names = unpack_wheels(wheels, site) if wheels else []
    if wheel_dir is not None: shutil.rmtree(site.parent / "wheels_unpacked", ignore_errors=True)  # decompressed copies: no longer needed
    if names and str(site) not in sys.path:
        sys.path.insert(0, str(site)); os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    importlib.invalidate_caches()
    return {"installed_from_wheels": names, "site": str(site) if names else None, "seconds": time.time() - t0}


# ---------------------------------------------------------------------------------------------------------------
# the bundle: xz-compressed files of the wheel folder (tokenizer/, corpus/) decompressed into the work directory

def materialize(src, dst)->Path:
    "Copy the tree `src` to `dst`, decompressing every `*.xz` file (its name without `.xz`); `dst` is replaced."
    src, dst = Path(src), Path(dst)
    if dst.exists(): shutil.rmtree(dst)
    for f in sorted(src.rglob("*")):
        if not f.is_file(): continue
        rel = f.relative_to(src)
        out = dst / (str(rel)[:-3] if f.name.endswith(".xz") else rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.name.endswith(".xz"):
            with lzma.open(f) as a, open(out, "wb") as b: shutil.copyfileobj(a, b, 1 << 24)
        else: shutil.copyfile(f, out)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# stages

def machine()->dict:
    "The machine and software a result was produced with."
    import torch, transformers, accelerate
    m = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
         "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
         "accelerate": accelerate.__version__, "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for name in ("datasets", "pyarrow", "pandas", "numpy", "tokenizers"): m[name] = installed_version(name)
    if m["gpu_count"]:
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 gpu_capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception: m["driver"] = None
    else: m["gpu"] = None
    return m

def _git_commit()->str|None:
    try: return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception: return None

def make_tokenizer(p:dict, corpus, tokenizer_dir)->tuple:
    """The run's tokenizer: `tokenizer_dir`'s, else a byte-level BPE of `p['bpe_vocab']` tokens trained on the train
    split. Returns (tokenizer, description)."""
    from stlm_nb.tokenizer import load_tokenizer, train_bpe
    if tokenizer_dir is not None:
        return load_tokenizer(str(tokenizer_dir)), f"loaded from {tokenizer_dir}"
    from stlm_nb.data import load_corpus, split_corpus
    texts = split_corpus(load_corpus(corpus))["train"]["text"]
    tok = train_bpe(texts if p["bpe_vocab"] > 1000 else texts[::8], vocab_size=p["bpe_vocab"])  # a toy vocabulary: every 8th document
    return tok, f"byte-level BPE of {p['bpe_vocab']} tokens trained here on the train split"

def _blocks(texts, tok, block:int):
    "Documents tokenised, joined with EOS and cut into (N, block) LongTensor rows (the tail dropped)."
    import torch
    eos = tok.eos_token_id
    ids = [i for row in tok(list(texts), add_special_tokens=False)["input_ids"] for i in row + [eos]]
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)

def train_teacher(p:dict, corpus, tok, out:Path, device:str)->dict:
    "Train the teacher from random init on the train split (bf16 autocast on CUDA), time-boxed; save_pretrained into `out`."
    import math, torch
    from stlm_nb.data import load_corpus, split_corpus
    from stlm_nb.models import count_parameters, make_student
    from stlm_nb.runs import matmul_parameters
    t0 = time.time()
    splits = split_corpus(load_corpus(corpus))
    stride = p["teacher_doc_stride"]  # the dry run tokenises every 8th document only
    train = _blocks(splits["train"]["text"][::stride], tok, p["teacher_block"])
    val = _blocks(splits["validation"]["text"][::stride], tok, p["teacher_block"])
    t_data = time.time() - t0
    model = make_student(p["teacher_preset"], tokenizer=tok, seed=1234, max_position_embeddings=max(1024, p["teacher_block"])).to(device)
    cuda = device == "cuda"
    autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda)
    opt = torch.optim.AdamW(model.parameters(), lr=p["teacher_lr"], betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if cuda else {}))
    per_epoch = max(1, len(train) // p["teacher_batch"])
    planned = max(1, min(p.get("teacher_max_steps", 10**9), per_epoch * p["teacher_epochs"]))
    warmup, budget = min(p["teacher_warmup"], planned), p["teacher_budget_s"]
    g = torch.Generator().manual_seed(1234)

    @torch.no_grad()
    def val_loss()->float:
        model.eval(); tot, n = 0.0, 0
        for i in range(0, min(len(val), p["teacher_val_blocks"]), p["teacher_batch"]):
            x = val[i:i + p["teacher_batch"]].to(device)
            with autocast(): tot += model(input_ids=x, labels=x).loss.float().item() * len(x); n += len(x)
        model.train(); return tot / max(1, n)

    before = val_loss()
    model.train(); step, losses, order, total = 0, [], torch.randperm(len(train), generator=g), planned
    if cuda: torch.cuda.synchronize()
    t_train = time.time(); t_warm = None
    while step < total:
        k = step % per_epoch
        if k == 0 and step: order = torch.randperm(len(train), generator=g)
        x = train[order[k * p["teacher_batch"]:(k + 1) * p["teacher_batch"]]].to(device, non_blocking=True)
        lr = p["teacher_lr"] * (step + 1) / warmup if step < warmup else \
            p["teacher_lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))
        for group in opt.param_groups: group["lr"] = lr
        with autocast(): loss = model(input_ids=x, labels=x).loss
        loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == total: losses.append((step, loss.item()))
        if step == 3:
            if cuda: torch.cuda.synchronize()
            t_warm = time.time()
        if step == warmup and t_warm is not None and step > 3:  # fit the schedule to the time budget once the step time is known
            per_step = (time.time() - t_warm) / (step - 3)
            total = max(step + 1, min(planned, int((budget - (time.time() - t_train)) / per_step) + step))
        if time.time() - t_train > 1.15 * budget: break  # a hard stop if the estimate was wrong
    if cuda: torch.cuda.synchronize()
    train_s = time.time() - t_train
    after = val_loss()
    model.eval().save_pretrained(out); tok.save_pretrained(out)
    tokens = step * p["teacher_batch"] * p["teacher_block"]
    n_mm = matmul_parameters(model)
    return {"preset": p["teacher_preset"], "parameters": count_parameters(model), "matmul_parameters": n_mm,
            "block_size": p["teacher_block"], "batch_blocks": p["teacher_batch"], "train_blocks": len(train),
            "steps": step, "planned_steps": planned, "stopped_by_budget": step < planned, "epochs": step / per_epoch,
            "tokens": tokens, "tokens_per_s": tokens / train_s, "model_tflops": 6 * n_mm * tokens / train_s / 1e12,
            "val_loss_nats_before": before, "val_loss_nats_after": after, "train_loss": losses[-1][1] if losses else None,
            "loss_log": losses, "data_s": t_data, "train_s": train_s, "wall_s": time.time() - t0, "dir": str(out)}

def distill(p:dict, teacher_dir:Path, corpus, out:Path)->dict:
    "The main job: run_distillation with the trained teacher, built from the flat knobs of `DistillConfig.from_parameters`."
    from stlm_nb.trainer import DistillConfig, run_distillation
    knobs = {k: p[k] for k in ("student", "seeds", "train_tokens", "eval_tokens_per_domain", "block_size", "top_k", "alpha",
                               "num_train_epochs", "per_device_train_batch_size", "learning_rate", "tasks_per_domain")}
    knobs.update(teachers=[str(teacher_dir)], out_dir=str(out), overwrite=True, precision="auto")
    if corpus is not None: knobs["corpus"] = str(corpus)
    return run_distillation(DistillConfig.from_parameters(**knobs))

def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d: return default
        d = d[k]
    return d

def summarize_distill(m:dict)->dict:
    "What gpu_check.json keeps of the job's metrics (missing keys become None: the trainer may change)."
    runs = m.get("runs", {})
    per_run = {name: {"wall_s": r.get("wall_s"), "train_runtime_s": r.get("train_runtime_s"), "tokens_seen": r.get("tokens_seen"),
                      "tokens_per_s": (r["tokens_seen"] / r["train_runtime_s"]) if r.get("tokens_seen") and r.get("train_runtime_s") else None,
                      "bpb": _get(r, "eval", "all", "bpb"), "tasks_eval_s": r.get("tasks_eval_s")} for name, r in runs.items()}
    kd_ce = _get(m, "kd_minus_ce_bpb", "all") or {}
    train_s = sum(r["train_runtime_s"] or 0 for r in per_run.values())
    tokens = sum(r["tokens_seen"] or 0 for r in per_run.values())
    return {"cache_tokens": _get(m, "flops", "teacher_cache_tokens"), "student_parameters": _get(m, "model_parameters", "student"),
            "student_flops_per_token": _get(m, "flops", "student_step_per_token"),
            "teacher_bpb": {k: _get(v, "all", "bpb") for k, v in (m.get("teacher") or {}).items()},
            "kd_minus_ce_bpb": {"per_seed": kd_ce.get("per_seed"), "mean": kd_ce.get("mean"), "ci95": kd_ce.get("ci95"), "n": kd_ce.get("n")},
            "kd_minus_ce_bpb_by_domain": {d: _get(v, "mean") for d, v in (m.get("kd_minus_ce_bpb") or {}).items()},
            "students_tokens_per_s": tokens / train_s if train_s else None, "runs": per_run, "job_timings_s": m.get("timings"),
            "precision": _get(m, "precision", "name")}

def ddp_smoke(teacher_dir:Path, work:Path, force:bool=False)->dict:
    """`accelerate launch --multi_gpu --num_processes 2` of a tiny run of the job when two GPUs exist (`force` without
    them: torchrun, 2 processes, gloo on CPU); the ranks' students must agree."""
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2 and not force:
        print(f"2-GPU smoke: skipped ({n} CUDA device{'s' if n != 1 else ''}; it needs 2)", flush=True)
        return {"ran": False, "reason": f"{n} CUDA device(s)"}
    out = work / "ddp"; shutil.rmtree(out, ignore_errors=True)
    if n >= 2:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    else:  # accelerate launch has no multi-process CPU launcher without MPI: torchrun, as accelerate itself uses for GPUs
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    cmd += [str(Path(__file__).resolve()), "--ddp-worker", str(out), "--teacher-dir", str(teacher_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    res = {"ran": True, "command": " ".join(cmd[1:]), "returncode": r.returncode, "wall_s": time.time() - t0}
    if r.returncode != 0:
        res["error_tail"] = r.stderr[-3000:]; print(f"2-GPU smoke: FAILED (exit {r.returncode})\n{r.stderr[-3000:]}", flush=True)
        return res
    files = {f.name: json.loads(f.read_text()) for f in sorted(out.glob("rank*-*.json"))}
    names = sorted({n.split("-", 1)[1] for n in files})
    ranks = sorted({n.split("-", 1)[0] for n in files})
    agree = len(ranks) == 2 and bool(names) and all(files.get(f"rank0-{n}") == files.get(f"rank1-{n}") for n in names)
    res.update(ranks=len(ranks), ranks_agree=agree, arms=names,
               world_size=_get(json.loads((out / "metrics.json").read_text()), "world_size") if (out / "metrics.json").exists() else None)
    print(f"2-GPU smoke: {len(ranks)} ranks, agree: {res['ranks_agree']}, {res['wall_s']:.0f} s", flush=True)
    return res

def _ddp_worker(out:str, teacher_dir:str)->None:
    import torch
    from accelerate import PartialState
    # joined first: on CPU, TrainingArguments (built by DistillConfig) would otherwise create accelerate's shared state
    # as a single process (DistributedType.NO), and every rank would then act as rank 0
    PartialState(cpu=not torch.cuda.is_available())
    from stlm_nb.trainer import DistillConfig, run_distillation
    run_distillation(DistillConfig.from_parameters(**DDP_SMOKE, teachers=[teacher_dir], out_dir=out, overwrite=True, precision="auto"))


# ---------------------------------------------------------------------------------------------------------------
# report

def _fmt(v, f=".3f"):
    if v is None: return "–"
    if isinstance(v, bool): return str(v)
    return format(v, f) if isinstance(v, float) else format(v, ",") if isinstance(v, int) else str(v)

def summary_markdown(r:dict)->str:
    "The short markdown summary of a gpu_check.json record."
    m, t, d = r["machine"], r["teacher"], r["distill"]
    kd = d["kd_minus_ce_bpb"]
    where = (f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')}, driver {m.get('driver')})" if m.get("gpu")
             else f"CPU only ({m.get('cpu_count')} cores)")
    lines = [f"# GPU check ({r['mode']})", "",
             f"Machine: {where}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
             f"accelerate {m['accelerate']}, datasets {m.get('datasets')}. Commit {r.get('commit') or 'unknown'}; {r['finished']}.", "",
             f"Made by: `{r['command']}`" + (" (a dry run: toy sizes, not a measurement)" if r["mode"] == "dry-run" else ""), "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["timings_s"].items() if k != "total"] + [f"| total | {r['timings_s']['total']:.1f} |"]
    lines += ["", "| quantity | value | target | met |", "|---|---|---|---|",
              f"| teacher cache tokens | {_fmt(d['cache_tokens'])} | >= {TARGETS['cache_tokens']:,} | {r['targets_met']['cache_tokens']} |",
              f"| student parameters ({r['profile']['student']}) | {_fmt(_get(d, 'student_parameters', 'total'))} | >= {TARGETS['student_parameters']:,} | {r['targets_met']['student_parameters']} |",
              f"| paired seeds | {len(r['profile']['seeds'])} | {TARGETS['seeds']} | {r['targets_met']['seeds']} |",
              f"| wall clock (s) | {r['timings_s']['total']:.0f} | < {TARGETS['wall_s']} | {r['targets_met']['wall_s']} |", "",
              f"Teacher ({t['preset']}, {t['parameters']['total']:,} parameters, trained here): {t['steps']} steps, "
              f"{t['tokens']:,} tokens, {t['tokens_per_s']:,.0f} tokens/s ({t['model_tflops']:.1f} model TFLOP/s), "
              f"held-out loss {t['val_loss_nats_before']:.3f} -> {t['val_loss_nats_after']:.3f} nats/token"
              + (" (stopped by its time budget)" if t["stopped_by_budget"] else "") + f"; bits per byte in the job: "
              + ", ".join(f"{_fmt(v, '.4f')}" for v in d["teacher_bpb"].values()) + ".",
              f"Students: {_fmt(d['students_tokens_per_s'], ',.0f')} training tokens/s over the {len(d['runs'])} runs; precision {d['precision']}"
              + (f"; peak GPU memory {r['gpu_memory_peak_gib']} GiB." if r.get("gpu_memory_peak_gib") is not None else "."), "",
              f"KD - CE bits per byte (all domains), per seed: {', '.join(_fmt(v, '+.4f') for v in kd['per_seed'] or [])}; "
              f"mean {_fmt(kd['mean'], '+.4f')}, 95% CI [{', '.join(_fmt(v, '+.4f') for v in kd['ci95'] or [])}].", "",
              f"2-GPU smoke: " + ("skipped (" + r["ddp_smoke"].get("reason", "") + ")" if not r["ddp_smoke"].get("ran") else
                                 f"exit {r['ddp_smoke'].get('returncode')}, ranks agree: {r['ddp_smoke'].get('ranks_agree')}"), "",
              f"Dependencies: {', '.join(r['dependencies']['installed_from_wheels']) or 'all present; nothing unpacked'}. "
              f"Tokenizer: {r['tokenizer']}. Corpus: {r['corpus']}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (automatic when CUDA is not available)")
    ap.add_argument("--wheels", help="folder made by bench/prepare_gpu_wheels.sh: wheels for what is missing, tokenizer/, corpus/")
    ap.add_argument("--out", help="where gpu_check.json and summary.md go "
                                  "(default: bench/results/gpu_check on CUDA, runs/gpu_check_dry in a dry run)")
    ap.add_argument("--work", help="teacher, caches, students, unpacked wheels (default: runs/gpu_check_work[_dry])")
    ap.add_argument("--corpus", help="corpus directory (default: <wheels>/corpus when present, else the embedded sample)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: <wheels>/tokenizer when present, else a BPE trained here)")
    ap.add_argument("--teacher-budget-s", type=float, help="seconds of teacher training (default: the profile's)")
    ap.add_argument("--ddp-smoke", action="store_true", help="run the 2-process smoke even without 2 GPUs (on CPU: gloo)")
    ap.add_argument("--check-deps", action="store_true", help="only check (and, with --wheels, unpack) the dependencies, then exit")
    ap.add_argument("--print-wheel-list", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)

def closure(roots)->dict:
    "{canonical name: version} of the installed distributions `roots` and everything they require (extras left out), read from their metadata."
    import importlib.metadata as md
    from packaging.requirements import Requirement
    seen, todo = {}, [Requirement(r).name for r in roots]
    while todo:
        n = _canon(todo.pop())
        if n in seen: continue
        try: dist = md.distribution(n)
        except md.PackageNotFoundError: raise MissingDependencies(f"{n} is not installed here: run this in the project's venv") from None
        seen[n] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}): todo.append(req.name)
    return seen

def wheel_list()->list[str]:
    "name==version of every distribution the wheel folder carries: the closure of NEEDS (as installed here) less that of PROVIDED, plus EXTRA_WHEELS."
    need, have = closure(NEEDS), closure(PROVIDED)
    keep = {n: v for n, v in need.items() if n not in have}
    for n in EXTRA_WHEELS: keep[_canon(n)] = need.get(_canon(n)) or installed_version(n)
    return [f"{n}=={v}" for n, v in sorted(keep.items())]

def main(argv=None)->int:
    args = parse_args(argv)
    t_start = time.time()
    if args.print_wheel_list: print("\n".join(wheel_list())); return 0
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")): os.environ.setdefault(k, v)
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    if args.ddp_worker:
        ensure_dependencies(None, site_dir(Path(args.ddp_worker).parent))
        _ddp_worker(args.ddp_worker, args.teacher_dir); return 0
    wheels = Path(args.wheels) if args.wheels else None
    if wheels is not None and not wheels.is_dir():
        print(f"gpu_check: error: --wheels {wheels}: no such directory; make it with: bash bench/prepare_gpu_wheels.sh {wheels}", file=sys.stderr)
        return 2
    # the work directory is needed before torch is imported (unpacked wheels go first on sys.path)
    dry_guess = args.dry_run or not _cuda_visible()
    work = Path(args.work or ROOT / "runs" / ("gpu_check_work_dry" if dry_guess else "gpu_check_work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try: deps = ensure_dependencies(wheels, site_dir(work))
    except (MissingDependencies, ValueError) as e:
        print(f"gpu_check: error: {e}", file=sys.stderr); return 2
    print(f"dependencies: {', '.join(deps['installed_from_wheels']) or 'all present'} ({deps['seconds']:.1f} s)", flush=True)
    if args.check_deps: return 0
    import torch
    cuda = torch.cuda.is_available()
    mode = "dry-run" if (args.dry_run or not cuda) else "gpu"
    if not cuda and not args.dry_run: print("no CUDA device: running the dry run (toy sizes)", flush=True)
    if mode == "dry-run": torch.set_num_threads(1)  # toy models gain nothing from threads; on a busy shared CPU spinning threads cost 2-3x
    p = dict(PROFILES["gpu" if mode == "gpu" else "dry"])
    if args.teacher_budget_s is not None: p["teacher_budget_s"] = args.teacher_budget_s
    out = Path(args.out or ROOT / ("bench/results/gpu_check" if mode == "gpu" else "runs/gpu_check_dry")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # teacher caches of this check stay in its work directory, and start empty: a cache's key names the teacher's
    # directory, not its weights, so a cache left by an earlier check's teacher would be taken for this one's
    shutil.rmtree(work / "cache", ignore_errors=True)
    os.environ["STLM_NB_CACHE"] = str(work / "cache")
    device = "cuda" if mode == "gpu" else "cpu"
    timings = {"dependencies": deps["seconds"]}
    record = {"schema": SCHEMA, "mode": mode, "status": "running", "finished": None, "commit": _git_commit(),
              "command": " ".join(["python", "bench/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine(), "profile": p, "targets": TARGETS, "targets_met": None, "timings_s": timings,
              "dependencies": deps}
    from stlm_nb.runs import write_json
    def checkpoint():  # after each stage: a run killed at a time limit still leaves what it had done
        timings["total"] = time.time() - t_start; write_json(out / "gpu_check.json", record)
    try:
        run_stages(args, p, mode, device, wheels, work, record, checkpoint)
        record["status"] = "ok"
    except Exception:  # a one-shot GPU run still leaves what it got, and why it stopped
        import traceback
        record.update(status="failed", error=traceback.format_exc()[-6000:])
        print(record["error"], file=sys.stderr, flush=True)
    timings["total"] = time.time() - t_start
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if cuda: record["gpu_memory_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if record["status"] == "ok":
        d, total_params = record["distill"], _get(record, "distill", "student_parameters", "total") or 0
        record["targets_met"] = {"cache_tokens": (d["cache_tokens"] or 0) >= TARGETS["cache_tokens"],
                                 "student_parameters": total_params >= TARGETS["student_parameters"],
                                 "seeds": len(p["seeds"]) >= TARGETS["seeds"] and d["kd_minus_ce_bpb"]["n"] == len(p["seeds"]),
                                 "wall_s": timings["total"] < TARGETS["wall_s"]}
    write_json(out / "gpu_check.json", record)
    if (work / "distill" / "metrics.json").exists(): shutil.copyfile(work / "distill" / "metrics.json", out / "distill_metrics.json")
    (out / "summary.md").write_text(summary_markdown(record) if record["status"] == "ok" else
                                    f"# GPU check ({mode}): FAILED\n\nMade by: `{record['command']}`\n\n```\n{record['error']}\n```\n")
    print(f"wrote {out / 'gpu_check.json'} and summary.md; total {timings['total']:.0f} s; status {record['status']}; "
          f"targets met: {record['targets_met']}", flush=True)
    return 0 if record["status"] == "ok" else 1

def run_stages(args, p:dict, mode:str, device:str, wheels, work:Path, record:dict, checkpoint)->None:
    "Corpus and tokenizer, teacher training, the job, the 2-GPU smoke: each stage's results and seconds into `record`, then `checkpoint()`."
    timings = record["timings_s"]
    t0 = time.time()
    corpus_src = Path(args.corpus) if args.corpus else (wheels / "corpus" if wheels is not None and (wheels / "corpus").is_dir() else None)
    corpus = None
    if corpus_src is not None:
        corpus = materialize(corpus_src, work / "corpus") if any(f.suffix == ".xz" for f in corpus_src.rglob("*")) else corpus_src.resolve()
    tok_src = Path(args.tokenizer) if args.tokenizer else (wheels / "tokenizer" if wheels is not None and (wheels / "tokenizer").is_dir() else None)
    if tok_src is not None and any(f.suffix == ".xz" for f in tok_src.rglob("*")): tok_src = materialize(tok_src, work / "tokenizer")
    tok, tok_desc = make_tokenizer(p, corpus, tok_src)
    timings["corpus_and_tokenizer"] = time.time() - t0
    record.update(corpus=str(corpus_src) if corpus_src else "embedded sample", tokenizer=f"{tok_desc} ({len(tok)} tokens)")
    print(f"mode {mode}; corpus {corpus or 'embedded sample'}; tokenizer: {tok_desc} ({len(tok)} tokens)", flush=True)
    checkpoint()

    t0 = time.time()
    teacher_dir = work / "teacher"; shutil.rmtree(teacher_dir, ignore_errors=True)
    record["teacher"] = teacher = train_teacher(p, corpus, tok, teacher_dir, device)
    timings["teacher_training"] = time.time() - t0
    print(f"teacher: {teacher['parameters']['total']:,} parameters, {teacher['steps']} steps, {teacher['tokens_per_s']:,.0f} tokens/s, "
          f"held-out loss {teacher['val_loss_nats_before']:.3f} -> {teacher['val_loss_nats_after']:.3f} ({teacher['train_s']:.0f} s)", flush=True)
    checkpoint()

    t0 = time.time()
    metrics = distill(p, teacher_dir, corpus, work / "distill")
    timings["distillation_job"] = time.time() - t0
    record["distill"] = d = summarize_distill(metrics)
    jt = d["job_timings_s"] or {}
    for k, name in (("data_s", "job_data"), ("teachers_s", "job_teacher_cache")):
        if k in jt: timings[name] = jt[k]
    timings["job_students_and_eval"] = sum(r["wall_s"] or 0 for r in d["runs"].values())
    print(f"job: cache {d['cache_tokens']:,} tokens, student {_get(d, 'student_parameters', 'total'):,} parameters, "
          f"KD - CE per seed {[round(v, 4) for v in d['kd_minus_ce_bpb']['per_seed'] or []]} bits/byte ({timings['distillation_job']:.0f} s)", flush=True)
    checkpoint()

    t0 = time.time()
    record["ddp_smoke"] = ddp = ddp_smoke(teacher_dir, work, force=args.ddp_smoke)
    if ddp["ran"]: timings["ddp_smoke"] = time.time() - t0

def _cuda_visible()->bool:
    "Whether a CUDA device is likely, without importing torch (it must come after the wheels are unpacked)."
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"): return False
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists()

if __name__ == "__main__":
    sys.exit(main())
