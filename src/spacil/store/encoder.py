"""The frozen CLIP that adds arrays to a finished store (views, pairwise descriptions): the one the store was encoded with,
in the store's precision."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from spacil.errors import InputError
from spacil.fileio import read_json


def finished_store_meta(out: str | Path, what: str) -> tuple[Path, Path, dict]:
    """(store folder, its meta.json, the parsed meta) of the finished store `out` that `what` is added to; an InputError
    when it has no meta.json (nothing to add to)."""
    out = Path(out)
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: missing; {what} are added to a finished store")
    return out, meta_path, read_json(meta_path)


def numpy_text_encoder(backbone):
    """texts -> (unit text features [n, d], their norms before normalisation [n]) as numpy arrays, through `backbone`."""

    def encode(texts):
        units, lengths = backbone.encode_texts_with_norms(texts)
        return units.cpu().numpy(), lengths.cpu().numpy()

    return encode


def store_encoder(meta: dict, meta_path: Path, model: str, pretrained: Optional[str], device: str, backbone=None):
    """`backbone` (or a FrozenCLIP of `model`/`pretrained` on `device`) in the store's precision; an InputError naming
    meta.json when it is not the model the store was encoded with."""
    precision = meta.get("precision", "fp32")
    if backbone is None:
        from spacil.backbone import FrozenCLIP
        from spacil.devices import resolve_device

        backbone = FrozenCLIP(model, pretrained, resolve_device(device), precision)
    else:
        backbone = backbone.with_precision(precision)
    if backbone.info.to_dict() != meta.get("backbone"):
        stored = meta.get("backbone") or {}
        raise InputError(f"{meta_path}: the store was encoded with another model ({stored.get('model')}, "
                         f"{stored.get('pretrained')}); what is added to it must come from the same one")
    return backbone
