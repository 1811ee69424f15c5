"""AREA's description sets in the store (*extension*, docs/interfaces.md): every sentence of each class of the clean,
occluded and augmented sets (AREA's `generated_descriptions`, `_occ`, `_aug`), and AREA's two prompts, encoded once
through the frozen text encoder.

    text/area_<set>.npy        float32 [C, M, d]  normalised text features, slots front first
    text/area_<set>_norms.npy  float32 [C, M]     their norms before normalisation (units * norms = encode_text's output)
    text/area_<set>_mask.npy   bool    [C, M]     which of the M slots are real
    meta.json "area_texts"     {"source": FILE, "sets": [...]}  written after the arrays: a store has them once it says so

<set> is one of AREA_SETS: `clean`, `occluded`, `augmented` (the sentences exactly as the official code encodes them: each
line of `<class>_descriptions.txt`, stripped, image file name and tab included), `name_prompt` ("a good photo of a {}.",
models/area.py `_get_class_name_features`) and `photo_prompt` ("a photo of a {}.", the clean score of `train`).
Indexed by data-set class index: a method reads the rows of the classes it has seen and nothing else. The array files are
listed by `area_text_files` (the store's other text arrays are checked the same way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from spacil.backbone import file_sha256
from spacil.errors import InputError
from spacil.fileio import atomic_save_npy, atomic_write_text, make_dirs, read_json

AREA_TEXTS_KEY = "area_texts"
DESCRIPTION_SETS = ("clean", "occluded", "augmented")
PROMPT_SETS = {"name_prompt": "a good photo of a {}.", "photo_prompt": "a photo of a {}."}
AREA_SETS = DESCRIPTION_SETS + tuple(PROMPT_SETS)
FILE_FORMAT = "spacil-area-descriptions"


def area_text_files(name: str) -> tuple[str, str, str]:
    """(features, norms, mask) of set `name`, relative to the store."""
    return f"text/area_{name}.npy", f"text/area_{name}_norms.npy", f"text/area_{name}_mask.npy"


def all_area_text_files() -> list[str]:
    return [rel for name in AREA_SETS for rel in area_text_files(name)]


def read_area_sets(path: str | Path, names: list[str]) -> dict[str, list[list[str]]]:
    """An AREA descriptions file (`spacil descriptions import --format area-sets`) -> {set: [sentences of class c for c in
    names]}, class names matched ignoring case, underscores and a leading `001.` index. A class without sentences in a set is an InputError (one
    line) naming the file, the set and the class."""
    from spacil.data import clean_class_name, normalise_name

    def key(name: str) -> str:  # a file imported with CUB's `001.` index kept still matches
        return normalise_name(clean_class_name(name))

    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("sets"), dict):
        raise InputError(f"{path}: not an AREA descriptions file (make one with `spacil descriptions import --format "
                         f"area-sets FOLDER`)")
    found = {}
    for name in DESCRIPTION_SETS:
        by_class = data["sets"].get(name)
        if not isinstance(by_class, dict):
            raise InputError(f"{path}: no '{name}' set")
        by_norm = {key(k): v for k, v in by_class.items()}
        rows = []
        for class_name in names:
            sentences = by_norm.get(key(class_name))
            if not isinstance(sentences, list) or not [s for s in sentences if isinstance(s, str) and s.strip()]:
                missing = sum(1 for n in names if not by_norm.get(key(n)))
                hint = (f"; `spacil describe --area-sets --out {path}` captions what the release lacks"
                        if data.get(MISSING_KEY) else "")
                raise InputError(f"{path}: the '{name}' set has no sentences for class '{class_name}' ({missing} of the "
                                 f"store's {len(names)} classes missing){hint}")
            rows.append([s.strip() for s in sentences if isinstance(s, str) and s.strip()])
        found[name] = rows
    return found


def _file_key(name: str) -> str:
    """A class name or file stem as the importer matches them: the class name spacil derives (data.clean_class_name: a
    leading `001.` index dropped, CamelCase split, underscores as spaces), then its letters and digits alone."""
    from spacil.data import clean_class_name

    return "".join(ch for ch in clean_class_name(name).lower() if ch.isalnum())


CLASS_LISTS = ("classnames.txt", "class_names.txt")  # the release's names of the class list (CUB's is class_names.txt)
MISSING_KEY = "missing_in_release"


def import_area_folders(folder: str | Path, dataset: Optional[str] = None, allow_missing: bool = False) -> dict:
    """AREA's released descriptions of one data set (`descriptions/<data set>/` of LAMDA-CL/ICML2026-AREA, with
    `generated_descriptions`, `generated_descriptions_occ` and `generated_descriptions_aug`, each one
    `<class>_descriptions.txt` per class of `generated_descriptions/classnames.txt` (CUB: `class_names.txt`)) -> an AREA
    descriptions file (dict).

    The class list is that file when present (the official code reads it), else the clean set's files; each entry becomes
    the class name spacil's data sets derive from a folder name (data.clean_class_name: CUB's `001.` index dropped,
    underscores as spaces). Every line is kept as the official code reads it (stripped; `<image file>\t` prefix
    included). Files are matched to class names by their letters and digits (the release writes some with spaces, some
    with underscores). A set without a class's file is an InputError (one line) naming the folder and the class, unless
    `allow_missing`: then the file holds what is there and records the missing classes per set under
    "missing_in_release" (what `spacil describe --area-sets --out FILE` fills). An empty file is an InputError."""
    from spacil.data import clean_class_name

    folder = Path(folder)
    folders = {"clean": "generated_descriptions", "occluded": "generated_descriptions_occ",
               "augmented": "generated_descriptions_aug"}
    for name, sub in folders.items():
        if not (folder / sub).is_dir():
            raise InputError(f"{folder / sub}: missing; expected AREA's descriptions folder of one data set (with "
                             f"{', '.join(folders.values())})")
    listing = next((folder / folders["clean"] / n for n in CLASS_LISTS if (folder / folders["clean"] / n).is_file()), None)
    if listing is not None:
        entries = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        entries = sorted(f.name[: -len("_descriptions.txt")] for f in (folder / folders["clean"]).glob("*_descriptions.txt"))
    if not entries:
        raise InputError(f"{folder / folders['clean']}: no {' or '.join(CLASS_LISTS)} and no *_descriptions.txt files")
    classes = [clean_class_name(entry) for entry in entries]
    sets: dict[str, dict[str, list[str]]] = {}
    absent: dict[str, list[str]] = {}
    for name, sub in folders.items():
        by_class = {}
        missing = []
        # the release names a class's file with underscores (the official code's rule) or, in some folders, spaces, and
        # classnames.txt and the files now and then split a word differently ("Hand Stand" / "Handstand"): matched by
        # letters and digits alone
        files = {_file_key(f.name[: -len("_descriptions.txt")]): f for f in (folder / sub).glob("*_descriptions.txt")}
        for entry, class_name in zip(entries, classes):
            file = files.get(_file_key(entry))
            if file is None:
                missing.append((entry, class_name))
                continue
            try:
                lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as err:
                raise InputError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not lines:
                raise InputError(f"{file}: empty; AREA draws a sentence of every class from it")
            by_class[class_name] = lines
        if missing and not allow_missing:
            entry, class_name = missing[0]
            raise InputError(f"{folder / sub}: no descriptions of class '{class_name}' "
                             f"({entry.replace(' ', '_').replace('/', '_')}_descriptions.txt; {len(missing)} of "
                             f"{len(classes)} classes missing; --allow-missing imports the rest)")
        if missing:
            absent[name] = [class_name for _, class_name in missing]
        sets[name] = by_class
    imported = {"format": FILE_FORMAT, "version": 1, "dataset": dataset, "source": str(folder), "sets": sets}
    if absent:
        imported[MISSING_KEY] = absent
    return imported


def prompt_sets(names: list[str]) -> dict[str, list[list[str]]]:
    """AREA's two prompts per class (models/area.py: `c.replace('_', ' ')` filled in)."""
    return {key: [[template.format(name.replace("_", " "))] for name in names] for key, template in PROMPT_SETS.items()}


