"""Bring your own corpus through the pipeline stage: a parquet file with its own column names gives exactly the blocks
of the same documents in the embedded layout; a run trains on it end to end (offline tasks included); a hub id fails
offline at once, before anything is written."""
import time

import pytest

from stlm_nb.data import load_corpus
from stlm_nb.trainer import DataConfig, DistillConfig, prepare_data, run_distillation


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
    "The embedded sample's documents as one parquet file, text in `content`, domain in `topic`."
    d = tmp_path_factory.mktemp("byo-corpus")
    load_corpus().rename_columns({"text": "content", "domain": "topic"}).to_parquet(str(d / "corpus.parquet"))
    return d / "corpus.parquet"


def test_parquet_with_own_columns_gives_the_same_blocks(parquet_corpus):
    from stlm_nb.models import load_teacher_tokenizer
    tok = load_teacher_tokenizer("smollm2-135m")
    small = dict(train_tokens=2_048, eval_tokens_per_domain=256, block_size=64)
    ref = prepare_data(DataConfig(**small), tok, steering=True)
    got = prepare_data(DataConfig(corpus=str(parquet_corpus), text_column="content", domain_column="topic", **small), tok, steering=True)
    for split in ("train", "validation", "steering"):
        assert got[split]["input_ids"] == ref[split]["input_ids"] and got[split]["domain"] == ref[split]["domain"]
    assert got["stats"] == ref["stats"]


def test_run_on_a_parquet_corpus(tmp_path, parquet_corpus, tiny_teacher, one_thread):
    m = run_distillation(DistillConfig.from_parameters({**DistillConfig.SMOKE, "seeds": [0], "teachers": [str(tiny_teacher)],
                                                        "tokenizer": str(tiny_teacher), "max_steps": 2, "baseline": False,
                                                        "corpus": str(parquet_corpus), "text_column": "content", "domain_column": "topic",
                                                        "out_dir": str(tmp_path / "run")}))
    assert len(m["corpus"]["domain_stats"]) == 9 and m["runs"]["kd-seed0"]["tasks"]
    assert (tmp_path / "run" / "offline_tasks" / "minimal_pairs.jsonl").exists()


def test_hub_id_fails_offline_at_once(tmp_path):
    t0 = time.time()
    with pytest.raises(ValueError, match="nosuch-org/nosuch-corpus"):
        run_distillation(DistillConfig.from_parameters(smoke=True, corpus="nosuch-org/nosuch-corpus", out_dir=str(tmp_path / "run")))
    assert time.time() - t0 < 30 and not (tmp_path / "run").exists()
