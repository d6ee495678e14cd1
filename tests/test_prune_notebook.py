"""The pruning experiment notebook through papermill (smoke: a tiny LLaMA source with SmolLM2's tokenizer), and its bad-parameter errors.
`STLM_NB_PRECISION=bf16 pytest tests/test_prune_notebook.py` runs the smoke with bf16 autocast (the kernel inherits the variable)."""
import json
import os

import papermill as pm
import pytest
import torch
from conftest import ROOT
from transformers import LlamaConfig, LlamaForCausalLM

from stlm_nb.models import load_teacher_tokenizer


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    "A tiny random GQA LLaMA (6 query / 3 KV heads) saved with the packaged teacher's tokenizer: the source to prune in seconds."
    tok = load_teacher_tokenizer("smollm2-135m")
    monkeypatch.setenv("STLM_NB_CACHE", str(tmp_path / "cache"))  # the tiny source's teacher cache stays in tmp_path
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: a second thread only adds contention (the kernel inherits it)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                      intermediate_size=96, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = tmp_path / "tiny-source"
    LlamaForCausalLM(cfg).save_pretrained(d); tok.save_pretrained(d)
    return d


SMALL_TARGET = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 48}


def test_prune_notebook_smoke(tmp_path, tiny_source):
    out = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "prune.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT), progress_bar=False,
                        parameters={"smoke": True, "out_dir": str(out), "source": str(tiny_source), **SMALL_TARGET})
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["smoke"] is True and m["config"]["hidden_size"] == 24
    assert m["shapes"]["pruned"] == {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 3,
                                     "num_key_value_heads": 3, "intermediate_size": 48}
    assert set(m["masks"]["names"]) == {"layer", "head", "intermediate", "hidden"}
    # the masked-vs-shrunk check runs in float32 on the unwrapped model whatever precision pruning trained in
    assert m["max_abs_logit_diff_masked_vs_shrunk"] <= 1e-4 * max(1.0, m["max_abs_logit"])
    assert m["precision"]["name"] == (os.environ.get("STLM_NB_PRECISION", "").strip().lower() or "fp32")  # CPU: fp32 unless set
    assert m["precision"]["student_autocast"] == (m["precision"]["name"] == "bf16")
    assert m["model_parameters"]["pruned"] == m["model_parameters"]["scratch"] and m["experiment"] == "prune"
    assert m["tokens"]["scratch"] >= m["tokens"]["prune"] + m["tokens"]["cpt"]
    for arm in ("source", "pruned", "pruned+cpt", "scratch"):
        assert 0 < m["eval"][arm]["all"]["bpb"] < 30
        assert set(m["offline_tasks"][arm][0]) == {"task", "domain", "metric", "value", "floor", "floor_std", "chance", "n"}
    assert any("lambda_1_hidden" in h for h in m["histories"]["prune"])
    for name in ("expected_sparsity", "expected_size", "lambdas", "training_curves", "bpb_per_domain", "offline_tasks"):
        assert 1_000 < (out / f"{name}.html").stat().st_size < 100_000 and (out / "plotly.min.js").exists()  # shared plotly.js
    assert (out / "verdict.txt").read_text().startswith("pruned+CPT − scratch")
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "pruned").config.head_dim == 16


@pytest.mark.parametrize("param,value,message", [("hidden_size", 1000, "hidden_size=1000: must be an int in [1, 576]")])  # target vs source
def test_prune_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    "A target that does not fit the source fails before any data, model or output directory is touched (config errors: 10_pruning)."
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "prune.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT), progress_bar=False,
                            parameters={"smoke": True, "out_dir": str(tmp_path / "run"), param: value})
    assert message in str(e.value)
    assert e.value.exec_count <= 4  # parameters, validation, the run's first check: nothing trained
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value,message", [("false", "already holds a completed run"),  # the string papermill's `-p overwrite false` gives
                                           ("maybe", "overwrite='maybe': accepted: true or false")])
def test_prune_notebook_overwrite_parsed_strictly(tmp_path, tiny_source, value, message):
    "`-p overwrite false` must not replace a finished run (bool('false') is True); an unparseable value is refused by name."
    out = tmp_path / "run"; out.mkdir()
    (out / "run_config.json").write_text("{}"); (out / "metrics.json").write_text('{"finished": true}')
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "prune.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT), progress_bar=False,
                            parameters={"smoke": True, "out_dir": str(out), "source": str(tiny_source), "overwrite": value, **SMALL_TARGET})
    assert message in str(e.value)
    assert e.value.exec_count <= 4  # parameters, validation, the run's first checks: no model loaded, nothing trained
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
