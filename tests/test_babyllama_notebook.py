"""The Baby Llama experiment notebook through papermill with its smoke parameters: a BPE trained on the train split,
two teachers (LLaMA and GPT-2) trained and saved, their logit-averaged ensemble scored as one model and distilled as
one cached teacher, CE-only and KD students per source and temperature, the three paired answers; a completed run is
not overwritten; a bad parameter fails before anything is written."""
import json
import math
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

NB = str(ROOT / "nbs" / "babyllama.ipynb")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the kernels run one thread each


def _run(tmp_path, name, params):
    return pm.execute_notebook(NB, str(tmp_path / f"{name}.ipynb"), parameters=params, cwd=str(ROOT), progress_bar=False)


def _heldout_nll(models, weights, blocks):
    "Held-out CE (nats/token) of the weighted mean of the models' logits on packed blocks, computed here from scratch."
    ids, labels = torch.tensor(blocks["input_ids"]), torch.tensor(blocks["labels"])
    with torch.no_grad():
        logits = sum(w * m(input_ids=ids).logits.double() for m, w in zip(models, weights))
    tgt = labels[:, 1:]; mask = tgt != -100
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp_min(0), reduction="none")
    return float(nll[mask].sum() / mask.sum())


def test_babyllama_notebook_smoke(tmp_path, monkeypatch):
    "Seconds: DistillConfig.SMOKE students, 512-token BPE, tiny teachers, one seed, T = 2 and T = 1."
    monkeypatch.setenv("STLM_NB_CACHE", str(tmp_path / "cache"))  # the kernel's teacher caches of these throw-away teachers
    out = tmp_path / "run"
    params = {"smoke": True, "out_dir": str(out)}
    _run(tmp_path, "out", params)
    m = json.loads((out / "metrics.json").read_text())
    assert m["experiment"] == "babyllama" and m["config"]["smoke"] is True and m["config"]["temperatures"] == [2.0, 1.0]

    # 1. the tokenizer: trained here at the smoke's size, saved, with the candidate table beside it
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tok) == m["tokenizer"]["vocab_size"] == 512
    assert [r["vocabulary"] for r in m["tokenizer"]["candidates"]] == [384, 512]
    for r in m["tokenizer"]["candidates"]:
        assert 1 < r["tokens/word (validation)"] < 10 and 0 <= r["entries seen ≥ 5× in training blocks"] <= 1
    # more merges, fewer tokens per word
    assert m["tokenizer"]["candidates"][1]["tokens/word (validation)"] < m["tokenizer"]["candidates"][0]["tokens/word (validation)"]

    # 2. the teachers: save_pretrained dirs of the two architectures, larger than the student, trained (below the untrained student)
    student_ne = m["student"]["parameters"]["non_embedding"]
    teachers = {}
    for name, model_type in (("llama", "llama"), ("gpt2", "gpt2")):
        t = m["teachers"][name]
        teachers[name] = AutoModelForCausalLM.from_pretrained(t["dir"], dtype=torch.float32).eval()
        assert teachers[name].config.model_type == model_type and teachers[name].config.vocab_size == 512
        assert t["parameters"]["non_embedding"] > student_ne and math.isclose(t["times_student_non_embedding"], t["parameters"]["non_embedding"] / student_ne)
        assert t["tokens_seen"] == 2 * 2048 and any("eval_loss" in h for h in t["log_history"])  # 2 epochs of the students' 2,048 tokens
        assert t["eval"]["all"]["bpb"] < m["untrained"]["eval"]["all"]["bpb"]
    # the ensemble: a directory naming both teachers; its reported held-out CE is the logit mean's, recomputed here
    ens = json.loads((Path(m["ensemble"]["dir"]) / "config.json").read_text())
    assert ens["model_type"] == "stlm_nb_logit_ensemble" and ens["weights"] == [0.5, 0.5] and len(ens["members"]) == 2
    from stlm_nb.trainer import DistillConfig, prepare_data
    blocks = prepare_data(DistillConfig.from_parameters(smoke=True).data, tok)["validation"]
    assert abs(_heldout_nll([teachers["llama"]], [1.0], blocks) - m["teachers"]["llama"]["eval"]["all"]["nll"]) < 1e-5
    assert abs(_heldout_nll(list(teachers.values()), [0.5, 0.5], blocks) - m["ensemble"]["eval"]["all"]["nll"]) < 1e-5  # prob mean: 1e-3 away
    assert max(m["teacher_route_check"].values()) < 1e-3  # the teachers' caches in the CE arm give the same held-out CE

    # 3. the students: one arm per source and temperature, CE-only with alpha = 1, the right teachers in each
    arms = m["arms"]
    assert list(arms) == ["ce"] + [f"kd-{s}-T{t}" for t in ("2", "1") for s in ("llama", "gpt2", "ensemble")]
    c = {a: v["config"] for a, v in arms.items()}
    assert c["ce"]["kd"]["alpha"] == 1.0 and c["ce"]["kd"]["teachers"] == [m["teachers"]["llama"]["dir"], m["teachers"]["gpt2"]["dir"], m["ensemble"]["dir"]]
    assert c["kd-ensemble-T2"]["kd"]["teachers"] == [m["ensemble"]["dir"]] and c["kd-gpt2-T1"]["kd"]["teachers"] == [m["teachers"]["gpt2"]["dir"]]
    assert {(c[a]["kd"]["alpha"], c[a]["kd"]["temperature"]) for a in arms if a != "ce"} == {(0.5, 2.0), (0.5, 1.0)}
    assert all(v["config"]["run"]["tokenizer"] == str(out / "tokenizer") and v["config"]["run"]["student"] == "llama-tiny" for v in arms.values())
    assert (tmp_path / "cache" / "teacher_cache").is_dir()

    # 5. the answers are the paired differences of the recorded numbers
    bpb = lambda arm: arms[arm]["runs"]["0"]["eval"]["all"]["bpb"]
    a = m["answers"]
    assert math.isclose(a["a_kd_minus_ce"]["kd-ensemble-T2"]["bits/byte"]["per_seed"][0], bpb("kd-ensemble-T2") - bpb("ce"), abs_tol=1e-12)
    assert math.isclose(a["b_kd_minus_reference"]["kd-llama-T1"]["ensemble"]["bits/byte"]["mean"],
                        bpb("kd-llama-T1") - m["ensemble"]["eval"]["all"]["bpb"], abs_tol=1e-12)
    assert math.isclose(a["c_ensemble_minus_single"]["T1"]["ensemble − gpt2"]["bits/byte"]["mean"], bpb("kd-ensemble-T1") - bpb("kd-gpt2-T1"), abs_tol=1e-12)
    acc = lambda rows: next(r["value"] for r in rows if (r["task"], r["domain"], r["metric"]) == ("minimal_pairs", "all", "acc"))
    assert math.isclose(a["b_kd_minus_reference"]["kd-gpt2-T2"]["GPT-2 teacher"]["minimal pairs acc"]["mean"],
                        acc(arms["kd-gpt2-T2"]["runs"]["0"]["tasks"]) - acc(m["teachers"]["gpt2"]["tasks"]), abs_tol=1e-12)
    comp = m["compute"]
    assert comp["kd-ensemble-T2"]["teacher_training_flops"] == comp["kd-llama-T2"]["teacher_training_flops"] + comp["kd-gpt2-T2"]["teacher_training_flops"]
    assert comp["ce"]["teacher_forward_flops"] == 0 < comp["kd-llama-T1"]["teacher_forward_flops"]
    for f in ("training_curves", "bpb_per_domain", "parallel_coordinates", "paired_differences"):
        assert (out / f"{f}.html").stat().st_size > 0
    assert (out / "verdict.txt").read_text().startswith("Held-out bits per byte") and np.isfinite(m["timings"]["total_s"])

    # papermill's `-p overwrite false` arrives as the string "false": the completed run is kept
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(tmp_path, "again", dict(params, overwrite="false"))
    assert "already holds a completed run" in str(e.value)
    assert json.loads((out / "metrics.json").read_text())["timings"] == m["timings"]


@pytest.mark.parametrize("param,value,message", [
    ("ensemble_mode", "median", "ensemble_mode='median': accepted: 'logit_mean', 'loss_mean'"),
    ("teacher_llama_overrides", '{"num_hiden_layers": 6}', "teacher_llama_overrides={'num_hiden_layers': 6}: ['num_hiden_layers'] are not settable")])
def test_babyllama_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(tmp_path, "bad", {"smoke": True, "out_dir": str(tmp_path / "run"), param: value})
    assert message in str(e.value)
    assert e.value.exec_count <= 3  # the parameter cell + validation: nothing ran yet
    assert not (tmp_path / "run").exists()
