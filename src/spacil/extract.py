"""`spacil extract`: encode a data set once with the frozen CLIP into a feature store (resumable).

Rows go in fixed batches into memory maps allocated at their final size; after each batch the maps are flushed and
`.progress.json` records how many rows are on disk. Kill it at any point and run it again: it continues from the last recorded
row, and because batches are the same and the forward pass is deterministic, the finished store is byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from spacil.backbone import FrozenCLIP
from spacil.data import DatasetSpec, SplitIndex, dataset_spec, image_transform, open_dataset
from spacil.errors import InputError
from spacil.features import FORMAT, PROGRESS_FILE, SPLITS, VERSION, atomic_save_npy, atomic_write_text, pad_token_sets, write_text_features

log = logging.getLogger(__name__)


class _ImageRows(torch.utils.data.Dataset):
    """Images of one split as tensors. A broken image yields its path as an error string, so that the main process can stop
    with one clear line whatever the number of loader workers."""

    def __init__(self, split: SplitIndex, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.items)

    def __getitem__(self, index: int):
        item = self.split.items[index]
        try:
            return self.transform(self.split.loader(item)), ""
        except Exception as err:  # noqa: BLE001 - any decoding failure is reported by path
            size = self.transform.transforms[1].size
            return torch.zeros(3, *size), f"{item}: unreadable image ({type(err).__name__}: {err})"


def class_prompt_features(backbone: FrozenCLIP, names: list[str], templates: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """-> (t_c [C, d]: normalised mean over templates, per-template tokens [C, K, d])."""
    texts = [template.format(name) for name in names for template in templates]
    tokens = backbone.encode_texts(texts).reshape(len(names), len(templates), -1)
    prompts = torch.nn.functional.normalize(tokens.mean(dim=1), dim=-1)
    return prompts.numpy().astype(np.float32), tokens.numpy().astype(np.float32)


def semantic_token_features(
    backbone: FrozenCLIP, names: list[str], descriptions: dict[str, list[str]], semantic_tokens: str = "sentence"
) -> tuple[np.ndarray, np.ndarray]:
    """Descriptions per class -> semantic tokens ([C, M, d], mask [C, M]) in class index order.

    `sentence`: one token e(description) per description; `word`: every word token of every description.
    """
    from spacil.descriptions import normalise_name

    by_name = {normalise_name(n): sentences for n, sentences in descriptions.items()}
    missing = [name for name in names if not by_name.get(normalise_name(name))]
    if len(missing) == len(names):
        raise InputError(f"descriptions: none of their class names matches a class of the data set (e.g. '{names[0]}')")
    if missing:
        warnings.warn(f"descriptions: {len(missing)} of {len(names)} classes have none (first: '{missing[0]}'); "
                      f"their patch score is 0", stacklevel=2)
    sets = []
    for name in names:
        sentences = by_name.get(normalise_name(name), [])
        if not sentences:
            sets.append(np.zeros((0, backbone.dim), dtype=np.float32))
        elif semantic_tokens == "word":
            sets.append(torch.cat(backbone.encode_text_tokens(sentences)).numpy())
        else:
            sets.append(backbone.encode_texts(sentences).numpy())
    return pad_token_sets(sets, backbone.dim)


def _fingerprint(spec: DatasetSpec, backbone: FrozenCLIP, counts: dict, dtype: str, batch_size: int) -> dict:
    return {"dataset": spec.key, "backbone": backbone.info.to_dict(), "counts": counts, "dtype": dtype, "batch_size": batch_size}


def extract_store(
    dataset: str,
    data_root: str | Path,
    out: str | Path,
    model: str = "ViT-B-16",
    pretrained: Optional[str] = "laion400m_e32",
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    names_file: Optional[str] = None,
    descriptions: Optional[dict[str, list[str]]] = None,
    descriptions_source: Optional[str] = None,
    semantic_tokens: str = "sentence",
    max_batches: Optional[int] = None,
    progress: bool = True,
    backbone: Optional[FrozenCLIP] = None,
) -> Path:
    """Encode `dataset` into a store at `out`. `max_batches` stops after that many batches (to test resuming); `backbone`
    reuses an already built model (it must be the one `model` and `pretrained` name)."""
    if dtype not in ("float16", "float32"):
        raise InputError(f"--dtype {dtype}: expected float16 or float32")
    spec = dataset_spec(dataset)
    names, splits = open_dataset(dataset, data_root, names_file)
    out = Path(out)
    backbone = backbone or FrozenCLIP(model, pretrained, device)
    counts = {split: len(splits[split].items) for split in SPLITS}
    fingerprint = _fingerprint(spec, backbone, counts, dtype, batch_size)
    progress_path = out / PROGRESS_FILE
    meta_path = out / "meta.json"

    if meta_path.exists() and not progress_path.exists():
        recorded = json.loads(meta_path.read_text()).get("backbone", {})
        if recorded != backbone.info.to_dict():
            raise InputError(f"{meta_path}: the store was encoded with another model ({recorded.get('model')}, "
                             f"{recorded.get('pretrained')}); its text features must come from the same one")
        log.info("%s: store complete; refreshing its text features only", out)
    else:
        state = {"fingerprint": fingerprint, "done": {split: 0 for split in SPLITS}}
        if progress_path.exists():
            previous = json.loads(progress_path.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise InputError(
                    f"{progress_path}: an unfinished extraction with other settings (data set, model, dtype or batch size); "
                    f"use another --out or delete {out}"
                )
            state = previous
        elif out.exists() and any(out.iterdir()):
            raise InputError(f"--out {out}: folder exists and is not an unfinished extraction; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        transform = image_transform(backbone.image_size)
        batches_left = max_batches
        for split in SPLITS:
            n = counts[split]
            mode = "r+" if (out / split / "global.npy").exists() else "w+"
            (out / split).mkdir(exist_ok=True)
            global_map = open_memmap(out / split / "global.npy", mode=mode, dtype=dtype, shape=(n, backbone.dim))
            patch_map = open_memmap(
                out / split / "patches.npy", mode=mode, dtype=dtype, shape=(n, backbone.num_patches, backbone.dim)
            )
            if mode == "w+":
                atomic_save_npy(out / split / "labels.npy", splits[split].labels)
                atomic_write_text(progress_path, json.dumps(state))
            start = int(state["done"][split])
            rows = torch.utils.data.Subset(_ImageRows(splits[split], transform), range(start, n))
            loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=workers)
            bar = tqdm(total=n, initial=start, desc=f"extract {dataset}/{split}", unit="img", disable=not progress)
            row = start
            for images, errors in loader:
                broken = next((e for e in errors if e), None)
                if broken:
                    raise InputError(broken)
                if batches_left is not None:
                    if batches_left == 0:
                        bar.close()
                        return out
                    batches_left -= 1
                g, patches = backbone.encode_images(images)
                end = row + len(images)
                global_map[row:end] = g.numpy().astype(dtype)
                patch_map[row:end] = patches.numpy().astype(dtype)
                global_map.flush()
                patch_map.flush()
                row = end
                state["done"][split] = row
                atomic_write_text(progress_path, json.dumps(state))
                bar.update(len(images))
            bar.close()
            del global_map, patch_map

    prompts, template_tokens = class_prompt_features(backbone, names, spec.templates)
    description_arrays = None
    if descriptions is not None:
        description_arrays = semantic_token_features(backbone, names, descriptions, semantic_tokens)
    write_text_features(out, prompts=prompts, templates=template_tokens, descriptions=description_arrays)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dim": backbone.dim,
        "num_patches": backbone.num_patches,
        "classes": names,
        "dataset": spec.key,
        "backbone": backbone.info.to_dict(),
        "text": {
            "templates": list(spec.templates),
            "semantic_tokens": semantic_tokens if descriptions is not None else None,
            "descriptions_source": descriptions_source,
        },
    }
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if descriptions is None:
            meta["text"] = old.get("text", meta["text"])
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    if progress_path.exists():
        progress_path.unlink()
    return out
