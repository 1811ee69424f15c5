"""Class names from class folders, as the protocol has them (docs/data.md, "Class names").

The folders of one data set are named by one convention, so the rule is chosen for the whole set, not folder by folder:
- every folder a WordNet id (`n01443537`: ImageNet-R's archive): the first lemma of timm's ImageNet synset table;
- every folder `<digits>.<name>` (CUB-200-2011's `001.Black_footed_Albatross`): the index is dropped. A number is never
  stripped otherwise: `707-320`, `A330-200` and `Bugatti_Veyron_16.4_Coupe_2009` are names;
- then `_` becomes a space, and a one-word CamelCase folder (UCF101's `ApplyEyeMakeup`) is split into words.
A names file (`--class-names`) replaces all of it: names by folder index.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from spacil.data.datasets import read_json_or_lines
from spacil.errors import InputError

log = logging.getLogger(__name__)

WORDNET_ID = re.compile(r"n\d{8}")
INDEX_PREFIX = re.compile(r"(\d+)\.(?=\D)")  # CUB's `001.`: digits, a dot, then not a digit (`16.4` is no index)
# a word boundary inside CamelCase: lower->Upper ("ApplyEye"), or the last capital of a run before a lower ("TVShow")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")

SOURCE_FOLDERS = "folders"
SOURCE_INDEXED_FOLDERS = "folders (leading index stripped)"
SOURCE_CAMEL_FOLDERS = "folders (CamelCase split)"
SOURCE_WORDNET = "wordnet (timm's ImageNet synset table)"
SOURCE_TORCHVISION = "torchvision (CIFAR-100 meta)"
SOURCE_OPEN_CLIP_IMAGENET = ("open_clip (IMAGENET_CLASSNAMES, by WordNet id; timm's WordNet description where two "
                             "classes share a name)")


@dataclass(frozen=True)
class ClassNames:
    """Names in class-index order and where they came from (`meta.json`'s `class_names_source`)."""

    names: tuple[str, ...]
    source: str


def normalise_name(name: str) -> str:
    """A class name as names are compared: case, underscores and runs of spaces aside."""
    return " ".join(name.replace("_", " ").lower().split())


def split_camel_case(word: str) -> str:
    """`ApplyEyeMakeup` -> `Apply Eye Makeup`, `HandStandPushups` -> `Hand Stand Pushups`; other text unchanged."""
    return _CAMEL_BOUNDARY.sub(" ", word)


def _is_camel_case(folder: str) -> bool:
    return " " not in folder and "_" not in folder and bool(re.search(r"[a-z][A-Z]", folder))


def clean_class_name(folder: str) -> str:
    """One folder name -> a class name by the rules above that need no other folder (descriptions files use it)."""
    match = INDEX_PREFIX.match(folder)
    name = folder[match.end():] if match else folder
    if _is_camel_case(name):
        name = split_camel_case(name)
    return " ".join(name.replace("_", " ").split())


def wordnet_lemmas(wnids: Sequence[str]) -> list[str]:
    """WordNet ids -> the first lemma of each in timm's ImageNet synset table (timm comes with open_clip)."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # pragma: no cover - timm is a dependency of open_clip
        raise InputError("WordNet-id class folders need timm (pip install timm), or --class-names FILE") from None
    info = ImageNetInfo()  # its lemma table (imagenet_synset_to_lemma.txt) covers the synsets of ImageNet-21k too
    names = []
    for wnid in wnids:
        try:
            description = info.label_name_to_description(wnid)
        except KeyError:
            description = None
        if not description:
            raise InputError(f"class folder {wnid}: a WordNet id timm's synset table does not know; pass --class-names FILE")
        names.append(description.split(",")[0].strip())
    return names


def open_clip_imagenet_names(wnids: Sequence[str]) -> ClassNames:
    """ImageNet-1k's WordNet-id folders -> open_clip's IMAGENET_CLASSNAMES, each folder by its own id: the name at the
    id's ImageNet-1k class index (the sorted order of the 1,000 ids, timm's `imagenet-1k` table), so a tree holding only
    some of the classes still gets each one its own name. An id outside ImageNet-1k is an InputError naming the folder.

    open_clip gives one name to two classes twice (`missile`: n03773504, n04008634; `sunglasses`: n04355933, n04356056),
    and names key descriptions, so they must be unique: every class whose open_clip name another of the 1,000 shares is
    named by timm's WordNet description of its synset instead (`missile` and `projectile, missile`; `sunglass` and
    `sunglasses, dark glasses, shades`). The rule looks at all 1,000 classes, so a name never depends on which other
    folders a tree holds; a warning names the renamed classes the tree holds."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    index_of = {wnid: i for i, wnid in enumerate(info.label_names())}
    unknown = next((wnid for wnid in wnids if wnid not in index_of), None)
    if unknown is not None:
        raise InputError(f"class folder {unknown}: not one of ImageNet-1k's 1000 WordNet ids (expected folders such as "
                         f"n01440764); pass --class-names FILE for other classes")
    shared = {key for key, count in Counter(map(normalise_name, IMAGENET_CLASSNAMES)).items() if count > 1}
    names, renamed = [], []
    for wnid in wnids:
        name = IMAGENET_CLASSNAMES[index_of[wnid]]
        if normalise_name(name) in shared:
            description = info.label_name_to_description(wnid)
            renamed.append(f"{wnid} '{description}'")
            name = description
        names.append(name)
    if renamed:
        log.warning("spacil: warning: imagenet1k: open_clip gives one name to two classes, so these are named by "
                    "timm's WordNet description instead: %s", ", ".join(renamed))
    return ClassNames(tuple(names), SOURCE_OPEN_CLIP_IMAGENET)


