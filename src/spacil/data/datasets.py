"""The benchmark protocol of CLIP-based CIL (PROTOCOL.md): the nine data sets (and ImageNet-1k beyond them), their
templates, class order, splits.

A data set is one entry of `DATASETS`, or a user's own ImageFolder tree spelled `folder:NAME` (read from
`<data-root>/NAME/{train,test}/<class>/`, with the ImageNet-style templates or those of a templates file). How trees are
read is `spacil.data.folders`, how class names are derived `spacil.data.names` (docs/data.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from types import MappingProxyType
from typing import Optional, Sequence

import numpy as np

from spacil.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CUSTOM_PREFIX = "folder:"  # `--dataset folder:NAME`: an ImageFolder tree <data-root>/NAME that is none of the nine
OPEN_CLIP_IMAGENET = "open_clip imagenet"  # DatasetSpec.metadata: names and templates from open_clip's ImageNet metadata


def _cifar_templates() -> tuple[str, ...]:
    # CLIP's CIFAR prompt ensemble: nine photo styles, first with "a", then with "the".
    styles = ["a photo of {art} {{}}.", "a blurry photo of {art} {{}}.", "a black and white photo of {art} {{}}.",
              "a low contrast photo of {art} {{}}.", "a high contrast photo of {art} {{}}.", "a bad photo of {art} {{}}.",
              "a good photo of {art} {{}}.", "a photo of {art} small {{}}.", "a photo of {art} big {{}}."]
    return tuple(style.format(art=article) for article in ("a", "the") for style in styles)


def _ucf_templates() -> tuple[str, ...]:
    # CLIP's UCF101 ensemble: {medium} x {article} x {how the person relates to the action}.
    relations = ["", "using ", "doing ", "during ", "performing ", "practicing "]
    return tuple(
        f"a {medium} of {article} person {relation}{{}}."
        for relation, article, medium in product(relations, ("a", "the"), ("photo", "video", "example", "demonstration"))
    )


# The 7-template ImageNet ensemble of the CLIP paper (also open_clip's SIMPLE_IMAGENET_TEMPLATES).
_IMAGENET_SEVEN = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                   "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
_CARS = ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
         "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.")


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    title: str
    num_classes: int
    increment: int  # classes per task in the B0 split
    half_base: int  # classes in the first task of the half-base split
    domain: str  # what the LLM is told a class is (SPEC.md section 2)
    templates: tuple[str, ...]
    source: str = "imagefolder"  # "imagefolder", "cifar100" (torchvision) or "custom" (folder:NAME; num_classes 0: any)
    folder: str = ""  # the folder under the data root (default: the key)
    split_folders: tuple[str, str] = ("train", "test")  # the folders read as the store's train and test splits
    metadata: str = ""  # OPEN_CLIP_IMAGENET: class names and templates from open_clip (filled in by `dataset_spec`)

    @property
    def root_name(self) -> str:
        return self.folder or self.key


DATASETS: "MappingProxyType[str, DatasetSpec]" = MappingProxyType({
    spec.key: spec
    for spec in (
        DatasetSpec("cifar224", "CIFAR-100", 100, 10, 50, "a common object or animal", _cifar_templates(), "cifar100"),
        DatasetSpec("cub", "CUB-200-2011", 200, 20, 100, "a type of bird", ("a photo of a {}, a type of bird.",)),
        DatasetSpec("imagenetr", "ImageNet-R", 200, 20, 100, "an object class shown in an artistic rendition", _IMAGENET_SEVEN),
        DatasetSpec("objectnet", "ObjectNet", 200, 20, 100, "a household object", _IMAGENET_SEVEN),
        DatasetSpec("aircraft", "FGVC-Aircraft", 100, 10, 50, "a type of aircraft",
                    ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft.")),
        DatasetSpec("cars", "Stanford Cars", 100, 10, 50, "a car model", _CARS),
        DatasetSpec("food101", "Food-101", 100, 10, 50, "a type of food", ("a photo of {}, a type of food.",)),
        DatasetSpec("sun", "SUN397", 300, 30, 150, "a type of scene", ("a photo of a {}.", "a photo of the {}.")),
        DatasetSpec("ucf101", "UCF101", 100, 10, 50, "a human action", _ucf_templates()),
        # beyond the nine (PROTOCOL.md): the official ILSVRC-2012 download, its labelled `val/` as the test split; the
        # templates (open_clip's 80 OpenAI ImageNet templates) are read from open_clip when the spec is looked up
        DatasetSpec("imagenet1k", "ImageNet-1k", 1000, 100, 500, "an object or animal category", (),
                    split_folders=("train", "val"), metadata=OPEN_CLIP_IMAGENET),
        # generated at run time by spacil.demo.shapes for the demo and the tests; not a benchmark
        DatasetSpec("shapes", "generated shapes", 4, 2, 2, "a coloured geometric shape", ("a photo of a {}.", "a drawing of a {}.")),
    )
})


def dataset_spec(key: str, templates_file: Optional[str | Path] = None) -> DatasetSpec:
    """The spec of a benchmark key, or of `folder:NAME` (a user's ImageFolder tree: any number of classes, the
    ImageNet-style templates unless `templates_file` gives others). A templates file with a benchmark key replaces its
    templates too."""
    if key.startswith(CUSTOM_PREFIX):
        folder = key[len(CUSTOM_PREFIX):]
        if not folder or "/" in folder or "\\" in folder or folder in (".", ".."):
            raise InputError(f"--dataset {key}: expected folder:NAME, NAME a folder directly under the data root")
        spec = DatasetSpec(key, f"ImageFolder tree '{folder}'", 0, 0, 0, "an object class", _IMAGENET_SEVEN, "custom",
                           folder)
    elif key in DATASETS:
        spec = DATASETS[key]
        if spec.metadata == OPEN_CLIP_IMAGENET:
            spec = replace(spec, templates=open_clip_imagenet_templates())
    else:
        raise InputError(f"--dataset {key}: unknown data set (known: {', '.join(DATASETS)}; or folder:NAME for an "
                         f"ImageFolder tree <data-root>/NAME/{{train,test}}/<class>/)")
    if templates_file is not None:
        spec = replace(spec, templates=load_templates(templates_file))
    return spec


def open_clip_imagenet_templates() -> tuple[str, ...]:
    """open_clip's OPENAI_IMAGENET_TEMPLATES (the CLIP paper's 80 ImageNet prompts) as `{}` strings. open_clip keeps them
    as functions of the class name; each is called with `{}` itself. Imported here, not at module level: open_clip
    brings torch with it."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def read_json_or_lines(path: str | Path, what: str, json_openers: str = "[") -> object:
    """A file that is JSON (when it starts with one of `json_openers`) or a list with one entry per non-empty line (names
    and templates files); `what` names it in the one-line error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{what} {path}: cannot read ({err.strerror})") from None
    if text.lstrip()[:1] and text.lstrip()[0] in json_openers:
        try:
            return json.loads(text)
        except ValueError as err:
            raise InputError(f"{what} {path}: not valid JSON ({err})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Prompt templates from a JSON list of strings or one template per line, each with one `{}` for the class name."""
    templates = read_json_or_lines(path, "--templates")
    if not templates or not all(isinstance(t, str) for t in templates):
        raise InputError(f"--templates {path}: expected a JSON list of strings or one template per line")
    bad = next((t for t in templates if t.count("{}") != 1), None)
    if bad is not None:
        raise InputError(f"--templates {path}: template {bad!r} must hold exactly one {{}} for the class name")
    return tuple(templates)


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """The protocol's class order: `np.random.seed(seed); np.random.permutation(C)`.

    A private RandomState seeded the same way draws the same permutation as the legacy global one, without touching
    global state.
    """
    if not shuffle:
        return list(range(num_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """Classes per task: the first task has `init_cls`, each later one `increment` (B0 IncX: init_cls == increment)."""
    if init_cls > num_classes:
        raise InputError(f"init_cls={init_cls}: more than the {num_classes} classes of the data")
    rest = num_classes - init_cls
    if rest % increment:
        raise InputError(f"increment={increment}: does not divide the {rest} classes after the first task (init_cls={init_cls})")
    return [init_cls] + [increment] * (rest // increment)


def task_boundaries(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, end)] positions in the class order covered by each task."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def image_transform(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    interpolation: str = "bicubic", resize_mode: str = "squash", fill_color: int = 0):
    """Train and test alike: resize, crop to `image_size`, ToTensor, Normalize with `mean` and `std` (four steps, always).

    The defaults are the protocol's transform (PROOF / ENGINE code, PROTOCOL.md): Resize (bicubic) to a square,
    CenterCrop, CLIP's statistics. Another model's own preprocessing (`spacil.backbone.Preprocess`, from its open_clip
    preprocess config) changes them: `resize_mode` `squash` (resize to the square, the aspect ratio lost), `shortest`
    (shortest side to `image_size`, then the centre square) or `longest` (longest side to `image_size`, then padded with
    `fill_color`), as open_clip's `image_transform` reads these names."""
    from torchvision import transforms

    mode = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR,
            "nearest": transforms.InterpolationMode.NEAREST}.get(interpolation)
    if mode is None:
        raise InputError(f"interpolation {interpolation!r}: expected bicubic, bilinear or nearest")
    if resize_mode == "squash":
        steps = [transforms.Resize((image_size, image_size), interpolation=mode), transforms.CenterCrop(image_size)]
    elif resize_mode == "shortest":
        steps = [transforms.Resize(image_size, interpolation=mode), transforms.CenterCrop(image_size)]
    elif resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

        steps = [ResizeKeepRatio(image_size, interpolation=mode, longest=1),
                 CenterCropOrPad(image_size, fill=fill_color)]
    else:
        raise InputError(f"resize_mode {resize_mode!r}: expected squash, shortest or longest")
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))])
