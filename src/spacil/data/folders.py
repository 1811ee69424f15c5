"""Reading a data set's tree as the field's code does: torchvision's ImageFolder walk, extension list and PIL decoding.

`<data-root>/<key>/{train,test}/<class>/...` (ImageNet-1k: `{train,val}`, `val/` read as the test split): the class
folders are torchvision's `find_classes` (sorted; hidden folders
such as `.ipynb_checkpoints` skipped), the images of a class every file under its folder, sub-folders included (SUN397's
`balcony/exterior/`), that `torchvision.datasets.folder.make_dataset` finds with `IMG_EXTENSIONS`, hidden files and files in
hidden folders skipped. An image decodes as `pil_loader` of PROOF / ENGINE does: `PIL.Image.open(path).convert("RGB")`
(no EXIF rotation; 16-bit values clipped as PIL clips them). CIFAR-100 comes from torchvision's own reader.

`index_dataset` lists the tree and derives the class names without opening an image (the cheap check that `spacil
extract` runs first); every fault found is a line of `DatasetIndex.faults`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from spacil.data.datasets import OPEN_CLIP_IMAGENET, DatasetSpec, dataset_spec
from spacil.data.names import (SOURCE_TORCHVISION, ClassNames, check_names, load_names_file, open_clip_imagenet_names,
                               resolve_names, shared_name_faults)
from spacil.errors import InputError

SPLITS = ("train", "test")


def pil_rgb(path) -> "object":
    """The field's image loader: open with PIL and convert to RGB (greyscale, palette, RGBA, CMYK, 16-bit alike)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass(frozen=True)
class SplitIndex:
    """The images of one split: file paths (or in-memory indices for CIFAR), data-set class indices, and each row's
    entry of `image_paths.json` (a POSIX path relative to the data-set folder, or `<split>/<index>` for CIFAR-100)."""

    items: tuple  # absolute paths (ImageFolder) or integer indices (CIFAR)
    labels: np.ndarray  # int64 [n]
    loader: Callable[[object], "object"]  # item -> PIL image
    paths: tuple[str, ...] = ()

    def counts(self, num_classes: int) -> np.ndarray:
        """Images per class, int64 [C]."""
        return np.bincount(self.labels, minlength=num_classes)


@dataclass
class DatasetIndex:
    """A data set as read from its tree: class folders, names and their source, the splits, and every fault found."""

    spec: DatasetSpec
    root: Path  # the data-set folder: <data-root>/<key> (for CIFAR-100 the folder holding cifar-100-python)
    folders: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    names_source: str = ""
    splits: dict[str, SplitIndex] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)

    def raise_first_fault(self) -> None:
        if self.faults:
            more = f" (and {len(self.faults) - 1} more faults: run `spacil data check`)" if len(self.faults) > 1 else ""
            raise InputError(self.faults[0] + more)


def _visible(path: str, top: str) -> bool:
    return not any(part.startswith(".") for part in Path(os.path.relpath(path, top)).parts)


def _class_folders(split_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(split_dir))
    except FileNotFoundError:
        return []
    return [c for c in classes if not c.startswith(".")]


def _split_samples(split_dir: Path, folders: list[str]) -> list[tuple[str, int]]:
    """(absolute path, class index) of every image, in torchvision's order: class by class, os.walk order, sorted names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

    top = str(split_dir)

    def is_image(path: str) -> bool:
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and _visible(path, top)

    return make_dataset(top, {c: i for i, c in enumerate(folders)}, is_valid_file=is_image, allow_empty=True)


def _no_class_folders(split_dir: Path, key: str) -> str:
    """The one line for a split folder without class folders; images lying directly in it (ImageNet-1k's official
    `val/` unpacks flat) are named as such, with where the sorting recipe is for ImageNet-1k."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    with os.scandir(split_dir) as entries:
        images = sum(1 for e in entries if not e.name.startswith(".") and e.is_file()
                     and has_file_allowed_extension(e.name, IMG_EXTENSIONS))
    if not images:
        return f"{split_dir}: no class folders"
    if key == "imagenet1k":
        return (f"{split_dir}: {images} images directly in {split_dir.name}/, none in WordNet-id class folders (the "
                f"official archive's flat layout); sort them into folders as docs/data.md shows (ImageNet-1k, "
                f"\"`val/` sorted, in one command\")")
    return (f"{split_dir}: {images} images directly in {split_dir.name}/, none in class folders (expected "
            f"{split_dir.name}/<class>/<image>)")


def _imagefolder(index: DatasetIndex) -> None:
    base = index.root
    split_folder = dict(zip(SPLITS, index.spec.split_folders))  # ImageNet-1k's test split is its `val/`
    if not base.is_dir():
        raise InputError(f"{base}: data set folder not found (expected <data-root>/{index.spec.root_name}/"
                         f"{split_folder['train']} and /{split_folder['test']})")
    folders = {}
    for split in SPLITS:
        split_dir = base / split_folder[split]
        if not split_dir.is_dir():
            raise InputError(f"{split_dir}: missing split folder")
        folders[split] = _class_folders(split_dir)
        if not folders[split]:
            raise InputError(_no_class_folders(split_dir, index.spec.key))
    if folders["train"] != folders["test"]:
        only_train = sorted(set(folders["train"]) - set(folders["test"]))
        only_test = sorted(set(folders["test"]) - set(folders["train"]))
        raise InputError(
            f"{base}: {split_folder['train']} and {split_folder['test']} class folders differ (only in "
            f"{split_folder['train']}: {only_train[:3]}, only in {split_folder['test']}: {only_test[:3]})"
        )
    index.folders = folders["train"]
    for split in SPLITS:
        samples = _split_samples(base / split_folder[split], index.folders)
        items = tuple(path for path, _ in samples)
        labels = np.asarray([label for _, label in samples], dtype=np.int64)
        paths = tuple(Path(os.path.relpath(path, base)).as_posix() for path in items)
        index.splits[split] = SplitIndex(items, labels, pil_rgb, paths)
        counts = index.splits[split].counts(len(index.folders))
        index.faults += [f"{base / split_folder[split] / index.folders[c]}: empty class folder (no image torchvision reads)"
                         for c in np.flatnonzero(counts == 0)]


