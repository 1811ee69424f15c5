"""The disk a feature store will take, estimated before anything is written, and the check against the free space at
`--out` (`spacil extract` stops with exit 2 before its first write; `spacil data check` says it beside the tree).

Every array the store holds, from the image count, the backbone's patches N, width d and z's width, and the store dtype
(docs/interfaces.md has the format):

    rows, per split    global [n, d], patches [n, N, d], global_pre (z) [n, width] when written      store dtype
    views (train)      views_global [n, V, d], views_global_pre [n, V, width] with z                  store dtype
    per split          labels [n] int64, image_paths.json (each path as JSON, with its ", ")
    text               prompts [C, d], templates [C, K, d] and their norms [C, K], descriptions
                       [C, M, d] and mask [C, M], backbone/visual_proj [width, d] with z              float32

A resumed extraction counts only the rows no record names done, and labels and paths only for a split that has none.
Sizes are in decimal units (GB = 10^9 bytes), as `df -H` and disk vendors give them. The `.npy` headers (128 bytes each)
and `meta.json` are left out: kilobytes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from spacil.errors import InputError

ITEMSIZE = {"float16": 2, "float32": 4}
FLOAT32 = 4
INT64 = 8


@dataclass(frozen=True)
class StoreShape:
    """The backbone's sizes a store's rows have: d (`dim`), patches N (`num_patches`) and z's `width`."""

    dim: int
    num_patches: int
    width: int


def model_shape(model: str) -> Optional[StoreShape]:
    """A model's store shape from its open_clip config, without building it (`spacil data check`); None where the name
    has no config open_clip knows (an `hf-hub:` model, a timm tower): then no estimate is made before the model is
    built. `local-dir:PATH` reads PATH/open_clip_config.json."""
    import open_clip

    if model.startswith("local-dir:"):
        try:
            config = json.loads((Path(model[len("local-dir:"):]) / "open_clip_config.json").read_text())["model_cfg"]
        except (OSError, ValueError, KeyError):
            return None
    else:
        config = open_clip.get_model_config(model)
    vision = (config or {}).get("vision_cfg") or {}
    if not config or "embed_dim" not in config or not {"width", "patch_size"} <= set(vision):
        return None
    size = vision.get("image_size", 224)
    height, width = (size, size) if isinstance(size, int) else size
    patch = vision["patch_size"]
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    return StoreShape(int(config["embed_dim"]), (height // patch_h) * (width // patch_w), int(vision["width"]))


def format_bytes(count: float) -> str:
    """Decimal units: '268.6 GB', '12.0 kB', '950 B'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""  # unreachable


@dataclass
class StoreEstimate:
    """Bytes a store (or what is left of one) will write, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'268.6 GB (patches 264.1 GB, global 1.4 GB, z 2.0 GB, labels and paths 70.2 MB, text 168.0 MB)'."""
        shown = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.parts.items() if size)
        return f"{format_bytes(self.total)}" + (f" ({shown})" if shown else "")


def estimate_store(shape: StoreShape, dtype: str, rows: dict[str, int], *, with_pre: bool, row_arrays: bool = True,
                   view_count: int = 0, view_rows: int = 0, paths: Optional[dict[str, Sequence[str]]] = None,
                   classes: int = 0, templates: int = 0, description_tokens: int = 0) -> StoreEstimate:
    """The bytes to write: `rows` per split still to encode (global and patches unless `row_arrays` is False, z with
    `with_pre`), `view_count` views of `view_rows` training images, labels and image paths of the splits in `paths`,
    and the text features of `classes` classes with `templates` templates and `description_tokens` tokens per class."""
    if dtype not in ITEMSIZE:
        raise InputError(f"--dtype {dtype}: expected float16 or float32")
    item = ITEMSIZE[dtype]
    n = sum(rows.values())
    d, width = shape.dim, shape.width if with_pre else 0
    parts = {
        "patches": n * shape.num_patches * d * item if row_arrays else 0,
        "global": n * d * item if row_arrays else 0,
        "z": n * width * item,
        "views": view_count * view_rows * (d + width) * item,
        "labels and paths": sum(INT64 * len(split_paths) + sum(len(json.dumps(p)) + 2 for p in split_paths)
                                for split_paths in (paths or {}).values()),
        "text": FLOAT32 * (classes * (d + templates * (d + 1) + description_tokens * (d + 1)) + width * d),
    }
    return StoreEstimate(parts)


def free_bytes(path: str | Path) -> Optional[int]:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent); None when it cannot be read."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def room_line(out: str | Path, estimate: StoreEstimate, what: str = "") -> tuple[str, Optional[str]]:
    """(the line that says the estimate (`what`: e.g. ' for ViT-B-16 in float16') and the free space at `out`, the fault
    when the space is short, else None)."""
    free = free_bytes(out)
    where = f"{format_bytes(free)} free at {out}" if free is not None else f"free space at {out} unknown"
    line = f"store size: about {estimate.describe()}{what}; {where}"
    if free is not None and free < estimate.total:
        return line, (f"--out {out}: the store needs about {format_bytes(estimate.total)}, only {format_bytes(free)} "
                      f"free there; make room or choose another --out")
    return line, None
