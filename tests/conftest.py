"""Shared pytest setup: offline hub, paths of the project's venv tools."""
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs; `make test` skips them (run with `pytest -m slow`)")
