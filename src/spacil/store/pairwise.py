"""Pairwise class descriptions in the store (*extension*, docs/interfaces.md): ENGINE's `des[a][b]`, how class a differs
from class b, encoded once through the frozen text encoder.

    text/pairwise.npy        float32 [C, C, M, d]  normalised e("<a> with <description of a against b, lower-cased>")
    text/pairwise_norms.npy  float32 [C, C, M]     the norms of those features before normalisation
    text/pairwise_mask.npy   bool    [C, C, M]     which of the M slots of (a, b) are real

Indexed by data-set class index on both axes (a, then b), so the descriptions of (a, b) are one slice: a method that has
seen classes S reads `[S][:, S]` and never a row or a column of a later class. The string encoded is the one the official
code builds (models/engine.py `_get_batch_des`, utils/inc_net.py `Engine.rerank`: `classname + ' with ' + d.lower()`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from spacil.errors import InputError
from spacil.store.encoder import finished_store_meta, numpy_text_encoder, store_encoder
from spacil.fileio import atomic_save_npy, make_dirs, read_json
from spacil.recorded_paths import relative_to

PAIRWISE_FILE = "text/pairwise.npy"
PAIRWISE_NORMS_FILE = "text/pairwise_norms.npy"
PAIRWISE_MASK_FILE = "text/pairwise_mask.npy"


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def read_pairwise(path: str | Path, names: list[str]) -> dict[tuple[int, int], list[str]]:
    """ENGINE's `chat/<data set>_des.json` (`{A: {B: [sentences]}}`) -> {(index of A, index of B): sentences}, class names
    matched to `names` ignoring case and underscores. A file that is not of that shape, or whose names match none of the
    data set's, is an InputError naming the file; names the data set lacks are skipped."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path}: expected ENGINE's pairwise format, a JSON object {{class A: {{class B: [sentences]}}}}")
    index = {_key(name): i for i, name in enumerate(names)}
    pairs: dict[tuple[int, int], list[str]] = {}
    for a_name, by_other in data.items():
        a = index.get(_key(a_name))
        if a is None:
            continue
        for b_name, sentences in by_other.items():
            b = index.get(_key(b_name))
            if b is None:
                continue
            if isinstance(sentences, str):
                sentences = [sentences]
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise InputError(f"{path}: entry [{a_name!r}][{b_name!r}] must be a list of strings")
            kept = [s.strip() for s in sentences if s.strip()]
            if kept:
                pairs[(a, b)] = kept
    if not pairs:
        raise InputError(f"{path}: none of its class names matches a class of the data set (e.g. '{names[0]}')")
    return pairs


def pairwise_strings(names: list[str], pairs: dict[tuple[int, int], list[str]]) -> dict[tuple[int, int], list[str]]:
    """The texts the official code encodes: '<class a> with <sentence, lower-cased>'."""
    return {(a, b): [f"{names[a]} with {s.lower()}" for s in sentences] for (a, b), sentences in pairs.items()}


