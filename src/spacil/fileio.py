"""Writing files so that an interrupted process never leaves a half-written one, and reading JSON with one-line errors.

Every stage writes through these: the store, descriptions, run folders, reports and sweeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from spacil.errors import InputError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a reader sees either the old or the new content, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


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
