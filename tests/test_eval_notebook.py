"""The evaluation experiment notebook through papermill with its smoke parameters: a saved student is scored beside
the packaged teacher and the untrained floor; tables, figures and metrics.json are written; a completed run is not
overwritten."""
import json

import papermill as pm
import pytest
from conftest import ROOT
from stlm_nb.models import load_teacher_tokenizer, make_student


@pytest.mark.slow  # scores the 135M teacher three times: ~2 min alone; kept out of `make test` for the 20-min CI budget (`pytest -m slow`)
def test_eval_models_notebook_smoke(tmp_path):
    tok = load_teacher_tokenizer("smollm2-135m")
    sdir = tmp_path / "student"
    make_student("llama-tiny", tokenizer=tok, seed=3).save_pretrained(sdir); tok.save_pretrained(sdir)
    out = tmp_path / "run"
    params = {"smoke": True, "out_dir": str(out), "students": [str(sdir)], "student_names": ["tiny"]}
    pm.execute_notebook(str(ROOT / "nbs" / "eval_models.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        cwd=str(ROOT), progress_bar=False)
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["models"]) == ["smollm2-135m", "tiny", "untrained llama-7m"]
    teacher, tiny = m["models"]["smollm2-135m"], m["models"]["tiny"]
    assert teacher["bits_per_byte"]["all"]["bpb"] < tiny["bits_per_byte"]["all"]["bpb"]  # a real model beats a random one
    assert tiny["agreement_with_first_teacher"]["all"]["fkl"] > 0                         # shares the teacher's tokenizer
    tasks = {(r["task"], r["metric"]) for r in teacher["tasks"] if r["domain"] == "all"}
    assert ("continuation", "acc_norm") in tasks and ("minimal_pairs", "acc") in tasks
    for f in ("accuracy.html", "bpb_per_domain.html", "parallel_coordinates.html", "summary.md", "bits_per_byte.csv",
              "offline_tasks/continuation.jsonl"):
        assert (out / f).stat().st_size > 0
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "eval_models.ipynb"), str(tmp_path / "again.ipynb"), parameters=params,
                            cwd=str(ROOT), progress_bar=False)
    assert "already holds a completed run" in str(e.value)
