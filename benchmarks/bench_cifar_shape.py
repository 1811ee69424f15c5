"""A full 10-task run from a store of CIFAR-100's shape (50,000 train and 10,000 test images x 196 patches x 512, fp16,
synthetic values), against the time to extract such a store with ViT-B-16 (from the extraction benchmark's measured rate).

    python benchmarks/bench_cifar_shape.py --method simplecil
    python benchmarks/bench_cifar_shape.py --method spa
    python benchmarks/bench_cifar_shape.py --method engine    (adds z, views and pairwise descriptions to the store once)
    python benchmarks/bench_cifar_shape.py --method area --set area_epochs=1
        (a store without patch tokens, which AREA does not read, at --store + "_global": z, occlusion and area-augment
        views of z, AREA's description sets with 50 sentences per class)

The store is generated once (about 12 GB; AREA's global-only one about 1 GB) and reused. Per-task times come from the
run's own log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from _common import DOCS, add_device_argument, write_result
from spacil.config import build_config
from spacil.store.format import FeatureStore, write_text_features
from spacil.runner import run_from_store


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(path: Path, train: int = 50_000, test: int = 10_000, classes: int = 100, patches: int = 196, dim: int = 512,
               tokens: int = 8, chunk: int = 1000) -> None:
    """The store (`patches` = 0: without patch tokens)."""
    if (path / "meta.json").exists():
        return
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(classes, dim))).astype(np.float32)
    for split, n in (("train", train), ("test", test)):
        (path / split).mkdir(parents=True, exist_ok=True)
        labels = np.repeat(np.arange(classes), n // classes)
        np.save(path / split / "labels.npy", labels)
        g = open_memmap(path / split / "global.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        p = open_memmap(path / split / "patches.npy", mode="w+", dtype=np.float16, shape=(n, patches, dim)) if patches else None
        for start in range(0, n, chunk):
            y = labels[start:start + chunk]
            g[start:start + chunk] = _unit(centres[y] + rng.standard_normal((len(y), dim), dtype=np.float32) * 0.05)
            if p is not None:
                noise = rng.standard_normal((len(y), patches, dim), dtype=np.float32) * 0.05
                p[start:start + chunk] = _unit(noise + 0.5 * centres[y][:, None])
        g.flush()
        if p is not None:
            p.flush()
        del g, p
    write_text_features(path, prompts=_unit(centres + rng.normal(size=centres.shape) * 0.02),
                        descriptions=(_unit(centres[:, None] + rng.normal(size=(classes, tokens, dim)) * 0.05).astype(np.float32),
                                      np.ones((classes, tokens), dtype=bool)))
    meta = {"format": "spacil-features", "version": 1, "dim": dim, "num_patches": patches,
            "classes": [f"class {i}" for i in range(classes)], "dataset": "cifar224-shaped", "backbone": {"logit_scale": 100.0}}
    (path / "meta.json").write_text(json.dumps(meta))


def add_area_arrays(path: Path, width: int = 768, views: int = 2, sentences: int = 50, chunk: int = 5000) -> None:
    """What AREA reads besides the rows (once, kept with the store): z and visual.proj (as add_engine_arrays), `views`
    occlusion and `views` area-augment views of z per training image (view sets), and AREA's description sets
    (`sentences` per class in each of the three, plus the two prompts)."""
    from spacil.store.area_texts import AREA_SETS, DESCRIPTION_SETS, encode_sets, write_area_texts
    from spacil.store.format import view_set_files

    meta = json.loads((path / "meta.json").read_text())
    if "area_texts" in meta:
        return
    rng = np.random.default_rng(2)
    dim, classes = meta["dim"], len(meta["classes"])
    if "width" not in meta:
        add_pre_projection(path, width, rng, chunk)
        meta = json.loads((path / "meta.json").read_text())
    z = np.load(path / "train" / "global_pre.npy", mmap_mode="r")
    sets = {}
    for transform, noise in (("occlusion", 0.3), ("area-augment", 0.1)):
        g_file, z_file = view_set_files(transform)
        v_g = open_memmap(path / g_file, mode="w+", dtype=np.float16, shape=(len(z), views, dim))
        v_z = open_memmap(path / z_file, mode="w+", dtype=np.float16, shape=(len(z), views, width))
        proj = np.load(path / "backbone" / "visual_proj.npy")
        for start in range(0, len(z), chunk):
            rows = np.asarray(z[start:start + chunk], dtype=np.float32)
            moved = rows[:, None] * (1 + noise * rng.standard_normal((len(rows), views, width), dtype=np.float32))
            v_z[start:start + chunk] = moved
            v_g[start:start + chunk] = _unit(moved @ proj)
        v_g.flush()
        v_z.flush()
        del v_g, v_z
        sets[transform] = {"count": views, "transform": transform, "params": {"synthetic": True}, "seed": 0,
                           "arrays": [g_file, z_file]}
    prompts = np.load(path / "text" / "prompts.npy")
    texts = {name: [[f"{name} {c} {m}" for m in range(sentences if name in DESCRIPTION_SETS else 1)]
                    for c in range(classes)] for name in AREA_SETS}
    lookup = {text: (c, m) for rows in texts.values() for c, row in enumerate(rows) for m, text in enumerate(row)}

    def encode(batch):  # synthetic text features near each class's prompt, norms like a CLIP text feature's
        units = _unit(np.stack([prompts[lookup[t][0]] for t in batch]) + rng.normal(size=(len(batch), dim)) * 0.1)
        return units.astype(np.float32), rng.uniform(6, 10, size=len(batch)).astype(np.float32)

    meta["view_sets"] = sets
    (path / "meta.json").write_text(json.dumps(meta))
    write_area_texts(path, encode_sets(encode, texts, dim), "synthetic")


def add_pre_projection(path: Path, width: int, rng, chunk: int, views: int = 0) -> None:
    """z (`global_pre.npy`, fp16) and visual.proj such that g = normalise(z @ proj) is close to the stored g, and (with
    `views`) that many noisy views of g per training image (`views_global.npy`); meta.json's width."""
    meta = json.loads((path / "meta.json").read_text())
    dim = meta["dim"]
    proj = (rng.standard_normal((width, dim), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
    lift = np.linalg.pinv(proj).astype(np.float32)  # [d, width]
    for split in ("train", "test"):
        g = np.load(path / split / "global.npy", mmap_mode="r")
        z = open_memmap(path / split / "global_pre.npy", mode="w+", dtype=np.float16, shape=(len(g), width))
        v = open_memmap(path / split / "views_global.npy", mode="w+", dtype=np.float16,
                        shape=(len(g), views, dim)) if split == "train" and views else None
        for start in range(0, len(g), chunk):
            rows = np.asarray(g[start:start + chunk], dtype=np.float32)
            z[start:start + chunk] = 10 * (rows @ lift) + rng.standard_normal((len(rows), width), dtype=np.float32) * 0.01
            if v is not None:
                noisy = rows[:, None] + rng.standard_normal((len(rows), views, dim), dtype=np.float32) * 0.03
                v[start:start + chunk] = _unit(noisy)
        z.flush()
        del z, v
    (path / "backbone").mkdir(exist_ok=True)
    np.save(path / "backbone" / "visual_proj.npy", proj)
    meta["width"] = width
    (path / "meta.json").write_text(json.dumps(meta))


def add_engine_arrays(path: Path, width: int = 768, views: int = 10, slots: int = 5, chunk: int = 5000) -> None:
    """What ENGINE reads besides the rows (once, kept with the store): z (`global_pre.npy`, fp16) and visual.proj such that
    g = normalise(z @ proj) is close to the stored g, per-template text features with their norms, pairwise descriptions
    [100, 100, 5, 512] and `views` stored views of every training image."""
    meta = json.loads((path / "meta.json").read_text())
    if "views" in meta:
        return
    rng = np.random.default_rng(1)
    dim, classes = meta["dim"], len(meta["classes"])
    add_pre_projection(path, width, rng, chunk, views)
    meta = json.loads((path / "meta.json").read_text())
    prompts = np.load(path / "text" / "prompts.npy")
    templates = _unit(prompts[:, None] + rng.normal(size=(classes, 3, dim)) * 0.02).astype(np.float32)
    np.save(path / "text" / "templates.npy", templates)
    np.save(path / "text" / "template_norms.npy", rng.uniform(6, 10, size=(classes, 3)).astype(np.float32))
    pairwise = _unit(prompts[:, None, None] + rng.standard_normal((classes, classes, slots, dim), dtype=np.float32) * 0.05)
    np.save(path / "text" / "pairwise.npy", pairwise.astype(np.float32))
    np.save(path / "text" / "pairwise_norms.npy", rng.uniform(6, 10, size=(classes, classes, slots)).astype(np.float32))
    np.save(path / "text" / "pairwise_mask.npy", np.ones((classes, classes, slots), dtype=bool))
    meta["width"] = width
    meta["views"] = {"count": views, "transform": "gaussian-noise", "params": {"noise": 0.25}, "seed": 0,
                     "arrays": ["train/views_global.npy"]}
    (path / "meta.json").write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="simplecil")
    parser.add_argument("--store", default="/tmp/spacil_cifar_shape")
    parser.add_argument("--out", default="/tmp/spacil_cifar_shape_runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    add_device_argument(parser)
    args = parser.parse_args()
    store = Path(args.store + ("_global" if args.method == "area" else ""))
    start = time.perf_counter()
    make_store(store, patches=0 if args.method == "area" else 196)
    if args.method == "engine":
        add_engine_arrays(store)
    if args.method == "area":
        add_area_arrays(store)
    made = time.perf_counter() - start
    FeatureStore(store)
    out = Path(args.out) / args.method
    shutil.rmtree(out, ignore_errors=True)
    config = build_config({"method": args.method, "device": args.device, "data": {"init_cls": 10, "increment": 10}}, args.overrides)
    load = os.getloadavg()
    start = time.perf_counter()
    summary = run_from_store(config, store, out)
    seconds = time.perf_counter() - start
    task_seconds = [float(t) for t in re.findall(r"classes, ([0-9.]+)s\)", (out / "log.txt").read_text())]
    rate = json.loads((DOCS / "extract_throughput.json").read_text())
    per_image = 1 / float(np.median(rate["extract_images_per_second"]))
    extract_seconds = 60_000 * per_image
    ratio = seconds / extract_seconds
    shape = ("x 512 (no patch tokens: AREA reads none; z 768 wide, 2 occlusion + 2 area-augment views of z per training "
             "image, 50 sentences per class in each description set)" if args.method == "area" else "x 196 patches x 512")
    rows = [("store", f"50,000 train + 10,000 test images {shape}, fp16, 100 classes, B0 Inc10 (10 tasks)"),
            ("load average when the run started", " ".join(f"{x:.2f}" for x in load)),
            (f"{args.method} run, 10 tasks, wall clock", f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"),
            ("per task (from the run's log)", ", ".join(f"{t:.1f}s" for t in task_seconds)),
            ("extracting this store with ViT-B-16 at the measured rate", f"{extract_seconds / 3600:.1f} h ({1 / per_image:.2f} images/s)"),
            ("run / extraction", f"{ratio:.2e}" + (" (target < 1: met)" if args.method == "spa" and ratio < 1 else
                                                   " (target < 1: missed)" if args.method == "spa" else ""))]
    if args.overrides:
        rows.insert(1, ("overrides", " ".join(args.overrides)))
    suffix = "".join("_" + re.sub(r"[^a-z0-9]+", "", item.lower()) for item in args.overrides)
    write_result(f"cifar_shape_{args.method}{suffix}", f"A 10-task {args.method} run on a CIFAR-100-shaped store", rows,
                 {"run_seconds": seconds, "task_seconds": task_seconds, "extract_seconds_estimate": extract_seconds,
                  "ratio": ratio, "store_generation_seconds": made, "avg_acc": summary["avg_acc"]},
                 notes="The extraction time is 60,000 images at the rate measured by bench_extract.py (docs/benchmarks/"
                       "extract_throughput.md) on this machine, not a 4-hour extraction run here. Feature values are "
                       "synthetic, so the accuracy means nothing.")


if __name__ == "__main__":
    main()
