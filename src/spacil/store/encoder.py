"""The frozen CLIP that adds arrays to a finished store (views, pairwise descriptions): the one the store was encoded with,
in the store's precision."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from spacil.errors import InputError


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
