"""Opening a workbench database: the checks before anything is written, the
schema migrations, and the transaction every write goes through.

Every write is its own short transaction, committed as it is made, so a label
is on disk the moment the researcher presses a key, and a second process (a
training job, the CLI) can read and write beside us. WAL mode lets readers and
one writer proceed together; the busy timeout makes a writer wait for another
instead of failing.

The schema is built by the steps of ``rlhf.migrations``, run on open. A
database written by a newer version of this program, or a damaged one, is
refused and never touched.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from rlhf.errors import UserError
from rlhf.migrations import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_S = 30.0


def now() -> str:
    """UTC timestamp in ISO 8601, the one format every table uses."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def database_path(path: str | Path, *, create: bool = True) -> Path:
    """The real file behind ``path``, or a one-line UserError saying why it cannot be used."""
    if not str(path).strip():
        raise UserError("the database path is empty: pass --db FILE (e.g. --db workbench.db)")
    resolved = Path(path).expanduser().resolve()
    folder = resolved.parent
    if resolved.is_dir():
        raise UserError(f"{resolved} is a folder: pass a database file, e.g. --db {resolved / 'workbench.db'}")
    if not folder.is_dir():
        raise UserError(f"database folder {folder} does not exist: create it or pass another --db")
    if not resolved.exists() and not create:
        raise UserError(f"there is no database at {resolved}: check --db, or create one with "
                        f"`rlhf --db {resolved} init`")
    if not os.access(folder, os.W_OK | os.X_OK):
        # SQLite keeps its -wal and -shm files beside the database.
        raise UserError(f"folder {folder} is not writable, and the database needs to write its -wal and -shm "
                        "files there: fix its permissions or pass a --db in another folder")
    if resolved.exists() and not os.access(resolved, os.R_OK | os.W_OK):
        raise UserError(f"{resolved} is read-only: make it writable (chmod u+rw) or work on a copy")
    return resolved


class Database:
    """One open, checked and migrated database connection, and the two ways to
    use it: ``_write()`` (one immediate transaction) and ``_rows()``. Safe to share
    between the threads of one process."""

    def __init__(self, path: str | Path, *, migrate_to: int = SCHEMA_VERSION, create: bool = True) -> None:
        """Open the database at ``path``; with ``create``, make it when missing.

        Nothing is written before the file is known to be a sound database of a
        schema this program knows: a newer or damaged one is refused untouched."""
        # Absolute, symlinks resolved: jobs and checkpoints find files beside it
        # from any working directory, and the app's lock is one per file.
        self.path = database_path(path, create=create)
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"cannot open {self.path} ({e}): check the path and its folder's permissions") from e
        conn.row_factory = sqlite3.Row
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._refuse_newer()
            self._refuse_damaged()
            self.db.enable_wal()
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(migrate_to)
        except sqlite3.OperationalError as e:
            conn.close()
            if "locked" in str(e) or "busy" in str(e):
                raise UserError(f"{self.path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s: "
                                "try again when it is done") from e
            raise UserError(f"cannot open {self.path} ({e}): check the file and its folder") from e
        except sqlite3.DatabaseError as e:
            conn.close()
            raise UserError(f"{self.path} is not a workbench database ({e}): pass another --db") from e
        except UserError:
            conn.close()
            raise

    # -- plumbing

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _refuse_newer(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{self.path} was written by a newer version of the workbench "
                f"(schema {version}, this one knows {SCHEMA_VERSION}): upgrade rlhf-workbench; "
                "the database was not changed"
            )

    def _refuse_damaged(self) -> None:
        """SQLite's own structural check (read-only, one pass over the pages):
        writing into a damaged file can only damage it further."""
        try:
            found = [r[0] for r in self.db.execute("PRAGMA quick_check(3)").fetchall()]
        except sqlite3.OperationalError:
            raise  # busy or locked: not a sign of damage
        except sqlite3.DatabaseError as e:
            found = [str(e)]
        if found != ["ok"]:
            # The report runs over lines ("*** in database main ***", "Page 6: ..."): keep the first finding.
            detail = next((line for r in found for line in r.splitlines() if not line.startswith("***")), "")
            raise UserError(f"{self.path} is damaged ({detail}); it was not changed. Recover what it holds "
                            f"into a new file with `sqlite3 {self.path} .recover | sqlite3 recovered.db` "
                            "and pass --db recovered.db")

    def _migrate(self, target: int) -> None:
        if self.schema_version >= target:
            return  # no write transaction: opening must not wait for another writer
        # An immediate transaction (as every write), the version read again inside
        # it: two processes opening an old database at once must not both migrate.
        with self._write():
            version = self.schema_version
            for step in range(version, target):
                MIGRATIONS[step](self.db)
                self.db.execute(f"PRAGMA user_version = {step + 1}")

    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One short transaction; committed on exit, rolled back on error.

        BEGIN IMMEDIATE takes the write lock up front, waiting (busy timeout) for
        another writer to finish. A deferred BEGIN would read first and then be
        refused outright ("database is locked") on its upgrade to a write, since
        waiting there could deadlock."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _rows(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, params).fetchall()]

    def _one(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
