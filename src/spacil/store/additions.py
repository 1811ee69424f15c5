"""Adding ENGINE's and AREA's inputs to a finished store: pairwise descriptions (store/pairwise.py), AREA's description
sets (store/area_texts.py) and stored views (store/views.py). Used by `spacil extract --pairwise-descriptions FILE --views N` and by a run whose config asks for them;
what the store has already is neither re-encoded nor touched (AREA's description sets from another file are refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from spacil.errors import InputError
from spacil.fileio import read_json
from spacil.store.area_texts import AREA_TEXTS_KEY, add_area_texts, check_area_source
from spacil.store.format import AREA_VIEW_TRANSFORMS, VIEW_SETS_KEY
from spacil.store.pairwise import PAIRWISE_MASK_FILE, add_pairwise
from spacil.store.views import add_views, make_view_transform


def check_view_request(views: int, transform: Optional[str], noise: Optional[float]) -> None:
    """Refuse, before any work, view settings without a count (and an unknown transform)."""
    if not views and (transform is not None or noise is not None):
        raise InputError("--view-transform / --view-noise: give --views N too (how many views to encode)")
    if views:
        make_view_transform(transform or "gaussian-noise", noise)


def _has_views(meta: dict, transform: Optional[str]) -> bool:
    """Does meta.json name views of `transform` (the first views or a view set)?"""
    transform = transform or "gaussian-noise"
    first = meta.get("views") or {}
    return first.get("transform") == transform or transform in (meta.get(VIEW_SETS_KEY) or {})


def missing_additions(store: str | Path, pairwise_descriptions: Optional[str], views: int,
                      view_transform: Optional[str] = None, area_descriptions: Optional[str] = None,
                      area_views: int = 0) -> bool:
    """Does the finished store lack pairwise descriptions, views of `view_transform`, AREA's description sets or AREA's
    views that were asked for?"""
    store = Path(store)
    meta = read_json(store / "meta.json")
    lacks_pairwise = bool(pairwise_descriptions) and not (store / PAIRWISE_MASK_FILE).is_file()
    if area_descriptions:
        check_area_source(store, meta, area_descriptions)
    lacks_area = bool(area_descriptions) and AREA_TEXTS_KEY not in meta
    lacks_area = lacks_area or (bool(area_views) and not all(_has_views(meta, t) for t in AREA_VIEW_TRANSFORMS))
    return lacks_pairwise or lacks_area or (bool(views) and not _has_views(meta, view_transform))


def add_engine_inputs(store: str | Path, dataset: str, data_root: Optional[str | Path], *, model: str,
                      pretrained: Optional[str], device: str, pairwise_descriptions: Optional[str] = None, views: int = 0,
                      view_transform: Optional[str] = None, view_noise: Optional[float] = None, view_seed: int = 0, area_descriptions: Optional[str] = None, area_views: int = 0,
                      batch_size: int = 64, names_file: Optional[str] = None, progress: bool = True) -> None:
    """Add what is asked for and missing: the pairwise descriptions and AREA's description sets first (text only), then
    the views."""
    store = Path(store)
    check_view_request(views, view_transform, view_noise)
    if pairwise_descriptions and not (store / PAIRWISE_MASK_FILE).is_file():
        add_pairwise(store, pairwise_descriptions, model=model, pretrained=pretrained, device=device)
    if area_descriptions:
        check_area_source(store, read_json(store / "meta.json"), area_descriptions)
    if area_descriptions and AREA_TEXTS_KEY not in read_json(store / "meta.json"):
        add_area_texts(store, area_descriptions, model=model, pretrained=pretrained, device=device)
    if area_views:  # AREA's two view transforms, each a view set beside the store's first views
        if data_root is None:
            raise InputError(f"{store}: AREA's views asked for, and no data root to encode them from")
        for transform in AREA_VIEW_TRANSFORMS:
            add_views(store, dataset, data_root, area_views, make_view_transform(transform), seed=view_seed, model=model,
                      pretrained=pretrained, device=device, batch_size=batch_size, names_file=names_file,
                      progress=progress)
    if views:
        if data_root is None:
            raise InputError(f"{store}: {views} views asked for, and no data root to encode them from")
        add_views(store, dataset, data_root, views, make_view_transform(view_transform or "gaussian-noise", view_noise),
                  seed=view_seed, model=model, pretrained=pretrained, device=device, batch_size=batch_size,
                  names_file=names_file, progress=progress)
