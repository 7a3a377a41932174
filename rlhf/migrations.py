"""The store's schema, as the steps that build it: ``MIGRATIONS[i]`` takes a
database from version ``i`` to ``i + 1`` (kept in ``PRAGMA user_version``).

A step, once released, never changes: a new column or table is a new step at
the end. ``Store`` runs the missing steps on open, in one immediate transaction.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils


def _v0_to_v1(db: sqlite_utils.Database) -> None:
    """Prompts, completions and labels: what the first release recorded."""
    db.execute(
        """CREATE TABLE prompts (
            id INTEGER PRIMARY KEY,
            text TEXT NOT NULL UNIQUE,
            source TEXT,
            meta TEXT,
            created_at TEXT NOT NULL,
            edited_at TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE completions (
            id INTEGER PRIMARY KEY,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            text TEXT NOT NULL,
            token_ids TEXT,              -- JSON list of sampled ids, EOS included
            n_tokens INTEGER NOT NULL,
            finish_reason TEXT NOT NULL, -- 'eos' | 'length' | 'imported'
            policy_version INTEGER,      -- 0 = reference/base; NULL = imported
            temperature REAL,
            top_p REAL,
            max_new_tokens INTEGER,
            logprobs TEXT,               -- JSON list, one per sampled token
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX completions_prompt ON completions(prompt_id)")
    db.execute(
        """CREATE TABLE comparisons (
            id INTEGER PRIMARY KEY,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            completion_ids TEXT NOT NULL, -- JSON list, in the order shown
            kind TEXT NOT NULL,           -- one of LABEL_KINDS
            choice TEXT,                  -- JSON: shown positions, best first
            labeler TEXT,
            seconds REAL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE pairs (
            id INTEGER PRIMARY KEY,
            comparison_id INTEGER REFERENCES comparisons(id) ON DELETE CASCADE,
            prompt_id INTEGER NOT NULL REFERENCES prompts(id),
            chosen_id INTEGER NOT NULL REFERENCES completions(id),
            rejected_id INTEGER NOT NULL REFERENCES completions(id),
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX pairs_comparison ON pairs(comparison_id)")


def _v1_to_v2(db: sqlite_utils.Database) -> None:
    """Imported pairs, background jobs, their metrics and checkpoints."""
    db.execute("ALTER TABLE pairs ADD COLUMN source TEXT NOT NULL DEFAULT 'label'")
    # Hash of (prompt, chosen, rejected) for imported pairs: importing a file
    # twice must not duplicate them. NULL for labeled pairs (never deduplicated).
    db.execute("ALTER TABLE pairs ADD COLUMN import_key TEXT")
    db.execute("CREATE UNIQUE INDEX pairs_import_key ON pairs(import_key)")
    db.execute("ALTER TABLE comparisons ADD COLUMN purpose TEXT NOT NULL DEFAULT 'preference'")
    db.execute(
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,           -- 'reward' | 'ppo' | ...
            status TEXT NOT NULL,         -- one of JOB_STATUSES
            config TEXT,                  -- JSON
            pid INTEGER,
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER,
            control TEXT,                 -- 'cancel' | 'pause' | NULL, set by the app
            error TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            heartbeat_at TEXT,
            finished_at TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE metrics (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            step INTEGER NOT NULL,
            name TEXT NOT NULL,
            value REAL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX metrics_job_step ON metrics(job_id, step)")
    db.execute(
        """CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,           -- 'policy' | 'reward'
            version INTEGER NOT NULL,     -- 1, 2, ... per kind; policy 0 = base
            path TEXT NOT NULL,
            job_id INTEGER REFERENCES jobs(id),
            parent_version INTEGER,
            meta TEXT,                    -- JSON: normalization, metrics, ...
            created_at TEXT NOT NULL,
            UNIQUE(kind, version)
        )"""
    )


def _v2_to_v3(db: sqlite_utils.Database) -> None:
    """Every PPO rollout, kept: what the policy produced at each iteration."""
    db.execute(
        """CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            iteration INTEGER NOT NULL,   -- the PPO iteration whose batch it was
            policy_version INTEGER,       -- the saved version that sampled it; NULL if unsaved
            prompt TEXT NOT NULL,
            completion TEXT NOT NULL,
            token_ids TEXT,               -- JSON list of sampled ids, EOS included
            n_tokens INTEGER NOT NULL,
            finish_reason TEXT NOT NULL,  -- 'eos' | 'length'
            score REAL,                   -- what PPO maximized for it
            spread REAL,                  -- the reward ensemble's disagreement
            kl REAL,                      -- summed per-token KL to the reference, in nats
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX rollouts_job_iteration ON rollouts(job_id, iteration)")


def _v3_to_v4(db: sqlite_utils.Database) -> None:
    """Best-of-N answers: sampled from a version, picked by a reward model among N."""
    db.execute("ALTER TABLE completions ADD COLUMN best_of INTEGER")         # N; NULL for a plain sample
    db.execute("ALTER TABLE completions ADD COLUMN reward_version INTEGER")  # the reward model that picked it


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v0_to_v1, _v1_to_v2, _v2_to_v3, _v3_to_v4]
SCHEMA_VERSION = len(MIGRATIONS)
