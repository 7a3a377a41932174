"""One workbench per database.

Two workbenches on one database would each sample ahead, each undo "the last
label" and each load its own copy of the model; the labels would survive (the
store is safe for several writers) but the researcher would be confused about
what was recorded. So the app holds an exclusive advisory lock on
``<db>.lock`` for its lifetime. The CLI and background jobs do not take it: they
are meant to run beside the app.

``flock`` locks belong to the open file, so the operating system drops the lock
when the process dies, however it dies: a crashed app never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from rlhf.errors import UserError


def lock_path(db_path: str | Path) -> Path:
    # The real file, symlinks resolved: two names for one database share one lock.
    db_path = Path(db_path).resolve()
    return db_path.with_name(db_path.name + ".lock")


class AppLock:
    """An exclusive, non-blocking lock on ``<db>.lock``; raises UserError when held."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = Path(db_path).resolve()
        self.path = lock_path(db_path)
        self._fd: int | None = None

    def acquire(self) -> AppLock:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create lock file {self.path} ({e.strerror}): "
                            "check the folder's permissions or pass another --db") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (process {holder})" if holder else ""
            raise UserError(f"another workbench{who} already has {self.db_path} open: "
                            "switch to it, or close it first") from None
        # Note our pid for the message another instance prints; informative only.
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> AppLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
