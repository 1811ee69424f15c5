"""NaN and infinity in what a run reads: every array a store opens is checked once per run (issues 16 and 26).

A NaN in a store is otherwise silent: a run finishes with a wrong accuracy (a NaN planted in text/descriptions.npy gave
30.6 % instead of 44.4 %). `FeatureStore` opens every array through one method, which registers it in
`FeatureStore.opened` (relative path -> array); a new array (an extension) joins the check by being opened there, never
by a list kept here. Two kinds:

- per-row arrays (`<split>/...`: global, patches, z, views, ...; rows on axis 0, one row per image): checked row by row
  the first time the run reads a row (`first_nonfinite_row`, used by the runner's row views), so a run pays only for the
  rows it reads and a row it never reads (another method's array) costs nothing;
- every other array (`text/...`, `backbone/...`: prompts, templates and their norms, descriptions, pairwise descriptions,
  visual.proj, and any array added later): class- or model-level, small, and handed whole to the learner, so checked in
  full before the run writes anything (`check_whole_arrays`).

Either way a non-finite value is an InputError (exit 2) naming the file and the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from spacil.errors import InputError

CHUNK_BYTES = 32 << 20  # a whole array is read in chunks of rows of about this size (a bounded temporary)

# float16 / float32 values whose exponent bits are all ones are exactly the NaNs and infinities
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def first_nonfinite_row(data: np.ndarray) -> Optional[int]:
    """The index of the first row of `data` [N, ...] holding a NaN or an infinity, or None.

    float16 and float32 rows are tested on their bits (exponent all ones), about 8 times faster than np.isfinite on
    float16; the row is then located with np.isfinite only when there is one."""
    bits = _EXPONENT_BITS.get(data.dtype)
    if bits is not None and data.size:
        view = np.ascontiguousarray(data).view(bits[0])
        if (view & bits[0](bits[1])).max() != bits[1]:
            return None
    elif data.size == 0 or np.isfinite(data).all():
        return None
    bad = ~np.isfinite(data.reshape(len(data), -1)).all(axis=1)
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def first_nonfinite_index(array: np.ndarray) -> Optional[tuple[int, ...]]:
    """The index (one number per axis) of the first NaN or infinity of `array` in row-major order, or None. Read in
    chunks of rows of about CHUNK_BYTES; arrays that are not floating point (labels, masks) hold neither."""
    if array.dtype.kind != "f" or array.size == 0:
        return None
    if array.ndim == 0:
        return None if np.isfinite(array) else ()
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, len(array), step):
        chunk = np.asarray(array[start:start + step])
        row = first_nonfinite_row(chunk)
        if row is not None:
            inner = np.argwhere(~np.isfinite(chunk[row]))[0] if chunk.ndim > 1 else ()
            return (start + row, *(int(i) for i in inner))
    return None


def is_row_array(rel: str, splits: tuple[str, ...]) -> bool:
    """An array of `<split>/` (rows on axis 0): checked row by row as the run reads it, not in full."""
    return Path(rel).parts[0] in splits


def check_whole_arrays(store_path: Path, opened: dict[str, np.ndarray], splits: tuple[str, ...]) -> None:
    """Check every array of `opened` (relative path -> array) that is not a per-row array, in full: the first NaN or
    infinity is an InputError naming the file and its index."""
    for rel, array in opened.items():
        if is_row_array(rel, splits):
            continue
        index = first_nonfinite_index(array)
        if index is not None:
            value = float(array[index])
            what = "NaN" if np.isnan(value) else f"{value} (infinite)"
            raise InputError(f"{store_path / rel}: index {list(index)} is {what}; re-extract the store "
                             f"(`spacil check {store_path}` lists every damaged file)")
