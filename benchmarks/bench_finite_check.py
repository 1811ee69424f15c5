"""The cost of `spacil run`'s check for NaN and infinity in the rows it reads, on a store of CIFAR-100's shape.

    python benchmarks/bench_finite_check.py --train 2000 --test 500

The store has CIFAR-100's row shape (100 classes, 196 patches x 512, fp16: bench_cifar_shape.make_store) with fewer rows,
so that it stays small on a shared machine: the check's cost is per row read, the run's per row trained, so the ratio holds
at full size. One process runs the same runs with the check off and on, alternating (off, on, on, off, after a warm-up that
brings the store into the page cache), and compares the best CPU time of each: simplecil (reads only global rows: the check
is largest relative to the work there) and SPA for one epoch (reads global and patch rows). On a shared machine the two
variants' times differ by more than the check costs, so the runs with the check also time the check itself (the process
time spent in `first_nonfinite_row`): its share of the run's CPU time is the overhead. Target: under 2% of run time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import add_device_argument, write_result
from bench_cifar_shape import make_store
import spacil.runner as runner
from spacil.config import build_config
from spacil.runner import Run
from spacil.store.format import FeatureStore


class CheckTimer:
    """Wraps runner.first_nonfinite_row (what each _RowView calls) and adds up the process time spent in it."""

    def __init__(self):
        self.seconds = 0.0
        self.original = runner.first_nonfinite_row

    def __call__(self, data):
        start = time.process_time()
        try:
            return self.original(data)
        finally:
            self.seconds += time.process_time() - start


def timed_run(store: Path, method: str, tasks: int, device: str, check_finite: bool) -> tuple[float, float, list, float]:
    config = build_config({"method": method, "device": device, "train": {"epochs": 1},
                           "data": {"init_cls": 10, "increment": 10}})
    out = Path(tempfile.mkdtemp(prefix="spacil_finite_"))
    timer = CheckTimer()
    try:
        run = Run(config, FeatureStore(store), out / "run", check_finite=check_finite)
        run.sizes, run.bounds = run.sizes[:tasks], run.bounds[:tasks]  # the first tasks only
        runner.first_nonfinite_row = timer
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = run.run()
        return time.perf_counter() - start, time.process_time() - cpu_start, summary["curve"], timer.seconds
    finally:
        runner.first_nonfinite_row = timer.original
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default="/tmp/spacil_cifar_shape_small")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--methods", default="simplecil,spa")
    add_device_argument(parser)
    args = parser.parse_args()
    store = Path(args.store)
    make_store(store, train=args.train, test=args.test)
    rows, data = [], {"train_rows": args.train, "test_rows": args.test, "tasks": args.tasks, "runs": {}}
    for method in args.methods.split(","):
        timed_run(store, method, args.tasks, args.device, True)  # warm-up: page cache, lazy imports
        results = {False: [], True: []}
        for check in (False, True, True, False):
            wall, cpu, curve, checking = timed_run(store, method, args.tasks, args.device, check)
            results[check].append({"seconds": wall, "cpu_seconds": cpu, "curve": curve, "check_cpu_seconds": checking})
            print(method, "check" if check else "no check", f"{wall:.2f} s wall, {cpu:.2f} s CPU, {checking:.3f} s checking",
                  flush=True)
        best = {c: min(r["cpu_seconds"] for r in results[c]) for c in results}
        best_wall = {c: min(r["seconds"] for r in results[c]) for c in results}
        overhead = best[True] / best[False] - 1
        share = max(r["check_cpu_seconds"] / r["cpu_seconds"] for r in results[True])  # the worse of the two runs
        same = all(r["curve"] == results[False][0]["curve"] for c in results for r in results[c])
        rows.append((f"{method}, first {args.tasks} tasks, 1 epoch",
                     f"the check: {100 * share:.2f}% of the run's CPU time ({'within' if share < 0.02 else 'MORE than'} "
                     f"2%); CPU time without the check {best[False]:.2f} s, with it {best[True]:.2f} s "
                     f"({100 * overhead:+.1f}%, machine noise included); wall clock "
                     f"{best_wall[False]:.2f} s vs {best_wall[True]:.2f} s; curves {'identical' if same else 'DIFFERENT'}"))
        data["runs"][method] = {"best_cpu_seconds": {"off": best[False], "on": best[True]},
                                "best_wall_seconds": {"off": best_wall[False], "on": best_wall[True]},
                                "overhead": overhead, "check_share": share, "same_curve": same,
                                "all": {"off": results[False], "on": results[True]}}
    write_result("finite_check", "Cost of the NaN / infinity check of the rows a run reads (CIFAR-100 row shape)", rows,
                 data, notes="Best of two runs each, alternating off, on, on, off in one process after a warm-up run; the "
                             "check's share is the process time inside first_nonfinite_row over the run's, the larger "
                             "of the two runs with the check. "
                             "The verdict uses CPU time: the machine (2 cores) was shared with other jobs. Each row is "
                             "checked once per run, the first time it is read (later epochs only look the row up).")


if __name__ == "__main__":
    main()
