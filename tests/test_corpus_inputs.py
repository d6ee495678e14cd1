"""Corpus inputs (issue 15): load_corpus reads .txt/.jsonl/.json/.parquet files, globs, lists, hub-layout directories and hub
ids (offline: one fast ValueError line) into the columns text, domain, source, id, streamed or not; prepare_blocks turns a
corpus into the trainer's blocks, bit-identical to the pipeline before it existed (pinned fingerprints)."""
import hashlib
import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stlm_nb.cache import fingerprint_blocks
from stlm_nb.data import SAMPLE_DIR, corpus_kind, load_corpus, prepare_blocks, split_corpus

FIX = Path(__file__).parent / "fixtures" / "corpus_inputs"
COLUMNS = ["text", "domain", "source", "id"]
datasets.disable_progress_bars()


def _error(fn, *args, **kw) -> str:
    "The ValueError message of fn(*args, **kw), checked to be one line."
    with pytest.raises(ValueError) as e: fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _rows(ds) -> list:
    return [dict(r) for r in ds]


@pytest.fixture(scope="module")
def tok():
    from stlm_nb.models import load_teacher_tokenizer
    return load_teacher_tokenizer("smollm2-135m")


@pytest.fixture
def hub_dir(tmp_path):
    "A local copy in hub layout, as `hf download NAME --repo-type dataset --local-dir DIR` leaves it."
    d = tmp_path / "TinyTales"; (d / "data").mkdir(parents=True)
    pq.write_table(pa.table({"story": ["Once upon a time a fox.", "The fox slept.", "The end."], "label": [0, 1, 0]}),
                   d / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"story": ["A held-out tale."], "label": [1]}), d / "data" / "test-00000-of-00001.parquet")
    return d


# ---- each format -------------------------------------------------------------------------------------------------

def test_txt_one_document_per_paragraph():
    ds = load_corpus(FIX / "garden.txt")
    assert ds.column_names == COLUMNS and corpus_kind(FIX / "garden.txt") == "files"
    assert ds["text"] == ["The beans climbed the fence in June,\nand by July they had swallowed the gate.",
                          "Tomatoes want sun and patience;\nthey punish the gardener who waters at noon.",
                          "   An indented line stays indented.\nA second line of the same paragraph.",
                          "The last paragraph follows three blank lines and ends without a newline."]
    assert set(ds["domain"]) == {"garden"}                                       # the file's stem
    assert ds["source"] == ["garden.txt"] * 4 and ds["id"] == [f"garden.txt#{i}" for i in range(4)]
    assert load_corpus(FIX / "harbour.txt")["text"] == ["Boats come in at dusk.", "The gulls leave at dawn."]  # CRLF or LF alike


def test_txt_one_document_per_file_takes_the_folder_as_domain():
    ds = load_corpus(str(FIX / "*.txt"), txt_unit="file")
    assert len(ds) == 2 and set(ds["domain"]) == {"corpus_inputs"} and ds["id"] == ["garden.txt", "harbour.txt"]
    assert ds["text"][0] == (FIX / "garden.txt").read_text()


def test_jsonl_with_other_column_names():
    ds = load_corpus(FIX / "articles.jsonl", text_column="body", domain_column="section")
    assert ds.column_names == COLUMNS
    assert ds["domain"] == ["civic", "farming", "civic", "farming"]
    assert ds["text"][1] == "A late frost cut the apple harvest by a third."
    assert ds["id"] == ["0", "1", "2", "3"] and ds["source"] == [None] * 4       # an integer id read as a string; no source column
    assert load_corpus(FIX / "articles.jsonl", "farming", text_column="body", domain_column="section")["id"] == ["1", "3"]


def test_jsonl_without_domain_column_takes_the_stem():
    ds = load_corpus(FIX / "notes.jsonl")
    assert ds["domain"] == ["notes"] * 3 and ds["id"] == [None] * 3


def test_parquet_with_and_without_domain_column():
    tagged = load_corpus(FIX / "tagged.parquet")
    assert tagged[:] == {"text": ["Tide tables are printed each winter.", "The library opens late on Thursdays.", "Rain is forecast for the fair."],
                         "domain": ["sea", "town", "town"], "source": [None] * 3, "id": ["101", "102", "103"]}
    assert load_corpus(FIX / "plain.parquet")["domain"] == ["plain", "plain"]
    assert load_corpus(FIX / "tagged.parquet", domain_column="words")["domain"] == ["6"] * 3  # integers as strings


