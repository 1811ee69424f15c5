"""Time the whole `spacil demo` (a fresh output folder, wall clock, a separate process) and publish what it produced:
its table (the demo's own demo_table.md) to docs/benchmarks/demo_table.md and, through sync_docs.py, into the README
between the demo-table markers; its time and accuracies to docs/benchmarks/demo.{json,md}; its pictures to docs/images/.
Run it after any change to the demo or to what it runs (a new method in demo.RUNS). Targets: at most 5 minutes of wall
clock and 133 s of CPU time on 2 CPU cores. Both clocks and the load average before and during the run are recorded: a
figure taken while other jobs kept the cores busy (load above the core count) is marked so, and the README should quote a
quiet run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import sync_docs
from _common import add_device_argument, run_timed, write_result
from spacil.devices import THREAD_ENV

ROOT = Path(__file__).resolve().parents[1]
CPU_TARGET = 133  # seconds of CPU time: what spacil 0.3's demo took on a quiet 2-core machine (issue 26); not to grow
PICTURES = {"curves.png": "demo_curves.png", "matrix_spa.png": "demo_spa_matrix.png", "patch_selection.png": "demo_patch_selection.png",
            "image_path/explain/test_5.png": "demo_explain.png"}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="spacil_demo_")) / "demo"
    # the environment as a user's: no thread settings, so the demo runs with spacil's own choice (spacil.devices)
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    timed = run_timed([sys.executable, "-m", "spacil", "demo", "--out", str(out), "--device", args.device], env=env)
    if timed["returncode"]:
        raise SystemExit(f"spacil demo failed with exit status {timed['returncode']}")
    seconds, cpu_seconds, busy = timed["wall"], timed["cpu"], timed["busy"]
    if busy:
        print(f"bench_demo: measured on {timed['load_note']}; rerun on a quiet machine before publishing the README's "
              f"figure", file=sys.stderr)
    table = (out / "demo_table.md").read_text().strip("\n")  # written by `spacil demo` itself
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for source, target in PICTURES.items():
        shutil.copyfile(out / source, images / target)
    shutil.copyfile(out / "demo_table.md", sync_docs.DEMO_TABLE)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))}
    rows = [("wall clock, whole demo", f"{seconds:.0f} s (target <= 300 s: {'met' if seconds <= 300 else 'missed'})"
                                       + (" (busy machine: see below)" if busy else "")),
            ("CPU time (user + system), whole demo", f"{cpu_seconds:.0f} s (target <= {CPU_TARGET} s: "
                                                     f"{'met' if cpu_seconds <= CPU_TARGET else 'missed'})"),
            ("1-minute load average before the demo", f"{timed['load_before']:.1f} ({timed['cores']} cores)"),
            ("mean / highest 1-minute load average while it ran", f"{timed['mean_load']:.1f} / {timed['max_load']:.1f}"),
            ("measured on", timed["load_note"])]
    rows += [(name, f"avg {s['avg_acc']:.2f}, last {s['last_acc']:.2f}, forgetting {s['forgetting']:.2f}") for name, s in summaries.items()]
    write_result("demo", "`spacil demo`: time and results", rows, {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "load_before": timed["load_before"], "mean_load": timed["mean_load"],
        "max_load": timed["max_load"], "cores": timed["cores"], "busy": busy, "load_note": timed["load_note"],
        "avg_acc": {name: s["avg_acc"] for name, s in summaries.items()}}, notes=table)
    shutil.rmtree(out.parent, ignore_errors=True)
    sync_docs.main([])  # the README's table and every figure marked in the docs, from the files just written


if __name__ == "__main__":
    main()
