"""`spacil check STORE`: validate a feature store completely and say what is wrong, file by file.

Two levels:
- `quick_check(path)`: what every `spacil run` (and `spacil extract` on an existing store) does before any work: meta.json
  parses and has its keys, every array exists, its header parses, its dtype and shape fit the others, its size on disk is
  what its header says (not truncated), labels lie in range; each split's image_paths.json, when there, has one path per row. Raises the first fault as an InputError; returns the store.
- `check_store(path)`: everything, every fault found (not only the first), one line each: the cheap checks above plus a
  streaming pass over every row, in chunks of bounded size (a 12 GB store needs no more than a chunk of memory), for
  non-finite values and rows that are not unit vectors (every feature in the store is L2-normalised; INTERFACES.md), and,
  in a store with the pre-projection features z, that normalise(z @ visual_proj) is each row's global embedding to the
  store dtype's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from spacil.errors import InputError
from spacil.store.area_texts import AREA_SETS, area_text_files
from spacil.store.format import (IMAGE_PATHS_FILE, PRE_PROJECTION_FILE, PROGRESS_FILE, SPLITS, TEMPLATE_NORMS_FILE,
                                 VISUAL_PROJ_FILE, FeatureStore, open_npy, read_image_paths, read_meta, view_set_files,
                                 AREA_VIEW_TRANSFORMS)

# Largest chunk read at once by the streaming pass (bytes of the stored array).
CHUNK_BYTES = 32 << 20
# |norm - 1| allowed for a stored unit vector: float16 storage alone moves a 512-d norm by ~1e-3.
UNIT_TOLERANCE = 1e-2

_FLOAT = ("float16", "float32")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: its path, whether a store must have it, the dtypes it may have, its shape in symbols
    (resolved from meta.json and from the arrays read before it), and whether its rows are unit vectors."""

    rel: str
    required: bool
    dtypes: tuple[str, ...]
    shape: tuple[str, ...]
    unit: bool


SPECS = tuple(
    spec for split in SPLITS for spec in (
        ArraySpec(f"{split}/global.npy", True, _FLOAT, (f"n_{split}", "dim"), True),
        ArraySpec(f"{split}/patches.npy", False, _FLOAT, (f"n_{split}", "num_patches", "dim"), True),
        ArraySpec(f"{split}/labels.npy", True, ("int64", "any integer"), (f"n_{split}",), False),
    )
) + (
    ArraySpec("text/prompts.npy", False, _FLOAT, ("classes", "dim"), True),
    ArraySpec("text/templates.npy", False, _FLOAT, ("classes", "templates", "dim"), True),
    ArraySpec("text/descriptions.npy", False, _FLOAT, ("classes", "tokens", "dim"), True),
    ArraySpec("text/description_mask.npy", False, ("bool",), ("classes", "tokens"), False),
    ArraySpec(TEMPLATE_NORMS_FILE, False, ("float32",), ("classes", "templates"), False),
    # the pairwise descriptions (store/pairwise.py) and the stored views (store/views.py)
    ArraySpec("text/pairwise_mask.npy", False, ("bool",), ("classes", "classes", "pairwise_slots"), False),
    ArraySpec("text/pairwise.npy", False, ("float32",), ("classes", "classes", "pairwise_slots", "dim"), True),
    ArraySpec("text/pairwise_norms.npy", False, ("float32",), ("classes", "classes", "pairwise_slots"), False),
    ArraySpec("train/views_global.npy", False, _FLOAT, ("n_train", "views", "dim"), True),
    ArraySpec("train/views_global_pre.npy", False, _FLOAT, ("n_train", "views", "width"), False),
    # AREA's view sets (store/views.py) and description sets (store/area_texts.py)
    *(spec for transform in AREA_VIEW_TRANSFORMS for spec in (
        ArraySpec(view_set_files(transform)[0], False, _FLOAT, ("n_train", f"views_{transform}", "dim"), True),
        ArraySpec(view_set_files(transform)[1], False, _FLOAT, ("n_train", f"views_{transform}", "width"), False))),
    *(spec for name in AREA_SETS for spec in (
        ArraySpec(area_text_files(name)[2], False, ("bool",), ("classes", f"area_{name}_slots"), False),
        ArraySpec(area_text_files(name)[0], False, ("float32",), ("classes", f"area_{name}_slots", "dim"), True),
        ArraySpec(area_text_files(name)[1], False, ("float32",), ("classes", f"area_{name}_slots"), False))),
)
# Token arrays whose padding rows are not unit vectors, and the masks that say which rows are real.
_MASKS = {"text/descriptions.npy": "text/description_mask.npy", "text/pairwise.npy": "text/pairwise_mask.npy",
          **{area_text_files(name)[0]: area_text_files(name)[2] for name in AREA_SETS}}
