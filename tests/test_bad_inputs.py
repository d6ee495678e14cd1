"""Every bad input the workbook refuses, each a test; the README's table "What the workbook refuses" is generated from
this list (`.venv/bin/python tests/test_bad_inputs.py --write`) and `test_readme_table_is_current` keeps it in sync.

Each case fails before any model weights are loaded and before anything is written, with one line naming the
parameter, the value and what is accepted (and the fix, where there is one)."""
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT  # noqa: E402

START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def _config(**kw):
    from stlm_nb.trainer import DistillConfig
    return DistillConfig.from_parameters(**kw)


def _run(tmp, **kw):
    "A smoke-sized run (DistillConfig.SMOKE's values without `smoke`, so that the case's own values are kept)."
    from stlm_nb.trainer import DistillConfig, run_distillation
    return run_distillation(DistillConfig.from_parameters({**DistillConfig.SMOKE, "seeds": [0], "out_dir": str(tmp / "run"), **kw}))


def _guard(tmp, finished, overwrite=False, new=None):
    from stlm_nb.runs import prepare_out_dir
    run = tmp / "run"
    prepare_out_dir(run, {"alpha": 0.5})
    if finished: (run / "metrics.json").write_text("{}")
    return prepare_out_dir(run, new or {"alpha": 0.5}, overwrite=overwrite)


def _not_a_run_dir(tmp):
    from stlm_nb.runs import prepare_out_dir
    (tmp / "thesis").mkdir(); (tmp / "thesis" / "draft.tex").write_text("x")
    return prepare_out_dir(tmp / "thesis", {}, overwrite=True)


def _parameter(name, value, hint):
    from stlm_nb.runs import coerce
    return coerce(name, value, hint)


def _precision_env(tmp):
    from stlm_nb.runs import resolve_precision
    old = os.environ.get("STLM_NB_PRECISION")
    os.environ["STLM_NB_PRECISION"] = "half"
    try: return resolve_precision()
    finally:
        if old is None: os.environ.pop("STLM_NB_PRECISION")
        else: os.environ["STLM_NB_PRECISION"] = old


def _corpus(tmp, line):
    "A corpus directory whose one file has a bad second line; run_distillation must refuse it before any weights."
    d = tmp / "corpus"; d.mkdir()
    (d / "fortunes.jsonl").write_text(json.dumps({"text": "A fine first line.", "domain": "fortunes"}) + "\n" + line + "\n")
    return _run(tmp, corpus=str(d))


def _student_vocab(tmp):
    from stlm_nb.models import student_config
    student_config("llama-tiny", vocab_size=300).to_json_file(tmp / "student.json")
    return _run(tmp, student=str(tmp / "student.json"))


