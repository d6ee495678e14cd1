"""The recipes notebook through papermill at smoke size: one study (schedule: 2 KD cells, 2 CE-only baselines) runs,
writes its tables, verdicts, figures and metrics.json; a completed study is not overwritten (papermill passes
`overwrite` as the string "false"); an unknown study fails before anything runs, naming the accepted ones."""
import json

import pandas as pd
import papermill as pm
import pytest
from conftest import ROOT

NB = str(ROOT / "nbs" / "recipes.ipynb")
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name, params):
    return pm.execute_notebook(NB, str(tmp_path / f"{name}.ipynb"), parameters=params, cwd=str(ROOT), progress_bar=False)


def test_recipes_notebook_smoke(tmp_path, tiny_teacher):
    out = tmp_path / "schedule"
    params = dict(study="schedule", smoke=True, out_dir=str(out), base=json.dumps({"teachers": [str(tiny_teacher)], "max_steps": 2}))
    _run(tmp_path, "run", params)
    m = json.loads((out / "metrics.json").read_text())
    assert m["experiment"] == "recipes" and m["complete"] and m["config"]["study"]["name"] == "schedule"
    assert [j["name"] for j in m["jobs"]] == ["ce_lr_scheduler_type=cosine", "lr_scheduler_type=cosine",
                                              "ce_lr_scheduler_type=warmup_stable_decay", "lr_scheduler_type=warmup_stable_decay"]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and set(table.seed) == {0}  # smoke: the first seed only
    assert [v["verdict"] for v in m["verdicts"]] == ["not resolved at this power"] * 3  # one seed gives no interval
    assert all("1 seed(s)" in v["detail"] for v in m["verdicts"])
    for f in ("paired.csv", "verdicts.md", "kd_minus_ce.html"): assert (out / f).exists(), f
    with pytest.raises(pm.PapermillExecutionError, match="already holds a completed run"):
        _run(tmp_path, "again", {**params, "overwrite": "false"})
    with pytest.raises(pm.PapermillExecutionError, match="study='schedul': accepted: divergence, alpha_temperature, deep_supervision"):
        _run(tmp_path, "bad", {**params, "study": "schedul", "out_dir": str(tmp_path / "bad")})
    assert not (tmp_path / "bad").exists()
