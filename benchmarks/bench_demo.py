"""Time the whole `spacil demo` (a fresh output folder, wall clock, a separate process) and publish what it produced:
its table into the README (between the demo-table markers) and docs/benchmarks/demo.md, its pictures into docs/images/.
Target: at most 5 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_device_argument, write_result

ROOT = Path(__file__).resolve().parents[1]
PICTURES = {"curves.png": "demo_curves.png", "matrix_spa.png": "demo_spa_matrix.png", "patch_selection.png": "demo_patch_selection.png"}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="spacil_demo_")) / "demo"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spacil", "demo", "--out", str(out), "--device", args.device], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = (out / "report.md").read_text()
    table = "\n".join(line for line in report.splitlines() if line.startswith("|"))
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for source, target in PICTURES.items():
        shutil.copyfile(out / source, images / target)
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = re.sub(r"(<!-- demo-table -->\n).*?(\n<!-- /demo-table -->)", lambda m: m.group(1) + table + m.group(2), text, flags=re.S)
    readme.write_text(text)
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))}
    rows = [("wall clock, whole demo", f"{seconds:.0f} s (target <= 300 s: {'met' if seconds <= 300 else 'missed'})")]
    rows += [(name, f"avg {s['avg_acc']:.2f}, last {s['last_acc']:.2f}, forgetting {s['forgetting']:.2f}") for name, s in summaries.items()]
    write_result("demo", "`spacil demo`: time and results", rows, {"seconds": seconds,
                 "avg_acc": {name: s["avg_acc"] for name, s in summaries.items()}}, notes=table)
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