# The pre-projection extension: read only when meta.json names "width", and then required.
PRE_PROJECTION_SPECS = tuple(
    ArraySpec(f"{split}/{PRE_PROJECTION_FILE}", True, _FLOAT, (f"n_{split}", "width"), False) for split in SPLITS
) + (ArraySpec(VISUAL_PROJ_FILE, True, ("float32",), ("width", "dim"), False),)


def quick_check(path: str | Path) -> FeatureStore:
    """The cheap checks (see the module doc); the first fault is an InputError naming the file. Returns the open store."""
    return FeatureStore(path)


def check_store(path: str | Path, progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Every fault of the store at `path`, one line each (empty: the store is sound). `progress(bytes)` is called as the
    streaming pass advances."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: no such feature store folder"]
    findings: list[str] = []
    sizes: dict[str, int] = {}
    specs = SPECS
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        unfinished = " (an unfinished extraction: run `spacil extract` again)" if (path / PROGRESS_FILE).exists() else ""
        findings.append(f"{meta_path}: missing; not a feature store{unfinished}")
    else:
        try:
            meta = read_meta(meta_path)
            sizes.update(dim=meta["dim"], num_patches=meta["num_patches"], classes=len(meta["classes"]))
            if "width" in meta:
                sizes["width"] = meta["width"]
                specs = SPECS + PRE_PROJECTION_SPECS
        except InputError as err:
            findings.append(str(err))
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        array = _open_checked(path, spec, sizes, findings, arrays)
        if array is not None:
            arrays[spec.rel] = array
    for tokens, mask in _MASKS.items():
        if tokens in arrays and mask not in arrays and not (path / mask).exists():
            findings.append(f"{path / mask}: missing array ({tokens} needs it)")
    findings += _image_path_faults(path, sizes)
    for spec in specs:
        if spec.rel in arrays:
            findings += _scan(path / spec.rel, spec, arrays[spec.rel], sizes, arrays, progress)
    for split in SPLITS:
        pre, global_ = f"{split}/{PRE_PROJECTION_FILE}", f"{split}/global.npy"
        if pre in arrays and global_ in arrays and VISUAL_PROJ_FILE in arrays:
            findings += _scan_projection(path, pre, global_, arrays)
    return findings


def _image_path_faults(path: Path, sizes: dict[str, int]) -> list[str]:
    """`<split>/image_paths.json` (optional; INTERFACES.md extension): a list of non-empty strings, one per row."""
    findings = []
    for split in SPLITS:
        file = path / split / IMAGE_PATHS_FILE
        if not file.exists():
            continue
        try:
            paths = read_image_paths(file)
        except InputError as err:
            findings.append(str(err))
            continue
        rows = sizes.get(f"n_{split}")
        if rows is not None and len(paths) != rows:
            findings.append(f"{file}: {len(paths)} image paths for the {rows} rows of {split}/global.npy")
    return findings