def pairwise_features(encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]], names: list[str],
                      pairs: dict[tuple[int, int], list[str]], dim: int,
                      batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode every pair's strings once. `encode(texts)` -> (normalised features [len(texts), d], their norms before
    normalisation [len(texts)]).

    -> (unit features [C, C, M, d], norms [C, C, M], mask [C, C, M]), M the most sentences of any pair."""
    texts = pairwise_strings(names, pairs)
    classes = len(names)
    width = max(len(v) for v in texts.values())
    units = np.zeros((classes, classes, width, dim), dtype=np.float32)
    norms = np.zeros((classes, classes, width), dtype=np.float32)
    mask = np.zeros((classes, classes, width), dtype=bool)
    flat = [(a, b, m, text) for (a, b), strings in sorted(texts.items()) for m, text in enumerate(strings)]
    for start in range(0, len(flat), batch):
        chunk = flat[start:start + batch]
        features, lengths = encode([text for *_, text in chunk])
        for (a, b, m, _), feature, length in zip(chunk, np.asarray(features, np.float32), np.asarray(lengths, np.float32)):
            units[a, b, m] = feature
            norms[a, b, m] = length
            mask[a, b, m] = True
    return units, norms, mask


def write_pairwise(path: str | Path, units: np.ndarray, norms: np.ndarray, mask: np.ndarray) -> None:
    """The three arrays, mask last (a store is read with them only when all three are there)."""
    text = Path(path) / "text"
    make_dirs(text)
    atomic_save_npy(Path(path) / PAIRWISE_FILE, np.asarray(units, dtype=np.float32))
    atomic_save_npy(Path(path) / PAIRWISE_NORMS_FILE, np.asarray(norms, dtype=np.float32))
    atomic_save_npy(Path(path) / PAIRWISE_MASK_FILE, np.asarray(mask, dtype=bool))


def add_pairwise(out: str | Path, file: str | Path, model: str = "ViT-B-16", pretrained: Optional[str] = "laion400m_e32",
                 device: str = "auto", backbone=None) -> Path:
    """Encode the pairwise descriptions `file` (ENGINE's format) into the finished store `out`, through the frozen text
    encoder the store was encoded with, in its precision; the other arrays are not touched. meta.json's
    `text.pairwise_source` names the file (written after the arrays)."""
    from spacil.fileio import atomic_write_text

    out, meta_path, meta = finished_store_meta(out, "pairwise descriptions")
    names = list(meta.get("classes") or [])
    pairs = read_pairwise(file, names)  # a bad file fails before the model is built
    backbone = store_encoder(meta, meta_path, model, pretrained, device, backbone)
    write_pairwise(out, *pairwise_features(numpy_text_encoder(backbone), names, pairs, backbone.dim))
    text = dict(meta.get("text") or {})
    text["pairwise_source"] = relative_to(file, out)  # relative to the store (spacil.recorded_paths)
    meta["text"] = text
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return out


class PairwiseTexts:
    """The pairwise descriptions of a store, memory-mapped: units [C, C, M, d], norms [C, C, M], mask [C, C, M]."""

    def __init__(self, units: np.ndarray, norms: np.ndarray, mask: np.ndarray):
        self.units, self.norms, self.mask = units, norms, mask

    def block(self, class_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The descriptions among `class_ids` (data-set indices), in that order on both axes, reading nothing else:
        (un-normalised features [S, S, M, d], counts of real slots [S, S]). Slots are filled front first."""
        ids = np.asarray(class_ids, dtype=np.int64)
        units = np.stack([np.asarray(self.units[a][ids], dtype=np.float32) for a in ids])
        norms = np.stack([np.asarray(self.norms[a][ids], dtype=np.float32) for a in ids])
        mask = np.stack([np.asarray(self.mask[a][ids]) for a in ids])
        return units * norms[..., None], mask.sum(axis=-1).astype(np.int64)


def open_pairwise(store_path: Path, classes: int, dim: int, array: Callable) -> Optional[PairwiseTexts]:
    """The store's pairwise descriptions, or None when it has none. `array(rel, shape)` opens and checks one array."""
    if not (store_path / PAIRWISE_MASK_FILE).is_file():
        return None
    units = array(PAIRWISE_FILE, (classes, classes, None, dim))
    width = units.shape[2]
    norms = array(PAIRWISE_NORMS_FILE, (classes, classes, width))
    mask = array(PAIRWISE_MASK_FILE, (classes, classes, width))
    for got, rel, want in ((units, PAIRWISE_FILE, np.float32), (norms, PAIRWISE_NORMS_FILE, np.float32),
                           (mask, PAIRWISE_MASK_FILE, np.bool_)):
        if got.dtype != want:
            raise InputError(f"{store_path / rel}: dtype {got.dtype}, expected {np.dtype(want).name}")
    return PairwiseTexts(units, norms, mask)
