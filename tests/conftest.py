"""Shared fixtures (a tiny random model in seconds, a fresh store per test) and
the helpers several test modules use (a fake sampler, the app under test,
synthetic preference pairs).

Converted models are cached in RLHF_CACHE_DIR (a folder under the system temp
dir unless set), so only the first test run pays for building them.
"""

from __future__ import annotations

import itertools
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("RLHF_CACHE_DIR", str(Path(tempfile.gettempdir()) / "rlhf-workbench-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads busy-wait by default; with jobs and tests sharing two
# cores that makes everything several times slower (measured in the app).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rlhf.sampling import Sample  # noqa: E402
from rlhf.store import Store  # noqa: E402
from workbench.app import WorkbenchApp  # noqa: E402
from workbench.screens.label import LabelScreen  # noqa: E402
from rlhf.preferences import record_label  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, built from a config."""
    from rlhf.models import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture
def tiny_stack(tiny_dir):
    """A fresh ModelStack on the tiny model in float32, whatever the CPU: tests
    compare it with models loaded in float32 (tests/engine/test_precision.py
    checks what must hold in bfloat16)."""
    import torch

    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack

    torch.manual_seed(0)
    return load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="float32"))


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


# --- helpers shared by the test modules ----------------------------------------------------

WORDS = "red green blue sky tree river stone cloud house road bird fish lamp chair door".split()


def synthetic_pairs(store, n: int, seed: int = 0, word: str = "banana") -> None:
    """A labeler who prefers the completion containing ``word``; both completions
    have the same length, so only the word tells them apart."""
    rng = random.Random(seed)
    for i in range(n):
        a, b = rng.choices(WORDS, k=5), rng.choices(WORDS, k=5)
        a.insert(rng.randrange(6), word)
        b.insert(rng.randrange(6), rng.choice(WORDS))
        store.add_imported_pair(f"Question {i}: say something", " ".join(a), " ".join(b), "synthetic", f"k{i}")


PROMPTS = ["First prompt?", "Second prompt?", "Third prompt?", "Fourth prompt?"]


# --- drift labels: a completion per policy version, labeled as the drift view does


def add_completion(store: Store, prompt_id: int, version: int, text: str) -> int:
    """A finished one-token completion of policy ``version``."""
    return store.add_completions(prompt_id, [{"text": text, "n_tokens": 1, "finish_reason": "eos",
                                              "policy_version": version}])[0]


def drift_label(store: Store, versions_shown: list[int], kind: str, choice: list[int] | None = None,
                prompt: str = "p") -> None:
    """A drift label over one answer of each version shown, in that order."""
    prompt_id = store.add_prompt(prompt)
    ids = [add_completion(store, prompt_id, v, f"answer of v{v}") for v in versions_shown]
    record_label(store, prompt_id, ids, kind, choice, purpose="drift")


class FakeSampler:
    """Numbered completions; optionally slow; counts its calls."""

    def __init__(self, delay: float = 0.0, cut_every: int = 0) -> None:
        self.delay = delay
        self.cut_every = cut_every
        self.calls: list[str] = []
        self._n = itertools.count(1)
        self.release = threading.Event()
        self.release.set()

    def __call__(self, prompts: list[str], k: int) -> list[list[Sample]]:
        self.release.wait(10)
        time.sleep(self.delay)
        out = []
        for p in prompts:
            self.calls.append(p)
            row = []
            for _ in range(k):
                n = next(self._n)
                cut = bool(self.cut_every) and n % self.cut_every == 0
                row.append(Sample(text=f"answer {n} to {p}", token_ids=[5] * (n % 7 + 1) + ([] if cut else [2]),
                                  logprobs=[-1.0] * (n % 7 + 1 + (0 if cut else 1)),
                                  finish_reason="length" if cut else "eos"))
            out.append(row)
        return out


def make_app(store: Store, sampler: Callable | None = None, k: int = 4, **kw) -> WorkbenchApp:
    if not store.prompts():
        store.add_prompts(PROMPTS)
    return WorkbenchApp(store, k=k, labeler="tester", sampler=sampler or FakeSampler(),
                        rng=random.Random(0), **kw)


async def wait_for(pilot, condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> None:
    """Let the app run until ``condition`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(interval)


def label_screen(app: WorkbenchApp) -> LabelScreen:
    return next(s for s in app.screen_stack if isinstance(s, LabelScreen))


async def shown(pilot, app: WorkbenchApp) -> LabelScreen:
    screen = label_screen(app)
    await wait_for(pilot, lambda: len(screen.shown) == app.k)
    return screen
