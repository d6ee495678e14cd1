"""Adapted teachers plug into run_distillation like any teacher (cache, ensembles); the vocabulary check still refuses
an unadapted one; the adaptation experiment notebook runs through papermill with its smoke parameters."""
import json
import math

import papermill as pm
import pytest
import torch
from conftest import ROOT

from stlm_nb.adapt import adapt_vocabulary, save_adapted_teacher
from stlm_nb.data import load_corpus, split_corpus
from stlm_nb.models import load_teacher, make_student
from stlm_nb.tokenizer import train_bpe
from stlm_nb.trainer import DistillConfig, run_distillation


@pytest.fixture(scope="module")
def tokenizers():
    texts = split_corpus(load_corpus())["train"]["text"]
    return train_bpe(texts[:300], vocab_size=600), train_bpe(texts[300:600], vocab_size=500)  # teacher's, student's


def _teacher_dir(path, teacher_tok, student_tok, arch, init):
    "A tiny teacher (LLaMA tied or GPT-2 untied) with its own tokenizer, adapted to the student's and saved."
    if arch == "llama": t = make_student("llama-tiny", tokenizer=teacher_tok, seed=1)
    else: t = make_student("gpt2-7m", tokenizer=teacher_tok, seed=2, n_layer=1, n_embd=32, n_head=2, tie_word_embeddings=False)
    return save_adapted_teacher(adapt_vocabulary(t, teacher_tok, student_tok, init=init), student_tok, path, metadata={"arch": arch})


def test_adapted_teachers_distil_through_cache_and_ensemble(tmp_path, tokenizers):
    teacher_tok, student_tok = tokenizers
    a = _teacher_dir(tmp_path / "llama-adapted", teacher_tok, student_tok, "llama", "spelled")
    b = _teacher_dir(tmp_path / "gpt2-adapted", teacher_tok, student_tok, "gpt2", "random")
    model, tok = load_teacher(a)
    assert tok.get_vocab() == student_tok.get_vocab() and model.config.vocab_size == len(student_tok)
    m = run_distillation(DistillConfig.from_parameters(teachers=[str(a), str(b)], tokenizer=str(a), smoke=True, max_steps=2, baseline=False,
                                                       out_dir=str(tmp_path / "run")))
    assert set(m["teacher"]) == {str(a), str(b)}
    for name in (str(a), str(b)):  # each teacher's held-out loss comes from its own cache: finite, and not the same model
        assert 0 < m["teacher"][name]["all"]["bpb"] < 50
    assert m["teacher"][str(a)]["all"]["bpb"] != m["teacher"][str(b)]["all"]["bpb"]
    kd = m["runs"]["kd-seed0"]
    assert any("train_kd" in h for h in kd["log_history"]) and kd["eval"]["all"]["bpb"] > 0


def test_unadapted_teacher_is_refused(tmp_path, tokenizers):
    teacher_tok, student_tok = tokenizers
    raw = tmp_path / "raw"
    t = make_student("llama-tiny", tokenizer=teacher_tok, seed=1)
    t.save_pretrained(raw); teacher_tok.save_pretrained(raw)
    adapted = _teacher_dir(tmp_path / "adapted", teacher_tok, student_tok, "llama", "spelled")
    with pytest.raises(ValueError, match="adapt the teacher first"):
        run_distillation(DistillConfig.from_parameters(teachers=[str(raw)], tokenizer=str(adapted), smoke=True, out_dir=str(tmp_path / "run")))


