"""Bad data, tokenizer and teacher inputs (issue 13): each fails at once, before any weights load, in ONE line
naming the parameter (or the corpus file and line), the value, what is accepted and the fix; valid inputs
load exactly as before."""
import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import RepositoryNotFoundError

from stlm_nb.data import SAMPLE_DIR, check_jsonl, corpus_files, load_corpus
from stlm_nb.models import (STUDENT_PRESETS, TEACHERS, load_model_config, load_teacher, load_teacher_tokenizer,
                            make_student, resolve_model_path, student_config)
from stlm_nb.tokenizer import load_tokenizer, locate_pretrained

PACKAGED = ", ".join(TEACHERS)


def _error(fn, *args, **kw) -> str:
    "The ValueError message of fn(*args, **kw), checked to be one line."
    with pytest.raises(ValueError) as e: fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def online(monkeypatch):
    "The hub allowed (the lookup itself is faked per test)."
    monkeypatch.setenv("HF_HUB_OFFLINE", "0"); monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


# ---- 7. teachers: packaged name, local directory or hub id --------------------------------------------------------

@pytest.mark.parametrize("fn", [load_teacher, load_teacher_tokenizer, load_model_config, resolve_model_path])
def test_nonexistent_teacher_offline_fails_fast_naming_teachers(offline, fn):
    t0 = time.time()
    msg = _error(fn, "nosuch-teacher")
    assert time.time() - t0 < 2
    assert msg.startswith(f"teachers='nosuch-teacher': not a packaged teacher ({PACKAGED}), not a local directory, "
                          "and HF_HUB_OFFLINE=1 forbids the hub; pass a local save_pretrained directory"), msg


def test_hub_id_offline_names_the_parameter_given(offline):
    msg = _error(load_teacher, "HuggingFaceTB/no-such-model", parameter="source")
    assert msg.startswith("source='HuggingFaceTB/no-such-model': not a packaged teacher"), msg


def test_teacher_hub_lookup_online_is_one_short_call(online, monkeypatch):
    calls = []
    def not_found(repo_id, timeout=None, **kw):
        calls.append((repo_id, timeout))
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x")))
    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    msg = _error(load_teacher_tokenizer, "nosuch-teacher")
    assert calls == [("nosuch-teacher", 10.0)]
    assert msg.startswith(f"teachers='nosuch-teacher': not a packaged teacher ({PACKAGED}), not a local directory, "
                          "and the hub has no such repo"), msg
    assert msg.endswith("or an existing hub id"), msg


def test_teacher_hub_unreachable_online(online, monkeypatch):
    def down(*a, **k): raise ConnectionError("[Errno -2] Name or service not known\ntraceback noise")
    monkeypatch.setattr(huggingface_hub, "model_info", down)
    msg = _error(load_model_config, "some-org/some-model")
    assert "the hub lookup failed (ConnectionError: [Errno -2] Name or service not known)" in msg, msg
    assert "set HF_HUB_OFFLINE=1" in msg


def test_existing_hub_id_passes_through(online, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout=None, **kw: object())
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_teacher_directory_checks(tmp_path):
    assert _error(load_teacher, tmp_path).startswith(f"teachers={str(tmp_path)!r}: a directory without config.json; pass a packaged teacher")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    msg = _error(load_teacher_tokenizer, tmp_path)  # a model directory without a tokenizer
    assert msg.startswith(f"teachers={str(tmp_path)!r}: cannot load a tokenizer from"), msg
    assert _error(load_teacher, tmp_path / "missing").startswith(f"teachers={str(tmp_path / 'missing')!r}: not a packaged teacher ({PACKAGED}), no such directory")
    assert "a file, not a directory" in _error(load_model_config, tmp_path / "config.json")


def test_packaged_teacher_config_without_weights():
    cfg = load_model_config("smollm2-135m")
    assert (cfg.max_position_embeddings, cfg.vocab_size) == (8192, 49152)
    assert resolve_model_path("smollm2-135m").endswith(os.path.join("teachers", "smollm2-135m"))


# ---- 12. tokenizer paths ------------------------------------------------------------------------------------------

FIX = "pass a directory saved by save_pretrained / train_bpe, a hub id, or 'teacher'"


@pytest.mark.parametrize("path", ["/no/such/dir", "./no_such_tok", "runs/no_such/tokenizer", "~/no_such_tok_dir"])
def test_tokenizer_missing_path_is_a_missing_directory(path):
    assert _error(load_tokenizer, path) == f"tokenizer={path!r}: no such directory; {FIX}"


def test_tokenizer_dir_slash_name_under_an_existing_dir_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path); (tmp_path / "runs").mkdir()
    assert _error(load_tokenizer, "runs/tok") == f"tokenizer='runs/tok': no such directory; {FIX}"


def test_tokenizer_missing_relative_path_object():
    assert _error(load_tokenizer, Path("no_such_tok")) == f"tokenizer='no_such_tok': no such directory; {FIX}"


def test_tokenizer_hub_id_offline(offline):
    msg = _error(load_tokenizer, "nosuch-tokenizer")
    assert msg.startswith("tokenizer='nosuch-tokenizer': not a local directory, and HF_HUB_OFFLINE=1 forbids the hub; "
                          "pass a directory saved by save_pretrained / train_bpe, or 'teacher'"), msg


def test_tokenizer_directory_without_files(tmp_path):
    assert _error(load_tokenizer, tmp_path).startswith(f"tokenizer={str(tmp_path)!r}: a directory without tokenizer.json or tokenizer_config.json")


