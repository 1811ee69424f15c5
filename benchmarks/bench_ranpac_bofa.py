"""RanPAC and BOFA measured beside SimpleCIL and SPA, and RanPAC's two ridge searches side by side.

    python benchmarks/bench_ranpac_bofa.py solver        # -> docs/benchmarks/ranpac_solver.{md,json}
    python benchmarks/bench_ranpac_bofa.py demo          # -> docs/benchmarks/ranpac_bofa_demo.{md,json}
    python benchmarks/bench_ranpac_bofa.py cifar-shape   # -> docs/benchmarks/ranpac_bofa_cifar_shape.{md,json}

`solver`: the ridge search of one CIFAR-100-sized task (5,000 rows of z, 768 wide, 10 classes) at M = 500, 1,000 and
2,000: the official 17 solves against one eigendecomposition (same lambda, the held-out errors, seconds), projected to the
official M = 10,000 by the cube of M; then a 10-task RanPAC run with each search on the demo world (the demo's M):
the same lambda at every task, the same accuracy.
`demo`: the demo world (written to a temporary folder), SimpleCIL, RanPAC (the demo's M, and M = 0) and BOFA (official
schedule, and without its GDA score): accuracy and wall clock of each run; SPA's accuracy from the full demo's demo.json.
`cifar-shape`: a store of CIFAR-100's size with z (50,000 train and 10,000 test rows, z 768 wide, g 512 wide, fp16, no patch
tokens: about 150 MB), generated once with class structure in z that g only partly keeps; SimpleCIL, SPA without its patch
branch, calibration and descriptions (the SPA that runs on this store), RanPAC at M 1,000 and BOFA with the official schedule, B0
Inc10, accuracy and wall clock.
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
from numpy.lib.format import open_memmap

from _common import DOCS, add_device_argument, write_result
from spacil.config import build_config
from spacil.demo.run import DEMO_OVERRIDES, RANPAC_DEMO, _run_one
from spacil.demo.world import WorldSpec, make_world
from spacil.fileio import atomic_write_text
from spacil.methods.ranpac import choose_ridge, random_projection, ridge_candidates, ridge_solve
from spacil.runner import run_from_store
from spacil.store.format import write_text_features, write_visual_proj


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _task_seconds(folder: Path) -> list[float]:
    return [float(t) for t in re.findall(r"classes, ([0-9.]+)s\)", (folder / "log.txt").read_text())]


NOISE = 2.5  # per coordinate of z, against class centres 8 long: classes overlap


def make_z_store(path: Path, train: int = 50_000, test: int = 10_000, classes: int = 100, width: int = 768, dim: int = 512,
                 chunk: int = 5000) -> None:
    """A CIFAR-100-sized store with the pre-projection extension and no patch tokens. z = class centre (unit, scaled) +
    Gaussian noise; g = normalise(z @ proj). Half of each centre lies where proj maps to zero, so g sees only part of it."""
    if (path / "meta.json").exists():
        return
    rng = np.random.default_rng(0)
    proj = (rng.standard_normal((width, dim)) / np.sqrt(width)).astype(np.float32)
    basis = np.linalg.qr(proj)[0]  # [width, dim]: proj's column space
    seen = _unit(rng.standard_normal((classes, dim))) @ basis.T  # the part g sees
    hidden = rng.standard_normal((classes, width))
    hidden = _unit(hidden - (hidden @ basis) @ basis.T)  # the part g does not see
    centres = (seen + hidden) * 8.0
    for split, n in (("train", train), ("test", test)):
        (path / split).mkdir(parents=True, exist_ok=True)
        labels = np.repeat(np.arange(classes), n // classes)
        g = open_memmap(path / split / "global.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        z = open_memmap(path / split / "global_pre.npy", mode="w+", dtype=np.float16, shape=(n, width))
        order = rng.permutation(n)  # classes mixed in row order, as CIFAR-100's files are
        labels = labels[order]
        np.save(path / split / "labels.npy", labels)
        for start in range(0, n, chunk):
            y = labels[start:start + chunk]
            rows = centres[y] + rng.standard_normal((len(y), width), dtype=np.float32) * NOISE
            z[start:start + chunk] = rows
            g[start:start + chunk] = _unit(rows.astype(np.float16).astype(np.float32) @ proj)
        g.flush()
        z.flush()
        del g, z
    text = _unit(centres @ proj + rng.standard_normal((classes, dim)) * 2.0)
    templates = _unit(text[:, None] + rng.standard_normal((classes, 3, dim)) * 0.1).astype(np.float32)
    write_text_features(path, prompts=_unit(templates.mean(axis=1)), templates=templates)
    write_visual_proj(path, proj)
    meta = {"format": "spacil-features", "version": 1, "dim": dim, "num_patches": 0, "width": width,
            "classes": [f"class {i}" for i in range(classes)], "dataset": "cifar224-shaped-z",
            "backbone": {"logit_scale": 100.0}}
    atomic_write_text(path / "meta.json", json.dumps(meta))


def _run(store: Path, out: Path, method: str, device: str, tree: dict) -> tuple[dict, float, list[float]]:
    shutil.rmtree(out, ignore_errors=True)
    base = {"method": method, "device": device, "data": {"init_cls": 10, "increment": 10}}
    config = build_config({**base, **tree})
    start = time.perf_counter()
    summary = run_from_store(config, store, out)
    return summary, time.perf_counter() - start, _task_seconds(out)


def bench_solver(device: str) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    rng = np.random.default_rng(1)
    width, n, classes = 768, 5000, 10
    centres = rng.standard_normal((classes, width)) * 0.5
    labels = rng.integers(0, classes, n)
    z = torch.tensor(centres[labels] + rng.standard_normal((n, width)), dtype=torch.float32, device=dev)
    Y = torch.nn.functional.one_hot(torch.tensor(labels, device=dev), classes).double()
    fit = int(n * 0.8)
    ridges = ridge_candidates(-8, 8)
    rows, per_m = [], {}
    for M in (500, 1000, 2000):
        W_rand = random_projection(width, M, torch.Generator().manual_seed(M)).to(dev)
        H = torch.relu(z @ W_rand).double()
        G, Q = H[:fit].T @ H[:fit], H[:fit].T @ Y[:fit]
        result = {}
        for solver in ("solve", "eigh"):
            start = time.perf_counter()
            chosen, losses = choose_ridge(G, Q, H[fit:], Y[fit:], ridges, solver)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            result[solver] = {"seconds": time.perf_counter() - start, "ridge": chosen, "losses": losses}
        start = time.perf_counter()
        ridge_solve(G + H[fit:].T @ H[fit:], Q + H[fit:].T @ Y[fit:], result["eigh"]["ridge"])
        final = time.perf_counter() - start
        best = int(np.argmin(result["solve"]["losses"]))
        relative = abs(result["eigh"]["losses"][best] - result["solve"]["losses"][best]) / result["solve"]["losses"][best]
        per_m[M] = {**result, "final_solve_seconds": final, "same_ridge": result["solve"]["ridge"] == result["eigh"]["ridge"],
                    "relative_loss_difference_at_choice": relative}
        rows.append((f"M = {M:,}: 17 solves / one eigh (+ the final solve)",
                     f"{result['solve']['seconds']:.2f} s / {result['eigh']['seconds']:.2f} s (+ {final:.2f} s); lambda "
                     f"{result['solve']['ridge']:g} / {result['eigh']['ridge']:g}; held-out error differs by {relative:.1e}"))
    largest = per_m[2000]
    scale = (10_000 / 2000) ** 3
    projected = {solver: largest[solver]["seconds"] * scale for solver in ("solve", "eigh")}
    rows.append(("projected to M = 10,000 (x 5^3 from M = 2,000)",
                 f"17 solves {projected['solve'] / 60:.1f} min, one eigh {projected['eigh'] / 60:.1f} min per task "
                 f"(+ the final solve {largest['final_solve_seconds'] * scale:.0f} s); G, G_fit and the eigenvectors are "
                 f"800 MB each in float64"))
    # a whole run with each search, on the demo world: same choices, same accuracy
    root = Path(tempfile.mkdtemp(prefix="spacil_ranpac_solver_"))
    make_world(root / "world", WorldSpec())
    runs = {}
    for solver in ("solve", "eigh"):
        extra = {"ranpac": {**RANPAC_DEMO["ranpac"], "ridge_solver": solver}}
        start = time.perf_counter()
        folder = _run_one(solver, "ranpac", extra, root / "world", root / "runs", DEMO_OVERRIDES["train"]["epochs"], device)
        seconds = time.perf_counter() - start
        summary = json.loads((folder / "summary.json").read_text())
        ridges = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["learner"]["ridges"]
        runs[solver] = {"avg_acc": summary["avg_acc"], "last_acc": summary["last_acc"], "seconds": seconds, "ridges": ridges}
        rows.append((f"{len(ridges)}-task run, demo world, M = {RANPAC_DEMO['ranpac']['M']:,}, ridge_solver {solver}",
                     f"avg {summary['avg_acc']:.2f}, last {summary['last_acc']:.2f}; lambda per task {ridges}; {seconds:.1f} s"))
    shutil.rmtree(root, ignore_errors=True)
    write_result("ranpac_solver", "RanPAC's ridge search: one eigendecomposition against one solve per candidate", rows,
                 {"device": str(dev), "single_task": {str(m): v for m, v in per_m.items()}, "projected_10000_seconds": projected,
                  "runs": runs, "same_ridges": runs["solve"]["ridges"] == runs["eigh"]["ridges"],
                  "same_accuracy": runs["solve"]["avg_acc"] == runs["eigh"]["avg_acc"]
                  and runs["solve"]["last_acc"] == runs["eigh"]["last_acc"]},
                 notes="One task of CIFAR-100 B0 Inc10's size (5,000 rows, 4,000 fit, 1,000 held out), synthetic z. The "
                       "official code solves (G_fit + lambda I) W = Q_fit once per candidate lambda (17 of them), spacil's "
                       "default; ridge_solver eigh decomposes G_fit once and reads every candidate's W from it. Both grow as M^3; the "
                       "projection multiplies the M = 2,000 time by 5^3. Float64 throughout. Timed on this shared 2-core machine.")


def bench_demo(device: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="spacil_ranpac_bofa_demo_"))
    store = root / "world"
    make_world(store, WorldSpec())
    epochs = DEMO_OVERRIDES["train"]["epochs"]
    runs = [("simplecil", "simplecil", {}, "SimpleCIL"),
            ("ranpac", "ranpac", RANPAC_DEMO, f"RanPAC, M = {RANPAC_DEMO['ranpac']['M']:,} (the demo's row)"),
            ("ranpac_no_projection", "ranpac", {"ranpac": {"M": 0}}, "RanPAC, M = 0 (z decorrelated, no projection)"),
            ("bofa", "bofa", {}, "BOFA, official schedule (15 + 2 epochs, batch 128)"),
            ("bofa_no_gda", "bofa", {"bofa": {"stat": 0.0}}, "BOFA without its GDA score (stat 0)")]
    rows, data = [], {}
    for name, method, extra, title in runs:
        start = time.perf_counter()
        folder = _run_one(name, method, extra, store, root / "runs", epochs, device)
        seconds = time.perf_counter() - start
        s = json.loads((folder / "summary.json").read_text())
        rows.append((title, f"avg {s['avg_acc']:.2f}, last {s['last_acc']:.2f}, forgetting {s['forgetting']:.2f}; {seconds:.1f} s"))
        data[name] = {"avg_acc": s["avg_acc"], "last_acc": s["last_acc"], "forgetting": s["forgetting"], "seconds": seconds}
    # SPA on the same world (its arrays are unchanged by z): the full demo's figure, not rerun here
    published = json.loads((DOCS / "demo.json").read_text())
    data["spa_published"] = {"avg_acc": published["avg_acc"]["spa"], "simplecil_avg_acc": published["avg_acc"]["simplecil"]}
    rows.insert(1, (f"SPA, demo settings ({epochs} epochs, k = 8), from demo.json (bench_demo.py)",
                    f"avg {published['avg_acc']['spa']:.2f} (SimpleCIL there: {published['avg_acc']['simplecil']:.2f})"))
    write_result("ranpac_bofa_demo", "RanPAC and BOFA on the demo world, beside SimpleCIL and SPA", rows, {"runs": data},
                 notes="The demo world (`spacil demo`'s store: 60 classes, 10 tasks, z 96 wide), each run through the "
                       "runner as `spacil demo` runs it. Seconds include evaluation after every task.")
    shutil.rmtree(root, ignore_errors=True)


def bench_cifar_shape(store: Path, device: str) -> None:
    make_z_store(store)
    out = Path(tempfile.mkdtemp(prefix="spacil_ranpac_bofa_cifar_"))
    runs = [("simplecil", "simplecil", {}, "SimpleCIL"),
            ("spa_global_only", "spa", {"ablation": {"patch_branch": False, "gaussian_calibration": False,
                                                     "llm_descriptions": False}, "train": {"epochs": 1}},
             "SPA without patch branch, calibration and descriptions, 1 epoch per task"),
            ("ranpac", "ranpac", {"ranpac": {"M": 1000}}, "RanPAC, M = 1,000"),
            ("bofa", "bofa", {}, "BOFA, official schedule (15 + 2 epochs, batch 128)")]
    rows, data = [], {}
    for name, method, tree, title in runs:
        summary, seconds, tasks = _run(store, out / name, method, device, tree)
        rows.append((title, f"avg {summary['avg_acc']:.2f}, last {summary['last_acc']:.2f}; {seconds:.1f} s "
                            f"(slowest task {max(tasks):.1f} s)"))
        data[name] = {"avg_acc": summary["avg_acc"], "last_acc": summary["last_acc"], "seconds": seconds, "task_seconds": tasks}
    spa = json.loads((DOCS / "cifar_shape_spa.json").read_text())
    rows.append(("full SPA on the 12 GB CIFAR-shaped store with patch tokens (cifar_shape_spa.json, another synthetic store)",
                 f"{spa['run_seconds']:.1f} s"))
    write_result("ranpac_bofa_cifar_shape", "RanPAC and BOFA on a CIFAR-100-sized store with z, beside SimpleCIL and SPA", rows,
                 {"runs": data},
                 notes="50,000 train and 10,000 test rows, 100 classes, B0 Inc10, synthetic: z = a class centre half of "
                       "which visual.proj maps to zero, plus noise; g = normalise(z @ proj). The accuracies compare the "
                       "methods on this construction only (methods reading z see class structure g lacks). RanPAC runs at "
                       "M = 1,000 here (ranpac_solver.md projects the official M = 10,000).")
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["solver", "demo", "cifar-shape"])
    parser.add_argument("--store", default="/tmp/spacil_cifar_shape_z")
    add_device_argument(parser)
    args = parser.parse_args()
    if args.what == "solver":
        bench_solver(args.device)
    elif args.what == "demo":
        bench_demo(args.device)
    else:
        bench_cifar_shape(Path(args.store), args.device)


if __name__ == "__main__":
    main()
