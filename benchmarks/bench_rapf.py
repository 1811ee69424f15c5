"""RAPF measured side by side with the methods already in spacil, in one process each.

    python benchmarks/bench_rapf.py demo                                      # -> docs/benchmarks/rapf_demo.{md,json}
    python benchmarks/bench_rapf.py cifar-shape --store /work/stores/cifar_shape  # -> docs/benchmarks/rapf_cifar_shape.{md,json}

`demo`: the demo world (`spacil demo`'s store, written to a temporary folder), SimpleCIL and SPA with the demo's settings,
RAPF with its official schedule and with the demo's step-matched schedule (`demo.RAPF_DEMO_SCHEDULE`), plus RAPF without
its hard-pair hinge (threshold 0) and without its fusion (mix_bias 1), accuracy and wall clock of each run.
`cifar-shape`: a 10-task RAPF run with the packaged `cifar224_b0` config (the official CIFAR-100 hyper-parameters) on the
CIFAR-100-shaped store of bench_cifar_shape.py (generated there when missing, about 12 GB; RAPF reads only its global
features), SimpleCIL on the same store, and RAPF once more with a threshold that makes hard pairs on this store's random
text features, to time the edge-sample path at this size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import write_result
from spacil.config import load_config
from spacil.data import class_order, task_boundaries, task_sizes
from spacil.demo.run import DEMO_OVERRIDES, RAPF_DEMO_SCHEDULE, _run_one
from spacil.demo.world import WorldSpec, make_world
from spacil.store.format import FeatureStore
from spacil.methods.rapf import hard_class_pairs
from spacil.runner import run_from_store


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def _task_seconds(folder: Path) -> list[float]:
    return [float(t) for t in re.findall(r"classes, ([0-9.]+)s\)", (folder / "log.txt").read_text())]


def _hard_pairs_per_task(store: Path, config) -> list[int]:
    """How many (old, new) pairs fall under the threshold at each task, as the learner will find them."""
    features = FeatureStore(store)
    prompts = torch.from_numpy(np.array(features.prompts, dtype=np.float32))
    order = class_order(features.num_classes, config.seed, config.data.shuffle)
    ordered = prompts[torch.as_tensor(order)]
    counts = []
    for start, end in task_boundaries(task_sizes(features.num_classes, config.data.init_cls, config.data.increment)):
        counts.append(len(hard_class_pairs(ordered[:start], ordered[start:end], config.rapf.threshold)))
    return counts


def bench_demo() -> None:
    root = Path(tempfile.mkdtemp(prefix="spacil_rapf_demo_"))
    store = root / "world"
    make_world(store, WorldSpec())
    epochs = DEMO_OVERRIDES["train"]["epochs"]
    demo_rapf = RAPF_DEMO_SCHEDULE["rapf"]
    runs = [
        ("simplecil", "simplecil", {}, "SimpleCIL"),
        ("spa", "spa", {}, f"SPA, demo settings ({epochs} epochs, k = 8)"),
        ("rapf_official", "rapf", {}, "RAPF, official CIFAR-100 hyper-parameters (15 epochs: 60 steps per task here)"),
        ("rapf", "rapf", RAPF_DEMO_SCHEDULE,
         f"RAPF, demo schedule ({demo_rapf['adapter_epochs']} epochs, milestones {demo_rapf['milestones']}: 752 steps per task), the demo's row"),
        ("rapf_no_hinge", "rapf", {"rapf": {**demo_rapf, "threshold": 0.0}}, "RAPF, demo schedule, no hard pairs (threshold 0)"),
        ("rapf_no_fusion", "rapf", {"rapf": {**demo_rapf, "mix_bias": 1.0}}, "RAPF, demo schedule, no fusion (mix_bias 1)"),
    ]
    rows, data = [], {}
    for name, method, extra, title in runs:
        start = time.perf_counter()
        folder = _run_one(name, method, extra, store, root / "runs", epochs)
        seconds = time.perf_counter() - start
        s = _summary(folder)
        rows.append((title, f"avg {s['avg_acc']:.2f}, last {s['last_acc']:.2f}, forgetting {s['forgetting']:.2f}; {seconds:.1f} s"))
        data[name] = {"avg_acc": s["avg_acc"], "last_acc": s["last_acc"], "forgetting": s["forgetting"], "seconds": seconds,
                      "curve": s["curve"]}
    config = load_config("cifar224_b0", ["method=rapf", "data.init_cls=10", "data.increment=10"])
    pairs = _hard_pairs_per_task(store, config)
    rows.append(("hard pairs per task at threshold 0.55", ", ".join(map(str, pairs))))
    data["hard_pairs_per_task"] = pairs
    shutil.rmtree(root, ignore_errors=True)
    write_result("rapf_demo", "RAPF on the demo world, side by side with SimpleCIL and SPA", rows, data,
                 notes="One process, runs one after another, on a machine shared with other jobs (2 cores): times are "
                       "comparable within this table only. The demo world has 40 training images per class (CIFAR-100: "
                       "500), so RAPF's official 15 epochs give it 60 adapter steps per task instead of 750; the demo row "
                       "matches the step count.")


def bench_cifar_shape(store: Path, out: Path) -> None:
    from bench_cifar_shape import make_store

    start = time.perf_counter()
    make_store(store)
    made = time.perf_counter() - start
    runs = [("rapf", "rapf", []), ("simplecil", "simplecil", []), ("rapf_hard_pairs", "rapf", ["rapf.threshold=1.35"])]
    rows = [("store", "50,000 train + 10,000 test images x 512 (global features read), 100 classes, B0 Inc10 (10 tasks)"),
            ("config", "packaged cifar224_b0 (RAPF: official cifar100_10-10 values: 15 epochs, batch 100, lr 0.001, "
                       "milestones [4, 10], beta 2, threshold 0.55, mix_bias 0.6)")]
    data = {"store_generation_seconds": made}
    for name, method, extra in runs:
        config = load_config("cifar224_b0", [f"method={method}", *extra])
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        summary = run_from_store(config, store, folder)
        seconds = time.perf_counter() - start
        tasks = _task_seconds(folder)
        label = name if not extra else f"{name} ({' '.join(extra)})"
        rows.append((f"{label}: wall clock, 10 tasks", f"{seconds:.1f} s"))
        rows.append((f"{label}: per task", ", ".join(f"{t:.1f}s" for t in tasks)))
        entry = {"run_seconds": seconds, "task_seconds": tasks, "avg_acc": summary["avg_acc"]}
        if method == "rapf":
            entry["hard_pairs_per_task"] = _hard_pairs_per_task(store, config)
            rows.append((f"{label}: hard pairs per task", ", ".join(map(str, entry["hard_pairs_per_task"]))))
        data[name] = entry
    write_result("rapf_cifar_shape", "A 10-task RAPF run on a CIFAR-100-shaped store", rows, data,
                 notes="Feature values are synthetic (bench_cifar_shape.py), so accuracies mean nothing; the store's text "
                       "features are random directions, so the official threshold finds no hard pairs and the last run "
                       "raises it to time the edge samples. One process, on a machine shared with other jobs (2 cores).")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("demo")
    shape = sub.add_parser("cifar-shape")
    shape.add_argument("--store", default="/tmp/spacil_cifar_shape")
    shape.add_argument("--out", default="/tmp/spacil_rapf_cifar_shape_runs")
    args = parser.parse_args()
    if args.what == "demo":
        bench_demo()
    else:
        bench_cifar_shape(Path(args.store), Path(args.out))


if __name__ == "__main__":
    main()