def test_locate_pretrained_rejects_non_strings():
    assert _error(locate_pretrained, 3, "tokenizer", ("tokenizer.json",), fix="pass X").startswith("tokenizer=3:")


# ---- 8, 9, 10. corpus files ---------------------------------------------------------------------------------------

GOOD = '{"text": "a document", "domain": "d", "source": "s", "id": "d/1#0"}'


def _corpus(tmp_path, bad_line, name="dom.jsonl", compress=False):
    body = f"{GOOD}\n{GOOD}\n{bad_line}\n{GOOD}\n".encode()
    f = tmp_path / name
    f.write_bytes(gzip.compress(body) if compress else body)
    return f


@pytest.mark.parametrize("compress", [False, True])
def test_invalid_json_line(tmp_path, compress):
    f = _corpus(tmp_path, '{"text": "a", "domain": "d"', name="dom.jsonl.gz" if compress else "dom.jsonl", compress=compress)
    assert _error(load_corpus, tmp_path) == f"corpus file {f}, line 3: invalid JSON (Expecting ',' delimiter at column 28)"


@pytest.mark.parametrize("record", ['{"domain": "d", "source": "s"}', '{"text": null, "domain": "d"}', '{"text": ["a"], "domain": "d"}'])
def test_record_without_text_string(tmp_path, record):
    f = _corpus(tmp_path, record)
    assert _error(load_corpus, tmp_path) == f"corpus file {f}, line 3: record has no 'text' string: {record}"


def test_record_snippet_is_80_chars(tmp_path):
    record = json.dumps({"domain": "d", "source": "x" * 300})
    f = _corpus(tmp_path, record)
    assert _error(load_corpus, tmp_path) == f"corpus file {f}, line 3: record has no 'text' string: {record[:80]}..."


@pytest.mark.parametrize("record, keys", [('{"content": "a document", "domain": "d"}', "['content']"),
                                          ('{"text": "a", "lang": "en", "url": "u"}', "['lang', 'url']")])
def test_unexpected_keys(tmp_path, record, keys):
    f = _corpus(tmp_path, record)
    assert _error(load_corpus, tmp_path) == (f"corpus file {f}, line 3: unexpected key(s) {keys}; "
                                             "accepted keys: ['text', 'domain', 'source', 'id'] (text required)")


@pytest.mark.parametrize("record, msg", [('[1, 2]', "a JSON list, not an object with a 'text' string: [1, 2]"),
                                         ('{"text": "a", "domain": {"x": 1}}', 'domain={"x": 1}; accepted: a string (or no \'domain\' key)'),
                                         ('{"text": "a", "id": 1.5}', "id=1.5; accepted: a string or an integer (or no 'id' key)"),
                                         ('{"text": "a", "id": 7}', "id=7 is an integer, but line 1's id is a string")])
def test_other_silent_manglings(tmp_path, record, msg):
    f = _corpus(tmp_path, record)
    assert _error(load_corpus, tmp_path).startswith(f"corpus file {f}, line 3: {msg}")


def test_unreadable_files(tmp_path):
    f = tmp_path / "dom.jsonl.gz"; f.write_bytes(b"not gzip at all")
    assert _error(load_corpus, tmp_path).startswith(f"corpus file {f}: cannot be read (BadGzipFile")
    f.unlink(); f = tmp_path / "dom.jsonl"; f.write_bytes(GOOD.encode() + b"\n" + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    assert _error(load_corpus, tmp_path).startswith(f"corpus file {f}, line 2: not UTF-8")


def test_only_the_requested_domains_are_checked(tmp_path):
    _corpus(tmp_path, "{broken", name="bad.jsonl")
    (tmp_path / "good.jsonl").write_text(GOOD + "\n")
    assert load_corpus(tmp_path, domains="good")["text"] == ["a document"]
    assert "bad.jsonl, line 3" in _error(load_corpus, tmp_path)


def test_valid_variants_load_as_before(tmp_path):
    (tmp_path / "dom.jsonl").write_text(f"{GOOD}\n\n  \n" + '{"text": "b"}\r\n')  # blank lines, CRLF, missing keys
    ds = load_corpus(tmp_path)
    assert (ds["text"], ds["id"]) == (["a document", "b"], ["d/1#0", None])
    assert check_jsonl(tmp_path / "dom.jsonl") == 2


def test_embedded_sample_loads_exactly_as_before():
    "Row count and a hash of every record, measured before check_jsonl existed."
    ds = load_corpus()
    h = hashlib.sha256()
    for r in ds: h.update(json.dumps([r["text"], r["domain"], r["source"], r["id"]]).encode())
    assert len(ds) == 1381
    assert h.hexdigest() == "1c0f636819ecc525d9c6a88677385d7630c1bd4286e3e41788588af463e711d1"
    assert sum(check_jsonl(f) for f in corpus_files(SAMPLE_DIR).values()) == 1381


# ---- student context ----------------------------------------------------------------------------------------------

def test_student_keeps_its_preset_context():
    for p in STUDENT_PRESETS:
        c = student_config(p, vocab_size=None if "vocab_size" in STUDENT_PRESETS[p] else 100)
        assert (getattr(c, "max_position_embeddings", None) or c.n_positions) == 1024, p
    assert make_student("llama-tiny", vocab_size=50).config.max_position_embeddings == 1024
    assert make_student("llama-tiny", vocab_size=50, max_position_embeddings=4096).config.max_position_embeddings == 4096
    assert _error(student_config, "llama-tiny", vocab_size=50, max_position_embeddings="1024").startswith("max_position_embeddings='1024'")
