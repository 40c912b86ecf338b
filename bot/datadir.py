"""The data directory, kept private to the account the bot runs as.

It holds the database (users' encrypted keys, credits, prompts), `secret.key` (which
decrypts those keys) and `jobs/` (users' reference images and results). With the usual umask
(022) all of it would be readable by every local account: folders 0755, files 0644.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

DATABASE = "drawbridge.sqlite3"
"""The SQLite database's file name inside the data directory."""

_DIR_MODE = 0o700
_FILE_MODE = 0o600
# SQLite's companions of the database; they hold the same data.
_DATABASE_COMPANIONS = ("-wal", "-shm", "-journal")
_PRIVATE_FILES = ("secret.key", DATABASE, *(DATABASE + s for s in _DATABASE_COMPANIONS))


def secure_data_dir(path: Path) -> Path:
    """Create `path` and `path/jobs` as 0700 and the database file as 0600; tighten old ones.

    Call it before anything opens the database or writes in the directory. The empty
    database file is created here, with mode 0600, because SQLite creates a missing database
    with the process umask (0644, usually) and gives its `-wal` and `-shm` files the mode of
    the main file: creating it private first makes all three private. Folders and files left
    by earlier versions with wider modes are tightened on every start. Returns `path`.
    """
    path = Path(path)
    jobs = path / "jobs"
    for folder in (path, jobs):
        folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        _restrict(folder, _DIR_MODE)
    # O_EXCL: never truncate, and never follow a link someone put there.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path / DATABASE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
    for name in _PRIVATE_FILES:
        _restrict(path / name, _FILE_MODE)
    return path


def _restrict(target: Path, mode: int) -> None:
    """chmod `target` to `mode` when it exists and is wider (not through symlinks)."""
    try:
        info = target.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        return
    if stat.S_IMODE(info.st_mode) & ~mode:
        target.chmod(mode)
