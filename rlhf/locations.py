"""Where the workbench keeps its files (platform directories, overridable)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

APP = "rlhf-workbench"
DEFAULT_DB_NAME = "workbench.db"


def cache_dir() -> Path:
    """Converted models and other things that can be rebuilt. ``RLHF_CACHE_DIR`` overrides."""
    path = Path(os.environ.get("RLHF_CACHE_DIR") or platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """The default home of the database and checkpoints. ``RLHF_DATA_DIR`` overrides."""
    path = Path(os.environ.get("RLHF_DATA_DIR") or platformdirs.user_data_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_db_path() -> Path:
    """``./workbench.db`` when the current directory has one, else the user's data dir."""
    local = Path.cwd() / DEFAULT_DB_NAME
    return local if local.exists() else data_dir() / DEFAULT_DB_NAME


def checkpoints_dir(db_path: Path) -> Path:
    """Adapters live beside their database, so a database and its models move together."""
    path = db_path.parent / (db_path.stem + "-checkpoints")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_new_folder(out: str | Path) -> Path:
    """``out`` as a path an export may write: a new or empty folder."""
    from rlhf.errors import UserError

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists: export into a new or empty folder")
    return out


@contextmanager
def new_folder(out: Path) -> Iterator[Path]:
    """Write a folder whole or not at all: the block fills ``out.partial``, which
    becomes ``out`` when the block ends and is removed when it raises."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty: check_new_folder said so
    tmp.rename(out)
