"""Shared fixtures: a tiny random model (seconds), a fresh store per test.

Converted models are cached in RLHF_CACHE_DIR (a folder under the system temp
dir unless set), so only the first test run pays for building them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RLHF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "rlhf-workbench-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads busy-wait by default; with jobs and tests sharing two
# cores that makes everything several times slower (measured in the app).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rlhf.store import Store  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, built from a config."""
    from rlhf.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def tiny_stack(tiny_dir):
    """A fresh ModelStack on the tiny model (full precision: fast and deterministic)."""
    import torch

    from rlhf.models import ModelOptions, load_stack

    torch.manual_seed(0)
    return load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu"))


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "workbench.db"


@pytest.fixture
def cli_db(db_path) -> Path:
    """An empty database that exists: CLI commands other than `init` refuse a missing one."""
    Store(db_path).close()
    return db_path


@pytest.fixture
def store(db_path):
    with Store(db_path) as s:
        yield s
