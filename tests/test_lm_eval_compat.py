"""A model saved by this workbook loads in lm-evaluation-harness (`lm_eval --model hf --model_args pretrained=DIR`),
and the harness scores our offline tasks exactly as `stlm_nb.eval` does: the same per-choice log-likelihoods and the
same acc / acc_norm. Skipped when `lm_eval` is not installed."""
import json
import math
import subprocess

import pytest

pytest.importorskip("lm_eval")

from conftest import BIN
from stlm_nb.eval import evaluate_minimal_pairs, evaluate_multiple_choice, offline_tasks
from stlm_nb.models import load_teacher_tokenizer, make_student

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
{fields}
"""
CONTINUATION_FIELDS = "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm"
PAIRS_FIELDS = 'doc_to_text: ""\ndoc_to_choice: "{{[sentence_good, sentence_bad]}}"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc'


def test_lm_eval_harness_matches_our_scorer(tmp_path, env):
    tok = load_teacher_tokenizer("smollm2-135m")
    model = make_student("llama-tiny", tokenizer=tok, seed=0)
    save = tmp_path / "student"
    model.save_pretrained(save); tok.save_pretrained(save)
    tasks = offline_tasks(n_per_domain=2)
    mc = [d for d in tasks["continuation"] if d["target_delimiter"] == " "][:12]   # the harness's default delimiter
    pairs = tasks["minimal_pairs"][:12]
    tdir = tmp_path / "tasks"; tdir.mkdir()
    for name, task, rows, fields in (("continuation", "stlm_continuation", mc, CONTINUATION_FIELDS),
                                     ("pairs", "stlm_minimal_pairs", pairs, PAIRS_FIELDS)):
        (tdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tdir / f"{name}.yaml").write_text(TASK_YAML.format(task=task, path=tdir / f"{name}.jsonl", fields=fields))
    out = tmp_path / "out"
    r = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={save},dtype=float32",
                        "--tasks", "stlm_continuation,stlm_minimal_pairs", "--include_path", str(tdir), "--device", "cpu",
                        "--batch_size", "8", "--output_path", str(out), "--log_samples"],
                       env=dict(env, OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {t: sorted((json.loads(l) for p in out.rglob(f"samples_{t}_*.jsonl") for l in p.read_text().splitlines()),
                         key=lambda s: s["doc_id"]) for t in ("stlm_continuation", "stlm_minimal_pairs")}

    ours_mc = evaluate_multiple_choice(model, tok, mc, batch_size=8, return_scores=True)
    ours_mp = evaluate_minimal_pairs(model, tok, pairs, batch_size=8, return_scores=True)
    for task, ours in (("stlm_continuation", ours_mc), ("stlm_minimal_pairs", ours_mp)):
        theirs = [[float(x[0]) for x in s["filtered_resps"]] for s in samples[task]]
        assert len(theirs) == len(ours["scores"])
        for a, b in zip(ours["scores"], theirs):
            assert all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-4) for x, y in zip(a, b)), (a, b)
        # no exact ties here, so the harness's argmax and our strict comparison agree
        assert all(len(set(s)) == len(s) for s in ours["scores"])
    assert math.isclose(results["stlm_continuation"]["acc,none"], ours_mc["acc"], abs_tol=1e-12)
    assert math.isclose(results["stlm_continuation"]["acc_norm,none"], ours_mc["acc_norm"], abs_tol=1e-12)
    assert math.isclose(results["stlm_minimal_pairs"]["acc,none"], ours_mp["acc"], abs_tol=1e-12)
