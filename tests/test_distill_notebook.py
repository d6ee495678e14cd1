"""The experiment notebook through papermill with its smoke parameters, and its bad-parameter errors."""
import json
import shutil

import papermill as pm
import pytest
from conftest import ROOT


def test_distill_notebook_smoke(tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "distill.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"smoke": True, "out_dir": str(out), "alpha": 0.3}, cwd=str(ROOT), progress_bar=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["kd"]["alpha"] == 0.3 and metrics["config"]["run"]["smoke"] is True and metrics["experiment"] == "distill"
    assert set(metrics["runs"]) == {"kd-seed0", "ce-seed0"}
    # teacher far better than a student trained for seconds; both finite
    t, s = metrics["teacher"]["smollm2-135m"]["all"]["bpb"], metrics["runs"]["kd-seed0"]["eval"]["all"]["bpb"]
    assert 0.3 < t < 3.0 and t < s < 20
    assert metrics["precision"]["name"] in ("fp32", "bf16") and metrics["precision"]["source"] in ("rule", "environment")
    for name in ("training_curves", "bpb_per_domain", "kd_minus_ce"):
        assert (out / f"{name}.html").stat().st_size < 100_000 and (out / "plotly.min.js").exists()  # plotly.js not inlined
        if shutil.which("chromium") or shutil.which("chromium-browser"): assert (out / f"{name}.png").stat().st_size > 5_000
    assert (out / "verdict.txt").read_text().startswith("KD − CE-only")
    # papermill passes `-p overwrite false` as the string "false": it must mean False (the finished run is kept)
    before = (out / "metrics.json").read_bytes()
    for value, message in (("false", "already holds a completed run"), ("maybe", "overwrite='maybe': accepted: true or false")):
        with pytest.raises(pm.PapermillExecutionError) as e:
            pm.execute_notebook(str(ROOT / "nbs" / "distill.ipynb"), str(tmp_path / "again.ipynb"),
                                parameters={"smoke": True, "out_dir": str(out), "alpha": 0.3, "overwrite": value},
                                cwd=str(ROOT), progress_bar=False)
        assert message in str(e.value)
        assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize("param,value,message", [("alpha", 1.5, "alpha=1.5: must be in [0, 1]"),
                                                 ("loss", "kl", "loss='kl'"),
                                                 ("temperature", 0.0, "temperature=0.0")])
def test_distill_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "distill.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"smoke": True, "out_dir": str(tmp_path / "run"), param: value},
                            cwd=str(ROOT), progress_bar=False)
    assert message in str(e.value)
    assert e.value.exec_count <= 3  # the parameter cell + validation: nothing ran yet
    assert not (tmp_path / "run").exists()
