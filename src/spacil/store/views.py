"""Stored views (*extension*, docs/interfaces.md): V extra encodings of every training image under a named, seeded,
deterministic transform, for methods whose loss compares an image with an altered copy of itself (ENGINE's image
augmentation term).

    train/views_global.npy      store dtype [n, V, d]      normalised g of each view (rows on axis 0, like every array)
    train/views_global_pre.npy  store dtype [n, V, width]  z of each view (when the store holds z)
    meta.json "views"           {"count": V, "transform": NAME, "params": {...}, "seed": S, "arrays": [...]}

Views of a second transform (AREA reads occlusion and area-augment views) are a *view set* beside the first:
    train/views_<transform>_global.npy, train/views_<transform>_global_pre.npy (transform with '-' as '_'),
    meta.json "view_sets": {NAME: the same record}

A view's pixels depend on (seed, training row, view number) alone, never on the batch or the device it is drawn on:
each image's noise comes from its own CPU generator. Views are added to a finished store (rows, text and meta.json are
kept, nothing else is re-encoded) in fixed batches of rows with a record, `.views.progress.json`, written before the
arrays and after every flushed batch, so a killed run resumes and ends byte-identical to an uninterrupted one; meta.json
names the views only once every batch is done (a store is read without them until then).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from spacil.data import CLIP_MEAN, CLIP_STD, open_dataset
from spacil.errors import InputError
from spacil.fileio import atomic_write_text, read_json, reserve_space, writing
from spacil.store.encoder import store_encoder
from spacil.store.format import VIEW_SETS_KEY, VIEWS_GLOBAL_FILE, VIEWS_PRE_FILE, read_npy_header, view_set_files

log = logging.getLogger(__name__)

VIEWS_PROGRESS_FILE = ".views.progress.json"


def _row_seed(seed: int, row: int, view: int) -> int:
    """The seed of one image's view: a function of (seed, row, view) only."""
    return (seed * 1_000_003 + row * 7_919 + view * 104_729 + 0x5EED) % (2 ** 63 - 1)


