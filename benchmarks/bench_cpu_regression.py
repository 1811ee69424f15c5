"""The CPU must not get slower with the device work: this code against an older copy of spacil, side by side, in one run.

    git archive 6573aa1 | tar -x -C /tmp/spacil_old        # the code before the device work
    python benchmarks/bench_cpu_regression.py --old-src /tmp/spacil_old/src --store /work/stores/cifar_shape

Three measures, each in a fresh process per version (PYTHONPATH picks the version), versions alternating old, new, new, old
so that machine noise hits both: the OT solver on SPA's shape (bench_ot.py's problem, 19,200 problems of 16 x 8), one SPA
training step (bench_spa_step.py's shape: batch 64 + 1,080 pseudo-samples, 300 classes, 196 patches, d 512), and the first
tasks of a 1-epoch SPA run on the CIFAR-100-shaped store of bench_cifar_shape.py (train, Gaussians, evaluation). The best of
each version's runs is compared, in CPU time (process time: a crowded machine stretches wall clock far more); wall clock is
reported beside it. Target: no figure more than 10% slower. On a crowded machine, smaller settings keep it short:
`--classes 100 --steps 1 --tasks 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"


def measure_ot(rounds: int) -> dict:
    import numpy as np
    import torch

    try:
        from spacil.ops.ot import sinkhorn_log
    except ModuleNotFoundError:  # an older checkout (before 0.3's layout by stage) measured as the baseline
        from spacil.ot import sinkhorn_log

    g = torch.Generator().manual_seed(0)
    problems, k, m = 64 * 300, 16, 8
    patches = torch.nn.functional.normalize(torch.randn(problems, k, 64, generator=g), dim=-1)
    tokens = torch.nn.functional.normalize(torch.randn(problems, m, 64, generator=g), dim=-1)
    cost = 1 - patches @ tokens.transpose(1, 2)
    log_a, log_b = torch.full((problems, k), -np.log(k)), torch.full((problems, m), -np.log(m))
    times, cpu_times = [], []
    for _ in range(rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        sinkhorn_log(cost, log_a, log_b, 0.1, 100)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times)}


def measure_step(steps: int, classes: int) -> dict:
    import torch
    import torch.nn.functional as F

    from spacil.config import build_config
    from spacil.learner import FeatureBatch, LearnerContext, TaskInfo, make_optimizer
    from spacil.methods.spa import SPA

    dim, patches, tokens, batch, old = 512, 196, 8, 64, classes - 30
    g = torch.Generator().manual_seed(0)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    config = build_config({"device": "cpu"})
    learner = SPA(config, LearnerContext(dim, patches, 100.0, torch.device("cpu")))
    learner.begin_task(TaskInfo(0, list(range(classes)), [str(i) for i in range(classes)], unit(torch.randn(classes, dim, generator=g)),
                                unit(torch.randn(classes, tokens, dim, generator=g)), torch.ones(classes, tokens, dtype=torch.bool), None))
    for bank in (learner.global_bank, learner.patch_bank):
        bank.positions = list(range(old))
        bank.means = unit(torch.randn(old, dim, generator=g))
        bank.factors = torch.eye(dim).expand(old, dim, dim) * 0.03
    optimizer, _ = make_optimizer(learner.image_projector.trainable() + learner.text_projector.trainable(), config.train, 100)
    column = torch.arange(classes)
    data = FeatureBatch(unit(torch.randn(batch, dim, generator=g)), unit(torch.randn(batch, patches, dim, generator=g)),
                        torch.randint(classes - 30, classes, (batch,), generator=g))

    def step():
        logits = learner._real_logits(data, g)
        global_, pseudo_patches, positions = learner._pseudo_batch(g)
        logits = torch.cat([logits, learner._pseudo_logits(global_, pseudo_patches)])
        loss = F.cross_entropy(logits, torch.cat([column[data.targets], column[positions]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times)}


def measure_run(store: str, tasks: int) -> dict:
    import re

    from spacil.config import build_config
    from spacil.runner import Run

    try:
        from spacil.store.format import FeatureStore
    except ModuleNotFoundError:  # an older checkout (before 0.3's layout by stage) measured as the baseline
        from spacil.features import FeatureStore

    config = build_config({"method": "spa", "device": "cpu", "train": {"epochs": 1}, "data": {"init_cls": 10, "increment": 10}})
    with tempfile.TemporaryDirectory() as out:
        run = Run(config, FeatureStore(store), Path(out) / "run")
        run.sizes, run.bounds = run.sizes[:tasks], run.bounds[:tasks]  # the first tasks only
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = run.run()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        task_seconds = [float(t) for t in re.findall(r"classes, ([0-9.]+)s\)", (Path(out) / "run" / "log.txt").read_text())]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "task_seconds": task_seconds, "curve": summary["curve"]}


def worker(args) -> None:
    if args.worker == "ot":
        result = measure_ot(args.rounds)
    elif args.worker == "step":
        result = measure_step(args.steps, args.classes)
    else:
        result = measure_run(args.store, args.tasks)
    import spacil

    result["spacil"] = str(Path(spacil.__file__).parent)
    print("RESULT " + json.dumps(result))


def run_worker(src: Path, measure: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", measure, "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--classes", str(args.classes), "--tasks", str(args.tasks), "--store", str(args.store)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    assert Path(result["spacil"]).resolve() == (src / "spacil").resolve(), result["spacil"]  # the version asked for ran
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old-src", help="the src/ folder of the older copy")
    parser.add_argument("--store", default="/work/stores/cifar_shape", help="bench_cifar_shape.py's store (made if missing)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks of the CIFAR-shaped run")
    parser.add_argument("--rounds", type=int, default=5, help="OT solves per process")
    parser.add_argument("--steps", type=int, default=3, help="SPA steps per process")
    parser.add_argument("--classes", type=int, default=300, help="seen classes of the SPA step (30 new, the rest old)")
    parser.add_argument("--measures", default="ot,step,run", help="which of ot, step, run to compare")
    parser.add_argument("--worker", choices=["ot", "step", "run"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.old_src:
        parser.error("--old-src is required")
    old_src = Path(args.old_src).resolve()
    sys.path.insert(0, str(HERE))
    from bench_cifar_shape import make_store

    make_store(Path(args.store))
    results = {"old": {}, "new": {}}
    for measure in args.measures.split(","):
        for version in ("old", "new", "new", "old"):
            src = old_src if version == "old" else NEW_SRC
            results[version].setdefault(measure, []).append(run_worker(src, measure, args))
            print(version, measure, results[version][measure][-1]["seconds"], results[version][measure][-1]["cpu_seconds"],
                  flush=True)
    # CPU time (both threads) is the verdict: other processes on a shared machine stretch wall clock far more than CPU time
    best = {v: {m: min(r["cpu_seconds"] for r in results[v][m]) for m in results[v]} for v in results}
    best_wall = {v: {m: min(r["seconds"] for r in results[v][m]) for m in results[v]} for v in results}
    ratios = {m: best["new"][m] / best["old"][m] for m in best["new"]}
    wall_ratios = {m: best_wall["new"][m] / best_wall["old"][m] for m in best_wall["new"]}
    labels = {"ot": "OT solver, 19,200 problems of 16 x 8, 100 iterations (median of %d)" % args.rounds,
              "step": f"one SPA step, batch 64 + {(args.classes - 30) * 4:,} pseudo-samples, {args.classes} classes "
                      f"(median of {args.steps})",
              "run": f"CIFAR-shaped SPA run, first {args.tasks} task{'s' if args.tasks > 1 else ''}, 1 epoch (train + "
                     "Gaussians + evaluation)"}
    labels = {m: label for m, label in labels.items() if m in best["new"]}
    rows = [(labels[m], f"CPU time old {best['old'][m]:.2f} s, new {best['new'][m]:.2f} s, new/old {ratios[m]:.3f} "
                        f"({'within' if ratios[m] <= 1.10 else 'MORE than'} 10%); wall clock old {best_wall['old'][m]:.2f} s, "
                        f"new {best_wall['new'][m]:.2f} s, new/old {wall_ratios[m]:.3f}") for m in labels]
    same_curve = None
    if "run" in best["new"]:
        same_curve = all(r["curve"] == results["old"]["run"][0]["curve"] for v in results for r in results[v]["run"])
        rows.append(("accuracy curve of the run, old vs new", "identical" if same_curve else "DIFFERENT"))
    from _common import write_result

    write_result("cpu_regression", "CPU speed before and after the device work, side by side", rows,
                 {"old_src": str(old_src), "best_cpu_seconds": best, "ratios": ratios, "best_wall_seconds": best_wall,
                  "wall_ratios": wall_ratios, "runs": results, "same_curve": same_curve},
                 notes="Each figure is the best of the processes of a version, run old, new, new, old (one process per "
                       "version and measure: a fresh interpreter, nothing cached). The verdict uses CPU time (process time, "
                       "all threads): the machine (2 CPU cores) was shared with several other jobs while this ran (load "
                       "average around 10), which stretches wall clock by factors of 2 to 20 at random, CPU time much less. "
                       "Differences of 10 to 20% are within this machine's noise.")


if __name__ == "__main__":
    main()
