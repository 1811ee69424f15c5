"""PROOF against SimpleCIL and SPA on the demo world (the store `spacil demo` writes), side by side in one process: accuracy
and run time of each. PROOF runs with its section's defaults (the official code's) and, as a second row, with the
hyper-parameters of the packaged cifar224_b0 config (official exps/cifar.json); a third PROOF row keeps no exemplars.

    python benchmarks/bench_proof_methods.py

Writes docs/benchmarks/proof_methods_demo.{md,json}.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from _common import write_result
from spacil.config import build_config, load_config
from spacil.demo.run import DEMO_OVERRIDES
from spacil.demo.world import WorldSpec, make_world
from spacil.store.format import FeatureStore
from spacil.runner import Run

EPOCHS = DEMO_OVERRIDES["train"]["epochs"]
CIFAR_PROOF = load_config("cifar224_b0").proof.model_dump()
RUNS = (
    ("simplecil", {"method": "simplecil"}),
    ("spa", {"method": "spa"}),
    ("proof", {"method": "proof", "proof": {"tuned_epoch": EPOCHS}}),
    ("proof_cifar224_b0_hyper_parameters", {"method": "proof", "proof": {**CIFAR_PROOF, "tuned_epoch": EPOCHS}}),
    ("proof_no_exemplars", {"method": "proof", "proof": {"tuned_epoch": EPOCHS, "memory_per_class": 0}}),
)


def run_on_demo_world(runs, prefix: str) -> tuple[list, dict]:
    """Each (name, config tree) of `runs` on a fresh demo world, one after the other in this process: (table rows, data)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    store = work / "world"
    make_world(store, WorldSpec())
    rows, data = [], {}
    for name, extra in runs:
        tree = {**DEMO_OVERRIDES, "train": {"epochs": EPOCHS}, "data": {"features": str(store)}}
        for key, value in extra.items():
            tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
        config = build_config(tree, source=name)
        start = time.perf_counter()
        summary = Run(config, FeatureStore(store), work / "runs" / name).run()
        seconds = time.perf_counter() - start
        data[name] = {"label": summary["label"], "avg_acc": summary["avg_acc"], "last_acc": summary["last_acc"],
                      "forgetting": summary["forgetting"], "curve": summary["curve"], "seconds": seconds}
        rows.append((f"{name} ({summary['label']})", f"avg {summary['avg_acc']:.2f}, last {summary['last_acc']:.2f}, "
                     f"forgetting {summary['forgetting']:.2f}, {seconds:.1f} s"))
    shutil.rmtree(work, ignore_errors=True)
    return rows, data


def main() -> None:
    rows, data = run_on_demo_world(RUNS, "spacil_proof_bench_")
    spec = WorldSpec()
    write_result("proof_methods_demo", "PROOF, SimpleCIL and SPA on the demo world", rows,
                 {"runs": data, "world": {"classes": spec.num_classes, "train_per_class": spec.train_per_class,
                                          "test_per_class": spec.test_per_class, "dim": spec.dim}, "epochs": EPOCHS},
                 notes=f"The demo world ({spec.num_classes} classes in 6 tasks, {spec.train_per_class} training images per "
                       f"class, d={spec.dim}); every method trains {EPOCHS} epochs per task. PROOF keeps exemplars (20 per "
                       "class: half of each class's training rows here; the cifar224_b0 row shares 2000 among the seen "
                       "classes), the other methods keep none. The demo world separates sibling classes only by local parts, "
                       "which no global-feature method sees (docs/demo.md). Times are wall clock on a machine shared with "
                       "other jobs (2 cores): compare them as ratios within this table.")


if __name__ == "__main__":
    main()
