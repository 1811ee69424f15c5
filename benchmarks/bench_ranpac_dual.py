"""RanPAC's dual form and its cost line (issue 26): time, memory and result of the primal and dual ridge problems side by
side, and the estimate `spacil run` prints before a RanPAC run against what the run then takes.

    python benchmarks/bench_ranpac_dual.py

1. The issue's case: a small data set (60 training images, 10 classes, B0 Inc2) at the official M = 10,000, a whole
   `spacil run --method ranpac` (before 0.4: over 10 minutes and 4.4 GB before it was stopped).
2. One task of 1,000 rows at M = 1,500 (800 fit rows < M): the ridge search and the head solved in the primal form
   (M x M, what spacil did before) and in the dual form (N x N), on the same h: chosen lambda, head difference, seconds.
3. A primal case (2,000 rows at M = 1,000, fit rows >= M): the estimate against the measured time.
Float64 throughout, CPU threads as torch sets them. The load average is recorded before and after.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _common import peak_rss, peak_rss_reset, write_result
from bench_ranpac_bofa import make_z_store
from spacil.config import build_config
from spacil.methods.ranpac import (choose_ridge, choose_ridge_dual, measured_rates, ridge_candidates, ridge_cost,
                                   ridge_solve, ridge_solve_dual)
from spacil.runner import run_from_store


def _problem(rows: int, M: int, classes: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = 768
    centres = torch.randn(classes, width, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (rows,), generator=generator)
    z = centres[labels] + torch.randn(rows, width, generator=generator, dtype=torch.float64) * 2.5
    W_rand = torch.randn(width, M, generator=generator, dtype=torch.float64)
    H = torch.relu(z @ W_rand)
    Y = torch.nn.functional.one_hot(labels, classes).double()
    fit = int(rows * 0.8)
    return H, Y, fit


def _by_ridge(differences: dict[str, float]) -> str:
    return ", ".join(f"{value:.0e} at {ridge}" for ridge, value in differences.items() if ridge in ("1e-08", "0.0001", "1", "10000", "1e+08"))


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def issue_case(folder: Path) -> dict:
    store = folder / "store"
    make_z_store(store, train=60, test=20, classes=10)
    config = build_config({"method": "ranpac", "device": "cpu", "data": {"init_cls": 2, "increment": 2}})
    note = io.StringIO()
    peak_rss_reset()
    with contextlib.redirect_stderr(note):
        start = time.perf_counter()
        summary = run_from_store(config, store, folder / "run")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": peak_rss(), "note": note.getvalue().strip(), "avg_acc": summary["avg_acc"]}


def one_task(rows: int, M: int) -> dict:
    H, Y, fit = _problem(rows, M)
    ridges = ridge_candidates(-8, 8)
    H_fit, Y_fit, H_hold, Y_hold = H[:fit], Y[:fit], H[fit:], Y[fit:]
    G, Q = H.T @ H, H.T @ Y

    def primal():
        G_fit, Q_fit = H_fit.T @ H_fit, H_fit.T @ Y_fit
        ridge, losses = choose_ridge(G_fit, Q_fit, H_hold, Y_hold, ridges)
        return ridge, losses, ridge_solve(G, Q, ridge)

    def dual():
        ridge, losses = choose_ridge_dual(H_fit, Y_fit, H_hold, Y_hold, ridges)
        return ridge, losses, ridge_solve_dual(H, Y, ridge)

    (p_ridge, p_losses, p_W), p_seconds = _timed(primal)
    (d_ridge, d_losses, d_W), d_seconds = _timed(dual)
    difference = float((p_W - d_W).abs().max() / p_W.abs().max())
    # by candidate: the primal matrix is numerically singular at the smallest ridges (rank 800 of M), the dual is not
    loss_difference = {f"{r:g}": abs(a - b) / max(abs(a), 1e-300) for r, a, b in zip(ridges, p_losses, d_losses)}
    return {"rows": rows, "M": M, "fit": fit, "primal": {"ridge": p_ridge, "seconds": p_seconds},
            "dual": {"ridge": d_ridge, "seconds": d_seconds}, "head_max_relative_difference": difference,
            "loss_relative_difference_by_ridge": loss_difference}


def main() -> None:
    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="spacil_ranpac_dual_"))
    try:
        issue = issue_case(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    task = one_task(1000, 1500)
    primal_rows, primal_M = 2000, 1000
    H, Y, fit = _problem(primal_rows, primal_M)
    rates = measured_rates(torch.device("cpu"))  # what the run's line measures, just before the task it estimates
    estimate, _, forms = ridge_cost(primal_M, None, [primal_rows], [10], 0.8, "solve", 17, rates)

    def primal_task():
        G_fit, Q_fit = H[:fit].T @ H[:fit], H[:fit].T @ Y[:fit]
        ridge, _ = choose_ridge(G_fit, Q_fit, H[fit:], Y[fit:], ridge_candidates(-8, 8))
        G = G_fit + H[fit:].T @ H[fit:]
        return ridge_solve(G, H.T @ Y, ridge)

    _, measured = _timed(primal_task)
    load_after = os.getloadavg()
    rows = [
        ("the issue's case: 60 training images, 10 classes, 5 tasks, M = 10,000, `spacil run --method ranpac`",
         f"{issue['seconds']:.1f} s, peak resident memory {issue['peak_rss'] / 2**20:.0f} MiB (before 0.4: stopped after "
         f"10 min at 4.4 GB); avg acc {issue['avg_acc']:.2f}"),
        ("its line before the run", issue["note"]),
        (f"one task, {task['rows']} rows ({task['fit']} fit) at M = {task['M']}: primal / dual",
         f"{task['primal']['seconds']:.2f} s / {task['dual']['seconds']:.2f} s "
         f"(x{task['primal']['seconds'] / task['dual']['seconds']:.0f}); lambda {task['primal']['ridge']:g} / "
         f"{task['dual']['ridge']:g}; heads differ by {task['head_max_relative_difference']:.1e} (max, relative to the "
         f"largest entry); held-out errors, relative, by {_by_ridge(task['loss_relative_difference_by_ridge'])}"),
        (f"a primal task ({primal_rows} rows at M = {primal_M}): estimate / measured",
         f"{estimate:.1f} s / {measured:.1f} s ({forms})"),
        ("load average (1, 5, 15 min) before / after", f"{load_before} / {load_after}"),
    ]
    write_result("ranpac_dual", "RanPAC: the dual form of the ridge problem, and the cost line before a run", rows,
                 {"issue_case": issue, "one_task": task, "estimate": {"rows": primal_rows, "M": primal_M,
                                                                     "estimated_seconds": estimate,
                                                                     "measured_seconds": measured, "rates": rates},
                  "load_before": load_before, "load_after": load_after},
                 notes="Timed on this project's shared 2-core machine; the load average says how busy it was. The "
                       "dual form is used where fewer rows than M take part (the search: fit rows < M; the head: rows "
                       "seen so far < M); it gives the primal result to float rounding (the held-out errors differ "
                       "most at lambda = 1e-8, where the primal matrix is nearly singular).")


if __name__ == "__main__":
    main()
