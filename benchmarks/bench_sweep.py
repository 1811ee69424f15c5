"""Time `spacil sweep` over 8 demo-world runs (4 methods x 2 seeds) with --jobs 1 and with --jobs 2, side by side, and check
the two give the same summaries. Target: --jobs 2 at least 1.6x faster than --jobs 1 on a 2-core machine.

Each measurement is the whole command in a fresh output folder (worker start-up included); the two settings alternate
`--repeats` times so that a change in the machine's load hits both."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result

from dataclasses import replace

from spacil.demo.run import DEMO_OVERRIDES
from spacil.demo.world import WorldSpec, make_world

METHODS = ["zeroshot", "simplecil", "finetune", "spa"]
SEEDS = [1993, 1994]
# the world and epochs of `spacil demo --quick`: 30 classes, 3 tasks, 1 epoch (the full demo's SPA run alone takes minutes
# on a loaded 2-core machine)
WORLD = replace(WorldSpec(), num_classes=30, train_per_class=16, test_per_class=8)
EPOCHS = 1


def sweep_yaml(store: Path) -> str:
    settings = {"data.init_cls": 10, "data.increment": 10, "spa.top_k_patches": DEMO_OVERRIDES["spa"]["top_k_patches"],
                "train.epochs": EPOCHS}
    return json.dumps({"features": [str(store)], "methods": METHODS, "seeds": SEEDS, "set": settings})  # JSON is YAML


def time_sweep(sweep: Path, out: Path, jobs: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spacil", "sweep", str(sweep), "--out", str(out), "--jobs", str(jobs), "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def summaries(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/summary.json"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spacil_sweep_bench_"))
    store = root / "world"
    make_world(store, WORLD)
    sweep = root / "sweep.yaml"
    sweep.write_text(sweep_yaml(store))
    seconds: dict[int, list[float]] = {1: [], 2: []}
    load = {1: [], 2: []}  # the 1-minute load average when each measurement ended: how much else ran on the machine
    results = {}
    for repeat in range(args.repeats):
        for jobs in (1, 2):
            out = root / f"out_jobs{jobs}_{repeat}"
            seconds[jobs].append(time_sweep(sweep, out, jobs))
            load[jobs].append(os.getloadavg()[0])
            results[jobs] = summaries(out)
            shutil.rmtree(out)
            print(f"repeat {repeat + 1}, --jobs {jobs}: {seconds[jobs][-1]:.1f} s", flush=True)
    same = results[1] == results[2] and len(results[1]) == len(METHODS) * len(SEEDS)
    one, two = statistics.median(seconds[1]), statistics.median(seconds[2])
    speedup = one / two
    met = "met" if speedup >= 1.6 else "missed"
    rows = [("runs", f"{len(METHODS) * len(SEEDS)} (quick demo world, {WORLD.num_classes} classes, {EPOCHS} epoch: "
                     f"{', '.join(METHODS)} x seeds {SEEDS})"),
            ("--jobs 1 (median)", f"{one:.1f} s  (each: {', '.join(f'{s:.1f}' for s in seconds[1])})"),
            ("--jobs 2 (median)", f"{two:.1f} s  (each: {', '.join(f'{s:.1f}' for s in seconds[2])})"),
            ("speed-up", f"{speedup:.2f}x (target >= 1.6x: {met})"),
            ("same summaries with --jobs 1 and --jobs 2", "yes" if same else "NO"),
            ("1-minute load average after each measurement", f"--jobs 1: {', '.join(f'{v:.1f}' for v in load[1])}; "
                                                              f"--jobs 2: {', '.join(f'{v:.1f}' for v in load[2])} (2 cores)")]
    busy = max(load[1] + load[2]) > 2.5  # above the two workers' own load: other processes shared the cores
    notes = (("Measured on this project's 2-core machine while other work shared it (load average up to "
              f"{max(load[1] + load[2]):.1f}), so the speed-up is what two workers got out of whatever CPU was left, not the "
              "machine's ceiling. " if busy else "Measured on this project's 2-core machine with nothing else running. ") +
             "Each worker is a "
             "fresh `python -m spacil run` process (about 2 s of start-up, mostly importing torch), with cores // N "
             "threads: 2 with --jobs 1, 1 each with --jobs 2.")
    write_result("sweep", "`spacil sweep`: 8 demo-world runs, --jobs 1 vs --jobs 2", rows,
                 {"seconds_jobs1": seconds[1], "seconds_jobs2": seconds[2], "speedup": speedup, "same_summaries": same,
                  "load_average_jobs1": load[1], "load_average_jobs2": load[2],
                  "runs": len(METHODS) * len(SEEDS)}, notes=notes)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
