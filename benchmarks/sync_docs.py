"""Every figure the docs quote from a benchmark is copied from the file the benchmark wrote, never typed by hand.

Two kinds of marked blocks in README.md and docs/*.md:

    <!-- demo-table -->                     the Markdown table a full `spacil demo` wrote (its demo_table.md), as
    ...                                     published by benchmarks/bench_demo.py in docs/benchmarks/demo_table.md
    <!-- /demo-table -->

    <!-- fig FILE KEY FORMAT -->36<!-- /fig -->   the value at KEY (dotted) of docs/benchmarks/FILE, formatted with FORMAT
                                                 (a format spec such as .0f); KEY may end in |median, |min, |max, |*N or
                                                 |/N (applied left to right), e.g. ours_seconds|median|*1000

    python benchmarks/sync_docs.py            rewrite every block from its source
    python benchmarks/sync_docs.py --check    rewrite nothing; exit 1 and name each block that differs from its source

benchmarks/bench_demo.py (the one command after any change to the demo or to what it runs) runs the full demo, publishes
its table, figures and pictures, then calls this.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks"
DEMO_TABLE = RESULTS / "demo_table.md"

TABLE_BLOCK = re.compile(r"(<!-- demo-table -->\n)(.*?)(\n<!-- /demo-table -->)", re.S)
FIGURE_BLOCK = re.compile(r"(<!-- fig (\S+) (\S+) (\S+) -->)(.*?)(<!-- /fig -->)")


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def figure(file: str, key: str, spec: str, results: Path = RESULTS) -> str:
    path, *steps = key.split("|")
    value = json.loads((results / file).read_text())
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    for step in steps:
        if step in ("median", "min", "max"):
            value = {"median": statistics.median, "min": min, "max": max}[step](value)
        elif step[0] in "*/":
            factor = float(step[1:])
            value = value * factor if step[0] == "*" else value / factor
        else:
            raise ValueError(f"unknown step '{step}' in figure key '{key}'")
    return format(value, spec)


def synced(text: str, results: Path = RESULTS) -> str:
    """`text` with every marked block replaced by what its source says now."""
    table = (results / DEMO_TABLE.name).read_text().strip("\n")
    text = TABLE_BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text)
    return FIGURE_BLOCK.sub(lambda m: m.group(1) + figure(m.group(2), m.group(3), m.group(4), results) + m.group(6), text)


def stale_blocks(text: str, results: Path = RESULTS) -> list[str]:
    """The blocks of `text` that differ from their source, described one per line."""
    stale = []
    table = (results / DEMO_TABLE.name).read_text().strip("\n")
    for match in TABLE_BLOCK.finditer(text):
        if match.group(2) != table:
            stale.append(f"demo table differs from {DEMO_TABLE.relative_to(ROOT)}")
    for match in FIGURE_BLOCK.finditer(text):
        want = figure(match.group(2), match.group(3), match.group(4), results)
        if match.group(5) != want:
            stale.append(f"figure {match.group(2)} {match.group(3)}: '{match.group(5)}', the file says '{want}'")
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        if args.check:
            stale += [f"{path.relative_to(ROOT)}: {line}" for line in stale_blocks(text)]
        elif synced(text) != text:
            path.write_text(synced(text))
            print(f"updated {path.relative_to(ROOT)}")
    for line in stale:
        print(line, file=sys.stderr)
    if stale:
        print("run: python benchmarks/bench_demo.py (or python benchmarks/sync_docs.py after a benchmark wrote new results)",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
