"""One SPA training step at batch 64 with 300 seen classes, 196 patches, d = 512, k = 16, 8 descriptions per class:
time and peak memory on CPU (plus the pseudo-features of 270 old classes, as in the last SUN task)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import add_device_argument, device_description, peak_rss, peak_rss_reset, synchronize, write_result
from spacil.config import build_config
from spacil.devices import resolve_device
from spacil.learner import FeatureBatch, LearnerContext, TaskInfo, make_optimizer
from spacil.methods.spa import SPA


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5)
    add_device_argument(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dim, patches, tokens, batch, old = 512, 196, 8, 64, args.classes - 30
    g = torch.Generator().manual_seed(0)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    config = build_config({})
    learner = SPA(config, LearnerContext(dim, patches, 100.0, device))
    learner.begin_task(TaskInfo(0, list(range(args.classes)), [str(i) for i in range(args.classes)],
                                unit(torch.randn(args.classes, dim, generator=g)).to(device),
                                unit(torch.randn(args.classes, tokens, dim, generator=g)).to(device),
                                torch.ones(args.classes, tokens, dtype=torch.bool, device=device), None))
    # stored Gaussians of 270 old classes (full covariance), so the step includes pseudo-feature sampling
    for position in range(old):
        for bank in (learner.global_bank, learner.patch_bank):
            bank.positions.append(position)
        learner.global_bank.means = unit(torch.randn(old, dim, generator=g))
        learner.patch_bank.means = unit(torch.randn(old, dim, generator=g))
    eye = torch.eye(dim).expand(old, dim, dim) * 0.03
    learner.global_bank.factors = eye.clone()
    learner.patch_bank.factors = eye.clone()
    for bank in (learner.global_bank, learner.patch_bank):
        bank.means, bank.factors = bank.means.to(device), bank.factors.to(device)
    params = learner.image_projector.trainable() + learner.text_projector.trainable()
    optimizer, _ = make_optimizer(params, config.train, 100)
    column = torch.arange(args.classes, device=device)
    data = FeatureBatch(unit(torch.randn(batch, dim, generator=g)).to(device), unit(torch.randn(batch, patches, dim, generator=g)).to(device),
                        torch.randint(args.classes - 30, args.classes, (batch,), generator=g).to(device))
    sampler = torch.Generator(device=device).manual_seed(0)

    def step():
        logits = learner._real_logits(data, sampler)
        targets = column[data.targets]
        global_, pseudo_patches, positions = learner._pseudo_batch(sampler)
        logits = torch.cat([logits, learner._pseudo_logits(global_, pseudo_patches)])
        loss = F.cross_entropy(logits, torch.cat([targets, column[positions]]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    synchronize(device)
    before = peak_rss_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()) - before
    median = statistics.median(times)
    rows = [("shape", f"batch {batch} + {old * config.spa.pseudo_per_class} pseudo-samples, {args.classes} classes, {patches} patches, "
                      f"d {dim}, k {config.spa.top_k_patches}, {tokens} descriptions"),
            ("device", device_description(device)),
            ("time per step, median of %d" % args.steps, f"{median:.2f} s"),
            ("peak memory above the resident set before the steps" if device.type == "cpu" else
             "peak device memory above the allocation before the steps", f"{peak / 2**20:.0f} MiB"),
            ("a [batch, classes, k, d] float32 tensor would be", f"{batch * args.classes * 16 * dim * 4 / 2**20:.0f} MiB")]
    name = "spa_step" if device.type == "cpu" else "spa_step_cuda"
    write_result(name, f"One SPA training step on {device.type.upper()}", rows,
                 {"seconds": times, "peak_bytes": peak, "device": device_description(device)})


if __name__ == "__main__":
    main()
