"""The per-row arrays of a store split beyond global/patches/labels that a method may declare it reads
(`Learner.train_arrays`, `Learner.eval_arrays`): rows on axis 0, one row per image of the split."""

from __future__ import annotations

import numpy as np

from spacil.errors import InputError
from spacil.store.format import FeatureStore, require_pre_projection

# name -> the SplitFeatures attribute holding it; an extension adds its arrays here
ROW_ARRAYS = {"global_pre": "global_pre", "views_global": "views_global", "views_global_pre": "views_global_pre"}
# name -> (view transform, "global" | "global_pre"): the z of the views of one transform, wherever the store keeps them
# (its first views or a view set); AREA reads these
VIEW_SET_ARRAYS = {"views_occlusion_pre": ("occlusion", "global_pre"), "views_area_augment_pre": ("area-augment", "global_pre")}


def _view_set_array(store: FeatureStore, split: str, name: str, method: str) -> np.ndarray:
    transform, kind = VIEW_SET_ARRAYS[name]
    require_pre_projection(store, method)
    found = store.split(split).view_sets.get(transform, {}).get(kind)
    if found is None:
        raise InputError(f"{store.path}: no stored {transform} views ({split}), which {method} needs; add them with "
                         f"`spacil extract --dataset {store.dataset} --data-root DATA --out {store.path} --views 4 "
                         f"--view-transform {transform}` (the store's other arrays are kept)")
    return found


def row_arrays(store: FeatureStore, split: str, names: tuple[str, ...] | list[str], method: str) -> dict[str, np.ndarray]:
    """{name: memory-mapped array [n, ...]} of `split` for each of `names`. A name the store lacks is an InputError (one
    line, exit 2) that says how to add it; a name spacil does not know is a ValueError (a learner's bug)."""
    found = {}
    for name in names:
        if name in VIEW_SET_ARRAYS:
            found[name] = _view_set_array(store, split, name, method)
            continue
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


# name -> (the FeatureStore attribute holding it, what it is, how to add it to a finished store)
TEXT_INPUTS = {"area_texts": ("area_texts", "AREA description sets (text/area_*.npy)",
                              "`spacil extract --dataset {dataset} --data-root DATA --out {store} --area-descriptions FILE` "
                              "(FILE from `spacil descriptions import --format area-sets FOLDER` or `spacil describe "
                              "--area-sets`; the store's other arrays are kept)")}


def require_text_inputs(store: FeatureStore, names: tuple[str, ...] | list[str], method: str) -> None:
    """InputError (one line, exit 2) naming the flag that adds a declared text input the store lacks."""
    for name in names:
        if name not in TEXT_INPUTS:
            raise ValueError(f"{method}: unknown store text input {name!r} (known: {', '.join(TEXT_INPUTS)})")
        attribute, what, how = TEXT_INPUTS[name]
        if getattr(store, attribute, None) is None:
            raise InputError(f"{store.path}: no {what}, which {method} needs; add them with "
                             + how.format(dataset=store.dataset, store=store.path))
