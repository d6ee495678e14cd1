"""The sweep runner end to end on tiny models: a 2 x 2 grid (alpha x temperature) with 2 paired seeds, killed with
SIGKILL right after a checkpoint in the middle of its fourth job, then resumed; the aggregate is checked against a hand
computation from the jobs' own metrics.json."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from stlm_nb.runs import t_quantile_975
from stlm_nb.sweep import Claim, Study, run_study


def _study(teacher):
    base = {"teachers": [teacher], "student": "llama-tiny", "train_tokens": 2_048, "eval_tokens_per_domain": 256, "block_size": 64,
            "top_k": 8, "tasks_per_domain": 2, "tasks_eval_steps": 0, "num_train_epochs": 1.0, "logging_steps": 1, "eval_steps": 2,
            "save_steps": 2}  # 4 optimiser steps per student: a checkpoint at step 2 is the resume point
    return Study("tiny", "2 x 2 test grid", grid={"alpha": [0.25, 0.5], "temperature": [1.0, 2.0]}, base=base,
                 claims=[Claim("KD (alpha 0.5, T 1) beats CE-only", {"alpha": 0.5, "temperature": 1.0}),
                         Claim("T 1 = T 2 at alpha 0.5", {"alpha": 0.5, "temperature": 1.0}, {"alpha": 0.5, "temperature": 2.0}, "=", 0.5)])


KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    import stlm_nb.trainer as T
    sys.path.insert(0, {tests!r}); from test_sweep import _study
    from stlm_nb.sweep import run_study
    class Kill(TrainerCallback):  # SIGKILL right after job 4's first checkpoint: nothing gets to clean up
        def on_save(self, args, state, control, **kw):
            if "alpha=0.5_temperature=1" in args.output_dir and state.global_step == 2: os.kill(os.getpid(), signal.SIGKILL)
    train = T.train_student
    T.train_student = lambda *a, callbacks=None, **k: train(*a, callbacks=(callbacks or []) + [Kill()], **k)
    run_study(_study({teacher!r}), {out!r}, seeds=[0, 1], progress=False)
""")


def test_grid_killed_and_resumed(tmp_path, tiny_teacher, env, one_thread):
    out = tmp_path / "study"
    script = KILLER.format(tests=str(__import__("pathlib").Path(__file__).parent), teacher=str(tiny_teacher), out=str(out))
    p = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert p.returncode == -9, p.stderr[-3000:]  # killed, not finished
    jobs = json.loads((out / "jobs.json").read_text())
    assert [j["name"] for j in jobs] == ["ce", "alpha=0.25_temperature=1", "alpha=0.25_temperature=2", "alpha=0.5_temperature=1",
                                         "alpha=0.5_temperature=2"]
    done = {j["name"]: (out / j["dir"] / "metrics.json").stat().st_mtime_ns for j in jobs[:3]}
    assert not (out / "cells/alpha=0.5_temperature=1/metrics.json").exists()
    assert (out / "cells/alpha=0.5_temperature=1/kd-seed0/checkpoint-2").is_dir()
    assert not (out / "metrics.json").exists()
    with pytest.raises(ValueError, match="unfinished run with another configuration"):  # another grid in the same directory
        run_study(Study("tiny", "other", grid={"alpha": [0.3]}, base=_study(str(tiny_teacher)).base), out, seeds=[0, 1], progress=False)

    res = run_study(_study(str(tiny_teacher)), out, seeds=[0, 1], progress=False)  # resume
    for j in jobs[:3]:  # finished jobs are not run again
        assert (out / j["dir"] / "metrics.json").stat().st_mtime_ns == done[j["name"]]
    m4 = json.loads((out / "cells/alpha=0.5_temperature=1/metrics.json").read_text())
    assert m4["runs"]["kd-seed0"]["resumed"] and m4["runs"]["kd-seed0"]["resumed_from_step"] == 2
    assert m4["runs"]["kd-seed0"]["global_step"] == 4 and not m4["runs"]["kd-seed1"]["resumed"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["timings"]["jobs_run"] == 2 and metrics["experiment"] == "recipes"

    # the aggregate equals a hand computation from the jobs' metrics.json
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 10 and set(table.arm) == {"kd", "ce"} and sorted(table.seed.unique()) == [0, 1]
    ce = json.loads((out / "baselines/ce/metrics.json").read_text())
    assert {r["alpha"] for r in ce["runs"].values()} == {1.0}
    d = np.array([m4["runs"][f"kd-seed{s}"]["eval"]["all"]["bpb"] - ce["runs"][f"kd-seed{s}"]["eval"]["all"]["bpb"] for s in (0, 1)])
    row = pd.read_csv(out / "paired.csv").query("cell == 'alpha=0.5_temperature=1' and metric == 'bpb'").iloc[0]
    assert row["n"] == 2 and row["baseline"] == "ce"
    np.testing.assert_allclose([row["mean"], row["std"]], [d.mean(), d.std(ddof=1)], rtol=1e-12)
    np.testing.assert_allclose(row["ci_hi"], d.mean() + t_quantile_975(1) * d.std(ddof=1) / np.sqrt(2), rtol=1e-9)
    assert res["verdicts"][0]["a"] == "alpha=0.5_temperature=1" and res["verdicts"][0]["b"] == "ce"
    assert res["verdicts"][1]["b"] == "alpha=0.5_temperature=2"
    assert all(v["verdict"] in ("supported", "contradicted", "not resolved at this power") for v in res["verdicts"])
    kd = table[table.arm == "kd"]
    assert (kd.teacher_flops > 0).all() and (table[table.arm == "ce"].teacher_flops == 0).all()
    assert (table.tokens_seen == 4 * 8 * 64).all()
    with pytest.raises(ValueError, match="already holds a completed run"):  # nothing is silently replaced
        run_study(_study(str(tiny_teacher)), out, seeds=[0, 1], progress=False)