def test_lists_and_globs_keep_file_order():
    ds = load_corpus([FIX / "plain.parquet", str(FIX / "*.txt"), FIX / "notes.jsonl"])
    assert ds["domain"] == ["plain"] * 2 + ["garden"] * 4 + ["harbour"] * 2 + ["notes"] * 3
    assert load_corpus(str(FIX / "*.parquet"))["domain"] == ["plain"] * 2 + ["sea", "town", "town"]


def test_directory_of_files_and_the_jsonl_layout(tmp_path):
    for f in ("garden.txt", "tagged.parquet"): (tmp_path / f).write_bytes((FIX / f).read_bytes())
    assert corpus_kind(tmp_path) == "files"
    assert load_corpus(tmp_path)["domain"] == ["garden"] * 4 + ["sea", "town", "town"]
    # a directory holding {domain}.jsonl files is the checked jsonl layout (keys text/domain/source/id): a glob reads other keys
    assert corpus_kind(FIX) == "jsonl_dir"
    assert "articles.jsonl, line 1: unexpected key(s) ['body', 'section', 'url']" in _error(load_corpus, FIX)
    assert "pass its files instead" in _error(load_corpus, FIX, text_column="body")


def test_hub_layout_directory(hub_dir):
    assert corpus_kind(hub_dir) == "hub_dir"
    ds = load_corpus(hub_dir, text_column="story")
    assert ds.column_names == COLUMNS and ds["text"] == ["Once upon a time a fox.", "The fox slept.", "The end."]
    assert set(ds["domain"]) == {"TinyTales"}                                    # no domain column: the directory's name
    assert load_corpus(hub_dir, text_column="story", split="test")["text"] == ["A held-out tale."]
    assert load_corpus(hub_dir, text_column="story", domain_column="label")["domain"] == ["0", "1", "0"]
    assert "Unknown split" in _error(load_corpus, hub_dir, text_column="story", split="validation")


