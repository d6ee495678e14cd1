"""The evaluation experiment notebook through papermill with its smoke parameters: a saved student is scored beside
the packaged teacher and the untrained floor; every task score carries its floor; tables, figures and metrics.json
(with the precision record) are written; a completed run is not overwritten, also when papermill passes
`overwrite` as the string "false"; a bad parameter fails before anything is loaded."""
import json

import papermill as pm
import pytest
from conftest import ROOT
from transformers import AutoTokenizer
from stlm_nb.models import load_teacher_tokenizer, make_student

NB = str(ROOT / "nbs" / "eval_models.ipynb")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the kernels run one thread each


def _run(tmp_path, name, params):
    return pm.execute_notebook(NB, str(tmp_path / f"{name}.ipynb"), parameters=params, cwd=str(ROOT), progress_bar=False)


def _save(tmp_path, name, preset, seed, tok):
    d = tmp_path / name
    make_student(preset, tokenizer=tok, seed=seed).save_pretrained(d); tok.save_pretrained(d)
    return d


def _check_run(out, m, names):
    assert list(m["models"]) == names
    teacher, tiny, untrained = (m["models"][k] for k in names)
    assert tiny["agreement_with_first_teacher"]["all"]["fkl"] > 0                         # shares the teacher's tokenizer
    assert m["precision"]["name"] in ("fp32", "bf16") and m["precision"]["source"] in ("rule", "environment")
    assert teacher["dtype"] == m["precision"]["teacher_dtype"]
    assert m["experiment"] == "eval_models" and m["config"]["tasks_per_domain"] == 1 and m["tasks"] == {"continuation": 9, "minimal_pairs": 9}
    assert m["resolvable_difference"]["minimal_pairs"]["n"] == 9
    rows = {(r["task"], r["metric"]): r for r in teacher["tasks"] if r["domain"] == "all"}
    assert ("continuation", "acc_norm") in rows and ("minimal_pairs", "acc") in rows
    assert m["config"]["floor_seeds"] == [0, 1] and teacher["floor"]["seeds"] == [0, 1]
    assert all(0 <= r["floor"] <= 1 and r["floor_std"] >= 0 for r in teacher["tasks"])     # a floor beside every score
    # the untrained row's floor is the teachers' floor (llama-tiny on the teacher's tokenizer, the same seeds)
    assert [r["floor"] for r in teacher["tasks"]] == [r["floor"] for r in untrained["tasks"]]
    for f in ("accuracy.html", "bpb_per_domain.html", "parallel_coordinates.html", "summary.md", "bits_per_byte.csv",
              "tasks_per_domain.csv", "offline_tasks/continuation.jsonl", "run_config.json"):
        assert (out / f).stat().st_size > 0
    assert "floor" in (out / "summary.md").read_text()
    assert (out / "verdict.txt").read_text().startswith(names[0] + ":") and "between two models" in m["verdict"]


def test_eval_models_notebook_smoke(tmp_path, tiny_teacher):
    "Seconds: a tiny trained teacher with a 512-token BPE stands in for the packaged one (its run is the slow test below)."
    teacher, student = str(tiny_teacher), _save(tmp_path, "student", "llama-tiny", 3, AutoTokenizer.from_pretrained(tiny_teacher))
    out = tmp_path / "run"
    params = {"smoke": True, "out_dir": str(out), "teachers": [teacher], "students": [str(student)], "student_names": ["tiny"]}
    _run(tmp_path, "out", params)
    m = json.loads((out / "metrics.json").read_text())
    _check_run(out, m, [teacher, "tiny", "untrained llama-tiny"])
    # a student of the teachers' floor preset on the same tokenizer: its own floor (an untrained copy of its config) is the same
    assert [r["floor"] for r in m["models"]["tiny"]["tasks"]] == [r["floor"] for r in m["models"][teacher]["tasks"]]
    assert all(r["vocab_size"] == 512 for r in m["models"].values())
    # the trained teacher beats both untrained models, which sit near the uniform floor (log2 512 bits per token)
    bpb = {k: r["bits_per_byte"]["all"] for k, r in m["models"].items()}
    assert bpb[teacher]["bpb"] < min(bpb["tiny"]["bpb"], bpb["untrained llama-tiny"]["bpb"]) - 0.3
    for b in bpb.values(): assert 0.5 < b["bpb"] * b["bytes"] / b["tokens"] / 9 < 1.1
    # papermill's `-p overwrite false` arrives as the string "false": it must mean False, so the completed run is kept
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(tmp_path, "again", dict(params, overwrite="false"))
    assert "already holds a completed run" in str(e.value)


@pytest.mark.slow  # the packaged 135M teacher scored, and run again for teacher agreement: minutes on the shared 2-core CPU
def test_eval_models_notebook_packaged_teacher(tmp_path):
    student = _save(tmp_path, "student", "llama-tiny", 3, load_teacher_tokenizer("smollm2-135m"))
    out = tmp_path / "run"
    _run(tmp_path, "out", {"smoke": True, "out_dir": str(out), "students": [str(student)], "student_names": ["tiny"]})
    m = json.loads((out / "metrics.json").read_text())
    _check_run(out, m, ["smollm2-135m", "tiny", "untrained llama-tiny"])
    assert m["models"]["smollm2-135m"]["bits_per_byte"]["all"]["bpb"] < m["models"]["tiny"]["bits_per_byte"]["all"]["bpb"]


@pytest.mark.parametrize("name,value,message", [("tasks_per_domain", "many", "tasks_per_domain='many'"),
                                                ("overwrite", "maybe", "overwrite='maybe'")])
def test_eval_models_notebook_bad_parameter(tmp_path, name, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run(tmp_path, "bad", {"smoke": True, "out_dir": str(tmp_path / "run"), name: value})
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