def encode_sets(encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]], sets: dict[str, list[list[str]]], dim: int,
                batch: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Encode every sentence once. `encode(texts)` -> (normalised features [len, d], norms [len]).
    -> {set: (units [C, M, d], norms [C, M], mask [C, M])}, M the most sentences of any class in that set."""
    out = {}
    for name, rows in sets.items():
        width = max(len(r) for r in rows)
        units = np.zeros((len(rows), width, dim), dtype=np.float32)
        norms = np.zeros((len(rows), width), dtype=np.float32)
        mask = np.zeros((len(rows), width), dtype=bool)
        flat = [(c, m, text) for c, texts in enumerate(rows) for m, text in enumerate(texts)]
        for start in range(0, len(flat), batch):
            chunk = flat[start:start + batch]
            features, lengths = encode([text for *_, text in chunk])
            for (c, m, _), feature, length in zip(chunk, np.asarray(features, np.float32), np.asarray(lengths, np.float32)):
                units[c, m], norms[c, m], mask[c, m] = feature, length, True
        out[name] = (units, norms, mask)
    return out


def write_area_texts(store: str | Path, encoded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], source: str,
                     sha256: Optional[str] = None) -> None:
    """The arrays of every set, then meta.json's record (a store is read with them only once it names them): the source
    file and its sha256 (what `check_area_source` compares a later request with)."""
    store = Path(store)
    make_dirs(store / "text")
    for name, arrays in encoded.items():
        for rel, array in zip(area_text_files(name), arrays):
            atomic_save_npy(store / rel, array)
    meta = read_json(store / "meta.json")
    meta[AREA_TEXTS_KEY] = {"source": source, "sets": list(encoded), **({"sha256": sha256} if sha256 else {})}
    atomic_write_text(store / "meta.json", json.dumps(meta, indent=2))


def add_area_texts(out: str | Path, file: str | Path, model: str = "ViT-B-16", pretrained: Optional[str] = "laion400m_e32",
                   device: str = "auto", backbone=None) -> Path:
    """Encode AREA's description sets (`file`) and prompts into the finished store `out` through the text encoder the
    store was encoded with; nothing else is touched. A class of the store missing from a set fails before any encoding."""
    from spacil.store.encoder import finished_store_meta, numpy_text_encoder, store_encoder

    out, meta_path, meta = finished_store_meta(out, "AREA's descriptions")
    names = list(meta.get("classes") or [])
    sets = {**read_area_sets(file, names), **prompt_sets(names)}
    backbone = store_encoder(meta, meta_path, model, pretrained, device, backbone)
    write_area_texts(out, encode_sets(numpy_text_encoder(backbone), sets, backbone.dim), str(file), file_sha256(file))
    return out


def check_area_source(store: str | Path, meta: dict, file: str | Path) -> None:
    """A store whose AREA description sets were encoded from other sentences than `file`'s is refused in one line: nothing
    would be re-encoded, and the run would read the old sets. The file's sha256 recorded at encoding decides (another
    path with the same contents is the same sets; the same path edited since is not); a store without it (made before
    it was recorded) compares the paths."""
    record = meta.get(AREA_TEXTS_KEY)
    if not isinstance(record, dict):
        return
    source = record.get("source")
    same_path = source is not None and Path(source).resolve() == Path(file).resolve()
    if record.get("sha256") is not None:
        if not Path(file).is_file():
            raise InputError(f"{file}: missing (AREA's descriptions file; the store at {store} holds sets encoded from "
                             f"{source})")
        same = record["sha256"] == file_sha256(file)
    else:
        same = same_path
    if not same:
        why = "this file's earlier contents" if same_path else "another file"
        raise InputError(f"{Path(store) / 'meta.json'}: the store's AREA description sets were encoded from {why} "
                         f"({source}), not {file}; extract into another --out")


class AreaTexts:
    """A store's AREA description sets, memory-mapped: {set: (units [C, M, d], norms [C, M], mask [C, M])}."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.arrays = arrays

    def rows(self, name: str, class_ids) -> tuple[np.ndarray, np.ndarray]:
        """Set `name` of the classes `class_ids` (data-set indices), reading nothing else:
        (un-normalised features [n, M, d] float32, counts of real slots [n])."""
        units, norms, mask = self.arrays[name]
        ids = np.asarray(class_ids, dtype=np.int64)
        raw = np.asarray(units[ids], dtype=np.float32) * np.asarray(norms[ids], dtype=np.float32)[..., None]
        return raw, np.asarray(mask[ids]).sum(axis=1).astype(np.int64)