class ViewTransform:
    """A deterministic transform of a batch of uint8 images [B, 3, H, W] (on the device) into the encoder's normalised
    input, image i drawn from the generator of (seed, rows[i], view)."""

    name = "base"

    def __init__(self, **params):
        self.params = params
        self.statistics = (CLIP_MEAN, CLIP_STD)  # the encoder's (mean, std): `add_views` sets the model's own

    def __call__(self, images: torch.Tensor, rows: np.ndarray, view: int, seed: int) -> torch.Tensor:
        pixels = images.to(torch.float32).div(255)
        out = torch.stack([self.one(pixels[i], torch.Generator().manual_seed(_row_seed(seed, int(row), view)))
                           for i, row in enumerate(rows)])
        return out

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalise_pixels(pixels, *self.statistics)

    def one(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def normalise_pixels(pixels: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> the encoder's normalised input (torchvision's Normalize; CLIP's statistics unless the
    model's own are given)."""
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean) / std


def flip_and_jitter(image: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float,
                    saturation: float, hue: float) -> torch.Tensor:
    """[3, H, W] -> a horizontal flip with probability 1/2, then brightness, contrast, saturation factors uniform in
    [1 - s, 1 + s] and a hue shift uniform in [-h, h], in that fixed order (torchvision's functional ops; five draws)."""
    from torchvision.transforms import functional as TF

    draws = torch.rand(5, generator=generator).tolist()
    if draws[0] < 0.5:
        image = image.flip(-1)
    image = TF.adjust_brightness(image, 1 + brightness * (2 * draws[1] - 1))
    image = TF.adjust_contrast(image, 1 + contrast * (2 * draws[2] - 1))
    image = TF.adjust_saturation(image, 1 + saturation * (2 * draws[3] - 1))
    return TF.adjust_hue(image.clamp(0, 1), hue * (2 * draws[4] - 1))


def occlude(image: torch.Tensor, generator: torch.Generator, rho_min: float = 0.1, rho_max: float = 0.4,
            eta_min: float = 0.33, eta_max: float = 3.0) -> torch.Tensor:
    """[C, H, W] -> a copy with one rectangle replaced by noise uniform in [0, 1), as models/area.py
    `_generate_occluded_inputs` draws it: area int(rho H W), rho uniform in [rho_min, rho_max], aspect eta uniform in
    [eta_min, eta_max], h = clip(int(sqrt(area eta)), 1, H), w = clip(int(sqrt(area / eta)), 1, W), the top-left corner
    uniform over the places it fits."""
    channels, height, width = image.shape
    draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    area = int((rho_min + (rho_max - rho_min) * draws[0]) * height * width)
    eta = eta_min + (eta_max - eta_min) * draws[1]
    h = min(max(int(math.sqrt(area * eta)), 1), height)
    w = min(max(int(math.sqrt(area / eta)), 1), width)
    top = int(draws[2] * (height - h + 1))  # np.random.randint(0, H - h + 1), or 0 when the box fills the height
    left = int(draws[3] * (width - w + 1))
    out = image.clone()
    out[:, top:top + h, left:left + w] = torch.rand((channels, h, w), generator=generator).to(image.device)
    return out


class GaussianNoise(ViewTransform):
    """ENGINE's view (models/engine.py Learner.train: `aug_image = inputs + torch.randn_like(inputs) * 0.25`, then
    `torch.clamp(aug_image, 0, 1)`): Gaussian noise of std `noise` added to the *normalised* input tensor, then clamped to
    [0, 1] (as the official code does, on the normalised tensor)."""

    name = "gaussian-noise"

    def __init__(self, noise: float = 0.25):
        if not noise >= 0:
            raise InputError(f"--view-noise {noise}: expected a number >= 0")
        super().__init__(noise=float(noise))

    def one(self, pixels, generator):
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        return (self.normalise(pixels) + noise * self.params["noise"]).clamp(0, 1)


class FlipJitter(ViewTransform):
    """A horizontal flip with probability 1/2 and a colour jitter (brightness, contrast, saturation factors uniform in
    [1 - s, 1 + s], hue shift uniform in [-h, h], applied in that fixed order with torchvision's functional ops), on the
    pixels before normalisation."""

    name = "flip-jitter"

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1):
        super().__init__(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def one(self, pixels, generator):
        return self.normalise(flip_and_jitter(pixels, generator, **self.params))


class Occlusion(ViewTransform):
    """AREA's occluded view (models/area.py Learner._generate_occluded_inputs): one rectangle of the *normalised* input
    tensor replaced by noise uniform in [0, 1) (as the official code does, on the normalised tensor). Its area is
    int(rho * H * W) with rho uniform in [rho_min, rho_max], its aspect eta uniform in [eta_min, eta_max]:
    h = clip(int(sqrt(area * eta)), 1, H), w = clip(int(sqrt(area / eta)), 1, W), top-left corner uniform over the places
    it fits. The official code draws a fresh occlusion per batch (numpy's global generator); here view v of image i is
    drawn once, from (seed, i, v)."""

    name = "occlusion"

    def __init__(self, rho_min: float = 0.1, rho_max: float = 0.4, eta_min: float = 0.33, eta_max: float = 3.0):
        super().__init__(rho_min=rho_min, rho_max=rho_max, eta_min=eta_min, eta_max=eta_max)

    def one(self, pixels, generator):
        return occlude(self.normalise(pixels), generator, **self.params)


class AreaAugment(ViewTransform):
    """AREA's augmented view (models/area.py Learner.train: `T.RandomHorizontalFlip(p=0.5)` then
    `T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)` applied to the *normalised* input tensor, as the
    official code does; torchvision's float ops clamp to [0, 1] there). Differences: the official code applies one draw to
    the whole batch tensor and ColorJitter permutes its four ops at random; here every image has its own draw and the ops
    run in the fixed order brightness, contrast, saturation, hue."""

    name = "area-augment"

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.1):
        super().__init__(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

    def one(self, pixels, generator):
        return flip_and_jitter(self.normalise(pixels), generator, **self.params)


VIEW_TRANSFORMS = {cls.name: cls for cls in (GaussianNoise, FlipJitter, Occlusion, AreaAugment)}


def make_view_transform(name: str, noise: Optional[float] = None) -> ViewTransform:
    if name not in VIEW_TRANSFORMS:
        raise InputError(f"--view-transform {name}: expected one of {', '.join(VIEW_TRANSFORMS)}")
    if name == "gaussian-noise":
        return GaussianNoise(0.25 if noise is None else noise)
    if noise is not None:
        raise InputError(f"--view-noise: only the gaussian-noise transform has a noise level, not {name}")
    return VIEW_TRANSFORMS[name]()


def views_record(count: int, transform: ViewTransform, seed: int, arrays: list[str]) -> dict:
    """What meta.json says of a store's views."""
    return {"count": count, "transform": transform.name, "params": dict(transform.params), "seed": seed, "arrays": arrays}


def add_views(out: str | Path, dataset: str, data_root: str | Path, count: int, transform: ViewTransform,
              seed: int = 0, model: str = "ViT-B-16", pretrained: Optional[str] = "laion400m_e32",
              device: str = "auto", batch_size: int = 64, names_file: Optional[str] = None,
              max_batches: Optional[int] = None, progress: bool = True, backbone=None) -> Path:
    """Encode `count` views of every training image of the finished store `out` (or finish an interrupted run).

    The encoder is `model`/`pretrained` (or `backbone`), run in the store's precision; it must be the one the store was
    encoded with. A store that has views made otherwise is refused. `max_batches` stops after that many batches (tests)."""
    out = Path(out)
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: missing; views are added to a finished store (run `spacil extract` first)")
    meta = read_json(meta_path)
    if count < 1:
        raise InputError(f"--views {count}: expected at least 1")
    has_pre = "width" in meta
    # the first views a store gets are meta.json's "views"; views of another transform are a view set beside them
    primary = meta.get("views") is None or meta["views"].get("transform") == transform.name
    global_file, pre_file = (VIEWS_GLOBAL_FILE, VIEWS_PRE_FILE) if primary else view_set_files(transform.name)
    arrays = [global_file] + ([pre_file] if has_pre else [])
    wanted = views_record(count, transform, seed, arrays)
    existing = meta.get("views") if primary else (meta.get(VIEW_SETS_KEY) or {}).get(transform.name)
    if existing == wanted:
        return out
    if existing is not None:
        raise InputError(f"{meta_path}: the store has {transform.name} views made otherwise ({existing.get('count')} "
                         f"views, seed {existing.get('seed')}, {existing.get('params')}); extract into another --out")
    backbone = store_encoder(meta, meta_path, model, pretrained, device, backbone)
    names, splits = open_dataset(dataset, data_root, names_file)
    split = splits["train"]
    header = read_npy_header(out / "train" / "global.npy")
    rows, dtype = header.shape[0], header.dtype
    if len(split.items) != rows:
        raise InputError(f"--data-root {data_root}: {len(split.items)} training images, the store has {rows}")
    fingerprint = {**wanted, "batch_size": batch_size, "rows": rows, "dtype": dtype.name,
                   "backbone": meta.get("backbone"), "precision": meta.get("precision", "fp32")}
    record_path = out / (VIEWS_PROGRESS_FILE if primary else f".views_{transform.name}.progress.json")
    record = read_json(record_path) if record_path.exists() else None
    if record is not None and record.get("fingerprint") != fingerprint:
        raise InputError(f"{record_path}: an unfinished views extraction with other settings; delete it to start over")
    shapes = {global_file: (rows, count, backbone.dim)}
    if has_pre:
        shapes[pre_file] = (rows, count, int(meta["width"]))
    done: list = [] if record is None else [list(r) for r in record.get("done", [])]
    if not done:  # the record first, then the arrays at their final size
        atomic_write_text(record_path, json.dumps({"fingerprint": fingerprint, "done": []}))
        with writing(out):
            maps = {rel: open_memmap(out / rel, mode="w+", dtype=dtype, shape=shape) for rel, shape in shapes.items()}
        for rel in shapes:  # rows are written through the maps: their blocks now, or one line on a full disk
            reserve_space(out / rel)
    else:
        maps = {rel: open_memmap(out / rel, mode="r+") for rel in shapes}
        for rel, shape in shapes.items():
            if maps[rel].shape != shape or maps[rel].dtype != dtype:
                raise InputError(f"{out / rel}: shape {list(maps[rel].shape)} {maps[rel].dtype}, expected {list(shape)} {dtype}")
    batches = [(s, min(rows, s + batch_size)) for s in range(0, rows, batch_size)]
    todo = [(s, e) for s, e in batches if not any(lo <= s and e <= hi for lo, hi in done)]
    from spacil.store.extract import _ImageRows, _add_range  # one image pipeline and one row-range record for every array

    images = _ImageRows(split, backbone.preprocess.transform())
    transform.statistics = (backbone.preprocess.mean, backbone.preprocess.std)
    bar = tqdm(total=sum(e - s for s, e in todo), desc=f"views {out.name}", unit="img", disable=not progress)
    try:
        for number, (start, end) in enumerate(todo):
            if max_batches is not None and number >= max_batches:
                return out
            batch = [images[i] for i in range(start, end)]
            broken = next((error for _, error in batch if error), None)
            if broken:
                raise InputError(broken)
            pixels = torch.stack([image for image, _ in batch]).to(backbone.device)
            row_ids = np.arange(start, end)
            for view in range(count):
                inputs = transform(pixels, row_ids, view, seed)
                if has_pre:
                    global_, _, pre = backbone.encode_image_features(inputs)
                else:
                    global_, _ = backbone.encode_images(inputs)
                maps[global_file][start:end, view] = global_.to(torch.float32).cpu().numpy().astype(dtype)
                if has_pre:
                    maps[pre_file][start:end, view] = pre.to(torch.float32).cpu().numpy().astype(dtype)
            for array in maps.values():
                array.flush()
            done = _add_range(done, start, end)
            atomic_write_text(record_path, json.dumps({"fingerprint": fingerprint, "done": done}))
            bar.update(end - start)
    finally:
        bar.close()
    for array in maps.values():
        array.flush()
    del maps
    meta = read_json(meta_path)  # as it is now (nothing else writes it while views are added, but keep what is there)
    if primary:
        meta["views"] = wanted
    else:
        meta[VIEW_SETS_KEY] = {**(meta.get(VIEW_SETS_KEY) or {}), transform.name: wanted}
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    record_path.unlink(missing_ok=True)
    log.info("%s: %d %s views of %d training images", out, count, transform.name, rows)
    return out
