"""One writer per run folder: a lock held by the process that writes it.

The lock is `RUN/.writer.lock` (filelock: an OS lock, released by the kernel when its process ends however it ends, so
the lock of a killed process is simply taken over); the holder's pid is in `RUN/.writer.pid`, for the message a second
writer gets. `spacil sweep` asks the same lock before it starts a cell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from filelock import FileLock, Timeout

from spacil.errors import InputError
from spacil.fileio import atomic_write_text, make_dirs

LOCK_NAME = ".writer.lock"
PID_NAME = ".writer.pid"


def _holder(folder: Path) -> str:
    try:
        pid = (folder / PID_NAME).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process (pid not yet recorded)"


class RunFolderLock:
    """Held while a process writes `folder`; `acquire` raises InputError (exit 2) naming the folder and the holder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._lock: Optional[FileLock] = None

    def acquire(self) -> "RunFolderLock":
        make_dirs(self.folder)
        lock = FileLock(self.folder / LOCK_NAME)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise InputError(f"{self.folder}: another spacil run writes this run folder ({_holder(self.folder)}); "
                             f"wait for it to end, or stop it") from None
        self._lock = lock
        atomic_write_text(self.folder / PID_NAME, f"{os.getpid()}\n")
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_writer(folder: str | Path) -> Optional[str]:
    """Who holds `folder`'s lock now ('process 1234'), or None when nobody does (or it is no run folder yet)."""
    folder = Path(folder)
    if not (folder / LOCK_NAME).exists():
        return None
    lock = FileLock(folder / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return _holder(folder)
    except OSError:
        return None
    lock.release()
    return None
