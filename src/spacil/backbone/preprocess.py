"""The model's own image preprocessing, from its open_clip preprocess config (open_clip transform.py `PreprocessCfg`).

open_clip attaches the final config to `model.visual.preprocess_cfg`: its defaults (CLIP's statistics, bicubic,
`shortest`), overlaid by a `local-dir:` folder's `preprocess_cfg`, or by the pretrained tag's (SigLIP and PE tags: mean and
std 0.5, squash; CLIPA: ImageNet statistics, bilinear). Two rules of spacil on top (docs/backbones.md):

- a built-in architecture with a checkpoint *file* (nothing downloads here) gets no tag config from open_clip; spacil
  takes the one its pretrained tags share, when they all agree (every SigLIP, SigLIP2, PE, EVA, ConvNeXt model does);
- `shortest`, open_clip's default and what `_pcfg` writes for every CLIP tag, becomes the protocol's `squash` (PROTOCOL.md:
  Resize to 224x224 bicubic), so that the protocol's ViT-B/16 path stays exactly as it was; `squash` and `longest` are
  kept as the model says, and so is a `shortest` that a `local-dir:` folder's config names itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from spacil.data import CLIP_MEAN, CLIP_STD, image_transform
from spacil.errors import InputError

_KEYS = ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")


@dataclass(frozen=True)
class Preprocess:
    """What turns an image into the encoder's input: resize and crop to `image_size`, then (x - mean) / std."""

    image_size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "squash"
    fill_color: int = 0
    source: str = "protocol"

    def transform(self):
        """torchvision Compose of four steps: resize, crop, ToTensor, Normalize (spacil.data.image_transform)."""
        return image_transform(self.image_size, self.mean, self.std, self.interpolation, self.resize_mode, self.fill_color)

    def as_seen(self, image):
        """A PIL image cropped as the encoder sees it, for drawing the patch grid over it: the image itself under
        `squash` (the grid spans all of it, stretched), else the resize-and-crop (`shortest`) or pad (`longest`) result."""
        if self.resize_mode == "squash":
            return image
        steps = self.transform().transforms[:2]
        for step in steps:
            image = step(image)
        return image

    def statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 [3, 1, 1] on `device`."""
        return (torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode, "fill_color": self.fill_color,
                "source": self.source}


def _tags_config(model: str) -> Optional[dict]:
    """The preprocess config every pretrained tag of the built-in `model` shares, or None when they differ or none exists."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    found = set()
    for tag in open_clip.list_pretrained_tags_by_model(model):
        cfg = get_pretrained_cfg(model, tag)
        found.add(tuple((k, tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in _KEYS[1:] if k in cfg))
    return dict(found.pop()) if len(found) == 1 else None


def model_preprocess(net: torch.nn.Module, model: str, pretrained: Optional[str]) -> Preprocess:
    """The preprocessing of the open_clip model `net` (built from `model` / `pretrained`), by the rules of this module."""
    cfg = dict(getattr(net.visual, "preprocess_cfg", None) or {})
    source = "open_clip config"
    explicit_resize = False
    if model.startswith("local-dir:"):
        config_file = Path(model[len("local-dir:"):]) / "open_clip_config.json"
        source = f"{config_file} preprocess_cfg"
        explicit_resize = "resize_mode" in (json.loads(config_file.read_text()).get("preprocess_cfg") or {})
    elif not model.startswith("hf-hub:") and pretrained and Path(pretrained).is_file():
        shared = _tags_config(model)
        if shared is not None:
            cfg.update(shared)
            source = f"open_clip pretrained tags of {model}"
    elif pretrained:
        source = f"open_clip pretrained tag {model}/{pretrained}"
    mean, std = (_three_numbers(cfg.get(key, default), key, source) for key, default in
                 (("mean", CLIP_MEAN), ("std", CLIP_STD)))
    if min(std) <= 0:  # (x - mean) / 0 would make every stored row NaN
        raise InputError(f"{source}: std {list(std)}: expected three numbers > 0")
    size = cfg.get("size", 224)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    if not sizes or not all(_is_number(v) and v > 0 and float(v).is_integer() for v in sizes):
        raise InputError(f"{source}: size {size!r}: expected a positive whole number of pixels (or [height, width])")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise InputError(f"--model {model}: image size {list(size)} is not square; spacil encodes square images")
        size = size[0]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode == "shortest" and not explicit_resize:
        resize_mode = "squash"  # the protocol's resize (see the module docstring)
    return Preprocess(image_size=int(size), mean=mean, std=std,
                      interpolation=str(cfg.get("interpolation", "bicubic")), resize_mode=resize_mode,
                      fill_color=int(cfg.get("fill_color", 0) or 0), source=source)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _three_numbers(value, key: str, source: str) -> tuple[float, float, float]:
    """A preprocess config's `mean` or `std`: one finite number per RGB channel, else a one-line InputError naming
    `source` (the config file) and `key`."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise InputError(f"{source}: {key} {value!r}: expected three finite numbers (one per RGB channel)")
    return tuple(float(v) for v in value)
