"""The `stlm-distill` command: a run, kill-and-resume, refusal to overwrite, and 2-process DDP on CPU (gloo)."""
import json
import signal
import subprocess
import time

from conftest import BIN


def _cmd(out, *extra):
    return [str(BIN / "stlm-distill"), "--smoke", "true", "--out_dir", str(out), *extra]


def test_cli_kill_and_resume(tmp_path, env):
    out = tmp_path / "run"
    args = _cmd(out, "--max_steps", "60", "--save_steps", "5", "--baseline", "false")
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "kd-seed0" / "checkpoint-5"
    deadline = time.time() + 240
    while not (ckpt / "trainer_state.json").exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out / "kd-seed0" / "final").exists(), "killed too late: training had finished"
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    run = m["runs"]["kd-seed0"]
    assert run["resumed"] is True and run["resumed_from_step"] >= 5   # continued from the checkpoint, not from step 0
    steps = [h["step"] for h in run["log_history"] if "loss" in h]
    assert steps == list(range(1, 61))  # the checkpoint's history plus the resumed steps: each step exactly once
    # a completed run is never overwritten silently
    r2 = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode != 0 and "already holds a completed run" in r2.stderr


def test_cli_ddp_two_processes_match_one(tmp_path, env):
    env = dict(env, OMP_NUM_THREADS="1")
    common = ("--max_steps", "6", "--baseline", "false", "--learning_rate", "1e-3")
    ddp_out, one_out = tmp_path / "ddp", tmp_path / "one"
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "stlm_nb.trainer",
                        "--smoke", "true", "--out_dir", str(ddp_out), "--per_device_train_batch_size", "4", *common],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    # the run saw its process group (a TrainingArguments built on a CPU before run_distillation once made every rank
    # start as rank 0 and race on out_dir: run_distillation now restarts accelerate's state as the group it is)
    assert json.loads((ddp_out / "metrics.json").read_text())["world_size"] == 2
    r0 = json.loads((ddp_out / "rank0-kd-seed0.json").read_text())
    r1 = json.loads((ddp_out / "rank1-kd-seed0.json").read_text())
    assert r0["param_sum"] == r1["param_sum"]           # DDP keeps the replicas identical
    assert r0["eval_all"]["nll"] == r1["eval_all"]["nll"]
    r = subprocess.run(_cmd(one_out, "--per_device_train_batch_size", "8", *common), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    one = json.loads((one_out / "metrics.json").read_text())["runs"]["kd-seed0"]
    ddp = json.loads((ddp_out / "metrics.json").read_text())["runs"]["kd-seed0"]
    assert ddp["tokens_seen"] == one["tokens_seen"]     # same global batch: 2 ranks x 4 = 1 x 8
    # same init and global batch size; the samplers order the blocks differently, so equal within tolerance
    assert abs(ddp["eval"]["all"]["nll"] - one["eval"]["all"]["nll"]) / one["eval"]["all"]["nll"] < 0.02
    # logged parts are global, not rank-local: loss = alpha*train_ce + (1-alpha)*train_kd at every logged step (T = 1)
    logged = [h for h in ddp["log_history"] if "loss" in h and "train_ce" in h]
    assert len(logged) == 6
    for h in logged:
        assert abs(h["loss"] - (0.5 * h["train_ce"] + 0.5 * h["train_kd"])) < 2e-3 * h["loss"], h
    # eval_loss is the held-out mean CE, not divided by the world size
    ev_ddp = [h["eval_loss"] for h in ddp["log_history"] if "eval_loss" in h]
    ev_one = [h["eval_loss"] for h in one["log_history"] if "eval_loss" in h]
    assert ev_ddp and abs(ev_ddp[-1] - ev_one[-1]) / ev_one[-1] < 0.02


def test_cli_ddp_online_teacher(tmp_path, env):
    "An online teacher under DDP: rank 0 builds the held-out cache (fresh cache dir), the other rank waits and opens it."
    env = dict(env, OMP_NUM_THREADS="1", STLM_NB_CACHE=str(tmp_path / "cache"))
    teachers = tmp_path / "cache" / "teachers"; teachers.parent.mkdir()
    src = __import__("stlm_nb.runs", fromlist=["cache_dir"]).cache_dir() / "teachers"
    teachers.symlink_to(src)  # the converted teacher is reused; the teacher caches start empty
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29534", "-m", "stlm_nb.trainer",
                        "--smoke", "true", "--out_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "4", "--max_steps", "2",
                        "--baseline", "false", "--teacher_mode", "online", "--tasks_per_domain", "0"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not list((tmp_path / "cache" / "teacher_cache").glob("*.partial"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["runs"]["kd-seed0"]["eval"]["all"]["nll"] > 0


def test_cli_errors_are_one_line_exit_2(tmp_path, env):
    r = subprocess.run(_cmd(tmp_path / "run", "--alpha", "2"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("stlm-distill: error: alpha=2.0: must be in [0, 1]") and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    r = subprocess.run(_cmd(tmp_path / "run", "--alpha", "2", "--debug"), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr
