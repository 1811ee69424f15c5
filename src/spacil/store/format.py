"""The feature store, version 1 (INTERFACES.md): a folder of plain `.npy` arrays that runs read memory-mapped.

`extract_store` encodes a data set once with the frozen CLIP. It is resumable: rows are written in fixed batches into
pre-allocated memory maps and progress records name the rows safely on disk, so a killed extraction continues where it
stopped and ends byte-identical to an uninterrupted one (spacil.store.extract has the order of writes). `meta.json` is written last: a store without it is unfinished.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from spacil import __version__
from spacil.errors import InputError
from spacil.fileio import atomic_save_npy, atomic_write_text, make_dirs, read_json
from spacil.store.area_texts import open_area_texts
from spacil.store.pairwise import open_pairwise

FORMAT = "spacil-features"
VERSION = 1
SPLITS = ("train", "test")
PROGRESS_FILE = ".progress.json"
IMAGE_PATHS_FILE = "image_paths.json"  # <split>/image_paths.json: each row's image, relative to meta["image_root"]
# The pre-projection extension (docs/interfaces.md): present exactly when meta.json has "width".
PRE_PROJECTION_FILE = "global_pre.npy"  # <split>/global_pre.npy [n, width], the store dtype: z, before visual.proj
VISUAL_PROJ_FILE = "backbone/visual_proj.npy"  # float32 [width, d]: g = normalise(z @ visual_proj)
TEMPLATE_NORMS_FILE = "text/template_norms.npy"  # float32 [C, K]: norms of text/templates.npy's rows before normalisation


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the rows begin
    fortran_order: bool


def read_npy_header(path: str | Path) -> NpyHeader:
    """The header of a `.npy` file, read alone (cheap at any size). An empty file, a broken header, an object dtype (a
    pickle: code could run) or a file whose size is not what its header says (truncated, or bytes after the array) is an
    InputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"{path}: empty file, expected a .npy array")
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = handle.tell()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except (ValueError, EOFError, SyntaxError) as err:
        raise InputError(f"{path}: not a readable .npy array ({' '.join(str(err).split())})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: dtype {dtype} holds Python objects (a pickle); expected a plain numeric array")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < expected:
        raise InputError(f"{path}: truncated ({size} bytes, its header {list(shape)} {dtype} needs {expected})")
    if size > expected:  # numpy writes exactly what the header says: anything after it is damage, not data
        raise InputError(f"{path}: {size - expected} bytes after the array its header describes ({list(shape)} {dtype})")
    return NpyHeader(tuple(int(n) for n in shape), dtype, offset, bool(fortran))


def open_npy(path: str | Path) -> np.ndarray:
    """A `.npy` array memory-mapped read-only, after `read_npy_header`'s checks; never unpickles."""
    read_npy_header(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy array ({' '.join(str(err).split())})") from None


def read_meta(meta_path: str | Path) -> dict:
    """A store's meta.json, checked: format, version, required keys and their types (InputError naming the file)."""
    meta_path = Path(meta_path)
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise InputError(f"{meta_path}: format is {meta.get('format')!r}, expected '{FORMAT}'")
    if meta.get("version") != VERSION:
        raise InputError(f"{meta_path}: version {meta.get('version')!r} is not supported (this spacil reads version {VERSION})")
    for key in ("dim", "num_patches", "classes"):
        if key not in meta:
            raise InputError(f"{meta_path}: key '{key}' missing")
    for key, low in (("dim", 1), ("num_patches", 0), ("width", 1)):
        if key not in meta:
            continue  # width is optional (the pre-projection extension)
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{meta_path}: '{key}' is {value!r}, expected an integer >= {low}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{meta_path}: 'classes' must be a non-empty list of class names (strings)")
    if not isinstance(meta.get("backbone", {}), dict):
        raise InputError(f"{meta_path}: 'backbone' must be an object")
    scale = meta.get("backbone", {}).get("logit_scale", 100.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise InputError(f"{meta_path}: 'backbone.logit_scale' is {scale!r}; expected a finite number above 0")
    return meta


def read_image_paths(file: str | Path) -> list[str]:
    """A `<split>/image_paths.json`: a JSON list of strings (InputError naming the file otherwise)."""
    try:
        paths = json.loads(Path(file).read_text())
    except OSError as err:
        raise InputError(f"{file}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise InputError(f"{file}: expected a JSON list of image paths (strings)")
    return paths


def rows_as_tensor(array: np.ndarray, rows, device=None):
    """Rows of a (memory-mapped, possibly fp16) array -> a float32 torch tensor on `device`."""
    import torch

    tensor = torch.from_numpy(np.asarray(array[rows], dtype=np.float32))
    return tensor if device is None else tensor.to(device)


@dataclass
class SplitFeatures:
    """One split of a store. Arrays are memory-mapped; index them to read.

    global_: [n, d]; patches: [n, N, d] (or None in a global-only store); labels: int64 [n] (data-set class index);
    global_pre: z [n, width], the CLS token before visual.proj, not normalised (None in a store without the pre-projection
    extension; `require_pre_projection` says how to add it).
    """

    global_: np.ndarray
    patches: Optional[np.ndarray]
    labels: np.ndarray
    global_pre: Optional[np.ndarray] = None
    # stored views (store/views.py), train split only: g [n, V, d] and z [n, V, width] of V altered copies of each image
    views_global: Optional[np.ndarray] = None
    views_global_pre: Optional[np.ndarray] = None
    # every stored view by transform name, the first views included: {transform: {"global": [n, V, d], "global_pre": ...}}
    view_sets: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


class FeatureStore:
    """A validated, memory-mapped feature store. Any shape or version mismatch is an InputError naming the file.

    Every array is opened through `_array` (or `_optional`), which registers it in `opened`: a run checks each one it
    reads for NaN and infinity (store/finite.py), so an array added to the format is checked by being opened there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # every array opened (relative path -> array), by `_array`: what a run checks for NaN and infinity (store/finite.py)
        self.opened: dict[str, np.ndarray] = {}
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise InputError(f"{self.path}: no such feature store folder")
        if not meta_path.is_file():
            hint = " (an unfinished extraction: run `spacil extract` again to resume)" if (self.path / PROGRESS_FILE).exists() else ""
            raise InputError(f"{meta_path}: missing; not a feature store{hint}")
        self.meta = read_meta(meta_path)
        self.dim = int(self.meta["dim"])
        self.num_patches = int(self.meta["num_patches"])
        self.classes: list[str] = list(self.meta["classes"])
        self.dataset: str = str(self.meta.get("dataset", "custom"))
        self.backbone: dict = dict(self.meta.get("backbone", {}))
        self.width: Optional[int] = int(self.meta["width"]) if "width" in self.meta else None
        self._splits: dict[str, SplitFeatures] = {}
        for split in SPLITS:
            self._splits[split] = self._load_split(split)
        self.prompts = self._optional("text/prompts.npy", (len(self.classes), self.dim))
        self.templates = self._optional("text/templates.npy", (len(self.classes), None, self.dim))
        self.descriptions = self._optional("text/descriptions.npy", (len(self.classes), None, self.dim))
        for array, rel in ((self.prompts, "text/prompts.npy"), (self.templates, "text/templates.npy"),
                           (self.descriptions, "text/descriptions.npy")):
            if array is not None and array.dtype not in (np.float16, np.float32):
                raise InputError(f"{self.path / rel}: dtype {array.dtype}, expected float32")
        self.description_mask = None
        if self.descriptions is not None:
            self.description_mask = self._array("text/description_mask.npy", (len(self.classes), self.descriptions.shape[1]))
            if self.description_mask.dtype != np.bool_:
                raise InputError(f"{self.path / 'text/description_mask.npy'}: dtype {self.description_mask.dtype}, expected bool")
        # visual.proj [width, d] float32, with the pre-projection features; None without them
        self.visual_proj = None
        if self.width is not None:
            self.visual_proj = self._array(VISUAL_PROJ_FILE, (self.width, self.dim))
        self.template_norms = None  # [C, K] float32: templates * template_norms[..., None] = the un-normalised features
        if self.templates is not None:
            self.template_norms = self._optional(TEMPLATE_NORMS_FILE, self.templates.shape[:2])
        for array, rel in ((self.visual_proj, VISUAL_PROJ_FILE), (self.template_norms, TEMPLATE_NORMS_FILE)):
            if array is not None and array.dtype != np.float32:
                raise InputError(f"{self.path / rel}: dtype {array.dtype}, expected float32")

        # pairwise descriptions (store/pairwise.py), None when the store has none
        self.pairwise = open_pairwise(self.path, len(self.classes), self.dim, self._array)
        # stored views (store/views.py), read only when meta.json names them
        train = self._splits["train"]
        for name, array in open_views(self.path, self.meta, len(train), self.dim, self.width, self._array).items():
            if array.dtype != train.global_.dtype:
                raise InputError(f"{self.path / 'train' / (name + '.npy')}: dtype {array.dtype}, expected {train.global_.dtype}")
            setattr(train, name, array)
        # every view set by transform name (AREA: occlusion and area-augment), checked like the first views
        for transform, arrays in open_view_sets(self.path, self.meta, len(train), self.dim, self.width, self._array).items():
            for kind, array in arrays.items():
                if array.dtype != train.global_.dtype:
                    raise InputError(f"{self.path}: {transform} views ({kind}): dtype {array.dtype}, expected "
                                     f"{train.global_.dtype}")
            train.view_sets[transform] = arrays
        # AREA's description sets (store/area_texts.py), None when the store has none
        self.area_texts = open_area_texts(self.path, self.meta, len(self.classes), self.dim, self._array)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def logit_scale(self) -> float:
        return float(self.backbone.get("logit_scale", 100.0))

    @property
    def logit_bias(self) -> float:
        """The model's own logit bias (SigLIP), 0 for a CLIP (which has none)."""
        return float(self.backbone.get("logit_bias", 0.0))

    def split(self, name: str) -> SplitFeatures:
        return self._splits[name]

    def image_paths(self, split: str) -> Optional[list[str]]:
        """The image of every row of `split` (row order), POSIX paths relative to `meta["image_root"]` (CIFAR-100:
        `<split>/<index>`); None for a store without `<split>/image_paths.json` (spacil before 0.3, generated worlds)."""
        file = self.path / split / IMAGE_PATHS_FILE
        if not file.is_file():
            return None
        paths = read_image_paths(file)
        if len(paths) != len(self._splits[split]):
            raise InputError(f"{file}: {len(paths)} image paths for the {len(self._splits[split])} rows of the split")
        return paths

    def _array(self, rel: str, shape: tuple) -> np.ndarray:
        file = self.path / rel
        if not file.is_file():
            raise InputError(f"{file}: missing array")
        array = open_npy(file)
        if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
            expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise InputError(f"{file}: shape {list(array.shape)}, expected {expected}")
        self.opened[rel] = array
        return array

    def _optional(self, rel: str, shape: tuple) -> Optional[np.ndarray]:
        return self._array(rel, shape) if (self.path / rel).is_file() else None

    def _load_split(self, split: str) -> SplitFeatures:
        global_ = self._array(f"{split}/global.npy", (None, self.dim))
        n = global_.shape[0]
        labels = self._array(f"{split}/labels.npy", (n,))
        if labels.dtype.kind not in "iu":
            raise InputError(f"{self.path / split / 'labels.npy'}: dtype {labels.dtype}, expected int64")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise InputError(f"{self.path / split / 'labels.npy'}: labels outside 0..{self.num_classes - 1}")
        patches = self._optional(f"{split}/patches.npy", (n, self.num_patches, self.dim))
        for array, name in ((global_, "global.npy"), (patches, "patches.npy")):
            if array is not None and array.dtype not in (np.float16, np.float32):
                raise InputError(f"{self.path / split / name}: dtype {array.dtype}, expected float16 or float32")
        global_pre = None
        if self.width is not None:  # meta.json names the width only once every split's z is written
            global_pre = self._array(f"{split}/{PRE_PROJECTION_FILE}", (n, self.width))
            if global_pre.dtype != global_.dtype:
                raise InputError(f"{self.path / split / PRE_PROJECTION_FILE}: dtype {global_pre.dtype}, expected "
                                 f"{global_.dtype} (the store's dtype)")
        return SplitFeatures(global_, patches, np.asarray(labels, dtype=np.int64), global_pre)


def require_pre_projection(store: FeatureStore, method: str) -> None:
    """InputError (exit 2, one line) unless `store` holds z (`<split>/global_pre.npy`) and `backbone/visual_proj.npy`."""
    if store.width is not None:
        return
    tower = store.meta.get("image_tower") or {}
    if tower.get("pre_projection") is False:  # the family has no z at all (docs/backbones.md): nothing to add
        raise InputError(f"{store.path}: {method} needs the pre-projection features z, and the store's {tower.get('family')} "
                         f"image tower has none ({tower.get('no_pre_projection', 'no projection after pooling')})")
    raise InputError(
        f"{store.path}: no pre-projection features (train/global_pre.npy), which {method} needs; add them by running "
        f"`spacil extract --dataset {store.dataset} --data-root DATA --out {store.path}` (with the store's --model, "
        f"--pretrained and --dtype) again: a finished store only has z encoded and added, its other arrays are kept"
    )


# Stored views (store/views.py writes them): train split only, rows on axis 0; meta.json's "views" names them.
VIEWS_GLOBAL_FILE = "train/views_global.npy"
VIEWS_PRE_FILE = "train/views_global_pre.npy"


VIEW_SETS_KEY = "view_sets"  # meta.json: views of further transforms, {transform name: record like "views"}
AREA_VIEW_TRANSFORMS = ("occlusion", "area-augment")  # the view transforms AREA reads


def view_set_files(transform: str) -> tuple[str, str]:
    """The g and z arrays of the view set of `transform` (a transform other than the store's first views')."""
    slug = transform.replace("-", "_")
    return f"train/views_{slug}_global.npy", f"train/views_{slug}_global_pre.npy"


def _open_view_record(store_path: Path, record: dict, where: str, files: tuple[str, str], rows: int, dim: int,
                      width: Optional[int], array) -> dict[str, np.ndarray]:
    count = record.get("count") if isinstance(record, dict) else None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"{store_path / 'meta.json'}: '{where}.count' is {count!r}, expected an integer >= 1")
    found = {"global": array(files[0], (rows, count, dim))}
    if files[1] in record.get("arrays", []):
        if width is None:
            raise InputError(f"{store_path / 'meta.json'}: names {files[1]} but the store has no 'width'")
        found["global_pre"] = array(files[1], (rows, count, width))
    return found


def open_view_sets(store_path: Path, meta: dict, rows: int, dim: int, width: Optional[int],
                   array) -> dict[str, dict[str, np.ndarray]]:
    """Every stored view of a finished store by transform name, the first views ("views") included:
    {transform: {"global": [n, V, d], "global_pre": [n, V, w] (with z)}}. `array(rel, shape)` opens and checks one."""
    found = {}
    record = meta.get("views")
    if isinstance(record, dict) and record.get("transform"):
        found[str(record["transform"])] = _open_view_record(store_path, record, "views", (VIEWS_GLOBAL_FILE, VIEWS_PRE_FILE),
                                                            rows, dim, width, array)
    sets = meta.get(VIEW_SETS_KEY) or {}
    if not isinstance(sets, dict):
        raise InputError(f"{store_path / 'meta.json'}: '{VIEW_SETS_KEY}' must be an object {{transform: record}}")
    for name, record in sets.items():
        found[str(name)] = _open_view_record(store_path, record, f"{VIEW_SETS_KEY}.{name}", view_set_files(str(name)),
                                             rows, dim, width, array)
    return found


def open_views(store_path: Path, meta: dict, rows: int, dim: int, width: Optional[int], array) -> dict[str, np.ndarray]:
    """The views a finished store names in meta.json, checked: {"views_global": [n, V, d], "views_global_pre": [n, V, w]}.
    `array(rel, shape)` opens and checks one array."""
    record = meta.get("views")
    if record is None:
        return {}
    count = record.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"{store_path / 'meta.json'}: 'views.count' is {count!r}, expected an integer >= 1")
    found = {"views_global": array(VIEWS_GLOBAL_FILE, (rows, count, dim))}
    if VIEWS_PRE_FILE in record.get("arrays", []):
        if width is None:
            raise InputError(f"{store_path / 'meta.json'}: names {VIEWS_PRE_FILE} but the store has no 'width'")
        found["views_global_pre"] = array(VIEWS_PRE_FILE, (rows, count, width))
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def write_store(
    path: str | Path,
    *,
    classes: Sequence[str],
    dataset: str,
    backbone: dict,
    splits: dict[str, tuple[np.ndarray, Optional[np.ndarray], np.ndarray]],
    prompts: Optional[np.ndarray] = None,
    templates: Optional[np.ndarray] = None,
    descriptions: Optional[tuple[np.ndarray, np.ndarray]] = None,
    extra_meta: Optional[dict] = None,
    global_pre: Optional[dict[str, np.ndarray]] = None,
    visual_proj: Optional[np.ndarray] = None,
    template_norms: Optional[np.ndarray] = None,
) -> Path:
    """Write a complete store from in-memory arrays (used by generated worlds and tests). meta.json goes last.

    The pre-projection extension: `global_pre` {split: z [n, width]} (written in each split's global dtype) with
    `visual_proj` [width, d]; `template_norms` [C, K] beside `templates`."""
    path = Path(path)
    any_global = next(iter(splits.values()))[0]
    dim = int(any_global.shape[1])
    num_patches = next((int(p.shape[1]) for _, p, _ in splits.values() if p is not None), 0)
    for split, (global_, patches, labels) in splits.items():
        make_dirs(path / split)
        atomic_save_npy(path / split / "global.npy", global_)
        if patches is not None:
            atomic_save_npy(path / split / "patches.npy", patches)
        atomic_save_npy(path / split / "labels.npy", np.asarray(labels, dtype=np.int64))
    if (global_pre is None) != (visual_proj is None):
        raise ValueError("write_store: global_pre and visual_proj go together")
    if global_pre is not None:
        for split, (global_, _, _) in splits.items():
            atomic_save_npy(path / split / PRE_PROJECTION_FILE, np.asarray(global_pre[split], dtype=global_.dtype))
        write_visual_proj(path, visual_proj)
    write_text_features(path, prompts=prompts, templates=templates, descriptions=descriptions,
                        template_norms=template_norms)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dim": dim,
        "num_patches": num_patches,
        "classes": list(classes),
        "dataset": dataset,
        "backbone": backbone,
        "spacil_version": __version__,  # the spacil that wrote the store (an extension: older stores lack it)
    }
    if visual_proj is not None:
        meta["width"] = int(visual_proj.shape[0])
    meta.update(extra_meta or {})
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=2))
    return path


