"""The benchmark protocol of CLIP-based CIL (PROTOCOL.md): the nine data sets, class names, templates, class order, splits.

A data set is one entry of `DATASETS`. ImageFolder sets are read as `<root>/<key>/{train,test}/<class>/*` with the class index
given by sorted folder order; CIFAR-100 comes from torchvision. Class names are taken from the folders (or from torchvision),
never from a names list; a names file that disagrees only earns a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Optional, Sequence

import numpy as np

from spacil.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


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
    source: str = "imagefolder"  # or "cifar100" (torchvision)


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
        # generated at run time by spacil.demo.shapes for the demo and the tests; not a benchmark
        DatasetSpec("shapes", "generated shapes", 4, 2, 2, "a coloured geometric shape", ("a photo of a {}.", "a drawing of a {}.")),
    )
})


def dataset_spec(key: str) -> DatasetSpec:
    if key not in DATASETS:
        raise InputError(f"--dataset {key}: unknown data set (known: {', '.join(DATASETS)})")
    return DATASETS[key]


def clean_class_name(folder: str) -> str:
    """Folder name -> class name: drop a leading index such as '001.' and turn underscores into spaces."""
    name = re.sub(r"^\d+[._-]", "", folder)
    return " ".join(name.replace("_", " ").split())


def normalise_name(name: str) -> str:
    """A class name as names are compared: case, underscores and runs of spaces aside."""
    return " ".join(name.replace("_", " ").lower().split())


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


# ----------------------------------------------------------------------------------------------------------------------
# Reading images


@dataclass(frozen=True)
class SplitIndex:
    """The images of one split: file paths (or in-memory indices for CIFAR) and data-set class indices."""

    items: tuple  # paths (ImageFolder) or integer indices (CIFAR)
    labels: np.ndarray  # int64 [n]
    loader: Callable[[object], "object"]  # item -> PIL image


def _list_class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder(root: Path, key: str) -> tuple[list[str], dict[str, SplitIndex]]:
    base = root / key
    if not base.is_dir():
        raise InputError(f"{base}: data set folder not found (expected <data-root>/{key}/train and /test)")
    folders = {}
    for split in ("train", "test"):
        split_dir = base / split
        if not split_dir.is_dir():
            raise InputError(f"{split_dir}: missing split folder")
        folders[split] = _list_class_folders(split_dir)
        if not folders[split]:
            raise InputError(f"{split_dir}: no class folders")
    if folders["train"] != folders["test"]:
        only_train = sorted(set(folders["train"]) - set(folders["test"]))
        only_test = sorted(set(folders["test"]) - set(folders["train"]))
        raise InputError(
            f"{base}: train and test class folders differ (only in train: {only_train[:3]}, only in test: {only_test[:3]})"
        )
    from PIL import Image

    def load(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    splits = {}
    for split in ("train", "test"):
        items, labels = [], []
        for index, folder in enumerate(folders[split]):
            files = sorted(p for p in (base / split / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            items.extend(str(p) for p in files)
            labels.extend([index] * len(files))
        splits[split] = SplitIndex(tuple(items), np.asarray(labels, dtype=np.int64), load)
    return [clean_class_name(f) for f in folders["train"]], splits


def _cifar100(root: Path) -> tuple[list[str], dict[str, SplitIndex]]:
    from torchvision.datasets import CIFAR100

    candidates = [root, root / "cifar224", root / "cifar100"]
    found = next((c for c in candidates if (c / "cifar-100-python").is_dir()), None)
    if found is None:
        raise InputError(
            f"{root}: CIFAR-100 not found (expected {root}/cifar-100-python; fetch it once with "
            f"torchvision.datasets.CIFAR100('{root}', download=True) where there is network)"
        )
    splits = {}
    names = None
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = CIFAR100(str(found), train=train, download=False)
        except RuntimeError as err:
            raise InputError(f"{found / 'cifar-100-python'}: missing or corrupt CIFAR-100 files ({err})") from None
        names = [clean_class_name(c) for c in dataset.classes]
        splits[split] = SplitIndex(
            tuple(range(len(dataset))), np.asarray(dataset.targets, dtype=np.int64), lambda i, d=dataset: d[i][0]
        )
    return names, splits


def open_dataset(key: str, data_root: str | Path, names_file: Optional[str | Path] = None) -> tuple[list[str], dict[str, SplitIndex]]:
    """Index a data set: (class names in data-set index order, {"train": SplitIndex, "test": SplitIndex})."""
    spec = dataset_spec(key)
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: no such folder")
    names, splits = _cifar100(root) if spec.source == "cifar100" else _imagefolder(root, key)
    if names_file is not None:
        check_names(names, load_names_file(names_file, key), str(names_file))
    return names, splits


def load_names_file(path: str | Path, key: str) -> list[str]:
    """A JSON list of names, or a JSON object {dataset key: [names]} such as PROOF's labels.json."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read names file ({err})") from None
    if isinstance(data, dict):
        if key not in data:
            raise InputError(f"{path}: no names for data set '{key}'")
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
        raise InputError(f"{path}: expected a list of class names")
    return data


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def check_names(folder_names: Sequence[str], listed: Sequence[str], source: str) -> list[int]:
    """Warn where a names list disagrees with the folders; names always stay the folders'. Returns the mismatching indices."""
    if len(listed) != len(folder_names):
        warnings.warn(
            f"{source}: {len(listed)} names for {len(folder_names)} class folders; keeping the folder names", stacklevel=2
        )
    bad = [i for i, (a, b) in enumerate(zip(folder_names, listed)) if _normalise(a) != _normalise(b)]
    if bad:
        i = bad[0]
        warnings.warn(
            f"{source}: {len(bad)} names differ from the folders (first: index {i}, folder '{folder_names[i]}' vs "
            f"'{listed[i]}'); keeping the folder names",
            stacklevel=2,
        )
    return bad


def image_transform(image_size: int = 224):
    """Train and test alike: Resize (bicubic) to a square, CenterCrop, ToTensor, Normalize with CLIP's statistics."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
