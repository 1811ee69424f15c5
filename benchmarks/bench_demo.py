"""Time the whole `spacil demo` (a fresh output folder, wall clock, a separate process) and publish what it produced:
its table (the demo's own demo_table.md) to docs/benchmarks/demo_table.md and, through sync_docs.py, into the README
between the demo-table markers; its time and accuracies to docs/benchmarks/demo.{json,md}; its pictures to docs/images/.
Run it after any change to the demo or to what it runs (a new method in demo.RUNS). Target: at most 5 minutes on 2 CPU
cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sync_docs
from _common import add_device_argument, write_result

ROOT = Path(__file__).resolve().parents[1]
PICTURES = {"curves.png": "demo_curves.png", "matrix_spa.png": "demo_spa_matrix.png", "patch_selection.png": "demo_patch_selection.png",
            "image_path/explain/test_5.png": "demo_explain.png"}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="spacil_demo_")) / "demo"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "spacil", "demo", "--out", str(out), "--device", args.device], stdout=subprocess.DEVNULL)
    load = []  # the machine's 1-minute load average while the demo ran: other jobs slow a shared machine down
    while process.poll() is None:
        load.append(os.getloadavg()[0])
        time.sleep(2)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"spacil demo failed with exit status {process.returncode}")
    mean_load = sum(load) / max(len(load), 1)
    table = (out / "demo_table.md").read_text().strip("\n")  # written by `spacil demo` itself
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for source, target in PICTURES.items():
        shutil.copyfile(out / source, images / target)
    shutil.copyfile(out / "demo_table.md", sync_docs.DEMO_TABLE)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))}
    rows = [("wall clock, whole demo", f"{seconds:.0f} s (target <= 300 s: {'met' if seconds <= 300 else 'missed'})"),
            ("mean 1-minute load average while it ran", f"{mean_load:.1f} ({os.cpu_count()} CPUs)")]
    rows += [(name, f"avg {s['avg_acc']:.2f}, last {s['last_acc']:.2f}, forgetting {s['forgetting']:.2f}") for name, s in summaries.items()]
    write_result("demo", "`spacil demo`: time and results", rows, {"seconds": seconds, "mean_load": mean_load,
                 "avg_acc": {name: s["avg_acc"] for name, s in summaries.items()}}, notes=table)
    shutil.rmtree(out.parent, ignore_errors=True)
    sync_docs.main([])  # the README's table and every figure marked in the docs, from the files just written


if __name__ == "__main__":
    main()
