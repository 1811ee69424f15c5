"""AREA against SimpleCIL and SPA on the demo world (the store `spacil demo` writes, with its generated occlusion and
area-augment views and description sets), side by side in one process: accuracy and run time of each. AREA runs as in
`spacil demo` (the demo's epochs, the official non-CIFAR values), with the official 20 epochs, and without its regulariser
(vib_lambda 0).

    python benchmarks/bench_area_demo.py

Writes docs/benchmarks/area_demo.{md,json}.
"""

from __future__ import annotations

import resource

from _common import write_result
from bench_proof_methods import EPOCHS, run_on_demo_world
from spacil.demo.run import AREA_DEMO
from spacil.demo.world import WorldSpec

AREA = AREA_DEMO["area"]
RUNS = (
    ("simplecil", {"method": "simplecil"}),
    ("spa", {"method": "spa"}),
    ("area", {"method": "area", "area": {**AREA, "area_epochs": EPOCHS}}),
    ("area_official_20_epochs", {"method": "area", "area": {**AREA, "area_epochs": 20}}),
    ("area_no_regulariser", {"method": "area", "area": {**AREA, "area_epochs": EPOCHS, "vib_lambda": 0.0}}),
)


def main() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)
    rows, data = run_on_demo_world(RUNS, "spacil_area_bench_")
    after = resource.getrusage(resource.RUSAGE_SELF)
    spec = WorldSpec()
    write_result("area_demo", "AREA, SimpleCIL and SPA on the demo world", rows,
                 {"runs": data, "world": {"classes": spec.num_classes, "train_per_class": spec.train_per_class,
                                          "area_views": spec.area_views, "area_sentences": spec.area_sentences,
                                          "dim": spec.dim, "width": spec.width}, "epochs": EPOCHS,
                  "process_cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)},
                 notes=f"The demo world ({spec.num_classes} classes in 6 tasks, {spec.train_per_class} training images per "
                       f"class, d={spec.dim}, z {spec.width} wide, {spec.area_views} generated occlusion and "
                       f"{spec.area_views} area-augment views per image, {spec.area_sentences} generated sentences per class "
                       f"in each description set; docs/demo.md). Times are wall clock on a machine shared with other jobs "
                       f"(2 cores): compare them as ratios within this table.")


if __name__ == "__main__":
    main()