def _damaged_cache(tmp, how):
    "A tiny teacher cache, damaged the way a disk or a careless user would, then opened."
    import torch
    from test_cache import build, tiny_teacher
    from stlm_nb.cache import TeacherCache
    cache, blocks, key = build(tmp, tiny_teacher(), n=40, T=32, k=16)
    path, f = tmp / "c", tmp / "c" / "values.npy"
    good = f.read_bytes()
    if how == "truncated": f.write_bytes(good[: len(good) // 2])
    elif how == "zeroed": f.write_bytes(bytes(len(good)))
    elif how == "format":
        meta = json.loads((path / "meta.json").read_text()); meta["key"]["format"] = 2; (path / "meta.json").write_text(json.dumps(meta))
    elif how == "key": return TeacherCache(path, expected_key={**key, "k": 4})
    return TeacherCache(path)


def _cache_top_k(tmp):
    from test_cache import build, tiny_teacher
    return build(tmp, tiny_teacher(V=40), k=64)


# (parameter, value as a user would write it, how it is tried, the message must contain)
CASES = [
    ("teacher cache", "a file truncated", lambda t: _damaged_cache(t, "truncated"), "bytes; rebuild it: delete"),
    ("teacher cache", "a file zeroed in place (same size)", lambda t: _damaged_cache(t, "zeroed"), "does not match its SHA-256 (sampled ranges); rebuild it"),
    ("teacher cache", "built by an older version", lambda t: _damaged_cache(t, "format"), "has format 2; this version reads format 4"),
    ("teacher cache", "opened with another key", lambda t: _damaged_cache(t, "key"), "different key"),
    ("top_k", "64 for a 40-token teacher (build_teacher_cache)", _cache_top_k, "top_k=64 is not accepted"),
    ("teachers", "nosuch-teacher (offline)", lambda t: _run(t, teachers=["nosuch-teacher"]),
     "teachers='nosuch-teacher': not a packaged teacher"),
    ("tokenizer", "/no/such/dir", lambda t: _run(t, tokenizer="/no/such/dir"), "tokenizer='/no/such/dir': no such directory"),
    ("corpus", "a line that is not JSON", lambda t: _corpus(t, '{"text": "unterminated'), "line 2: invalid JSON"),
    ("corpus", "a record without text", lambda t: _corpus(t, '{"domain": "fortunes"}'), "line 2: record has no 'text' string"),
    ("corpus", "`content` instead of `text`", lambda t: _corpus(t, '{"content": "x", "domain": "fortunes"}'),
     "unexpected key(s) ['content']"),
    ("alpha", "1.5", lambda t: _config(alpha=1.5), "alpha=1.5: must be in [0, 1]"),
    ("temperature", "0", lambda t: _config(temperature=0), "temperature=0.0: must be a finite number > 0"),
    ("loss", "kl", lambda t: _config(loss="kl"), "loss='kl': accepted: fkl"),
    ("beta", "1.5", lambda t: _config(beta=1.5), "beta=1.5: must be in [0, 1]"),
    ("teacher_mode", "offline", lambda t: _config(teacher_mode="offline"), "teacher_mode='offline': accepted"),
    ("teacher_weights", "[1, 2] (one teacher)", lambda t: _config(teacher_weights=[1, 2]), "one non-negative weight per teacher"),
    ("student", "gpt-5 (offline)", lambda t: _run(t, student="gpt-5"), "student='gpt-5': not a student preset, not a local directory"),
    ("student", "a config.json with a 300-token vocabulary", _student_vocab, "its vocabulary has 300 tokens, the teacher(s) smollm2-135m and their tokenizer 49152"),
    ("precision", "half", lambda t: _config(precision="half"), "precision='half': accepted"),
    ("STLM_NB_PRECISION", "half", _precision_env, "STLM_NB_PRECISION='half': accepted"),
    ("num_train_epochs", "0", lambda t: _config(num_train_epochs=0), "num_train_epochs=0.0: must be a finite number > 0 (or set max_steps)"),
    ("max_steps", "0", lambda t: _config(max_steps=0), "max_steps=0: must be a positive int, or -1"),
    ("save_steps", "0", lambda t: _config(save_steps=0), "save_steps=0.0: must be a positive int (the end of training is always saved)"),
    ("logging_steps", "0", lambda t: _config(logging_steps=0), "logging_steps=0.0: must be a positive int"),
    ("learning_rate", "nan", lambda t: _config(learning_rate=math.nan), "learning_rate=nan: must be a finite number"),
    ("weight_decay", "-0.1", lambda t: _config(weight_decay=-0.1), "weight_decay=-0.1"),
    ("mixture", "doremi", lambda t: _config(mixture="doremi"), "mixture='doremi': accepted: 'none', 'static', 'dynamic'"),
    ("mixture_update_steps", "0", lambda t: _config(mixture_update_steps=0), "mixture_update_steps=0: must be a positive int"),
    ("mixture_eta", "nan", lambda t: _config(mixture_eta=math.nan), "mixture_eta=nan: must be a finite number >= 0"),
    ("hint_layers", "'2:31' (the teacher has 30 blocks)", lambda t: _run(t, hint_weight=0.5, hint_layers="2:31"), "hint_layers='2:31': pair 2:31 is out of range"),
    ("hint_layers", "1-5", lambda t: _config(hint_layers="1-5"), "hint_layers='1-5': accepted"),
    ("block_size", "100000", lambda t: _run(t, block_size=100_000), "block_size=100000: longer than the context of teacher"),
    ("top_k", "100000", lambda t: _run(t, top_k=100_000), "top_k=100000: larger than the vocabulary"),
    ("overwrite", "'maybe' (papermill -p)", lambda t: _parameter("overwrite", "maybe", bool), "overwrite='maybe': accepted: true or false"),
    ("seeds", "'0,x' (papermill -p)", lambda t: _parameter("seeds", "0,x", list[int]), "seeds[1]='x': accepted: an integer"),
    ("out_dir", "a completed run, overwrite false", lambda t: _guard(t, True), "already holds a completed run"),
    ("out_dir", "an unfinished run of another config", lambda t: _guard(t, False, new={"alpha": 0.2}),
     "holds an unfinished run with another configuration"),
    ("out_dir", "a directory that is not a run, overwrite true", _not_a_run_dir, "not a run directory"),
]


def _ids():
    seen = {}
    out = []
    for c in CASES:
        k = c[0]; seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}-{seen[k]}")
    return out


def _message(case, tmp):
    "The one-line message a case raises (ValueError), or None when it did not raise."
    try: case[2](tmp)
    except ValueError as e: return str(e)
    return None


@pytest.mark.parametrize("case", CASES, ids=_ids())
def test_bad_input_is_refused_by_name(case, tmp_path):
    msg = _message(case, tmp_path)
    assert msg is not None, f"{case[0]}={case[1]} was accepted"
    assert case[3] in msg, msg
    assert "\n" not in msg.strip()                     # one line
    assert not (tmp_path / "run" / "metrics.json").exists() or case[0] == "out_dir"


def _table(tmp):
    rows = ["| parameter | value | message |", "|---|---|---|"]
    for i, case in enumerate(CASES):
        (tmp / f"case{i}").mkdir()
        msg = _message(case, tmp / f"case{i}") or "(accepted!)"
        msg = re.sub(r"/tmp/[^\s'\",;:]*", "<path>", msg).replace("|", "\\|")
        rows.append(f"| `{case[0]}` | {case[1]} | {msg} |")
    return "\n".join(rows)


def test_readme_table_is_current(tmp_path):
    text = (ROOT / "README.md").read_text()
    assert START in text and END in text, "README lacks the bad-inputs markers"
    current = text.split(START)[1].split(END)[0].strip()
    assert current == _table(tmp_path), "README table is stale: run `.venv/bin/python tests/test_bad_inputs.py --write`"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        table = _table(Path(d))
    readme = ROOT / "README.md"; text = readme.read_text()
    text = text.split(START)[0] + START + "\n" + table + "\n" + END + text.split(END)[1]
    readme.write_text(text); print(f"README table: {len(CASES)} refused inputs")
