"""CPU threads, side by side: each kind of work at one thread, at one per core, and at spacil's choice
(`spacil.devices.choose_cpu_threads`), on the machine as it is ("quiet") and beside as many CPU-bound processes as it
has cores ("busy"). Wall clock and CPU seconds of a fresh process for each (median of --repeat), the load average before
and during, written to docs/benchmarks/threads.{md,json}. One command, a few minutes on 2 cores:

    python benchmarks/bench_threads.py

Work (what SPA and extraction do, at the shapes that matter):
- spa_demo: `spacil run --method spa` on the demo world (60 classes, 49 patches x 64 dims), --epochs epochs;
- spa_step_vit: SPA training steps at ViT-B/16 shapes (196 patches x 512 dims, 100 classes, batch 64), as
  bench_spa_step.py;
- encode_vit: an open_clip ViT-B/16 (random weights: none are downloaded) encoding 224 x 224 images, extraction's work;
- test_runner: `pytest tests/test_runner.py`, a sample of the test suite (spacil's choice there: tests/conftest.py's one
  thread).
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

from _common import write_result

HERE = Path(__file__).resolve().parent
WORKS = ("spa_demo", "spa_step_vit", "encode_vit", "test_runner")
# per-image elements (patch tokens x width) of each work, for spacil's choice
ELEMENTS = {"spa_demo": 49 * 64, "spa_step_vit": 196 * 512, "encode_vit": 197 * 768, "test_runner": 9 * 16}


# ----------------------------------------------------------------------------------------------------------------------
# The children: one work, one thread setting, in a fresh process


def _spa_demo(store: str, epochs: int) -> None:
    from spacil.config import build_config
    from spacil.runner import run_from_store

    config = build_config({"method": "spa", "device": "cpu", "data": {"features": store}, "train": {"epochs": epochs},
                           "spa": {"top_k_patches": 8}})
    with tempfile.TemporaryDirectory() as out:
        run_from_store(config, store, Path(out) / "run")  # the runner applies spacil's thread choice itself


def _spa_step_vit(steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from spacil.config import build_config
    from spacil.learner import FeatureBatch, LearnerContext, TaskInfo, make_optimizer
    from spacil.methods.spa import SPA

    classes, dim, patches, tokens, batch = 100, 512, 196, 8, 64
    g = torch.Generator().manual_seed(0)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    config = build_config({})
    learner = SPA(config, LearnerContext(dim, patches, 100.0, torch.device("cpu")))
    learner.begin_task(TaskInfo(0, list(range(classes)), [str(i) for i in range(classes)], unit(torch.randn(classes, dim, generator=g)),
                                unit(torch.randn(classes, tokens, dim, generator=g)), torch.ones(classes, tokens, dtype=torch.bool), None))
    optimizer, _ = make_optimizer(learner.image_projector.trainable() + learner.text_projector.trainable(), config.train, 100)
    data = FeatureBatch(unit(torch.randn(batch, dim, generator=g)), unit(torch.randn(batch, patches, dim, generator=g)),
                        torch.randint(0, classes, (batch,), generator=g))
    sampler = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = F.cross_entropy(learner._real_logits(data, sampler), data.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _encode_vit(batches: int) -> None:
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    images = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        for _ in range(batches):
            model.encode_image(images)


def child(args) -> None:
    """Run one work at args.threads ('auto': spacil's choice, the environment free of thread settings) and print
    {"wall", "cpu", "threads"} as one JSON line."""
    import torch

    from spacil.devices import choose_cpu_threads, cpu_threads

    start, cpu_start = time.perf_counter(), time.process_time()
    if args.child == "test_runner":  # the suite's own choice: tests/conftest.py, where no OMP_NUM_THREADS is set
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_runner.py"],
                       cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL)
        threads = 1 if args.threads == "auto" else int(args.threads)
    elif args.child == "spa_demo":
        _spa_demo(args.store, args.epochs)  # the run decides its threads itself, and gives torch's count back after
        threads = choose_cpu_threads(ELEMENTS[args.child]) if args.threads == "auto" else torch.get_num_threads()
    else:
        with cpu_threads(ELEMENTS[args.child]) as threads:
            {"spa_step_vit": lambda: _spa_step_vit(args.steps), "encode_vit": lambda: _encode_vit(args.batches)}[args.child]()
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pytest's process, for test_runner
    cpu = time.process_time() - cpu_start + children.ru_utime + children.ru_stime
    print(json.dumps({"wall": time.perf_counter() - start, "cpu": cpu, "threads": threads}))


# ----------------------------------------------------------------------------------------------------------------------
# The parent


def busy_loops(count: int, seconds: float) -> list[subprocess.Popen]:
    """`count` CPU-bound processes that each end by themselves after `seconds` (and are ended by us before that)."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def measure(work: str, threads: str, args, store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads != "auto":
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", work, "--threads", threads, "--store", store,
               "--epochs", str(args.epochs), "--steps", str(args.steps), "--batches", str(args.batches)]
    runs = []
    for _ in range(args.repeat):
        load_before = os.getloadavg()[0]
        try:
            out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE, timeout=args.cell_timeout)
        except subprocess.TimeoutExpired:  # stopped: the wall clock is at least the limit, the CPU time unknown
            runs.append({"wall": float(args.cell_timeout), "cpu": None, "threads": None, "stopped": True,
                         "load_before": load_before, "load_after": os.getloadavg()[0]})
            continue
        if out.returncode:
            raise SystemExit(f"{work} at {threads} threads failed:\n{out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(load_before=load_before, load_after=os.getloadavg()[0], stopped=False)
        runs.append(result)
    wall = statistics.median(r["wall"] for r in runs)
    finished = [r["cpu"] for r in runs if not r["stopped"]]
    return {"wall": wall, "cpu": statistics.median(finished) if finished else None, "threads": runs[0]["threads"],
            "stopped": any(r["stopped"] for r in runs), "load_before": max(r["load_before"] for r in runs),
            "load_after": max(r["load_after"] for r in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=WORKS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=5, help="spa_demo's epochs (the demo's own: 5)")
    parser.add_argument("--steps", type=int, default=3, help="spa_step_vit's steps")
    parser.add_argument("--batches", type=int, default=1, help="encode_vit's batches of 8 images")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each cell (the median is reported)")
    parser.add_argument("--works", default=",".join(WORKS), help="comma-separated subset of " + ", ".join(WORKS))
    parser.add_argument("--conditions", default="quiet,busy", help="quiet, busy, or both")
    parser.add_argument("--cell-timeout", type=int, default=240,
                        help="seconds after which a cell is stopped and reported as at least that long")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(HERE.parent / "src"))
    from spacil.demo.world import WorldSpec, make_world
    from spacil.devices import usable_cores

    cores = usable_cores()
    settings = ["1", str(cores), "auto"] if cores > 1 else ["1", "auto"]
    works = [w for w in args.works.split(",") if w]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "world")
        make_world(store, WorldSpec())
        for condition in args.conditions.split(","):
            # the loops end by themselves after the longest the cells can take, should this process die first
            limit = len(works) * len(settings) * args.repeat * args.cell_timeout + 60
            loops = busy_loops(cores, seconds=limit) if condition == "busy" else []
            try:
                time.sleep(1.0 if loops else 0.0)  # the loops are running before the first measure
                for work in works:
                    for threads in settings:
                        cell = measure(work, threads, args, store)
                        results.setdefault(condition, {}).setdefault(work, {})[threads] = cell
                        cpu = "stopped" if cell["cpu"] is None else f"{cell['cpu']:6.1f} s"
                        print(f"{condition:5s} {work:12s} threads={threads:4s} wall {cell['wall']:6.1f} s  cpu {cpu}  "
                              f"(chosen {cell['threads']}; load {cell['load_before']:.1f} -> {cell['load_after']:.1f})",
                              flush=True)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
    rows = []
    for condition, by_work in results.items():
        for work, cells in by_work.items():
            shown = []
            for threads, cell in cells.items():
                name = "spacil's choice" + (f" ({cell['threads']})" if cell["threads"] else "") if threads == "auto" else f"{threads} thread(s)"
                shown.append(f"{name}: > {cell['wall']:.0f} / ? (stopped)" if cell["stopped"] else
                             f"{name}: {cell['wall']:.1f} / {cell['cpu']:.1f}")
            load = max(c["load_before"] for c in cells.values())
            marker = f" (load {load:.1f}" + (f" > {cores} cores: a shared machine" if load > cores and condition == "quiet" else "") + ")"
            rows.append((f"{condition}{marker if condition == 'quiet' else ''}, {work}: wall / CPU s", "; ".join(shown)))
    notes = ("'quiet': the machine as it was (its load average says how quiet); 'busy': beside "
             f"{cores} CPU-bound processes started by the benchmark. Each cell is a fresh process; 'spacil's choice' runs with "
             "no OMP_NUM_THREADS/MKL_NUM_THREADS and lets spacil.devices.cpu_threads decide (one thread below "
             "LARGE_WORK_ELEMENTS per image, else every usable core).")
    write_result("threads", "CPU threads: one, one per core, spacil's choice; quiet and beside CPU-bound processes", rows,
                 {"cores": cores, "results": results, "args": {k: v for k, v in vars(args).items() if k not in ("child", "threads", "store")}},
                 notes=notes)


if __name__ == "__main__":
    main()
