"""`stlm_nb.eval.TasksCallback`: log-likelihood task scores logged during training, beside `eval_loss`, at the expected
steps, equal to an independent `evaluate` of the model as it was at that step, without changing training."""
import copy
import json
import re
import subprocess

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from conftest import BIN, ROOT
from stlm_nb.data import collate_blocks, load_corpus, split_corpus
from stlm_nb.eval import (TasksCallback, evaluate, load_blimp, load_hellaswag, offline_tasks, task_curves,
                          task_log_metrics)
from stlm_nb.models import make_student
from stlm_nb.tokenizer import train_bpe
from stlm_nb.trainer import DistillationTrainer, KDConfig

FIX = ROOT / "tests" / "fixtures" / "eval"
KEYS = ["tasks/continuation/acc", "tasks/continuation/acc_norm", "tasks/continuation/acc_per_token", "tasks/minimal_pairs/acc"]


@pytest.fixture(scope="module")
def tok_blocks():
    "A 512-token BPE (a 49k vocabulary would dominate a tiny student's scoring time) and 24 packed blocks of real text."
    texts = split_corpus(load_corpus())["train"]["text"]
    tok = train_bpe(texts[::8], vocab_size=512)
    ids = [i for t in texts[1::16] for i in tok.encode(t) + [tok.eos_token_id]][: 24 * 32]
    rows = [ids[i:i + 32] for i in range(0, len(ids), 32)]
    return tok, Dataset.from_dict({"input_ids": rows, "labels": rows, "block_idx": list(range(len(rows)))})


@pytest.fixture(scope="module")
def small_suite():
    return offline_tasks(n_per_domain=2)  # 18 continuation items, 18 minimal pairs


class Snapshots(TrainerCallback):
    "Added after the TasksCallback: copies of the model and its mode right after each scoring point."
    def __init__(self): self.models, self.modes = {}, {}
    def _take(self, step, model): self.models[step] = copy.deepcopy(model); self.modes[step] = [m.training for m in model.modules()]
    def on_train_begin(self, args, state, control, model=None, **kw): self._take(state.global_step, model)
    def on_step_end(self, args, state, control, model=None, **kw): self._take(state.global_step, model)


def _trainer(tok_blocks, out, callbacks, max_steps=5, seed=0, distill=True, **kw):
    tok, blocks = tok_blocks
    args = TrainingArguments(str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=seed,
                             **{"eval_strategy": "no", "save_strategy": "no", **kw})
    model = make_student("llama-tiny", tokenizer=tok, seed=seed)
    collate = collate_blocks if distill else (lambda rows: {k: v for k, v in collate_blocks(rows).items() if k != "block_idx"})
    common = dict(model=model, args=args, train_dataset=blocks, eval_dataset=blocks.select(range(4)), data_collator=collate,
                  callbacks=callbacks)
    tr = DistillationTrainer(**common, kd=KDConfig(alpha=1.0)) if distill else Trainer(**common)
    tr.remove_callback(PrinterCallback)
    return tr


def test_scores_beside_eval_loss_equal_evaluate_of_snapshots(tok_blocks, small_suite, tmp_path):
    "eval_steps=None follows the Trainer's eval_steps: steps 0 (own entry), 3 and 5 (the end) in the eval_loss entries."
    tok = tok_blocks[0]
    cb, snap = TasksCallback(tok, small_suite, items_per_domain=1, batch_size=16), Snapshots()
    tr = _trainer(tok_blocks, tmp_path, [cb, snap], eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    tr.train()
    logged = {h["step"]: h for h in tr.state.log_history if any(k.startswith("tasks/") for k in h)}
    assert sorted(logged) == [0, 3, 5]
    assert ["eval_loss" in logged[s] for s in (0, 3, 5)] == [False, True, True]
    assert sum("eval_loss" in h for h in tr.state.log_history) == 2  # merged, not duplicated
    subset = offline_tasks(n_per_domain=1)  # independent of task_subset: the suite built smaller
    assert cb.counts == {"continuation": 9, "minimal_pairs": 9}
    for s in (0, 3, 5):
        ref = task_log_metrics(evaluate(snap.models[s].eval(), tok, subset, batch_size=7))
        assert sorted(ref) == KEYS and {k: logged[s][k] for k in KEYS} == ref
        assert logged[s]["tasks/eval_s"] > 0
    assert len({tuple(logged[s][k] for k in KEYS) for s in (0, 3, 5)}) > 1  # the scores moved: a real comparison
    assert all(all(m) for m in snap.modes.values())  # every module back in training mode right after each scoring
    assert [h["step"] for h in cb.history] == [0, 3, 5]
    saved = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in saved if "tasks/minimal_pairs/acc" in h] == [0, 3]  # in the checkpoint's trainer_state.json
    curves = task_curves(tr.state.log_history)
    assert curves["minimal_pairs/acc"] == ([0, 3, 5], [logged[s]["tasks/minimal_pairs/acc"] for s in (0, 3, 5)])


