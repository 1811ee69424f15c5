"""spacil on a GPU, in one script (under 8 minutes on one H200): writes docs/benchmarks/gpu.{md,json}.

    python benchmarks/bench_gpu.py                          # on the GPU machine (needs open_clip, pydantic and POT there)
    python benchmarks/bench_gpu.py --device cpu --quick     # the same script at small sizes: a smoke test, written
                                                            # to docs/benchmarks/gpu_cpu_smoke.{md,json}, never as GPU numbers

(a) OT: spacil's `sinkhorn_log` against POT's batched log-domain solver, on the device, at SPA's sizes (19,200 and 343,200
    problems of 16 x 8, 100 iterations). Target: >= 3x POT.
(b) Extraction: images/s of the image loader alone (decode + resize of generated 224 px PNGs), of a bare open_clip ViT-B-16
    forward (random weights, fp32 and bf16 autocast), and of `spacil extract` (loader + forward + writes). Target: extraction
    >= 0.8x min(loader, bare bf16 forward).
(c) The CIFAR-100-shaped store of bench_cifar_shape.py (50,000 + 10,000 images x 196 x 512, fp16; generated once): SimpleCIL,
    SPA with 1 and with 10 epochs per task: wall clock, per task, peak device memory. Targets: SPA 1 epoch <= 15 s,
    10 epochs <= 60 s.
(d) The demo world: SPA on the CPU and on the device; average accuracies equal within 0.5.
(e) One ImageNet-1k task (the last of B0 Inc100: 1,000 seen classes, 100 x 1,300 training images, 10 epochs, then 50,000
    test images) with SPA's class shortlist and pseudo budget: training steps and evaluation timed at ViT-B/16 shapes on
    the device (bench_scale.py's helpers), the task's time extrapolated from them, and the peak device memory.
Results are written after every part, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _common
from _common import add_device_argument, device_description, synchronize
from spacil.devices import autocast, device_name, resolve_device, resolve_precision

HERE = Path(__file__).resolve().parent


class Results(_common.Results):
    def __init__(self, name: str, device: torch.device, quick: bool):
        note = ("CPU smoke test at small sizes: proves the script runs; these are not GPU numbers." if device.type == "cpu"
                else "Targets on an H200: OT >= 3x POT, extraction >= 0.8x min(loader, bare bf16 forward), SPA on the "
                     "CIFAR-shaped store <= 15 s (1 epoch) and <= 60 s (10 epochs), demo SPA equal to the CPU's within 0.5.")
        super().__init__(name, f"spacil on {device_description(device)}",
                         [("device", device_description(device)), ("sizes", "quick (smoke test)" if quick else "full")],
                         {"device": device_description(device), "quick": quick}, note)
        self.device, self.quick = device, quick


def _timed(clock_device: torch.device, function, *args, **kwargs):
    """(function(*args, **kwargs), seconds), with `clock_device`'s queued work finished before each clock reading."""
    synchronize(clock_device)
    start = time.perf_counter()
    value = function(*args, **kwargs)
    synchronize(clock_device)
    return value, time.perf_counter() - start


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