def write_text_features(
    path: str | Path,
    prompts: Optional[np.ndarray] = None,
    templates: Optional[np.ndarray] = None,
    descriptions: Optional[tuple[np.ndarray, np.ndarray]] = None,
    template_norms: Optional[np.ndarray] = None,
) -> None:
    """text/prompts.npy [C, d], text/templates.npy [C, K, d] (spacil's extension: one token per template, for the
    no-LLM ablation) with text/template_norms.npy [C, K] (their norms before normalisation), text/descriptions.npy
    [C, M, d] with text/description_mask.npy [C, M]."""
    text = Path(path) / "text"
    if prompts is not None:
        make_dirs(text)
        atomic_save_npy(text / "prompts.npy", np.asarray(prompts, dtype=np.float32))
    if templates is not None:
        make_dirs(text)
        atomic_save_npy(text / "templates.npy", np.asarray(templates, dtype=np.float32))
    if template_norms is not None:
        make_dirs(text)
        atomic_save_npy(Path(path) / TEMPLATE_NORMS_FILE, np.asarray(template_norms, dtype=np.float32))
    if descriptions is not None:
        tokens, mask = descriptions
        make_dirs(text)
        atomic_save_npy(text / "descriptions.npy", np.asarray(tokens, dtype=np.float32))
        atomic_save_npy(text / "description_mask.npy", np.asarray(mask, dtype=bool))


def write_visual_proj(path: str | Path, visual_proj: np.ndarray) -> None:
    """backbone/visual_proj.npy float32 [width, d]."""
    file = Path(path) / VISUAL_PROJ_FILE
    make_dirs(file.parent)
    atomic_save_npy(file, np.asarray(visual_proj, dtype=np.float32))


def pad_token_sets(token_sets: Sequence[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class token sets of varying length -> ([C, M, d] zero-padded, bool mask [C, M])."""
    width = max((len(t) for t in token_sets), default=0)
    width = max(width, 1)
    tokens = np.zeros((len(token_sets), width, dim), dtype=np.float32)
    mask = np.zeros((len(token_sets), width), dtype=bool)
    for c, t in enumerate(token_sets):
        tokens[c, : len(t)] = t
        mask[c, : len(t)] = True
    return tokens, mask