def test_own_schedule_without_evaluation_and_loaded_benchmarks(tok_blocks, tmp_path):
    "An int eval_steps, no held-out evaluation: own entries every 2 steps (+ the end with at_end); any suite, e.g. benchmarks."
    tok = tok_blocks[0]
    bench = {"hellaswag": load_hellaswag(path=FIX / "hellaswag.jsonl"), "blimp": load_blimp(path=FIX / "blimp.jsonl")}
    a = TasksCallback(tok, bench, eval_steps=2, items_per_domain=2, at_start=False, prefix="a")
    b = TasksCallback(tok, bench, eval_steps=2, items_per_domain=2, at_end=False, prefix="b")
    snap = Snapshots()
    tr = _trainer(tok_blocks, tmp_path, [a, b, snap], max_steps=5, distill=False)
    tr.train()
    steps = lambda p: [h["step"] for h in tr.state.log_history if f"{p}/blimp/acc" in h]
    assert steps("a") == [2, 4, 5] and steps("b") == [0, 2, 4]
    assert not any("eval_loss" in h for h in tr.state.log_history)
    assert a.counts == {"hellaswag": 2, "blimp": 2}  # no domain field: the first items
    first2 = {k: v[:2] for k, v in bench.items()}
    for h in (h for h in tr.state.log_history if "a/blimp/acc" in h):
        ref = task_log_metrics(evaluate(snap.models[h["step"]].eval(), tok, first2), prefix="a")
        assert sorted(ref) == ["a/blimp/acc", "a/hellaswag/acc", "a/hellaswag/acc_norm", "a/hellaswag/acc_per_token"]
        assert {k: h[k] for k in ref} == ref


def test_training_is_unchanged_by_the_callback(tok_blocks, small_suite, tmp_path):
    "Scoring draws no random numbers and leaves no gradients: the same losses and final weights, bit for bit."
    runs = []
    for i, cbs in enumerate(([], [TasksCallback(tok_blocks[0], small_suite, eval_steps=1, items_per_domain=1)])):
        tr = _trainer(tok_blocks, tmp_path / str(i), cbs, max_steps=3, eval_strategy="steps", eval_steps=2)
        tr.train()
        runs.append(([(h["step"], h.get("loss"), h.get("eval_loss")) for h in tr.state.log_history if "loss" in h or "eval_loss" in h],
                     {k: v.clone() for k, v in tr.model.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_score_is_gradient_free_in_eval_mode_and_restores_each_module(tok_blocks, small_suite):
    tok = tok_blocks[0]
    model = make_student("llama-tiny", tokenizer=tok, seed=0).train()
    model.model.layers[1].eval()  # a mixed state must come back exactly as it was
    before = [m.training for m in model.modules()]
    seen = []
    hook = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.training)))
    cb = TasksCallback(tok, small_suite, items_per_domain=1)
    out = cb.score(model)
    hook.remove()
    assert seen and set(seen) == {(False, False)}
    assert [m.training for m in model.modules()] == before
    assert all(p.grad is None for p in model.parameters())
    assert sorted(out) == sorted(KEYS + ["tasks/eval_s"]) and all(0 <= out[k] <= 1 for k in KEYS)


def test_resume_keeps_earlier_scores_and_does_not_rescore_step_0(tok_blocks, small_suite, tmp_path):
    tok = tok_blocks[0]
    tr = _trainer(tok_blocks, tmp_path, [TasksCallback(tok, small_suite, eval_steps=2, items_per_domain=1)], max_steps=4,
                  save_strategy="steps", save_steps=2)
    tr.train()
    full = [(h["step"], h["tasks/minimal_pairs/acc"]) for h in tr.state.log_history if "tasks/minimal_pairs/acc" in h]
    cb = TasksCallback(tok, small_suite, eval_steps=2, items_per_domain=1)
    tr2 = _trainer(tok_blocks, tmp_path, [cb], max_steps=4, save_strategy="steps", save_steps=2)
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed = [(h["step"], h["tasks/minimal_pairs/acc"]) for h in tr2.state.log_history if "tasks/minimal_pairs/acc" in h]
    assert [s for s, _ in full] == [0, 2, 4] and resumed == full  # step 0 and 2 from the checkpoint, 4 scored again alike
    assert [h["step"] for h in cb.history] == [4]