def _open_checked(path: Path, spec: ArraySpec, sizes: dict[str, int], findings: list[str],
                  arrays: dict[str, np.ndarray]) -> Optional[np.ndarray]:
    """Header, dtype and shape of one array against what is known so far; binds the shape symbols it introduces."""
    file = path / spec.rel
    if not file.is_file():
        if spec.required:
            findings.append(f"{file}: missing array")
        return None
    try:
        array = open_npy(file)
    except InputError as err:
        findings.append(str(err))
        return None
    shape, dtype = array.shape, array.dtype
    sound = True
    if dtype.name not in spec.dtypes and not ("any integer" in spec.dtypes and dtype.kind in "iu"):
        findings.append(f"{file}: dtype {dtype}, expected {' or '.join(spec.dtypes)}")
        sound = False
    if len(shape) != len(spec.shape):
        findings.append(f"{file}: shape {list(shape)}, expected [{', '.join(spec.shape)}] ({len(spec.shape)} dimensions)")
        return None
    for axis, (got, symbol) in enumerate(zip(shape, spec.shape)):
        if symbol not in sizes:
            sizes[symbol] = got  # the first array to name a size defines it
        elif got != sizes[symbol]:
            findings.append(f"{file}: shape {list(shape)}, expected {symbol}={sizes[symbol]} on axis {axis}")
            sound = False
    return array if sound else None