def open_area_texts(store_path: Path, meta: dict, classes: int, dim: int, array: Callable) -> Optional[AreaTexts]:
    """The description sets a finished store names in meta.json (checked), or None."""
    record = meta.get(AREA_TEXTS_KEY)
    if record is None:
        return None
    if not isinstance(record, dict) or sorted(record.get("sets") or []) != sorted(AREA_SETS):
        raise InputError(f"{store_path / 'meta.json'}: '{AREA_TEXTS_KEY}.sets' must name {', '.join(AREA_SETS)}")
    found = {}
    for name in AREA_SETS:
        units_rel, norms_rel, mask_rel = area_text_files(name)
        units = array(units_rel, (classes, None, dim))
        norms = array(norms_rel, (classes, units.shape[1]))
        mask = array(mask_rel, (classes, units.shape[1]))
        for got, rel, want in ((units, units_rel, np.float32), (norms, norms_rel, np.float32), (mask, mask_rel, np.bool_)):
            if got.dtype != want:
                raise InputError(f"{store_path / rel}: dtype {got.dtype}, expected {np.dtype(want).name}")
        if not np.asarray(mask).any(axis=1).all():
            raise InputError(f"{store_path / mask_rel}: a class has no sentence in AREA's '{name}' set")
        found[name] = (units, norms, mask)
    return AreaTexts(found)
