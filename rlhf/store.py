"""The workbench's tables: prompts, completions, labels and pairs, jobs and
their metrics, checkpoints. The single source of truth, and the channel between
the app, the CLI and background jobs.

Opening, the checks before anything is written, migrations and the one
transaction every write goes through are ``rlhf.database``'s; this module says
what is read and written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf.database import Database, now
from rlhf.errors import UserError
from rlhf.rows import (ACTIVE_JOB_STATUSES, JOB_STATUSES, LABEL_KINDS, Checkpoint, Comparison, Completion, Job, Prompt,
                       RolloutRow)

# Source of pairs (and of prompts first seen in them) that `rlhf import` added:
# 'import:<file name>'. A prompt the researcher added keeps its own source.
IMPORT_SOURCE_PREFIX = "import:"
_NOT_IMPORTED = f"(source IS NULL OR source NOT LIKE '{IMPORT_SOURCE_PREFIX}%')"
# Source of the drift view's probe prompts: their answers are blind pairs of two
# policy versions, never a set of one policy's samples to label.
PROBE_SOURCE = "probes"
# How kept rollouts can be ordered: name -> column.
ROLLOUT_SORTS = {"score": "score", "kl": "kl", "length": "n_tokens"}


class Store(Database):
    """The workbench's tables: what is read and written, one method per question."""

    # -- prompts

    def add_prompts(self, texts: Iterable[str], source: str | None = None,
                    meta: Iterable[dict[str, Any] | None] | None = None) -> tuple[int, int]:
        """Add prompts, skipping exact duplicates. Returns (added, already there)."""
        texts = list(texts)
        metas = list(meta) if meta is not None else [None] * len(texts)
        added = 0
        mine = source is None or not source.startswith(IMPORT_SOURCE_PREFIX)
        with self._write() as db:
            for text, m in zip(texts, metas):
                cur = db.execute(
                    "INSERT OR IGNORE INTO prompts (text, source, meta, created_at) VALUES (?, ?, ?, ?)",
                    [text, source, json.dumps(m) if m else None, now()],
                )
                if not cur.rowcount and mine:
                    # Known only from imported pairs, so out of the labeling queue:
                    # the researcher's own prompt takes it over (its pairs stay).
                    cur = db.execute(
                        f"UPDATE prompts SET source = ?, meta = COALESCE(?, meta) WHERE text = ? AND NOT "
                        f"{_NOT_IMPORTED}", [source, json.dumps(m) if m else None, text])
                added += cur.rowcount
        return added, len(texts) - added

    def add_prompt(self, text: str, source: str | None = None) -> int:
        """Add one prompt (or find it) and return its id."""
        self.add_prompts([text], source)
        row = self._one("SELECT id FROM prompts WHERE text = ?", [text])
        assert row is not None
        return row["id"]

    def edit_prompt(self, prompt_id: int, text: str) -> None:
        with self._write() as db:
            db.execute("UPDATE prompts SET text = ?, edited_at = ? WHERE id = ?", [text, now(), prompt_id])

    def prompts(self, *, include_imported: bool = False) -> list[Prompt]:
        """The researcher's prompts in id order; with ``include_imported``, also those
        that came only with imported pairs (training data, not a labeling queue)."""
        where = "" if include_imported else f" WHERE {_NOT_IMPORTED}"
        return [Prompt(r["id"], r["text"], r["source"])
                for r in self._rows(f"SELECT id, text, source FROM prompts{where} ORDER BY id")]

    def prompt(self, prompt_id: int) -> Prompt:
        r = self._one("SELECT id, text, source FROM prompts WHERE id = ?", [prompt_id])
        if r is None:
            raise UserError(f"no prompt with id {prompt_id}")
        return Prompt(r["id"], r["text"], r["source"])

    def unlabeled_prompt_ids(self, *, include_imported: bool = False) -> list[int]:
        """Prompts with no preference label yet (skips count as labeled); see
        ``prompts`` for ``include_imported``."""
        extra = "" if include_imported else f" AND {_NOT_IMPORTED}"
        return [r["id"] for r in self._rows(
            "SELECT id FROM prompts WHERE id NOT IN "
            f"(SELECT prompt_id FROM comparisons WHERE purpose = 'preference'){extra} ORDER BY id")]

    # -- completions

    def add_completions(self, prompt_id: int, rows: Iterable[dict[str, Any]]) -> list[int]:
        """Record sampled completions; each row holds the ``completions`` columns."""
        ids = []
        with self._write() as db:
            for row in rows:
                row = dict(row, prompt_id=prompt_id, created_at=now())
                for key in ("token_ids", "logprobs"):
                    if isinstance(row.get(key), list):
                        row[key] = json.dumps(row[key])
                cols = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                cur = db.execute(f"INSERT INTO completions ({cols}) VALUES ({marks})", list(row.values()))
                ids.append(cur.lastrowid)
        return ids

    def completions(self, ids: Iterable[int]) -> list[Completion]:
        """Completions by id, in the order asked."""
        ids = list(ids)
        if not ids:
            return []
        marks = ", ".join("?" for _ in ids)
        by_id = {r["id"]: Completion.from_row(r) for r in self._rows(f"SELECT * FROM completions WHERE id IN ({marks})", ids)}
        return [by_id[i] for i in ids]

    def completions_for_prompt(self, prompt_id: int, policy_version: int | None = None,
                               best_of: int | None = None) -> list[Completion]:
        """A prompt's completions, oldest first; with ``policy_version``, that
        version's plain samples, or with ``best_of`` its best-of-N picks."""
        sql = "SELECT * FROM completions WHERE prompt_id = ?"
        params: list[Any] = [prompt_id]
        if policy_version is not None:
            sql += " AND policy_version = ? AND best_of IS ?"
            params += [policy_version, best_of]
        return [Completion.from_row(r) for r in self._rows(sql + " ORDER BY id", params)]

    def pending_sets(self, k: int) -> list[tuple[int, list[Completion]]]:
        """Sampled completions no comparison has shown yet, as the sets a labeler
        would be shown: per prompt and policy version (best-of-N picks apart), runs of consecutive ids (one
        sampling call stores its K in a row) cut into sets of ``k``; a shorter
        rest of at least two is a set too. Oldest first. The drift view's blind
        pairs (probe prompts) are not preference sets and never pend here."""
        rows = self._rows(
            "SELECT * FROM completions WHERE policy_version IS NOT NULL AND id NOT IN "
            "(SELECT value FROM comparisons, json_each(comparisons.completion_ids)) AND prompt_id NOT IN "
            "(SELECT id FROM prompts WHERE source = ?) ORDER BY prompt_id, id", [PROBE_SOURCE])
        sets: list[tuple[int, list[Completion]]] = []
        run: list[Completion] = []
        for c in map(Completion.from_row, rows):
            if run and (c.prompt_id != run[-1].prompt_id or c.policy_version != run[-1].policy_version
                        or c.best_of != run[-1].best_of or c.id != run[-1].id + 1 or len(run) == k):
                sets.append((run[0].prompt_id, run))
                run = []
            run.append(c)
        if run:
            sets.append((run[0].prompt_id, run))
        return sorted((s for s in sets if len(s[1]) >= 2), key=lambda s: s[1][0].id)

    def sampling_definition(self, completion_ids: Iterable[int]) -> dict[str, Any] | None:
        """How most of these completions were sampled (temperature, top-p, length
        budget), or None when none was sampled here (imported text)."""
        ids = sorted(set(completion_ids))
        if not ids:
            return None
        marks = ", ".join("?" for _ in ids)
        row = self._one(
            "SELECT temperature, top_p, max_new_tokens, COUNT(*) AS n FROM completions "
            f"WHERE id IN ({marks}) AND policy_version IS NOT NULL AND temperature IS NOT NULL "
            "GROUP BY temperature, top_p, max_new_tokens ORDER BY n DESC LIMIT 1", ids)
        return None if row is None else {k: row[k] for k in ("temperature", "top_p", "max_new_tokens")}

    # -- labels

    def record_comparison(self, prompt_id: int, completion_ids: list[int], kind: str,
                          choice: list[int] | None, pairs: list[tuple[int, int]], *,
                          labeler: str | None = None, seconds: float | None = None,
                          purpose: str = "preference") -> int:
        """Record one label and the (chosen, rejected) completion pairs it implies,
        in one transaction. Returns the comparison id."""
        if kind not in LABEL_KINDS:
            raise ValueError(f"unknown label kind {kind!r}; expected one of {LABEL_KINDS}")
        stamp = now()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO comparisons (prompt_id, completion_ids, kind, choice, labeler, seconds, "
                "created_at, purpose) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [prompt_id, json.dumps(completion_ids), kind, json.dumps(choice) if choice is not None else None,
                 labeler, seconds, stamp, purpose],
            )
            cid = cur.lastrowid
            for chosen, rejected in pairs:
                db.execute(
                    "INSERT INTO pairs (comparison_id, prompt_id, chosen_id, rejected_id, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [cid, prompt_id, chosen, rejected, stamp],
                )
        assert cid is not None
        return cid

    def last_comparison(self, purpose: str = "preference", labeler: str | None = None) -> Comparison | None:
        sql = "SELECT * FROM comparisons WHERE purpose = ?"
        params: list[Any] = [purpose]
        if labeler is not None:
            sql += " AND labeler = ?"
            params.append(labeler)
        row = self._one(sql + " ORDER BY id DESC LIMIT 1", params)
        return None if row is None else Comparison.from_row(row)

    def delete_comparison(self, comparison_id: int) -> None:
        """Remove one label and its pairs, nothing else (undo)."""
        with self._write() as db:
            db.execute("DELETE FROM pairs WHERE comparison_id = ?", [comparison_id])
            db.execute("DELETE FROM comparisons WHERE id = ?", [comparison_id])

    def comparisons(self, purpose: str | None = None) -> list[Comparison]:
        sql = "SELECT * FROM comparisons"
        params: list[Any] = []
        if purpose is not None:
            sql += " WHERE purpose = ?"
            params.append(purpose)
        return [Comparison.from_row(r) for r in self._rows(sql + " ORDER BY id", params)]

    def add_imported_pair(self, prompt: str, chosen: str, rejected: str, source: str, key: str) -> bool:
        """Store one imported pair (prompt, two completions, the pair) unless a pair
        with the same key is already there. Returns True when it was added."""
        return self.add_imported_pairs([(prompt, chosen, rejected, key)], source) == 1

    def add_imported_pairs(self, pairs: Iterable[tuple[str, str, str, str]], source: str) -> int:
        """Store imported (prompt, chosen, rejected, key) pairs in one transaction
        (one commit for a whole file, not one per pair), skipping keys already
        there. Returns how many were added."""
        added = 0
        with self._write() as db:
            for prompt, chosen, rejected, key in pairs:
                if db.execute("SELECT 1 FROM pairs WHERE import_key = ?", [key]).fetchone():
                    continue
                db.execute("INSERT OR IGNORE INTO prompts (text, source, created_at) VALUES (?, ?, ?)",
                           [prompt, source, now()])
                prompt_id = db.execute("SELECT id FROM prompts WHERE text = ?", [prompt]).fetchone()[0]
                ids = []
                for text in (chosen, rejected):
                    cur = db.execute(
                        "INSERT INTO completions (prompt_id, text, n_tokens, finish_reason, created_at) "
                        "VALUES (?, ?, 0, 'imported', ?)", [prompt_id, text, now()])
                    ids.append(cur.lastrowid)
                db.execute(
                    "INSERT INTO pairs (prompt_id, chosen_id, rejected_id, created_at, source, import_key) "
                    "VALUES (?, ?, ?, ?, ?, ?)", [prompt_id, ids[0], ids[1], now(), source, key])
                added += 1
        return added

    def pairs(self, *, since: str | None = None, policy_version: int | None = None,
              labeler: str | None = None, source: str | None = None,
              purpose: str = "preference") -> list[dict[str, Any]]:
        """Preference pairs as text with their metadata, oldest first.

        ``source`` is 'label' for the researcher's own labels, 'import' for every
        imported file, or an exact source string. Filters are ANDed."""
        sql = """
            SELECT p.id AS pair_id, p.comparison_id, p.prompt_id, p.source, p.created_at,
                   pr.text AS prompt, c.text AS chosen, r.text AS rejected,
                   p.chosen_id, p.rejected_id, c.finish_reason AS chosen_finish,
                   r.finish_reason AS rejected_finish,
                   c.policy_version AS policy_version, cmp.labeler AS labeler
            FROM pairs p
            JOIN prompts pr ON pr.id = p.prompt_id
            JOIN completions c ON c.id = p.chosen_id
            JOIN completions r ON r.id = p.rejected_id
            LEFT JOIN comparisons cmp ON cmp.id = p.comparison_id
            WHERE (cmp.purpose IS NULL OR cmp.purpose = ?)"""
        params: list[Any] = [purpose]
        if since is not None:
            sql += " AND p.created_at >= ?"
            params.append(since)
        if policy_version is not None:
            sql += " AND c.policy_version = ? AND r.policy_version = ?"
            params += [policy_version, policy_version]
        if labeler is not None:
            sql += " AND cmp.labeler = ?"
            params.append(labeler)
        if source == "import":
            sql += " AND p.source != 'label'"
        elif source is not None:
            sql += " AND p.source = ?"
            params.append(source)
        return self._rows(sql + " ORDER BY p.id", params)

    # -- jobs and metrics

    def create_job(self, kind: str, config: dict[str, Any], *, total_steps: int | None = None,
                   exclusive: bool = True) -> int:
        """Queue a job. With ``exclusive``, refuse while another job is active:
        two training jobs on one machine would only fight for its cores and memory
        (``rlhf.jobs.start_job`` first clears jobs whose process died)."""
        with self._write() as db:
            marks = ", ".join("?" for _ in ACTIVE_JOB_STATUSES)
            active = db.execute(f"SELECT id, kind, status FROM jobs WHERE status IN ({marks}) ORDER BY id LIMIT 1",
                                ACTIVE_JOB_STATUSES).fetchone()
            if exclusive and active is not None:
                raise UserError(f"job {active['id']} ({active['kind']}) is already {active['status']} on this "
                                "database: wait for it, or cancel it first")
            cur = db.execute(
                "INSERT INTO jobs (kind, status, config, total_steps, created_at) VALUES (?, 'queued', ?, ?, ?)",
                [kind, json.dumps(config), total_steps, now()])
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_job(self, job_id: int, **fields: Any) -> None:
        if not fields:
            return
        if "status" in fields and fields["status"] not in JOB_STATUSES:
            raise ValueError(f"unknown job status {fields['status']!r}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as db:
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id])

    def job(self, job_id: int) -> Job:
        row = self._one("SELECT * FROM jobs WHERE id = ?", [job_id])
        if row is None:
            raise UserError(f"no job with id {job_id}")
        return Job.from_row(row)

    def jobs(self, kind: str | None = None, *, active: bool = False) -> list[Job]:
        """Jobs in id order: of one kind, or only those not yet ended."""
        sql, params = "SELECT * FROM jobs WHERE 1", []
        if kind is not None:
            sql, params = sql + " AND kind = ?", [kind]
        if active:
            sql += f" AND status IN ({', '.join('?' for _ in ACTIVE_JOB_STATUSES)})"
            params += ACTIVE_JOB_STATUSES
        return [Job.from_row(r) for r in self._rows(sql + " ORDER BY id", params)]

    def fail_active_jobs(self, errors: dict[int, str]) -> None:
        """Mark these jobs failed with their error, those still active only (one
        may have finished since it was looked at)."""
        if not errors:
            return  # the usual case, and no write lock taken: a read-only look stays one
        marks = ", ".join("?" for _ in ACTIVE_JOB_STATUSES)
        with self._write() as db:
            for job_id, error in errors.items():
                db.execute(f"UPDATE jobs SET status = 'failed', error = ?, finished_at = ? "
                           f"WHERE id = ? AND status IN ({marks})", [error, now(), job_id, *ACTIVE_JOB_STATUSES])

    def log_metrics(self, job_id: int, step: int, values: dict[str, float]) -> None:
        stamp = now()
        with self._write() as db:
            db.conn.executemany(
                "INSERT INTO metrics (job_id, step, name, value, created_at) VALUES (?, ?, ?, ?, ?)",
                [(job_id, step, name, float(v), stamp) for name, v in values.items()])
            db.execute("UPDATE jobs SET step = ?, heartbeat_at = ? WHERE id = ?", [step, stamp, job_id])

    def metrics(self, job_id: int, after_step: int = -1) -> dict[str, list[tuple[int, float]]]:
        """Metric series of a job: name -> [(step, value), ...], steps > after_step."""
        series: dict[str, list[tuple[int, float]]] = {}
        for r in self._rows("SELECT step, name, value FROM metrics WHERE job_id = ? AND step > ? ORDER BY step",
                            [job_id, after_step]):
            series.setdefault(r["name"], []).append((r["step"], r["value"]))
        return series

    # -- PPO rollouts

    def add_rollouts(self, job_id: int, iteration: int, policy_version: int | None,
                     rows: Iterable[dict[str, Any]]) -> int:
        """Keep one iteration's batch: rows as ``Rollout.rows`` gives them."""
        stamp = now()
        values = [(job_id, iteration, policy_version, r["prompt"], r["completion"], json.dumps(r.get("token_ids")),
                   r["n_tokens"], r["finish_reason"], r["score"], r.get("spread"), r["kl"], stamp) for r in rows]
        with self._write() as db:
            db.conn.executemany(
                "INSERT INTO rollouts (job_id, iteration, policy_version, prompt, completion, token_ids, n_tokens, "
                "finish_reason, score, spread, kl, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        return len(values)

    def rollouts(self, job_id: int, iteration: int | None = None, *, sort: str | None = None,
                 limit: int | None = None) -> list[RolloutRow]:
        """A PPO job's kept rollouts, of one iteration or all; in batch order, or
        highest first by ``sort`` (one of ROLLOUT_SORTS)."""
        if sort is not None and sort not in ROLLOUT_SORTS:
            raise UserError(f"cannot sort rollouts by {sort!r}: use one of {', '.join(ROLLOUT_SORTS)}")
        sql, params = "SELECT * FROM rollouts WHERE job_id = ?", [job_id]
        if iteration is not None:
            sql += " AND iteration = ?"
            params.append(iteration)
        sql += f" ORDER BY {ROLLOUT_SORTS[sort]} DESC, id" if sort else " ORDER BY iteration, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [RolloutRow.from_row(r) for r in self._rows(sql, params)]

    def rollout_iterations(self, job_id: int) -> list[int]:
        """The iterations of a PPO job whose rollouts are kept, in order."""
        return [r["iteration"] for r in self._rows(
            "SELECT DISTINCT iteration FROM rollouts WHERE job_id = ? ORDER BY iteration", [job_id])]

    # -- checkpoints (policy and reward versions)

    def add_checkpoint(self, kind: str, path: str | Path, *, job_id: int | None = None,
                       parent_version: int | None = None, meta: dict[str, Any] | None = None) -> int:
        """Register a saved adapter as the next version of its kind; returns the version.
        A path beside the database is stored relative to it, so the two move together."""
        path = Path(path).resolve()
        if path.is_relative_to(self.path.parent):
            path = path.relative_to(self.path.parent)
        with self._write() as db:
            last = db.execute("SELECT MAX(version) FROM checkpoints WHERE kind = ?", [kind]).fetchone()[0]
            version = (last or 0) + 1
            db.execute(
                "INSERT INTO checkpoints (kind, version, path, job_id, parent_version, meta, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [kind, version, str(path), job_id, parent_version, json.dumps(meta or {}), now()])
        return version

    def update_checkpoint_meta(self, kind: str, version: int, meta: dict[str, Any]) -> None:
        """Replace a version's metadata (figures computed after it was saved)."""
        with self._write() as db:
            db.execute("UPDATE checkpoints SET meta = ? WHERE kind = ? AND version = ?",
                       [json.dumps(meta), kind, version])

    def checkpoints(self, kind: str) -> list[Checkpoint]:
        # A path stored relative to the database's folder is made absolute; an absolute one stays.
        return [Checkpoint.from_row(r, str(self.path.parent / r["path"]))
                for r in self._rows("SELECT * FROM checkpoints WHERE kind = ? ORDER BY version", [kind])]

    def checkpoint(self, kind: str, version: int | None = None) -> Checkpoint | None:
        """A version of a kind, or the latest when version is None; None if there is none."""
        rows = self.checkpoints(kind)
        if version is None:
            return rows[-1] if rows else None
        for row in rows:
            if row.version == version:
                return row
        raise UserError(f"no {kind} version {version}: `rlhf stats` lists the versions there are")

    # -- summary

    def labeled_pair_count(self) -> int:
        """Training pairs from labels: a drift judgement or a repeated comparison
        (rlhf.consistency) is not one. One query: the labeling screen asks after every key."""
        return self._rows("SELECT COUNT(*) AS n FROM pairs p LEFT JOIN comparisons c ON c.id = p.comparison_id "
                          "WHERE p.source = 'label' AND (c.purpose IS NULL OR c.purpose = 'preference')")[0]["n"]

    def stats(self) -> dict[str, Any]:
        def count(sql: str) -> int:
            return self._rows(sql)[0]["n"]

        kinds = {r["kind"]: r["n"] for r in self._rows(
            "SELECT kind, COUNT(*) AS n FROM comparisons WHERE purpose = 'preference' GROUP BY kind")}
        return {
            "database": str(self.path),
            "schema_version": self.schema_version,
            "prompts": count(f"SELECT COUNT(*) AS n FROM prompts WHERE {_NOT_IMPORTED}"),
            "prompts_imported": count(f"SELECT COUNT(*) AS n FROM prompts WHERE NOT {_NOT_IMPORTED}"),
            "prompts_labeled": count(
                "SELECT COUNT(DISTINCT prompt_id) AS n FROM comparisons WHERE purpose = 'preference'"),
            "completions": count("SELECT COUNT(*) AS n FROM completions"),
            "comparisons": sum(kinds.values()),
            "comparisons_by_kind": kinds,
            "pairs_labeled": self.labeled_pair_count(),
            "pairs_imported": count("SELECT COUNT(*) AS n FROM pairs WHERE source != 'label'"),
            "policy_versions": [r.version for r in self.checkpoints("policy")],
            "reward_versions": [r.version for r in self.checkpoints("reward")],
            "jobs_active": len(self.jobs(active=True)),
        }


def open_store(path: str | Path) -> Store:
    """Open (creating when missing) the database at ``path``."""
    return Store(path)
