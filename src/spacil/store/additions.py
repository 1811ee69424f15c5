"""Adding ENGINE's inputs to a finished store: pairwise descriptions (store/pairwise.py) and stored views
(store/views.py). Used by `spacil extract --pairwise-descriptions FILE --views N` and by a run whose config asks for them;
what the store has already is neither re-encoded nor touched."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from spacil.errors import InputError
from spacil.fileio import read_json
from spacil.store.pairwise import PAIRWISE_MASK_FILE, add_pairwise
from spacil.store.views import add_views, make_view_transform


def check_view_request(views: int, transform: Optional[str], noise: Optional[float]) -> None:
    """Refuse, before any work, view settings without a count (and an unknown transform)."""
    if not views and (transform is not None or noise is not None):
        raise InputError("--view-transform / --view-noise: give --views N too (how many views to encode)")
    if views:
        make_view_transform(transform or "gaussian-noise", noise)


def missing_additions(store: str | Path, pairwise_descriptions: Optional[str], views: int) -> bool:
    """Does the finished store lack pairwise descriptions or views that were asked for?"""
    store = Path(store)
    lacks_pairwise = bool(pairwise_descriptions) and not (store / PAIRWISE_MASK_FILE).is_file()
    return lacks_pairwise or (bool(views) and "views" not in read_json(store / "meta.json"))


def add_engine_inputs(store: str | Path, dataset: str, data_root: Optional[str | Path], *, model: str,
                      pretrained: Optional[str], device: str, pairwise_descriptions: Optional[str] = None, views: int = 0,
                      view_transform: Optional[str] = None, view_noise: Optional[float] = None, view_seed: int = 0,
                      batch_size: int = 64, names_file: Optional[str] = None, progress: bool = True) -> None:
    """Add what is asked for and missing: the pairwise descriptions first (text only), then the views."""
    store = Path(store)
    check_view_request(views, view_transform, view_noise)
    if pairwise_descriptions and not (store / PAIRWISE_MASK_FILE).is_file():
        add_pairwise(store, pairwise_descriptions, model=model, pretrained=pretrained, device=device)
    if views:
        if data_root is None:
            raise InputError(f"{store}: {views} views asked for, and no data root to encode them from")
        add_views(store, dataset, data_root, views, make_view_transform(view_transform or "gaussian-noise", view_noise),
                  seed=view_seed, model=model, pretrained=pretrained, device=device, batch_size=batch_size,
                  names_file=names_file, progress=progress)
