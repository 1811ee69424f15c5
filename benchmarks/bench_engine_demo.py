"""ENGINE against SimpleCIL and SPA on the demo world (the store `spacil demo` writes, with its generated pairwise
descriptions and views), side by side in one process: accuracy and run time of each. ENGINE runs as in `spacil demo`
(the demo's epochs), with the official 10 epochs, and with each prediction term alone (GDA only: stat 1; adapter only:
stat 0, rerank 0).

    python benchmarks/bench_engine_demo.py

Writes docs/benchmarks/engine_demo.{md,json}.
"""

from __future__ import annotations

from _common import write_result
from bench_proof_methods import EPOCHS, run_on_demo_world
from spacil.demo.world import WorldSpec

RUNS = (
    ("simplecil", {"method": "simplecil"}),
    ("spa", {"method": "spa"}),
    ("engine", {"method": "engine", "engine": {"engine_epochs": EPOCHS}}),
    ("engine_official_10_epochs", {"method": "engine"}),
    ("engine_gda_only", {"method": "engine", "engine": {"engine_epochs": EPOCHS, "stat_weight": 1.0}}),
    ("engine_adapter_only", {"method": "engine", "engine": {"engine_epochs": EPOCHS, "stat_weight": 0.0, "rerank": 0.0}}),
)


def main() -> None:
    rows, data = run_on_demo_world(RUNS, "spacil_engine_bench_")
    spec = WorldSpec()
    write_result("engine_demo", "ENGINE, SimpleCIL and SPA on the demo world", rows,
                 {"runs": data, "world": {"classes": spec.num_classes, "train_per_class": spec.train_per_class,
                                          "views": spec.views, "dim": spec.dim, "width": spec.width}, "epochs": EPOCHS},
                 notes=f"The demo world ({spec.num_classes} classes in 6 tasks, {spec.train_per_class} training images per "
                       f"class, d={spec.dim}, z {spec.width} wide, {spec.views} generated views per image); ENGINE's "
                       f"pairwise descriptions are the world's generated ones (des[a][b]: the parts a shows and b does not, "
                       f"docs/demo.md). Times are wall clock on a machine shared with other jobs (2 cores): compare them as "
                       f"ratios within this table.")


if __name__ == "__main__":
    main()