def test_bad_arguments_are_refused_by_name(tok_blocks, small_suite, tmp_path):
    tok = tok_blocks[0]
    for v in (0, -1, True, 2.5, "10"):
        with pytest.raises(ValueError, match=re.escape(f"eval_steps={v!r}; accepted: an int >= 1")): TasksCallback(tok, small_suite, eval_steps=v)
    for v in (0, -3, False, 8.0, "8"):
        with pytest.raises(ValueError, match=re.escape(f"items_per_domain={v!r}; accepted: an int >= 1, or None")):
            TasksCallback(tok, small_suite, items_per_domain=v)
    with pytest.raises(ValueError, match="batch_size=0"): TasksCallback(tok, small_suite, batch_size=0)
    with pytest.raises(ValueError, match="suite='hub'"): TasksCallback(tok, "hub")
    with pytest.raises(ValueError, match="non-empty list"): TasksCallback(tok, {"continuation": []})
    with pytest.raises(ValueError, match="non-empty dict"): TasksCallback(tok, {})
    with pytest.raises(ValueError, match="corpus: only for suite='offline'"): TasksCallback(tok, small_suite, corpus="x")
    # eval_steps=None needs the Trainer's step-wise evaluation: refused at Trainer(...), or at train() when added later
    with pytest.raises(ValueError, match="eval_steps=None follows the Trainer's eval_steps, but eval_strategy="):
        _trainer(tok_blocks, tmp_path, [TasksCallback(tok, small_suite)])
    tr = _trainer(tok_blocks, tmp_path, [])
    tr.add_callback(TasksCallback(tok, small_suite))
    with pytest.raises(ValueError, match="eval_strategy='steps', or an int eval_steps"): tr.train()
    assert TasksCallback(tok, "offline", items_per_domain=1, domains=["bible_kjv", "fortunes"]).counts == {"continuation": 2, "minimal_pairs": 2}


DDP_SCRIPT = r'''
import json, os, sys
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer, TrainingArguments
from stlm_nb.data import collate_blocks
from stlm_nb.eval import TasksCallback, offline_tasks
from stlm_nb.models import make_student
from stlm_nb.trainer import DistillationTrainer, KDConfig
out, tok_dir = sys.argv[1], sys.argv[2]
state = PartialState(cpu=True)
tok = AutoTokenizer.from_pretrained(tok_dir)
blocks = Dataset.from_json(os.path.join(tok_dir, "blocks.jsonl"))
args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, eval_strategy="steps", eval_steps=2,
                         save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
cb = TasksCallback(tok, offline_tasks(n_per_domain=1), items_per_domain=1)
tr = DistillationTrainer(model=make_student("llama-tiny", tokenizer=tok, seed=0), args=args, train_dataset=blocks,
                         eval_dataset=blocks.select(range(4)), data_collator=collate_blocks, kd=KDConfig(alpha=1.0), callbacks=[cb])
tr.train()
with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
    json.dump({"world": state.num_processes, "log": [h for h in tr.state.log_history if "tasks/minimal_pairs/acc" in h]}, f)
'''


def test_two_rank_ddp_scores_on_every_rank_without_deadlock(tok_blocks, tmp_path, env):
    "Under 2-process DDP (CPU, gloo) both ranks finish and log the same task scores at the same steps, beside eval_loss."
    tok, blocks = tok_blocks
    tok.save_pretrained(tmp_path / "tok"); blocks.to_json(tmp_path / "tok" / "blocks.jsonl")
    script = tmp_path / "tasks_ddp.py"; script.write_text(DDP_SCRIPT)
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29547", str(script), str(tmp_path), str(tmp_path / "tok")],
                       env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert [h["step"] for h in r0["log"]] == [0, 2, 4] and all("eval_loss" in h for h in r0["log"][1:])
    strip = lambda log: [{k: v for k, v in h.items() if k != "tasks/eval_s" and not k.startswith("eval_")} for h in log]
    assert strip(r0["log"]) == strip(r1["log"])  # the same weights on both ranks: the same scores