# (a) -------------------------------------------------------------------------------------------------------------------
def bench_ot(results: Results, sizes: list[int], rounds: int) -> None:
    from ot.batch import solve_batch

    from spacil.ops.ot import sinkhorn_log

    device = results.device
    g = torch.Generator().manual_seed(0)
    k, m, eps, iters = 16, 8, 0.1, 100
    results.data["ot"] = {}
    for problems in sizes:
        patches = torch.nn.functional.normalize(torch.randn(problems, k, 64, generator=g), dim=-1)
        tokens = torch.nn.functional.normalize(torch.randn(problems, m, 64, generator=g), dim=-1)
        cost = (1 - patches @ tokens.transpose(1, 2)).to(device)
        log_a = torch.full((problems, k), -np.log(k), device=device)
        log_b = torch.full((problems, m), -np.log(m), device=device)

        def pot():
            return solve_batch(cost, reg=eps, a=log_a.exp(), b=log_b.exp(), max_iter=iters, tol=0.0, method="log_sinkhorn",
                               grad="detach").plan

        ours_plan, _ = _timed(device, sinkhorn_log, cost, log_a, log_b, eps, iters)  # warm-up (kernels, allocator)
        pot_plan, _ = _timed(device, pot)
        ours_times, pot_times = [], []
        for _ in range(rounds):
            ours_times.append(_timed(device, sinkhorn_log, cost, log_a, log_b, eps, iters)[1])
            pot_times.append(_timed(device, pot)[1])
        ours, theirs = statistics.median(ours_times), statistics.median(pot_times)
        difference = float((ours_plan - pot_plan).abs().max())
        results.add(f"OT, {problems:,} problems of {k} x {m}, {iters} iterations: spacil / POT (median of {rounds})",
                    f"{ours * 1000:.1f} ms / {theirs * 1000:.1f} ms = {theirs / ours:.1f}x (target >= 3x: "
                    f"{_verdict(theirs / ours >= 3)}); max plan difference {difference:.1e}")
        results.data["ot"][str(problems)] = {"spacil_seconds": ours_times, "pot_seconds": pot_times, "speedup": theirs / ours,
                                             "max_plan_difference": difference}
        del cost, log_a, log_b, ours_plan, pot_plan
    results.write()


# (b) -------------------------------------------------------------------------------------------------------------------
def bench_extraction(results: Results, work: Path, images_per_class: int, batch_size: int, workers: int, passes: int) -> None:
    import open_clip

    from spacil.data import image_transform, open_dataset
    from spacil.store.extract import extract_store
    from spacil.demo.shapes import write_shapes_dataset

    device = results.device
    # one test image per class: a tree with an empty class folder is refused (spacil.data.folders)
    write_shapes_dataset(work / "data", train_per_class=images_per_class, test_per_class=1, seed=0, size=224)
    images = 4 * images_per_class  # the training split's, which the loader and the bare forward time
    _, splits = open_dataset("shapes", work / "data")
    split, transform = splits["train"], image_transform(224)

    class Decoded(torch.utils.data.Dataset):
        def __len__(self):
            return len(split.items)

        def __getitem__(self, index):
            return transform(split.loader(split.items[index]))

    def load_all():
        loader = torch.utils.data.DataLoader(Decoded(), batch_size=batch_size, num_workers=workers)
        for batch in loader:
            if device.type == "cuda":
                batch.pin_memory().to(device, non_blocking=True)

    loader_rate = max(images / _timed(device, load_all)[1] for _ in range(passes))
    model = open_clip.create_model("ViT-B-16", pretrained=None).to(device).eval()
    batch = torch.randn(batch_size, 3, 224, 224, device=device)

    def forward(precision):
        with torch.no_grad(), autocast(device, precision):
            for _ in range(0, images, batch_size):
                model.encode_image(batch)

    bare = {}
    for precision in ("fp32", "bf16"):
        forward(precision)  # warm-up
        bare[precision] = max(images / _timed(device, forward, precision)[1] for _ in range(passes))
    del model
    extract_precision = resolve_precision(None, device)  # extract's own default: bf16 on CUDA, fp32 on the CPU
    extract_rates = []
    for index in range(passes):
        out = work / f"store{index}"
        _, seconds = _timed(device, extract_store, "shapes", work / "data", out, model="ViT-B-16", pretrained=None,
                            device=device_name(device), batch_size=batch_size, workers=workers, progress=False, precision=extract_precision)
        extract_rates.append((images + 4) / seconds)  # extraction encodes both splits
        shutil.rmtree(out, ignore_errors=True)
    extract_rate = max(extract_rates)
    bound = min(loader_rate, bare["bf16"])
    results.add("images", f"{images} generated PNGs, 224 px, batch {batch_size}, {workers} loader workers, best of {passes}")
    results.add("loader alone (decode + resize), images/s", f"{loader_rate:.1f}")
    results.add("bare open_clip ViT-B-16 forward, fp32 / bf16 autocast, images/s", f"{bare['fp32']:.1f} / {bare['bf16']:.1f}")
    results.add(f"`spacil extract` ({extract_precision}),"
                " images/s", f"{extract_rate:.1f} = {extract_rate / bound:.2f}x min(loader, bare bf16) "
                             f"(target >= 0.8x: {_verdict(extract_rate >= 0.8 * bound)})")
    results.data["extraction"] = {"images": images, "loader_images_per_second": loader_rate, "bare_images_per_second": bare,
                                  "extract_images_per_second": extract_rates, "extract_precision": extract_precision,
                                  "ratio_to_bound": extract_rate / bound}
    results.write()


