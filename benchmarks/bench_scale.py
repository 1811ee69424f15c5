"""SPA at scale (issue 23), side by side in one run: writes docs/benchmarks/scale.{md,json}.

(a) One training step (ViT-B/16 shapes: batch 64, 196 patches, d 512, k 16, 8 descriptions; the last of ten equal tasks, so
    90% of the classes are old) at 100, 300, 1,000 and 3,000 seen classes: exact SPA (4 pseudo-samples per old class, every
    class scored) where it fits in `--exact-limit` seconds, and SPA with the class shortlist and the per-batch pseudo
    budget: time and peak memory above the resident set. Targets: at 1,000 classes a step at most 2x the 100-class exact
    step, and at most 2 GB above the resident set on the CPU.
(b) Evaluation time per test image at the same class counts, exact and shortlisted.
(c) Average accuracy on generated worlds (spacil.demo.world): exact SPA against shortlisted SPA at 100 and 200 classes
    (target: within 0.5), and shortlisted SPA against SimpleCIL on a 1,000-class world.
(d) One ImageNet-1k task on this CPU estimated from (a) and (b): the last task of B0 Inc100 (100 new classes x ~1,300
    images, 1,000 seen classes, 10 epochs), then its evaluation on 50,000 test images.
(e) (not in the default parts) How the ImageNet-1k values were chosen: SPA's average accuracy on a 100-class world under
    several shortlist sizes and pseudo budgets, alone and together.

    python benchmarks/bench_scale.py                 # everything (about 25 minutes on the project's 2-core CPU)
    python benchmarks/bench_scale.py --parts ab      # the step and evaluation timings only
    python benchmarks/bench_scale.py --parts e --name scale_choice   # the choice of N and P (docs/method.md)

`bench_gpu.py --parts e` measures (d) on a GPU with the helpers defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import _common
from _common import add_device_argument, device_description, peak_rss, peak_rss_reset, synchronize
from spacil.config import build_config
from spacil.devices import device_name, resolve_device, working_memory
from spacil.learner import FeatureBatch, LearnerContext, TaskInfo, make_optimizer, task_generator
from spacil.methods.spa import SPA

DIM, PATCHES, TOKENS, BATCH = 512, 196, 8, 64
SHORTLIST, PSEUDO_PER_BATCH = 32, 64  # the values chosen for ImageNet-1k (docs/method.md, "SPA at scale")
IMAGENET_TASK_IMAGES, IMAGENET_TEST_IMAGES, IMAGENET_EPOCHS = 100 * 1300, 50_000, 10


def spa_learner(classes: int, device: torch.device, spa: dict, seed: int = 0, shared_factors: Optional[bool] = None) -> SPA:
    """SPA after begin_task of `classes` classes with ViT-B/16's shapes (random unit features), its projectors away from
    zero, and Gaussians of the first 90% of the classes (the old ones: the last of ten tasks). The exact configuration
    samples from every old class's factor, so its banks hold one real [d, d] factor per class (1 MB per class and branch,
    as a run keeps them); with the per-batch budget only the drawn classes' factors are read, and the banks hold one shared
    factor seen by every class (a stride-0 view), which leaves the resident set small at 3,000 classes."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    config = build_config({"spa": spa})
    learner = SPA(config, LearnerContext(DIM, PATCHES, 100.0, device))
    learner.begin_task(TaskInfo(0, list(range(classes)), [str(i) for i in range(classes)],
                                unit(torch.randn(classes, DIM, generator=g)).to(device),
                                unit(torch.randn(classes, TOKENS, DIM, generator=g)).to(device),
                                torch.ones(classes, TOKENS, dtype=torch.bool, device=device), None))
    with torch.no_grad():
        for stack in (learner.image_projector, learner.text_projector):
            stack.layers[0].weight.normal_(std=0.02, generator=g)
    old = classes * 9 // 10
    shared = config.spa.pseudo_per_batch > 0 if shared_factors is None else shared_factors  # (evaluation samples nothing)
    for bank in (learner.global_bank, learner.patch_bank):
        bank.positions = list(range(old))
        bank.means = unit(torch.randn(old, DIM, generator=g)).to(device)
        factor = torch.eye(DIM, device=device) * 0.03
        bank.factors = factor.expand(old, DIM, DIM) if shared else factor.repeat(old, 1, 1)
    return learner


