"""The dynamic-batch-loading experiment notebook through papermill with its smoke parameters, and its bad-parameter errors."""
import json

import papermill as pm
import pytest
from conftest import ROOT


@pytest.mark.slow  # two tiny students + teacher reference: ~2 min alone; kept out of `make test` for the 20-min CI budget (`pytest -m slow`)
def test_mixture_notebook_smoke(tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "mixture.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"smoke": True, "out_dir": str(out), "eta": 0.5}, cwd=str(ROOT), progress_bar=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["parameters"]["eta"] == 0.5 and m["configs"]["dynamic"]["mixture_eta"] == 0.5
    assert m["configs"]["static"]["mixture"] == "static" and m["configs"]["dynamic"]["mixture"] == "dynamic"
    static, dynamic = m["weights_over_steps"]["static"][0], m["weights_over_steps"]["dynamic"][0]
    assert [h["step"] for h in static] == [h["step"] for h in dynamic] == [2, 4]
    domains = list(m["summary"]["samples_per_domain"]["static"])
    w = lambda h: [h[f"mixture/weight/{d}"] for d in domains]
    assert w(static[0]) == w(static[-1])            # static: the weights never move
    assert w(dynamic[0]) != w(dynamic[-1])          # dynamic: they follow the excess loss
    assert abs(sum(w(dynamic[-1])) - 1) < 1e-9
    # both arms trained on the same number of blocks; the gap is student minus teacher loss, per domain
    assert sum(m["summary"]["samples_per_domain"]["static"].values()) == sum(m["summary"]["samples_per_domain"]["dynamic"].values()) == 4 * 8
    for d in domains:
        g = m["summary"]["gap_per_domain"][d]
        assert abs(g["static"] - (m["eval"]["static"][0][d]["nll"] - m["reference_loss"][d])) < 1e-9
    for name in ("domain_weights", "gap_per_domain", "samples_per_domain"):
        assert (out / f"{name}.html").stat().st_size < 100_000 and (out / "plotly.min.js").exists()
    assert (out / "verdict.txt").read_text().startswith("Dynamic − static")


@pytest.mark.parametrize("param,value,message", [("eta", -1.0, "mixture_eta=-1.0: must be a finite number >= 0"),
                                                 ("update_steps", 0, "mixture_update_steps=0: must be a positive int")])
def test_mixture_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "mixture.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"smoke": True, "out_dir": str(tmp_path / "run"), param: value},
                            cwd=str(ROOT), progress_bar=False)
    assert message in str(e.value)
    assert e.value.exec_count <= 3  # the parameter cell + validation: nothing ran yet
    assert not (tmp_path / "run").exists()