def _chunks(file: Path, array: np.ndarray):
    """(first row, rows) of a stored array in chunks of at most CHUNK_BYTES, read with plain file reads: the memory used
    stays one chunk, whatever the file's size (rows touched through a memory map would stay resident)."""
    per_row_items = int(np.prod(array.shape[1:], dtype=np.int64))
    step = max(1, CHUNK_BYTES // max(1, per_row_items * array.dtype.itemsize))
    if not (isinstance(array, np.memmap) and array.flags.c_contiguous):
        for start in range(0, len(array), step):
            yield start, np.asarray(array[start:start + step])
        return
    with open(file, "rb") as handle:
        handle.seek(array.offset)
        for start in range(0, len(array), step):
            rows = min(step, len(array) - start)
            chunk = np.fromfile(handle, dtype=array.dtype, count=rows * per_row_items)
            yield start, chunk.reshape((rows, *array.shape[1:]))


def _scan(file: Path, spec: ArraySpec, array: np.ndarray, sizes: dict[str, int], arrays: dict[str, np.ndarray],
          progress: Optional[Callable[[int], None]]) -> list[str]:
    """The streaming pass over one array: labels in range; non-finite values; rows that are not unit vectors."""
    findings = []
    if spec.rel.endswith("labels.npy"):
        classes = sizes.get("classes")
        bad, first = 0, None
        for start, chunk in _chunks(file, array):
            out = (chunk < 0) | (chunk >= classes) if classes is not None else chunk < 0
            if out.any():
                bad += int(out.sum())
                first = first if first is not None else (start + int(np.flatnonzero(out)[0]), int(chunk[out][0]))
            if progress:
                progress(chunk.nbytes)
        if bad:
            upper = "" if classes is None else f"..{classes - 1}"
            findings.append(f"{file}: {bad} labels outside 0{upper} (first: row {first[0]}, label {first[1]})")
        return findings
    if not spec.unit and array.dtype.kind != "f":
        return findings
    mask = None
    if _MASKS.get(spec.rel) in arrays:
        mask = np.asarray(arrays[_MASKS[spec.rel]])  # [C, (C,) M]: only real tokens are unit vectors
    non_finite, first_non_finite = 0, None
    off_unit, first_off_unit = 0, None
    for start, chunk in _chunks(file, array):
        values = chunk.astype(np.float32)
        finite_values = np.isfinite(values)
        finite = finite_values.all(axis=-1)  # per vector
        if mask is not None:
            finite |= ~mask[start:start + len(chunk)]
        if not finite.all():
            non_finite += int((~finite).sum())
            if first_non_finite is None:
                first_non_finite = _where(start, ~finite)
        if not finite_values.all():
            values[~finite_values] = 0
        if not spec.unit:  # only finiteness is checked (z, visual_proj, template norms)
            if progress:
                progress(chunk.nbytes)
            continue
        norms = np.sqrt(np.einsum("...i,...i->...", values, values))
        wrong = finite & (np.abs(norms - 1.0) > UNIT_TOLERANCE)
        if mask is not None:
            wrong &= mask[start:start + len(chunk)]
        elif spec.rel in _MASKS:
            wrong &= norms != 0  # no usable mask: zero rows are taken for padding
        if wrong.any():
            off_unit += int(wrong.sum())
            if first_off_unit is None:
                first_off_unit = f"{_where(start, wrong)}, norm {norms[wrong].flat[0]:.4g}"
        if progress:
            progress(chunk.nbytes)
    if non_finite:
        findings.append(f"{file}: {non_finite} vectors hold NaN or infinite values (first: {first_non_finite})")
    if off_unit:
        findings.append(f"{file}: {off_unit} vectors are not unit length (|norm - 1| > {UNIT_TOLERANCE}; first: {first_off_unit})")
    return findings


def _projection_tolerance(z: np.ndarray, proj: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Per row, how far normalise(z @ proj) may lie from the stored g when both were rounded to `dtype` from one exact
    forward pass: rounding z (relative u = eps / 2 per element) moves z @ proj by at most u * || |z| @ |proj| ||, which
    moves its direction by at most twice that over ||z @ proj||; rounding g moves it by u. Twice that sum, plus float32
    arithmetic."""
    u = float(np.finfo(dtype).eps) / 2
    ratio = np.linalg.norm(np.abs(z) @ np.abs(proj), axis=-1) / np.maximum(np.linalg.norm(z @ proj, axis=-1), 1e-30)
    return 2 * u * (1 + 2 * ratio) + 1e-5 * (1 + ratio)


def _scan_projection(path: Path, pre: str, global_: str, arrays: dict[str, np.ndarray]) -> list[str]:
    """Row by row: normalise(z @ visual_proj) against the stored g (chunks of z; g's rows read alongside)."""
    proj = np.asarray(arrays[VISUAL_PROJ_FILE], dtype=np.float32)
    if not np.isfinite(proj).all():
        return []  # reported by the finiteness pass over visual_proj
    stored = arrays[global_]
    wrong, first = 0, None
    for start, chunk in _chunks(path / pre, arrays[pre]):
        z = chunk.astype(np.float32)
        g = np.asarray(stored[start:start + len(chunk)], dtype=np.float32)
        # rows with non-finite values or a g off unit length are reported by the passes over each array
        rows = np.isfinite(z).all(axis=-1) & np.isfinite(g).all(axis=-1)
        rows &= np.abs(np.linalg.norm(np.where(np.isfinite(g), g, 0), axis=-1) - 1.0) <= UNIT_TOLERANCE
        projected = z[rows] @ proj
        projected /= np.maximum(np.linalg.norm(projected, axis=-1, keepdims=True), 1e-30)
        distance = np.linalg.norm(projected - g[rows], axis=-1)
        allowed = _projection_tolerance(z[rows], proj, stored.dtype)
        bad = distance > allowed
        if bad.any():
            wrong += int(bad.sum())
            if first is None:
                at = int(np.flatnonzero(rows)[np.flatnonzero(bad)[0]])
                first = f"row {start + at}, distance {distance[bad][0]:.3g} > {allowed[bad][0]:.3g}"
    if wrong:
        return [f"{path / pre}: {wrong} rows whose normalise(z @ {VISUAL_PROJ_FILE}) is not their {global_} row "
                f"(beyond the {stored.dtype} rounding; first: {first})"]
    return []


def _where(start: int, flags: np.ndarray) -> str:
    """The first flagged vector of a chunk, as 'row r' (or 'row r, token t' for arrays of token sets)."""
    index = np.argwhere(flags)[0]
    row = f"row {start + int(index[0])}"
    return row if len(index) == 1 else f"{row}, token {int(index[1])}"


def main_check(path: str, quiet: bool = False) -> int:
    """The command: every finding on standard error, one line each, then exit 2; or one 'ok' line and exit 0."""
    import sys

    from tqdm import tqdm

    store = Path(path)
    total = sum(f.stat().st_size for f in store.rglob("*.npy")) if store.is_dir() else 0
    with tqdm(total=total, desc=f"check {store.name}", unit="B", unit_scale=True, disable=quiet, leave=False) as bar:
        findings = check_store(store, progress=bar.update)
    if findings:
        for line in findings:
            print(f"spacil: error: {line}", file=sys.stderr)
        return 2
    print(f"{store}: a sound feature store ({total / 1e6:.1f} MB checked)")
    return 0