def _run_notebook(tmp_path, **params):
    out = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "adapt_teacher.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"smoke": True, "out_dir": str(out), **params}, cwd=str(ROOT), progress_bar=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["experiment"] == "adapt_teacher" and m["config"]["smoke"] is True and m["config"]["inits"] == ["spelled", "random"]
    assert m["precision"]["name"] in ("fp32", "bf16") and "torch" in m["versions"]
    assert set(m["bpb"]) == {"original", "adapted-spelled", "adapted-random"}
    # spelled starts far closer to the teacher than random (most rows are copies of the teacher's own)
    first = {i: next(h["eval_loss"] for h in m["histories"][i] if "eval_loss" in h) for i in ("spelled", "random")}
    assert first["spelled"] < first["random"]
    for name in ("adaptation_curves", "bpb_per_domain", "offline_tasks"):
        assert 1_000 < (out / f"{name}.html").stat().st_size < 100_000 and (out / "plotly.min.js").exists()  # shared plotly.js
    assert (out / "verdict.txt").read_text().startswith("After 2 steps")
    return m


@pytest.mark.usefixtures("one_thread")
def test_adapt_teacher_notebook_smoke(tmp_path, tiny_teacher):
    "Seconds: a tiny trained teacher with a 512-token BPE is adapted (the packaged teacher's run is the slow test below)."
    m = _run_notebook(tmp_path, teacher=str(tiny_teacher))
    tk, p = m["tokenizers"], m["model_parameters"]
    assert tk["teacher_vocab"] == 512 and tk["student_vocab"] == 2_000 == sum(tk["spelling"].values())
    assert tk["spelling"]["exact"] > 250                               # byte-level BPEs share the 256 byte symbols at least
    assert p["adapted"]["non_embedding"] == p["teacher"]["non_embedding"] and p["trainable"] == p["adapted"]["embedding"] == 2_000 * 32
    # two steps from step 0, held-out CE at 0 and at 2; after each arm's two steps, every number finite
    for i in ("spelled", "random"):
        assert [h["step"] for h in m["histories"][i] if "eval_loss" in h] == [0, 2]
    for name, b in m["bpb"].items():
        bits = b["all"]["nll"] / math.log(2) * b["all"]["tokens"] / b["all"]["bytes"]
        assert 0 < b["all"]["bpb"] < 20 and abs(b["all"]["bpb"] - bits) < 1e-9, name
    # the trained teacher beats uniform prediction over its 512 tokens; 2 steps leave the random rows behind the original
    o = m["bpb"]["original"]["all"]
    assert o["bpb"] < math.log2(512) * o["tokens"] / o["bytes"]
    assert o["bpb"] < m["bpb"]["adapted-random"]["all"]["bpb"]
    for name, rows in m["tasks"].items():
        assert all(0 <= r["value"] <= 1 for r in rows) and {r["task"] for r in rows} == {"continuation", "minimal_pairs"}, name


@pytest.mark.slow  # three 135M-parameter models evaluated: ~1 min alone, ~2.5 min on the shared 2-core CPU (`pytest -m slow`)
@pytest.mark.usefixtures("one_thread")
def test_adapt_teacher_notebook_packaged_teacher(tmp_path):
    m = _run_notebook(tmp_path)
    assert 0.3 < m["bpb"]["original"]["all"]["bpb"] < 3.0                          # the packaged teacher on held-out text


@pytest.mark.parametrize("param,value,message", [("inits", ["zeros"], "inits=['zeros']"), ("max_steps", 0, "max_steps=0")])
def test_adapt_teacher_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "adapt_teacher.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"smoke": True, "out_dir": str(tmp_path / "run"), param: value}, cwd=str(ROOT), progress_bar=False)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value,message", [("false", "already holds a completed run"),  # the string papermill's `-p overwrite false` gives
                                           ("maybe", "overwrite='maybe': accepted: true or false")])
def test_adapt_teacher_notebook_overwrite_parsed_strictly(tmp_path, value, message):
    "`-p overwrite false` must not replace a finished run (bool('false') is True); an unparseable value is refused by name."
    out = tmp_path / "run"; out.mkdir()
    (out / "run_config.json").write_text("{}"); (out / "metrics.json").write_text('{"finished": true}')
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "adapt_teacher.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT), progress_bar=False,
                            parameters={"smoke": True, "out_dir": str(out), "overwrite": value})
    assert message in str(e.value)
    assert e.value.exec_count <= 3  # parameters, injected parameters, validation: no tokenizer trained, no model loaded
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