# (c) -------------------------------------------------------------------------------------------------------------------
def _run_on_store(store: Path, out: Path, device: torch.device, method: str, epochs: int, increment: int) -> dict:
    from spacil.config import build_config
    from spacil.runner import run_from_store

    shutil.rmtree(out, ignore_errors=True)
    config = build_config({"method": method, "device": device_name(device), "train": {"epochs": epochs},
                           "data": {"init_cls": increment, "increment": increment}})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary, seconds = _timed(device, run_from_store, config, store, out)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    task_seconds = [float(t) for t in re.findall(r"classes, ([0-9.]+)s\)", (out / "log.txt").read_text())]
    return {"seconds": seconds, "task_seconds": task_seconds, "peak_device_bytes": peak, "avg_acc": summary["avg_acc"]}


def bench_store(results: Results, store: Path, work: Path, quick: bool) -> None:
    sys.path.insert(0, str(HERE))
    from bench_cifar_shape import make_store

    device = results.device
    if quick:
        shape = {"train": 1000, "test": 200, "classes": 10, "patches": 16, "dim": 64}
        increment, runs = 5, (("simplecil", 1, None), ("spa", 1, None), ("spa", 2, None))
    else:
        shape = {}
        increment, runs = 10, (("simplecil", 1, None), ("spa", 1, 15.0), ("spa", 10, 60.0))
    made = _timed(device, make_store, store, **shape)[1]
    results.add("CIFAR-shaped store", ("quick: 1,000 + 200 images x 16 patches x 64, 10 classes" if quick else
                                       "50,000 + 10,000 images x 196 patches x 512, fp16, 100 classes, 10 tasks")
                + f" (made or found in {made:.0f} s)")
    results.data["store_runs"] = {}
    for method, epochs, target in runs:
        measured = _run_on_store(store, work / f"{method}_{epochs}", device, method, epochs, increment)
        key = f"{method}, {epochs} epoch{'s' if epochs > 1 else ''} per task" if method == "spa" else method
        peak = measured["peak_device_bytes"]
        value = (f"{measured['seconds']:.1f} s" + (f" (target <= {target:.0f} s: {_verdict(measured['seconds'] <= target)})"
                                                     if target else "")
                 + f"; per task {', '.join(f'{t:.1f}' for t in measured['task_seconds'])} s"
                 + (f"; peak device memory {peak / 2**30:.2f} GiB" if peak is not None else ""))
        results.add(f"CIFAR-shaped run: {key}, wall clock", value)
        results.data["store_runs"][key] = measured
        results.write()


# (d) -------------------------------------------------------------------------------------------------------------------
def bench_demo_world(results: Results, work: Path, quick: bool) -> None:
    from dataclasses import replace

    from spacil.config import build_config
    from spacil.demo.run import DEMO_OVERRIDES
    from spacil.demo.world import WorldSpec, make_world
    from spacil.runner import run_from_store

    spec = WorldSpec() if not quick else replace(WorldSpec(), num_classes=30, train_per_class=16, test_per_class=8)
    store = work / "world"
    make_world(store, spec)
    devices = [torch.device("cpu")] + ([results.device] if results.device.type != "cpu" else [])
    averages = {}
    for device in devices:
        tree = {**json.loads(json.dumps(DEMO_OVERRIDES)), "method": "spa", "device": device_name(device)}
        if quick:
            tree["train"] = {"epochs": 1}
        summary, seconds = _timed(device, run_from_store, build_config(tree), store, work / f"demo_{device.type}")
        averages[str(device)] = summary["avg_acc"]
        results.add(f"demo world, SPA on {device}", f"average accuracy {summary['avg_acc']:.2f}, {seconds:.1f} s")
    if len(averages) == 2:
        gap = abs(averages["cpu"] - averages[str(results.device)])
        results.add("demo world, |CPU - device| average accuracy", f"{gap:.2f} (target <= 0.5: {_verdict(gap <= 0.5)})")
    results.data["demo_world_avg_acc"] = averages
    results.write()


