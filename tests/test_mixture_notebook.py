"""The dynamic-batch-loading experiment notebook through papermill with its smoke parameters, and its bad-parameter errors."""
import json
import math

import papermill as pm
import pytest
from conftest import ROOT


@pytest.mark.usefixtures("one_thread")
def test_mixture_notebook_smoke(tmp_path, tiny_teacher, monkeypatch):
    "Seconds: a tiny trained teacher with a 512-token BPE is the reference (the packaged 135M one: ~1.5 min, its 49k vocabulary)."
    monkeypatch.setenv("STLM_NB_CACHE", str(tmp_path / "cache"))  # the kernel's teacher cache of this throw-away teacher
    out = tmp_path / "run"
    pm.execute_notebook(str(ROOT / "nbs" / "mixture.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(ROOT), progress_bar=False,
                        parameters={"smoke": True, "out_dir": str(out), "mixture_eta": 0.5, "teacher": str(tiny_teacher)})
    m = json.loads((out / "metrics.json").read_text())
    c = m["configs"]
    assert m["experiment"] == "mixture" and m["config"]["mixture_eta"] == 0.5 and c["dynamic"]["mixture"]["mixture_eta"] == 0.5
    assert c["static"]["mixture"]["mixture"] == "static" and c["dynamic"]["mixture"]["mixture"] == "dynamic"
    assert c["static"]["kd"]["teachers"] == [str(tiny_teacher)] and (tmp_path / "cache" / "teacher_cache").is_dir()
    assert c["static"]["run"]["student"] == "llama-tiny" and c["static"]["training"]["max_steps"] == 4  # the smoke's sizes
    static, dynamic = m["weights_over_steps"]["static"][0], m["weights_over_steps"]["dynamic"][0]
    assert [h["step"] for h in static] == [h["step"] for h in dynamic] == [2, 4]
    domains = list(m["summary"]["samples_per_domain"]["static"])
    w = lambda h: [h[f"mixture/weight/{d}"] for d in domains]
    assert w(static[0]) == w(static[-1])            # static: the weights never move
    assert w(dynamic[0]) != w(dynamic[-1])          # dynamic: they follow the excess loss
    assert abs(sum(w(dynamic[-1])) - 1) < 1e-9
    # the trained teacher is ahead on every domain, and each update is w <- softmax(log w + eta * max(excess, 0))
    # (from the static arm's proportional weights; 1e-4 smoothing)
    prev = w(static[0])
    for h in dynamic:
        assert all(h[f"mixture/excess/{d}"] > 0 for d in domains)
        z = [p * math.exp(0.5 * h[f"mixture/excess/{d}"]) for p, d in zip(prev, domains)]
        assert all(abs(a - b / sum(z)) < 1e-3 for a, b in zip(w(h), z)), (w(h), z)
        prev = w(h)
    # both arms trained on the same number of blocks; the gap is student minus teacher loss, per domain
    assert sum(m["summary"]["samples_per_domain"]["static"].values()) == sum(m["summary"]["samples_per_domain"]["dynamic"].values()) == 4 * 8
    for d in domains:
        g = m["summary"]["gap_per_domain"][d]
        assert abs(g["static"] - (m["eval"]["static"][0][d]["nll"] - m["reference_loss"][d])) < 1e-9
        assert 0 < g["static"] < 5 and 0 < g["dynamic"] < 5  # a student of seconds stays behind the trained teacher
    for name in ("domain_weights", "gap_per_domain", "samples_per_domain"):
        assert (out / f"{name}.html").stat().st_size < 100_000 and (out / "plotly.min.js").exists()
    assert (out / "verdict.txt").read_text().startswith("Dynamic − static")


@pytest.mark.parametrize("param,value,message", [("mixture_eta", -1.0, "mixture_eta=-1.0: must be a finite number >= 0"),
                                                 ("mixture_update_steps", 0, "mixture_update_steps=0: must be a positive int")])
def test_mixture_notebook_bad_parameters_fail_early(tmp_path, param, value, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "nbs" / "mixture.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"smoke": True, "out_dir": str(tmp_path / "run"), param: value},
                            cwd=str(ROOT), progress_bar=False)
    assert message in str(e.value)
    assert e.value.exec_count <= 3  # the parameter cell + validation: nothing ran yet
    assert not (tmp_path / "run").exists()
