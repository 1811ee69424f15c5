"""Writing files so that an interrupted process never leaves a half-written one, and reading JSON with one-line errors.

Every stage writes through these: the store, descriptions, run folders, reports, sweeps, figures and images (rendered in
memory first: `atomic_save_figure`, `atomic_save_image`); nothing else in spacil opens a file for writing or makes a folder. A write that fails (a full
disk, a read-only folder, a quota) is one InputError naming the path and the free space there, and leaves no temporary
file behind: after room is made, the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from spacil.errors import InputError


def _free_space(path: Path) -> str:
    """'12.3 MiB free' on the filesystem holding `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""  # unreachable


# errors that room on the disk cures
_FULL = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name)}


def write_error(path: str | Path, err: OSError) -> InputError:
    """The one-line error of a failed write to `path`: what the system said and the free space there."""
    path = Path(path)
    reason = err.strerror or type(err).__name__
    return InputError(f"{path}: cannot write ({reason}; {_free_space(path)})"
                      + ("; make room and run the command again (a `spacil run` with --resume)" if err.errno in _FULL else ""))


@contextlib.contextmanager
def writing(path: str | Path, tmp: Optional[Path] = None) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into write_error's InputError; remove `tmp` (a temporary file of the
    write) when that happens."""
    try:
        yield
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise write_error(path, err) from None


def _tmp_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that a reader sees either the old or the new content, never a half-written one."""
    path = Path(path)
    tmp = _tmp_of(path)
    with writing(path, tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write_bytes of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = _tmp_of(path)
    with writing(path, tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, path)


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez of `arrays`, built in memory and written by atomic_write_bytes (no pickles)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_save_figure(path: str | Path, figure, **savefig_options) -> None:
    """A matplotlib figure rendered in memory (in the format of `path`'s suffix, PNG without one), then written by
    atomic_write_bytes: a full disk or a read-only folder is write_error's one line and leaves no partial or empty file
    (matplotlib's own savefig leaves a 0-byte file and a traceback)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png", **savefig_options)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_save_image(path: str | Path, image, **save_options) -> None:
    """A PIL image encoded in memory (the format of `path`'s suffix, PNG when it names none PIL knows), then written by
    atomic_write_bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions().get(Path(path).suffix.lower(), "PNG"), **save_options)
    atomic_write_bytes(path, buffer.getbuffer())


def open_log(path: str | Path):
    """A log file opened for appending, for the caller to close (a worker's standard output goes there as it runs, so it
    cannot be written whole and renamed): write_error's one line when it cannot be opened."""
    with writing(path):
        return open(path, "a")


def reserve_space(path: str | Path) -> None:
    """Allocate the blocks of a file created at its final size (a memory map, sparse until written) now: a full disk is
    then write_error's one line here, not a SIGBUS that kills the process when a row is written through the map later.
    Where the filesystem cannot allocate ahead (or the platform lacks posix_fallocate), nothing is done."""
    if not hasattr(os, "posix_fallocate"):
        return
    with writing(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
        finally:
            os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """mkdir -p, with write_error's one line when it fails."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def append_text(path: str | Path, text: str) -> None:
    """Append `text` to a log file, with write_error's one line when it fails."""
    with writing(path):
        with open(path, "a") as handle:
            handle.write(text)


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; anything else (unreadable, not JSON, not an object) is an InputError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