# (e) -------------------------------------------------------------------------------------------------------------------
def bench_imagenet_task(results: Results, quick: bool) -> None:
    sys.path.insert(0, str(HERE))
    from bench_scale import (BATCH, IMAGENET_EPOCHS, IMAGENET_TASK_IMAGES, IMAGENET_TEST_IMAGES, MODES, real_batch,
                             spa_learner, time_evaluation, time_steps)

    device = results.device
    classes, steps, test_images = (100, 2, 32) if quick else (1000, 20, 1024)
    learner = spa_learner(classes, device, MODES["shortlist"])
    times, _, peak = time_steps(learner, real_batch(classes, device), steps, warm_up=True)
    per_image, _, eval_peak = time_evaluation(learner, real_batch(classes, device, test_images, seed=2))
    step = statistics.median(times)
    task_steps = -(-IMAGENET_TASK_IMAGES // BATCH) * IMAGENET_EPOCHS
    train, evaluate = task_steps * step, IMAGENET_TEST_IMAGES * per_image
    knobs = learner.knobs
    results.add(f"ImageNet-1k task, {classes} seen classes, shortlist {knobs.class_shortlist}, {knobs.pseudo_per_batch} "
                f"pseudo-samples per batch", f"step {step * 1000:.0f} ms (median of {steps}), peak {peak / 2**30:.2f} GiB above "
                f"the allocation before; evaluation {per_image * 1e6:.0f} us per test image (peak {eval_peak / 2**30:.2f} GiB); "
                f"one task: training {task_steps:,} steps = {train / 60:.1f} min, evaluation of {IMAGENET_TEST_IMAGES:,} "
                f"images {evaluate / 60:.1f} min")
    results.data["imagenet_task"] = {"classes": classes, "step_seconds": times, "peak_bytes": peak,
                                     "eval_seconds_per_image": per_image, "eval_peak_bytes": eval_peak,
                                     "task_train_seconds": train, "task_eval_seconds": evaluate}
    results.write()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script, not a measurement")
    parser.add_argument("--store", default="/tmp/spacil_cifar_shape", help="where the CIFAR-shaped store is (made if missing)")
    parser.add_argument("--workers", type=int, default=8, help="image loader workers for part (b)")
    parser.add_argument("--parts", default="abcde", help="which parts to run")
    parser.add_argument("--name", help="result name (default: gpu on CUDA, gpu_cpu_smoke on the CPU)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = args.name or ("gpu" if device.type == "cuda" and not args.quick else
                         "gpu_cpu_smoke" if device.type == "cpu" else "gpu_quick")
    results = Results(name, device, args.quick)
    work = Path(tempfile.mkdtemp(prefix="spacil_bench_gpu_"))
    started = time.perf_counter()
    try:
        if "a" in args.parts:
            bench_ot(results, [1_920, 3_432] if args.quick else [19_200, 343_200], rounds=2 if args.quick else 5)
        if "b" in args.parts:
            bench_extraction(results, work, images_per_class=4 if args.quick else 1000, batch_size=8 if args.quick else 256,
                             workers=0 if args.quick else args.workers, passes=1 if args.quick else 2)
        if "c" in args.parts:
            store = Path(args.store) if not args.quick else work / "cifar_shape_quick"
            bench_store(results, store, work, args.quick)
        if "d" in args.parts:
            bench_demo_world(results, work, args.quick)
        if "e" in args.parts:
            bench_imagenet_task(results, args.quick)
        results.add("whole script, wall clock", f"{time.perf_counter() - started:.0f} s")
        results.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