def test_hub_layout_directory_with_configs(tmp_path):
    (tmp_path / "small").mkdir(); (tmp_path / "big").mkdir()
    (tmp_path / "small" / "part.jsonl").write_text('{"text": "s1", "topic": "a"}\n')
    (tmp_path / "big" / "part.jsonl").write_text('{"text": "b1", "topic": "b"}\n{"text": "b2", "topic": "c"}\n')
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: small/*.jsonl\n"
                                        "- config_name: big\n  data_files: big/*.jsonl\n---\n# A dataset card\n")
    assert corpus_kind(tmp_path) == "hub_dir"
    ds = load_corpus(tmp_path, name="big", domain_column="topic")
    assert (ds["text"], ds["domain"]) == (["b1", "b2"], ["b", "c"])


# ---- the hub, offline --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"name": "sample-10BT", "parameter": "corpus"}])
def test_hub_id_offline_fails_at_once_in_one_line(offline, kw):
    repo = "HuggingFaceFW/fineweb-edu" if kw else "roneneldan/TinyStories"
    assert corpus_kind(repo) == "hub_id"
    t0 = time.time()
    msg = _error(load_corpus, repo, **kw)
    assert time.time() - t0 < 2, time.time() - t0
    p = kw.get("parameter", "path")
    assert msg.startswith(f"{p}={repo!r}" + (" (name='sample-10BT')" if kw else "") + ": not a local file, glob or directory, "
                          "and HF_HUB_OFFLINE=1 forbids the hub"), msg
    assert msg.endswith(f"run `hf download {repo} --repo-type dataset --local-dir DIR` and pass {p}=DIR"), msg
    assert _error(load_corpus, repo, streaming=True) == _error(load_corpus, repo)


def test_missing_local_paths_are_not_hub_ids(tmp_path):
    assert _error(load_corpus, tmp_path / "nope").startswith(f"path={str(tmp_path / 'nope')!r}: no such file or directory")
    assert "no such file or directory" in _error(load_corpus, "corpus/books.parquet")
    assert _error(load_corpus, str(tmp_path / "*.parquet")) == f"path={str(tmp_path / '*.parquet')!r}: the glob matches no file"


# ---- bad columns -------------------------------------------------------------------------------------------------

def test_missing_text_column_names_the_columns():
    assert _error(load_corpus, FIX / "articles.jsonl") == (f"text_column='text': no such column in corpus file {FIX / 'articles.jsonl'}; "
                                                           "its columns: ['body', 'section', 'url', 'id']")


def test_non_string_text_column():
    assert _error(load_corpus, FIX / "tagged.parquet", text_column="words") == (
        f"text_column='words' in corpus file {FIX / 'tagged.parquet'} holds Value('int64'), not strings; its string columns: ['text', 'domain']")


def test_missing_domain_column_names_the_columns(hub_dir):
    assert _error(load_corpus, FIX / "articles.jsonl", text_column="body", domain_column="topic") == (
        f"domain_column='topic': no such column in corpus file {FIX / 'articles.jsonl'}; its columns: ['body', 'section', 'url', 'id']")
    assert _error(load_corpus, hub_dir, text_column="story", domain_column="genre") == (
        f"domain_column='genre': no such column in path={str(hub_dir)!r} (split 'train'); its columns: ['story', 'label']")


def test_null_texts_and_domains(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, None], "domain": ["x", None, "y"]}), tmp_path / "holes.parquet")
    assert "text_column='text': 2 of 3 rows in corpus file" in _error(load_corpus, tmp_path / "holes.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "domain": ["x", None]}), tmp_path / "holes.parquet")
    assert "domain_column='domain': 1 of 2 rows in corpus file" in _error(load_corpus, tmp_path / "holes.parquet")


def test_bad_arguments():
    assert _error(load_corpus, FIX / "tagged.parquet", "klingon").startswith("unknown domain(s) ['klingon']")
    assert _error(load_corpus, FIX / "tagged.parquet", split="test").startswith("split='test': path=")
    assert _error(load_corpus, FIX / "garden.txt", txt_unit="sentence").startswith("txt_unit='sentence'")
    assert _error(load_corpus, FIX / "garden.txt", streaming="yes").startswith("streaming='yes'")
    assert _error(load_corpus, 42).startswith("path=42; accepted")


# ---- streaming ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, kw", [(FIX / "garden.txt", {}), (FIX / "articles.jsonl", dict(text_column="body", domain_column="section")),
                                      ([FIX / "tagged.parquet", FIX / "plain.parquet"], {}), (None, dict(domains=["dict_devil", "fortunes"])),
                                      (FIX / "tagged.parquet", dict(domains="town"))])
def test_streaming_gives_the_same_rows(path, kw):
    it = load_corpus(path, streaming=True, **kw)
    assert isinstance(it, datasets.IterableDataset) and it.column_names == COLUMNS
    assert _rows(it) == _rows(load_corpus(path, **kw))


def test_streaming_hub_layout(hub_dir):
    assert _rows(load_corpus(hub_dir, text_column="story", streaming=True)) == _rows(load_corpus(hub_dir, text_column="story"))


def test_streamed_blocks_equal_when_the_budget_covers_everything(tok):
    corpus = load_corpus(domains=["dict_devil", "python_code"]).select(range(0, 264, 6))  # 44 documents, two domains
    every = dict(block_size=64, train_tokens=10**7, eval_tokens_per_domain=10**7, steering=True)
    streamed, whole = prepare_blocks(corpus.to_iterable_dataset(), tok, **every), prepare_blocks(corpus, tok, **every)
    assert list(streamed) == list(whole) == ["train", "stats", "validation", "steering"]
    for k in ("train", "validation", "steering"): assert streamed[k][:] == whole[k][:], k
    assert streamed["stats"] == whole["stats"]
    assert sum(s["docs"] for s in whole["stats"].values()) == len(split_corpus(corpus)["validation"])


def test_streamed_blocks_from_files(tok):
    corpus = [FIX / "garden.txt", FIX / "tagged.parquet"]
    every = dict(block_size=16, train_tokens=10**6, eval_tokens_per_domain=10**6)
    streamed, whole = prepare_blocks(load_corpus(corpus, streaming=True), tok, **every), prepare_blocks(load_corpus(corpus), tok, **every)
    for k in ("train", "validation"): assert streamed[k][:] == whole[k][:], k
    assert len(whole["train"]) > 0


# ---- the trainer's blocks, unchanged -----------------------------------------------------------------------------

CONFIGS = [dict(train_tokens=2048, eval_tokens_per_domain=256, block_size=64),
           dict(train_tokens=4096, eval_tokens_per_domain=128, block_size=32, domains=["dict_devil", "fortunes"]),
           dict(train_tokens=24_576, eval_tokens_per_domain=1024, block_size=128)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_prepare_blocks_equals_the_trainers_prepare_data(tok, cfg):
    from stlm_nb.trainer import DataConfig, prepare_data
    ref = prepare_data(DataConfig(**cfg), tok, steering=True)
    got = prepare_blocks(load_corpus(domains=cfg.get("domains")), tok, block_size=cfg["block_size"], train_tokens=cfg["train_tokens"],
                         eval_tokens_per_domain=cfg["eval_tokens_per_domain"], steering=True)
    assert list(got) == list(ref)
    for k in ("train", "validation", "steering"):
        assert got[k].features == ref[k].features and got[k][:] == ref[k][:], k
    assert got["stats"] == ref["stats"]


def _digest(out: dict) -> dict:
    h = {}
    for k, v in out.items():
        if k == "stats": h[k] = hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]; continue
        h[k] = [len(v), v.column_names, fingerprint_blocks(v["input_ids"]), fingerprint_blocks(v["labels"])[:16],
                hashlib.sha256("\n".join(v["domain"]).encode()).hexdigest()[:16], list(v["block_idx"]) == list(range(len(v)))]
    return h


# measured with the trainer's prepare_data before prepare_blocks existed (smollm2-135m's tokenizer, the embedded sample)
PINNED = {
    (2048, 256, 64): {
        "train": [32, ["input_ids", "labels", "domain", "block_idx"], "81b4bcc9822c3ab1fa04d9ddb80d6ddf6abf359fdde8213f982e7a7d300efa78", "24cfde38832a7e51", "7a55f754de7637f8", True],
        "stats": "5912043b3309b6a0",
        "validation": [36, ["input_ids", "labels", "domain", "block_idx"], "7e3a982a2369758922900677385db480663b368c8507e9945faf55daf9028a11", "7e3a982a23697589", "03206ec840d262d4", True],
        "steering": [36, ["input_ids", "labels", "domain", "block_idx"], "0c542191fcf3de029ff35d55fba3aacb5277cb5f8b6b715c1d82c89217abb922", "0c542191fcf3de02", "03206ec840d262d4", True]},
    (24_576, 1024, 128): {  # DataConfig's defaults
        "train": [192, ["input_ids", "labels", "domain", "block_idx"], "77feea9cbdea763209d9b4e275576bfcbf82a38c9fc8bc9cba319f3656262b41", "b1cc240260f911b8", "d088c8edc45698f3", True],
        "stats": "390fecc26f275196",
        "validation": [72, ["input_ids", "labels", "domain", "block_idx"], "1841439a0644f7e8f5f190f99b2d01c90f4ca44241492ea5a0c0abe341ee1608", "1841439a0644f7e8", "af7bd5a4c7664049", True],
        "steering": [72, ["input_ids", "labels", "domain", "block_idx"], "6adea362e58bbbd62bb34bf1fd38f64794b072e569245d981a2b317762c67aa3", "6adea362e58bbbd6", "af7bd5a4c7664049", True]},
}


@pytest.mark.parametrize("budget", list(PINNED))
def test_prepare_blocks_fingerprints_are_pinned(tok, budget):
    train_tokens, eval_tokens, block_size = budget
    out = prepare_blocks(load_corpus(), tok, block_size=block_size, train_tokens=train_tokens, eval_tokens_per_domain=eval_tokens, steering=True)
    assert _digest(out) == PINNED[budget]


def test_prepare_blocks_with_processes_gives_the_same_blocks(tok):
    corpus = load_corpus(domains="dict_devil")
    kw = dict(block_size=64, train_tokens=4096, eval_tokens_per_domain=256)
    one, two = prepare_blocks(corpus, tok, **kw), prepare_blocks(corpus, tok, num_proc=2, **kw)
    for k in ("train", "validation"): assert one[k][:] == two[k][:], k
