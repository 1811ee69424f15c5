"""From a config to a feature store: reuse the store the config names, or extract it first when a data root is given.

This is what makes a real benchmark one command: `spacil run --config cifar224_b0 --set data.data_root=DATA
--set data.features=STORE` extracts the store once (resumable) and runs on it; later runs reuse it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from spacil.config import Config
from spacil.errors import InputError
from spacil.fileio import make_dirs
from spacil.store.additions import missing_additions
from spacil.store.format import read_meta


def store_lock_path(store: Path) -> Path:
    """The lock file beside the store folder, held while the store is extracted (a sweep's runs share stores)."""
    return store.parent / f"{store.name}.lock"


def prepare_store(config: Config, progress: bool = True) -> Path:
    data = config.data
    if data.features is None:
        raise InputError("config: data.features is not set (pass --features STORE, or set data.features to where the store is or should be written)")
    store = Path(data.features)
    if not (store / "meta.json").is_file():
        if data.data_root is None:
            raise InputError(f"{store}: no feature store there (meta.json missing) and data.data_root is not set to extract one")
        from filelock import FileLock, Timeout

        from spacil.describe.descriptions import load_descriptions
        from spacil.store.extract import extract_store

        # Runs of a sweep that need the same store wait here for one extraction: never two writers on one store.
        make_dirs(store.parent)
        lock = FileLock(store_lock_path(store))
        try:
            lock.acquire(timeout=0)
        except Timeout:  # said once, so a waiting process does not look hung
            print(f"waiting for {store}: another process is extracting it (lock {store_lock_path(store)})",
                  file=sys.stderr, flush=True)
            lock.acquire()
        try:
            if not (store / "meta.json").is_file():  # another process may have finished it while this one waited
                descriptions = load_descriptions(data.descriptions).sentences if data.descriptions else None
                extract_store(data.dataset, data.data_root, store, model=data.model, pretrained=data.pretrained,
                              device=config.device, names_file=data.names_file, class_names=data.class_names,
                              templates=data.templates, descriptions=descriptions,
                              descriptions_source=data.descriptions, semantic_tokens=config.spa.semantic_tokens,
                              progress=progress, views=data.views)
        finally:
            lock.release()
    meta = read_meta(store / "meta.json")
    if missing_additions(store, data.pairwise_descriptions, data.views, data.view_transform, data.area_descriptions,
                         data.area_views):
        from filelock import FileLock

        from spacil.store.additions import add_engine_inputs

        with FileLock(store_lock_path(store)):  # the other runs of a sweep wait, then find them there
            add_engine_inputs(store, data.dataset, data.data_root, model=data.model, pretrained=data.pretrained,
                              device=config.device, pairwise_descriptions=data.pairwise_descriptions, views=data.views,
                              view_transform=data.view_transform,
                              view_noise=data.view_noise if data.view_transform == "gaussian-noise" else None,
                              view_seed=data.view_seed, area_descriptions=data.area_descriptions,
                              area_views=data.area_views, names_file=data.names_file, progress=progress)
        meta = read_meta(store / "meta.json")
    text = meta.get("text") or {}
    recorded = text.get("semantic_tokens") if isinstance(text, dict) else None
    if recorded and recorded != config.spa.semantic_tokens and config.method == "spa" and config.ablation.llm_descriptions:
        raise InputError(
            f"{store / 'meta.json'}: its descriptions were embedded as semantic_tokens={recorded}, the config asks for "
            f"{config.spa.semantic_tokens}; re-embed with `spacil extract ... --semantic-tokens {config.spa.semantic_tokens}`"
        )
    return store

