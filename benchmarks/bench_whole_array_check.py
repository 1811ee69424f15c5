"""The cost of the NaN / infinity check of a store's text and model arrays that every `spacil run` makes before it
writes anything (issue 26, spacil.store.finite.check_whole_arrays), on a CIFAR-100-shaped store with everything ENGINE
reads (prompts, descriptions, templates and their norms, pairwise descriptions [100, 100, 5, 512] and their norms,
visual.proj: about 105 MB).

    python benchmarks/bench_whole_array_check.py

The store has few rows (the rows are checked as they are read, issue 16's bench_finite_check.py); the whole arrays do
not depend on them. Best of five checks after a first one that brings the files into the page cache, and that first one.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import write_result
from bench_cifar_shape import add_engine_arrays, make_store
from spacil.store.finite import check_whole_arrays, is_row_array
from spacil.store.format import SPLITS, FeatureStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="/tmp/spacil_cifar_shape_whole_arrays")
    args = parser.parse_args()
    store_path = Path(args.store)
    make_store(store_path, train=500, test=100)
    add_engine_arrays(store_path)
    load = os.getloadavg()
    store = FeatureStore(store_path)
    whole = {rel: array for rel, array in store.opened.items() if not is_row_array(rel, SPLITS)}
    size = sum(array.nbytes for array in whole.values())
    times = []
    for _ in range(6):
        start = time.perf_counter()
        check_whole_arrays(store.path, store.opened, SPLITS)
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    rows = [("arrays checked in full", ", ".join(sorted(whole))),
            ("their size", f"{size / 2**20:.0f} MiB"),
            ("the check, first (files read) / best of five after", f"{times[0]:.3f} s / {best:.3f} s "
                                                                  f"({size / 2**30 / best:.1f} GiB/s)"),
            ("load average (1, 5, 15 min) before", str(load))]
    write_result("whole_array_check", "Cost of the NaN / infinity check of a store's text and model arrays before a run",
                 rows, {"arrays": sorted(whole), "bytes": size, "seconds": times, "best_seconds": best,
                        "load_average": load},
                 notes="Timed on this project's shared 2-core machine (its load average above). float32 arrays are "
                       "tested on their exponent bits in chunks of 32 MB (spacil.store.finite).")


if __name__ == "__main__":
    main()
