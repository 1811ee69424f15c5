"""The per-row arrays of a store split beyond global/patches/labels that a method may declare it reads
(`Learner.train_arrays`, `Learner.eval_arrays`): rows on axis 0, one row per image of the split."""

from __future__ import annotations

import numpy as np

from spacil.errors import InputError
from spacil.store.format import FeatureStore, require_pre_projection

# name -> the SplitFeatures attribute holding it; an extension adds its arrays here
ROW_ARRAYS = {"global_pre": "global_pre", "views_global": "views_global", "views_global_pre": "views_global_pre"}


def row_arrays(store: FeatureStore, split: str, names: tuple[str, ...] | list[str], method: str) -> dict[str, np.ndarray]:
    """{name: memory-mapped array [n, ...]} of `split` for each of `names`. A name the store lacks is an InputError (one
    line, exit 2) that says how to add it; a name spacil does not know is a ValueError (a learner's bug)."""
    found = {}
    for name in names:
        if name not in ROW_ARRAYS:
            raise ValueError(f"{method}: unknown per-row store array {name!r} (known: {', '.join(ROW_ARRAYS)})")
        if name == "global_pre":
            require_pre_projection(store, method)
        array = getattr(store.split(split), ROW_ARRAYS[name], None)
        if array is None and name.startswith("views_"):
            raise InputError(f"{store.path}: no stored views ({split}/{name}.npy), which {method} needs; add them with "
                             f"`spacil extract --dataset {store.dataset} --data-root DATA --out {store.path} --views 10 "
                             f"--view-transform gaussian-noise` (the store's other arrays are kept)"
                             + ("; or set engine.image_aug=0" if method == "engine" else ""))
        if array is None:
            raise InputError(f"{store.path / split / (name + '.npy')}: missing, and {method} needs it")
        found[name] = array
    return found
