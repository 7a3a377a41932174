"""The store's rows as Python sees them: one frozen dataclass per table.

``Store`` reads SQLite rows into these (JSON columns decoded, checkpoint paths
made absolute) so that no caller indexes a dict by column name; a misspelt
field is an error where it is written, not a ``KeyError`` in a worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kinds of answer a labeler can give. Only "best" and "ranking"
# yield pairs; "tie", "all_bad" and "skip" are kept as they are.
LABEL_KINDS = ("best", "ranking", "tie", "all_bad", "skip")
DECIDED_KINDS = ("best", "ranking")
# Statuses a background job moves through (see rlhf/jobs.py).
JOB_STATUSES = ("queued", "running", "paused", "done", "failed", "cancelled")
ACTIVE_JOB_STATUSES = ("queued", "running", "paused")


def count_decided(kinds: Mapping[str, int]) -> int:
    """How many of these labels (a count per kind) state a preference, so train."""
    return sum(kinds.get(kind, 0) for kind in DECIDED_KINDS)


def _json(text: str | None, empty: Any = None) -> Any:
    return json.loads(text) if text else empty


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    source: str | None = None


@dataclass(frozen=True)
class Completion:
    id: int
    prompt_id: int
    text: str
    n_tokens: int
    finish_reason: str
    policy_version: int | None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    best_of: int | None = None          # picked by a reward model among this many samples of the version
    reward_version: int | None = None   # that reward model

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Completion:
        return cls(id=row["id"], prompt_id=row["prompt_id"], text=row["text"], n_tokens=row["n_tokens"],
                   finish_reason=row["finish_reason"], policy_version=row["policy_version"],
                   token_ids=_json(row["token_ids"]), logprobs=_json(row["logprobs"]),
                   best_of=row.get("best_of"), reward_version=row.get("reward_version"))


@dataclass(frozen=True)
class Comparison:
    """One label: the completions shown, in order, and what the labeler said."""

    id: int
    prompt_id: int
    completion_ids: list[int]
    kind: str                   # one of LABEL_KINDS
    choice: list[int] | None    # shown positions, best first
    labeler: str | None
    seconds: float | None
    created_at: str
    purpose: str = "preference"

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Comparison:
        return cls(id=row["id"], prompt_id=row["prompt_id"], completion_ids=_json(row["completion_ids"], []),
                   kind=row["kind"], choice=_json(row["choice"]), labeler=row["labeler"],
                   seconds=row["seconds"], created_at=row["created_at"], purpose=row["purpose"])


@dataclass(frozen=True)
class Job:
    """A background job's row: what it was asked to do and how far it got."""

    id: int
    kind: str                   # a key of rlhf.jobs.RUNNERS
    status: str                 # one of JOB_STATUSES
    config: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    step: int = 0
    total_steps: int | None = None
    control: str | None = None  # 'pause' | 'cancel' | None, set by whoever steers the job
    error: str | None = None
    created_at: str = ""
    started_at: str | None = None
    heartbeat_at: str | None = None
    finished_at: str | None = None

    @property
    def active(self) -> bool:
        """Queued, running or paused: not yet ended."""
        return self.status in ACTIVE_JOB_STATUSES

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        return cls(**{**row, "config": _json(row["config"], {})})


@dataclass(frozen=True)
class Checkpoint:
    """A saved adapter registered as a version of its kind ('policy' or 'reward')."""

    kind: str
    version: int
    path: str                   # absolute
    job_id: int | None = None
    parent_version: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    id: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], path: str) -> Checkpoint:
        return cls(kind=row["kind"], version=row["version"], path=path, job_id=row["job_id"],
                   parent_version=row["parent_version"], meta=_json(row["meta"], {}),
                   created_at=row["created_at"], id=row["id"])


@dataclass(frozen=True)
class RolloutRow:
    """One completion of a PPO batch as it was scored and measured."""

    id: int
    job_id: int
    iteration: int
    policy_version: int | None  # the saved version that sampled it; None when it was never saved
    prompt: str
    completion: str
    n_tokens: int
    finish_reason: str
    score: float | None
    spread: float | None
    kl: float | None
    token_ids: list[int] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RolloutRow:
        fields = {k: row[k] for k in ("id", "job_id", "iteration", "policy_version", "prompt", "completion",
                                       "n_tokens", "finish_reason", "score", "spread", "kl")}
        return cls(**fields, token_ids=_json(row["token_ids"]))