def derive_names(folders: Sequence[str], dataset: str = "") -> ClassNames:
    """Class folders (sorted, as torchvision orders them) -> their names and the rule that made them."""
    if folders and all(WORDNET_ID.fullmatch(f) for f in folders):
        log.warning("spacil: warning: %s: class names are WordNet lemmas from timm's synset table; some published class "
                    "lists word them differently: --class-names FILE supplies a list", dataset or "class folders")
        return ClassNames(tuple(wordnet_lemmas(folders)), SOURCE_WORDNET)
    source = SOURCE_FOLDERS
    if folders and all(INDEX_PREFIX.match(f) for f in folders):
        folders = [f[INDEX_PREFIX.match(f).end():] for f in folders]
        source = SOURCE_INDEXED_FOLDERS
    if any(_is_camel_case(f) for f in folders):
        source = SOURCE_CAMEL_FOLDERS if source == SOURCE_FOLDERS else f"{source}, CamelCase split"
    names = [" ".join((split_camel_case(f) if _is_camel_case(f) else f).replace("_", " ").split()) for f in folders]
    return ClassNames(tuple(names), source)


def load_names_file(path: str | Path, key: str) -> list[str]:
    """Class names from a JSON list, a JSON object {data set key: [names]} (the layout PROOF's and ENGINE's labels.json
    have), or a text file with one name per line."""
    data = read_json_or_lines(path, "names file", json_openers="[{")
    if isinstance(data, dict):
        if key not in data:
            raise InputError(f"{path}: no names for data set '{key}' (it has: {', '.join(map(str, data))})")
        data = data[key]
    if not isinstance(data, list) or not data or not all(isinstance(n, str) and n.strip() for n in data):
        raise InputError(f"{path}: expected a list of class names")
    return [" ".join(n.split()) for n in data]


def names_from_file(path: str | Path, key: str, folders: Sequence[str]) -> ClassNames:
    """`--class-names FILE`: names by folder index; a count other than the folders' is an InputError naming both."""
    names = load_names_file(path, key)
    if len(names) != len(folders):
        raise InputError(f"--class-names {path}: {len(names)} names for the {len(folders)} class folders of {key}")
    return ClassNames(tuple(names), f"class-names file {Path(path).resolve()}")


def shared_name_faults(names: Sequence[str], folders: Sequence[str]) -> list[str]:
    """One line per name that two classes share (compared as `normalise_name` does), naming both folders."""
    first: dict[str, int] = {}
    faults = []
    for index, name in enumerate(names):
        key = normalise_name(name)
        if key in first:
            faults.append(f"class folders '{folders[first[key]]}' and '{folders[index]}' both get the name '{name}'; "
                          f"pass --class-names FILE")
        else:
            first[key] = index
    return faults


def check_names(folder_names: Sequence[str], listed: Sequence[str], source: str) -> list[int]:
    """`--names-file`: warn where a names list disagrees with the derived names, which stay as they are. Returns the
    indices that differ."""
    import warnings

    if len(listed) != len(folder_names):
        warnings.warn(
            f"{source}: {len(listed)} names for {len(folder_names)} class folders; keeping the folder names", stacklevel=2
        )
    bad = [i for i, (a, b) in enumerate(zip(folder_names, listed)) if normalise_name(a) != normalise_name(b)]
    if bad:
        i = bad[0]
        warnings.warn(
            f"{source}: {len(bad)} names differ from the folders (first: index {i}, folder '{folder_names[i]}' vs "
            f"'{listed[i]}'); keeping the folder names",
            stacklevel=2,
        )
    return bad


def resolve_names(folders: Sequence[str], key: str, class_names: Optional[str | Path] = None) -> ClassNames:
    """The names of a data set's class folders: from `class_names` when given, else derived from the folders."""
    if class_names is not None:
        return names_from_file(class_names, key, folders)
    return derive_names(folders, key)