def real_batch(classes: int, device: torch.device, images: int = BATCH, seed: int = 1) -> FeatureBatch:
    """A batch of `images` random images of the newest classes (their targets) on `device`."""
    g = torch.Generator().manual_seed(seed)
    return FeatureBatch(F.normalize(torch.randn(images, DIM, generator=g), dim=-1).to(device),
                        F.normalize(torch.randn(images, PATCHES, DIM, generator=g), dim=-1).to(device),
                        torch.randint(classes * 9 // 10, classes, (images,), generator=g).to(device))


def _memory_start(device: torch.device) -> int:
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return peak_rss_reset()


def _memory_peak(device: torch.device, before: int) -> int:
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) - before


def time_steps(learner: SPA, batch: FeatureBatch, steps: int, warm_up: bool) -> tuple[list[float], list[float], int]:
    """Wall-clock and CPU seconds of each of `steps` training steps (loss, backward, optimizer step; chunked under the
    budget a run would measure) and the peak memory above what was allocated before them."""
    device = learner.context.device
    params = learner.image_projector.trainable() + learner.text_projector.trainable()
    optimizer, _ = make_optimizer(params, learner.config.train, 100)
    generator = task_generator(learner.config, 9, stream=2, device=device)
    budget = working_memory(device, learner.config.train.device_memory_budget)

    def step():
        optimizer.zero_grad(set_to_none=True)
        learner.step_gradients(batch, batch.targets, generator, budget)
        optimizer.step()

    if warm_up:
        step()
    before = _memory_start(device)
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, _memory_peak(device, before)


def time_evaluation(learner: SPA, batch: FeatureBatch) -> tuple[float, float, int]:
    """Wall-clock and CPU seconds per test image of prediction over `batch` (one evaluation batch) and the peak memory
    above the start."""
    device = learner.context.device
    learner._eval_generator = None  # a fresh evaluation: the budget is measured again
    before = _memory_start(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        learner.predict(batch)
    synchronize(device)
    images = len(batch.global_)
    return ((time.perf_counter() - start) / images, (time.process_time() - cpu_start) / images,
            _memory_peak(device, before))


MODES = {"exact": {}, "shortlist": {"class_shortlist": SHORTLIST, "pseudo_per_batch": PSEUDO_PER_BATCH}}


def _problems(classes: int, mode: str) -> int:
    """Transport problems of one training step: (real + pseudo samples) x the classes each scores."""
    if mode == "exact":
        return (BATCH + 4 * (classes * 9 // 10)) * classes
    return (BATCH + PSEUDO_PER_BATCH) * min(SHORTLIST + 1, classes)


def bench_steps(results: "Results", class_counts: list[int], steps: int, exact_limit: float, eval_images: int) -> None:
    device = results.device
    results.data["steps"] = {}
    exact_seconds_per_problem: Optional[float] = None
    for classes in class_counts:
        for mode, spa in MODES.items():
            key = f"{classes} classes, {mode}"
            estimate = None if exact_seconds_per_problem is None else exact_seconds_per_problem * _problems(classes, mode)
            if mode == "exact" and estimate is not None and estimate > exact_limit:
                reason = (f"skipped: one step estimated at {estimate:.0f} s from the smaller exact steps (transport "
                          f"problems {_problems(classes, mode):,}), beyond --exact-limit {exact_limit:.0f} s")
                learner = spa_learner(classes, device, spa, shared_factors=True)  # prediction draws no pseudo-samples
                per_image, eval_cpu, eval_peak = time_evaluation(learner, real_batch(classes, device, eval_images, seed=2))
                results.data["steps"][key] = {"skipped": reason, "estimated_seconds": estimate,
                                              "eval_seconds_per_image": per_image, "eval_cpu_seconds_per_image": eval_cpu,
                                              "eval_peak_bytes": eval_peak, "eval_images": eval_images}
                results.data.setdefault("summary", {}).update({
                    f"step_estimated_seconds_{mode}_{classes}": estimate, f"eval_ms_per_image_{mode}_{classes}": per_image * 1000,
                    f"eval_cpu_ms_per_image_{mode}_{classes}": eval_cpu * 1000})
                results.add(f"step, {key}", f"{reason}; evaluation {per_image * 1000:.1f} ms per test image, "
                                            f"{eval_cpu * 1000:.1f} ms CPU (peak {eval_peak / 2**20:.0f} MiB)")
                del learner
                results.write()
                continue
            learner = spa_learner(classes, device, spa)
            batch = real_batch(classes, device)
            slow = mode == "exact" and estimate is not None and estimate > 20  # one step only, no warm-up
            times, cpu_times, peak = time_steps(learner, batch, 1 if slow else steps, warm_up=not slow)
            median, cpu = statistics.median(times), statistics.median(cpu_times)
            if mode == "exact":
                exact_seconds_per_problem = max(median, cpu) / _problems(classes, mode)
            per_image, eval_cpu, eval_peak = time_evaluation(learner, real_batch(classes, device, eval_images, seed=2))
            pseudo = 4 * (classes * 9 // 10) if mode == "exact" else PSEUDO_PER_BATCH
            results.data["steps"][key] = {"seconds": times, "cpu_seconds": cpu_times, "peak_bytes": peak,
                                          "pseudo_samples": pseudo, "problems": _problems(classes, mode),
                                          "eval_seconds_per_image": per_image, "eval_cpu_seconds_per_image": eval_cpu,
                                          "eval_peak_bytes": eval_peak, "eval_images": eval_images}
            # flat keys for the docs' figures (benchmarks/sync_docs.py)
            results.data.setdefault("summary", {}).update({
                f"step_seconds_{mode}_{classes}": median, f"step_cpu_seconds_{mode}_{classes}": cpu,
                f"step_peak_mib_{mode}_{classes}": peak / 2**20, f"eval_ms_per_image_{mode}_{classes}": per_image * 1000,
                f"eval_cpu_ms_per_image_{mode}_{classes}": eval_cpu * 1000})
            results.add(f"step, {key}", f"{median:.2f} s, {cpu:.2f} s CPU ({'1 step' if slow else f'median of {steps}'}), "
                                        f"peak {peak / 2**20:.0f} MiB above the resident set; {BATCH} + {pseudo} "
                                        f"pseudo-samples; evaluation {per_image * 1000:.1f} ms per test image, "
                                        f"{eval_cpu * 1000:.1f} ms CPU (peak {eval_peak / 2**20:.0f} MiB)")
            del learner, batch
            results.write()


def step_targets(results: "Results") -> None:
    steps = results.data["steps"]
    base, scaled = steps.get("100 classes, exact"), steps.get("1000 classes, shortlist")
    if not base or not scaled or "seconds" not in base:
        return
    ratio = statistics.median(scaled["seconds"]) / statistics.median(base["seconds"])
    cpu_ratio = statistics.median(scaled["cpu_seconds"]) / statistics.median(base["cpu_seconds"])
    gib = scaled["peak_bytes"] / 2**30
    results.data["targets"] = {"step_ratio_1000_shortlist_to_100_exact": ratio, "step_cpu_ratio_1000_shortlist_to_100_exact":
                               cpu_ratio, "peak_gib_1000_shortlist": gib}
    verdict = "met" if cpu_ratio <= 2 else "missed"
    results.add("target: 1,000-class shortlisted step / 100-class exact step", f"{cpu_ratio:.2f}x in CPU time (target <= "
                f"2x: {verdict}), {ratio:.2f}x in wall clock")
    results.add("target: 1,000-class shortlisted step, peak above the resident set",
                f"{gib:.2f} GiB (target <= 2 GB: {'met' if scaled['peak_bytes'] <= 2e9 else 'missed'})")


def imagenet_task_estimate(results: "Results") -> None:
    """One ImageNet-1k task from the 1,000-class shortlisted step and evaluation: steps per epoch x epochs x step time, and
    test images x time per image."""
    scaled = results.data["steps"].get("1000 classes, shortlist")
    if not scaled:
        return
    steps = -(-IMAGENET_TASK_IMAGES // BATCH) * IMAGENET_EPOCHS
    step = statistics.median(scaled["cpu_seconds"] if results.device.type == "cpu" else scaled["seconds"])
    train = steps * step
    evaluate = IMAGENET_TEST_IMAGES * (scaled["eval_cpu_seconds_per_image"] if results.device.type == "cpu"
                                       else scaled["eval_seconds_per_image"])
    results.data["imagenet_task_estimate"] = {"train_steps": steps, "train_seconds": train, "eval_seconds": evaluate,
                                              "peak_bytes": max(scaled["peak_bytes"], scaled["eval_peak_bytes"])}
    results.add(f"ImageNet-1k, last task of B0 Inc100 on {results.device.type} (estimate)",
                f"training {steps:,} steps ({IMAGENET_EPOCHS} epochs of {IMAGENET_TASK_IMAGES:,} images) x "
                f"{step:.2f} s = {train / 3600:.1f} h; evaluation of {IMAGENET_TEST_IMAGES:,} "
                f"test images {evaluate / 3600:.1f} h; peak {max(scaled['peak_bytes'], scaled['eval_peak_bytes']) / 2**30:.2f} "
                f"GiB above the resident set (plus the Gaussians: 2 MB per class with cov_type=full, 2 GB at 1,000 classes)")


# (c) -------------------------------------------------------------------------------------------------------------------
def _world_run(store: Path, out: Path, method: str, spa: dict, increment: int, epochs: int, device: torch.device) -> dict:
    from spacil.demo.run import DEMO_OVERRIDES
    from spacil.runner import run_from_store

    shutil.rmtree(out, ignore_errors=True)
    tree = {"method": method, "device": device_name(device), "spa": {**DEMO_OVERRIDES["spa"], **spa},
            "train": {"epochs": epochs}, "data": {"init_cls": increment, "increment": increment}}
    start = time.perf_counter()
    summary = run_from_store(build_config(tree), store, out)
    return {"avg_acc": summary["avg_acc"], "last_acc": summary["last_acc"], "seconds": time.perf_counter() - start}


def bench_worlds(results: "Results", work: Path, epochs: int, small: list[int], large: int) -> None:
    """Exact against shortlisted SPA on worlds of `small` classes (ten tasks each); shortlisted SPA against SimpleCIL on a
    world of `large` classes (ten tasks, 12 training and 6 test images per class). The demo world's 49 patches and k = 8
    (DEMO_OVERRIDES), families of 5 classes; the shortlist and pseudo budget are the ImageNet-1k values."""
    from spacil.demo.world import WorldSpec, make_world

    device = results.device
    results.data["worlds"] = {}
    scaled_knobs = {"class_shortlist": SHORTLIST, "pseudo_per_batch": PSEUDO_PER_BATCH}
    plans = [(classes, classes // 10, [("spa exact", "spa", {}), ("spa shortlisted", "spa", scaled_knobs)], {})
             for classes in small]
    plans += [(large, large // 10, [("simplecil", "simplecil", {}), ("spa shortlisted", "spa", scaled_knobs)],
              {"train_per_class": 12, "test_per_class": 6})]
    for classes, increment, runs, sizes in plans:
        spec = replace(WorldSpec(), num_classes=classes, family_size=5, views=1, **sizes)
        store = work / f"world{classes}"
        made = time.perf_counter()
        make_world(store, spec)
        made = time.perf_counter() - made
        measured = {name: _world_run(store, work / f"run{classes}_{method}_{len(spa)}", method, spa, increment, epochs, device)
                    for name, method, spa in runs}
        results.data["worlds"][str(classes)] = {"spec": {"classes": classes, "increment": increment, "epochs": epochs,
                                                         "train_per_class": spec.train_per_class,
                                                         "test_per_class": spec.test_per_class},
                                                "runs": measured, "world_seconds": made}
        text = "; ".join(f"{name} {m['avg_acc']:.2f} (last {m['last_acc']:.2f}, {m['seconds']:.0f} s)"
                         for name, m in measured.items())
        results.add(f"world of {classes} classes (B0 Inc{increment}, {spec.train_per_class}/{spec.test_per_class} "
                    f"images per class, {epochs} epochs): average accuracy", text)
        results.data.setdefault("summary", {}).update(
            {f"avg_acc_{name.replace(' ', '_')}_{classes}": m["avg_acc"] for name, m in measured.items()})
        if "spa exact" in measured:
            gap = measured["spa shortlisted"]["avg_acc"] - measured["spa exact"]["avg_acc"]
            results.add(f"target: world of {classes}, shortlisted - exact average accuracy",
                        f"{gap:+.2f} (target within 0.5: {'met' if abs(gap) <= 0.5 else 'missed'})")
        shutil.rmtree(store, ignore_errors=True)
        results.write()


# (e) -------------------------------------------------------------------------------------------------------------------
CHOICES = (("exact", {}), ("N 32", {"class_shortlist": 32}), ("N 16", {"class_shortlist": 16}),
           ("N 8", {"class_shortlist": 8}), ("P 64", {"pseudo_per_batch": 64}), ("P 16", {"pseudo_per_batch": 16}),
           ("P 64 unweighted", {"pseudo_per_batch": 64, "pseudo_per_class": 0}),
           ("N 32, P 64", {"class_shortlist": 32, "pseudo_per_batch": 64}),
           ("N 16, P 128", {"class_shortlist": 16, "pseudo_per_batch": 128}))


def bench_choices(results: "Results", work: Path, epochs: int, classes: int) -> None:
    """How the ImageNet-1k values were chosen: SPA's average accuracy on one world of `classes` classes (ten tasks) under
    several shortlist sizes N and pseudo budgets P, each alone and together ('unweighted': the P draws as plain samples,
    pseudo_per_class 0, instead of each standing for pseudo_per_class x old classes / P of them)."""
    from spacil.demo.world import WorldSpec, make_world

    spec = replace(WorldSpec(), num_classes=classes, family_size=5, views=1)
    store = work / f"choice_world{classes}"
    make_world(store, spec)
    measured = {name: _world_run(store, work / f"choice{index}", "spa", spa, classes // 10, epochs, results.device)
                for index, (name, spa) in enumerate(CHOICES)}
    results.data["choices"] = {"classes": classes, "epochs": epochs, "runs": measured}
    exact = measured["exact"]["avg_acc"]
    for name, m in measured.items():
        results.add(f"world of {classes} classes, SPA {name}", f"average accuracy {m['avg_acc']:.2f} "
                    f"({m['avg_acc'] - exact:+.2f} against exact), {m['seconds']:.0f} s")
    results.data.setdefault("summary", {}).update(
        {f"choice_{name.replace(' ', '').replace(',', '_')}": m["avg_acc"] - exact for name, m in measured.items()})
    results.write()


class Results(_common.Results):
    def __init__(self, name: str, device: torch.device, notes: str):
        super().__init__(name, f"SPA at scale on {device_description(device)}", [("device", device_description(device))],
                         {"device": device_description(device), "shortlist": SHORTLIST, "pseudo_per_batch": PSEUDO_PER_BATCH},
                         notes)
        self.device = device


def main() -> None:
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median), after a warm-up")
    parser.add_argument("--exact-limit", type=float, default=600.0, help="skip an exact step estimated to take longer (s)")
    parser.add_argument("--eval-images", type=int, default=128, help="test images per evaluation timing")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task of the world runs")
    parser.add_argument("--worlds", type=int, nargs="*", default=[100, 200], help="classes of the exact/shortlisted worlds")
    parser.add_argument("--large-world", type=int, default=1000, help="classes of the world shortlisted SPA meets SimpleCIL on")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a CPU shared with other jobs, more threads than free cores spin and wait)")
    parser.add_argument("--parts", default="abcd")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    notes = (f"Load average when the run started: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min) on "
             f"{os.cpu_count()} cores shared with other jobs: times are under that load, with {args.threads} torch "
             f"thread(s). Shortlist N = {SHORTLIST}, "
             f"{PSEUDO_PER_BATCH} pseudo-samples per batch; exact = SPEC.md's scoring (every class) with 4 pseudo-samples per "
             f"old class. Chunks follow the working-memory budget a run measures (spacil.devices.working_memory). CPU time "
             f"(of this one-thread process) is what the step targets and the ImageNet-1k estimate use: other jobs on "
             f"the machine stretch the wall clock, not the work.")
    results = Results(args.name, device, notes)
    work = Path(tempfile.mkdtemp(prefix="spacil_bench_scale_"))
    started = time.perf_counter()
    try:
        if "a" in args.parts or "b" in args.parts:
            bench_steps(results, args.classes, args.steps, args.exact_limit, args.eval_images)
            step_targets(results)
        if "d" in args.parts:
            imagenet_task_estimate(results)
        if "c" in args.parts:
            bench_worlds(results, work, args.epochs, args.worlds, args.large_world)
        if "e" in args.parts:
            bench_choices(results, work, args.epochs, args.worlds[0] if args.worlds else 100)
        results.add("whole script, wall clock", f"{time.perf_counter() - started:.0f} s")
        results.write()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
