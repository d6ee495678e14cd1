"""Shared pytest setup: offline hub, paths of the project's venv tools, and fixtures shared by several test files."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running pytest holds papermill, torchrun, stlm-distill, jupyter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def env():
    "Environment for subprocesses: offline, quiet, one thread each (2 cores shared)."
    e = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture
def offline(monkeypatch):
    "HF_HUB_OFFLINE=1, and any network use (hub lookups of models or datasets, any socket) fails the test."
    import socket
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    def no_network(*a, **k): raise AssertionError("network used while HF_HUB_OFFLINE=1")
    for name in ("model_info", "dataset_info"): monkeypatch.setattr(huggingface_hub, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture
def one_thread(monkeypatch):
    "Papermill kernels inherit it: tiny models gain nothing from threads, and on a busy shared CPU spinning threads cost 2-3x."
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A save_pretrained dir: llama-tiny (37k parameters) with its own 512-token BPE, trained 100 steps on a quarter of
    the train split (held-out CE ~5.0 nats/token against ~6.2 untrained): a teacher that is really better than an
    untrained model, built in seconds, for the experiment notebooks' smokes in place of the packaged 135M teacher (whose
    49k vocabulary dominates a tiny student's step time; tests/test_distill_notebook.py scores the packaged one)."""
    import torch
    from stlm_nb.data import load_corpus, split_corpus
    from stlm_nb.models import make_student
    from stlm_nb.tokenizer import train_bpe
    texts = split_corpus(load_corpus())["train"]["text"][::4]  # every domain
    tok = train_bpe(texts, vocab_size=512)
    ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    model, g = make_student("llama-tiny", tokenizer=tok, seed=1), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads(); torch.set_num_threads(1)  # a busy shared CPU: spinning threads cost 2-3x
    try:
        for _ in range(100):
            batch = blocks[torch.randint(len(blocks), (16,), generator=g)]
            model(input_ids=batch, labels=batch).loss.backward(); opt.step(); opt.zero_grad()
    finally: torch.set_num_threads(threads)
    d = tmp_path_factory.mktemp("tiny-teacher")
    model.eval().save_pretrained(d); tok.save_pretrained(d)
    return d


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs; `make test` skips them (run with `pytest -m slow`)")
