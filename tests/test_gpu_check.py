"""bench/gpu_check.py: the dry run (the CPU path CI checks: the GPU run's code at toy sizes), a failed stage's record,
the wheel logic of the air-gapped GPU box (hand-made wheels, no network), and the folder's package list end to end in
a venv that holds only what the box is assumed to have."""
import importlib.util
import json
import lzma
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(spec); spec.loader.exec_module(gc)


def _run(args, env, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_dry_run_writes_the_metrics_layout(tmp_path, env):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _run(["--dry-run", "--out", str(out), "--work", str(work)], env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "2-GPU smoke: skipped" in r.stdout
    rec = json.loads((out / "gpu_check.json").read_text())
    assert rec["schema"] == gc.SCHEMA and rec["mode"] == "dry-run" and rec["status"] == "ok" and rec["machine"]["gpu"] is None
    assert {"dependencies", "corpus_and_tokenizer", "teacher_training", "distillation_job", "total"} <= set(rec["timings_s"])
    assert all(v >= 0 for v in rec["timings_s"].values())
    t = rec["teacher"]
    assert t["steps"] > 0 and t["tokens"] == t["steps"] * t["batch_blocks"] * t["block_size"]
    assert t["val_loss_nats_after"] < t["val_loss_nats_before"]  # the teacher trained here learned something
    assert (work / "teacher" / "config.json").exists() and (work / "teacher" / "tokenizer.json").exists()
    d = rec["distill"]
    job = json.loads((out / "distill_metrics.json").read_text())  # the job's own metrics, copied beside
    assert d["cache_tokens"] == job["flops"]["teacher_cache_tokens"] > 0
    from stlm_nb.models import count_parameters, make_student
    assert d["student_parameters"]["total"] == count_parameters(make_student("llama-tiny", vocab_size=512))["total"]
    seeds = rec["profile"]["seeds"]
    assert len(seeds) == 3 and len(d["kd_minus_ce_bpb"]["per_seed"]) == 3
    for s, diff in zip(seeds, d["kd_minus_ce_bpb"]["per_seed"]):  # KD - CE recomputed from the per-run bits per byte
        assert abs(diff - (d["runs"][f"kd-seed{s}"]["bpb"] - d["runs"][f"ce-seed{s}"]["bpb"])) < 1e-12
    assert d["students_tokens_per_s"] > 0
    assert rec["targets_met"]["seeds"] and not rec["targets_met"]["cache_tokens"]  # toy sizes: honestly below target
    assert rec["ddp_smoke"] == {"ran": False, "reason": "0 CUDA device(s)"}
    md = (out / "summary.md").read_text()
    assert "GPU check (dry-run)" in md and "KD - CE" in md and "2-GPU smoke: skipped" in md


def test_a_failed_stage_still_leaves_its_record(tmp_path, env):
    "A one-shot GPU run that fails part-way writes gpu_check.json and summary.md with the error, and exits 1."
    out = tmp_path / "out"
    r = _run(["--dry-run", "--tokenizer", str(tmp_path / "no-tokenizer"), "--out", str(out), "--work", str(tmp_path / "work")], env)
    assert r.returncode == 1, r.stderr[-3000:]
    rec = json.loads((out / "gpu_check.json").read_text())
    assert rec["status"] == "failed" and "no-tokenizer" in rec["error"] and rec["targets_met"] is None
    assert "teacher" not in rec and rec["machine"]["torch"] and "total" in rec["timings_s"]
    assert "FAILED" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_ddp_smoke_two_processes_agree(tmp_path, env):
    "The 2-process smoke's worker under torchrun on CPU (gloo): both ranks join, and their students agree."
    r = _run(["--dry-run", "--ddp-smoke", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")], env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ddp = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["ddp_smoke"]
    assert ddp["ran"] and ddp["returncode"] == 0 and ddp["ranks"] == 2 and ddp["ranks_agree"] and ddp["world_size"] == 2


# --- wheels ------------------------------------------------------------------------------------------------------

def _wheel(d, name, version, requires=(), tag="py3-none-any", files=None, xz=False):
    "A minimal wheel: a module `name` holding VERSION, METADATA with Requires-Dist, optionally xz-compressed."
    dist = f"{name}-{version}.dist-info"
    path = d / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if xz else zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        for f, text in (files or {}).items(): z.writestr(f, text)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: %s\nVersion: %s\n%s" % (
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)))
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: %s\n" % tag)
        z.writestr(f"{dist}/RECORD", "")
    if xz:
        with open(path, "rb") as a, lzma.open(str(path) + ".xz", "wb") as b: b.write(a.read())
        path.unlink(); path = path.with_name(path.name + ".xz")
    return path


def test_plan_wheels_resolves_and_unpacks(tmp_path, monkeypatch):
    wd = tmp_path / "wheels"; wd.mkdir()
    _wheel(wd, "gcalpha", "1.0", ["gcbeta>=2", "gcgamma; python_version < '3'", "gcdelta; extra == 'x'"],
           files={"gcalpha-1.0.data/purelib/gcalpha_extra.py": "X = 1\n", "gcalpha-1.0.data/scripts/tool": "#!/bin/sh\n"})
    _wheel(wd, "gcbeta", "1.9")
    _wheel(wd, "gcbeta", "2.1", xz=True)                             # the highest fitting version, stored xz-compressed
    _wheel(wd, "gcbeta", "3.0", tag="cp27-cp27mu-manylinux1_x86_64")  # not for this interpreter: ignored
    installed = {"gcbeta": "1.5"}.get                                # installed, but too old for gcalpha
    plan = gc.plan_wheels(["gcalpha"], wd, unpack_dir=tmp_path / "unpacked", installed=installed)
    assert sorted(p.name for p in plan) == ["gcalpha-1.0-py3-none-any.whl", "gcbeta-2.1-py3-none-any.whl"]
    site = tmp_path / "site"
    gc.unpack_wheels(plan, site)
    assert (site / "gcalpha_extra.py").exists() and not (site / "tool").exists() and not any(site.glob("*.data"))
    monkeypatch.syspath_prepend(str(site))
    import gcalpha, gcbeta
    assert gcalpha.VERSION == "1.0" and gcbeta.VERSION == "2.1"
    # installed at a fitting version: nothing to unpack
    assert gc.plan_wheels(["gcalpha"], wd, installed={"gcalpha": "1.0"}.get) == []


def test_plan_wheels_says_what_is_missing(tmp_path):
    wd = tmp_path / "wheels"; wd.mkdir()
    with pytest.raises(gc.MissingDependencies) as e:  # an empty folder
        gc.plan_wheels(["datasets"], wd, installed=lambda n: None)
    msg = str(e.value)
    assert "datasets (needed by stlm_nb; installed: none)" in msg and "0 usable wheels" in msg
    assert "bash bench/prepare_gpu_wheels.sh DIR" in msg
    _wheel(wd, "gcalpha", "1.0", ["gcbeta>=5"])
    _wheel(wd, "gcbeta", "2.1")
    with pytest.raises(gc.MissingDependencies, match=r"gcbeta>=5 \(needed by gcalpha 1.0; installed: none\)"):
        gc.plan_wheels(["gcalpha"], wd, installed=lambda n: None)
    with pytest.raises(gc.MissingDependencies, match=r"no wheel folder was given \(--wheels DIR\)"):
        gc.plan_wheels(["gcalpha"], None, installed=lambda n: None)
    with pytest.raises(ValueError, match="no such directory"):
        gc.plan_wheels(["gcalpha"], tmp_path / "nowhere")


def test_command_line_wheel_errors(tmp_path, env):
    r = _run(["--check-deps", "--wheels", str(tmp_path / "nowhere"), "--work", str(tmp_path / "work")], env, timeout=120)
    assert r.returncode == 2 and "no such directory" in r.stderr and "prepare_gpu_wheels.sh" in r.stderr
    (tmp_path / "empty").mkdir()  # everything is installed in the project's venv: an empty folder is enough
    r = _run(["--check-deps", "--wheels", str(tmp_path / "empty"), "--work", str(tmp_path / "work")], env, timeout=120)
    assert r.returncode == 0 and "dependencies: all present" in r.stdout, r.stderr[-2000:]


def _bare_env(path, dists):
    "A venv whose site-packages holds only `dists` (links into this venv's): a GPU box with just those installed."
    import importlib.metadata as md
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = next(path.glob("lib/python*/site-packages"))
    for n in dists:
        d = md.distribution(n)
        for top in {f.parts[0] for f in d.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            src, dst = d.locate_file(top), site / top
            if src.exists() and not dst.exists(): dst.symlink_to(src)
    return path / "bin" / "python"


def _wheel_of_installed(d, name):
    "A wheel (stored, tagged py3-none-any) holding an installed distribution's files: the folder's wheel, made offline."
    import importlib.metadata as md
    dist = md.distribution(name)
    path = d / f"{gc._canon(name).replace('-', '_')}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in dist.files or []:
            src = dist.locate_file(f)
            if f.parts[0] not in ("..", "__pycache__") and "__pycache__" not in f.parts and src.is_file(): z.write(src, str(f))
    return path


def test_wheel_folder_makes_the_trainer_importable(tmp_path, env):
    """The air-gapped path end to end, offline: a box with only what PROVIDED needs fails with a clear message; with a
    folder of wheels for `wheel_list()` (made here from the installed distributions) gpu_check unpacks them, and then
    `import stlm_nb.trainer` works and datasets fingerprints a mapped dataset (dill pickles the unpacked modules by
    reference only under a directory named site-packages)."""
    carried = [s.split("==")[0] for s in gc.wheel_list()]
    provided = set(gc.closure(gc.PROVIDED))
    assert {"datasets", "pyarrow", "pandas", "plotly"} <= set(carried) and not set(carried) & {"torch", "numpy", "transformers"}
    py = _bare_env(tmp_path / "box", provided - set(map(gc._canon, carried)))  # fsspec: torch's, carried in case of a newer one
    env = dict(env, PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    work = tmp_path / "work"
    r = subprocess.run([str(py), str(SCRIPT), "--check-deps", "--work", str(work)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "datasets>=3 (needed by stlm_nb; installed: none)" in r.stderr, r.stderr[-3000:]
    wheels = tmp_path / "wheels"; wheels.mkdir()
    for n in carried: _wheel_of_installed(wheels, n)
    r = subprocess.run([str(py), str(SCRIPT), "--check-deps", "--wheels", str(wheels), "--work", str(work)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "dependencies: datasets-" in r.stdout, r.stderr[-3000:]
    site = next(work.glob("py3.*/site-packages"))  # the box's Python here is this venv's
    assert (site / "pyarrow").is_dir() and not (site.parent / "wheels_unpacked").exists()
    code = ("import stlm_nb.trainer, datasets, pyarrow; assert pyarrow.__file__.startswith(%r); "
            "ds = datasets.Dataset.from_dict({'x': [1, 2]}).map(lambda r: {'y': r['x'] + 1}); print('ok', list(ds['y']))" % str(site))
    r = subprocess.run([str(py), "-c", code], env=dict(env, PYTHONPATH=f"{site}:{ROOT}"), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "ok [2, 3]" in r.stdout, r.stderr[-3000:]


def test_requirement_floors_match_settings():
    "The versions gpu_check.py demands of the box and of the folder are the project's own floors (settings.ini)."
    import configparser
    from packaging.requirements import Requirement
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    project = {gc._canon(Requirement(r).name): Requirement(r).specifier for r in cfg["DEFAULT"]["requirements"].split()}
    for r in map(Requirement, gc.PROVIDED + gc.NEEDS):
        if gc._canon(r.name) in project: assert r.specifier == project[gc._canon(r.name)], r
    assert {"torch", "transformers", "accelerate", "datasets", "plotly"} <= {gc._canon(Requirement(r).name) for r in gc.PROVIDED + gc.NEEDS}


def test_prepare_script_refuses_bad_arguments(tmp_path):
    "The wheel script's usage and argument checks (no network: it stops before pip)."
    sh = ROOT / "bench" / "prepare_gpu_wheels.sh"
    r = subprocess.run(["bash", str(sh)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bash bench/prepare_gpu_wheels.sh DIR [PYTHON_VERSION ...]" in r.stdout
    r = subprocess.run(["bash", str(sh), str(tmp_path / "w"), "3.x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "PYTHON_VERSION=3.x" in r.stderr and not (tmp_path / "w").exists()