def _cifar100(index: DatasetIndex, data_root: Path) -> None:
    candidates = [data_root, data_root / "cifar224", data_root / "cifar100"]
    found = next((c for c in candidates if (c / "cifar-100-python").is_dir()), None)
    if found is None:
        raise InputError(
            f"{data_root}: CIFAR-100 not found (expected {data_root}/cifar-100-python; fetch it once with "
            f"torchvision.datasets.CIFAR100('{data_root}', download=True) where there is network)"
        )
    index.root = found
    for split in SPLITS:
        dataset = cifar100_split(found, split)
        index.folders = list(dataset.classes)
        index.splits[split] = SplitIndex(tuple(range(len(dataset))), np.asarray(dataset.targets, dtype=np.int64),
                                         lambda i, d=dataset: d[i][0], tuple(f"{split}/{i}" for i in range(len(dataset))))


def cifar100_split(root: Path, split: str):
    """torchvision's CIFAR-100 reader on `root` (the folder holding cifar-100-python), InputError when broken."""
    from torchvision.datasets import CIFAR100

    try:
        return CIFAR100(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        raise InputError(f"{root / 'cifar-100-python'}: missing or corrupt CIFAR-100 files ({err})") from None


def index_dataset(key: str, data_root: str | Path, class_names: Optional[str | Path] = None,
                  names_file: Optional[str | Path] = None, templates: Optional[str | Path] = None) -> DatasetIndex:
    """List a data set's tree and derive its class names, opening no image. A tree that cannot be read at all is an
    InputError; what is wrong but readable (empty class folders, two classes with one name, a class count other than the
    protocol's) is a line of `faults`. `class_names`: names by folder index (`--class-names`); `names_file`: a list the
    names are only compared with (`--names-file`, warnings)."""
    spec = dataset_spec(key, templates)
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: no such folder")
    index = DatasetIndex(spec, (root / spec.root_name).absolute())
    if spec.source == "cifar100":
        _cifar100(index, root)
    else:
        _imagefolder(index)
    if spec.source == "cifar100" and class_names is None:
        derived = ClassNames(tuple(" ".join(c.replace("_", " ").split()) for c in index.folders), SOURCE_TORCHVISION)
    elif spec.metadata == OPEN_CLIP_IMAGENET and class_names is None:
        derived = open_clip_imagenet_names(index.folders)
    else:
        derived = resolve_names(index.folders, spec.key, class_names)
    index.names, index.names_source = list(derived.names), derived.source
    index.faults += shared_name_faults(index.names, index.folders)
    if spec.num_classes and len(index.folders) != spec.num_classes:
        index.faults.append(f"{index.root}: {len(index.folders)} class folders, the protocol's {spec.title} has "
                            f"{spec.num_classes}")
    if names_file is not None:
        check_names(index.names, load_names_file(names_file, spec.key), str(names_file))
    return index


def open_dataset(key: str, data_root: str | Path, names_file: Optional[str | Path] = None,
                 class_names: Optional[str | Path] = None, templates: Optional[str | Path] = None
                 ) -> tuple[list[str], dict[str, SplitIndex]]:
    """Index a data set: (class names in data-set index order, {"train": SplitIndex, "test": SplitIndex}); the first
    fault of `index_dataset` is an InputError."""
    index = index_dataset(key, data_root, class_names=class_names, names_file=names_file, templates=templates)
    index.raise_first_fault()
    return index.names, index.splits


def open_store_image(meta_or_store, split: str, row: int):
    """The image (PIL, RGB) of row `row` of a stored split, reopened from where it was at extraction time:
    `meta["image_root"]` joined with the row's entry of `<split>/image_paths.json` (CIFAR-100: `<split>/<index>` read through
    torchvision). `meta_or_store`: a FeatureStore (anything with `.meta` and `.image_paths(split)`) or a store folder."""
    import json

    if isinstance(meta_or_store, (str, os.PathLike)):
        folder = Path(meta_or_store)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            paths = json.loads((folder / split / "image_paths.json").read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{folder}: no image paths for split '{split}' ({err})") from None
    else:
        meta, paths = meta_or_store.meta, meta_or_store.image_paths(split)
    if not paths or "image_root" not in meta:
        raise InputError(f"store of {meta.get('dataset', '?')}: it records no image paths (extracted before spacil 0.3)")
    if not 0 <= row < len(paths):
        raise InputError(f"row {row}: outside the {len(paths)} rows of split '{split}'")
    root = Path(meta["image_root"])
    if meta.get("dataset") == "cifar224":
        entry_split, number = paths[row].split("/")
        return cifar100_split(root, entry_split)[int(number)][0].convert("RGB")
    path = root / paths[row]
    if not path.is_file():
        raise InputError(f"{path}: the image of {split} row {row} is no longer there")
    return pil_rgb(path)
