"""The local engine of `spacil sweep`: a pool of N worker processes on this machine.

Each cell runs as its own `python -m spacil run --config CELL.yaml --out FOLDER --resume` process, so an interrupted worker
leaves what the runner leaves: a run folder with every finished task and a checkpoint, resumed by the next sweep. A worker
slot owns one GPU (CUDA_VISIBLE_DEVICES) when there are GPUs, else an equal share of the cores (cores // N, SPACIL_CPU_SHARE).
A worker ends when the sweep process ends, however it ends (`spacil.sweep.lifeline`): a killed sweep leaves no worker
writing a run folder. Ctrl-C reaches the workers (they are in the terminal's process group; a SIGINT sent to this process alone is forwarded),
they stop after writing what they finished, and the sweep exits 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from spacil.devices import CPU_SHARE_ENV, PROCESSES_PER_GPU_ENV
from spacil.fileio import make_dirs, open_log
from spacil.sweep.cell import Cell, write_cell_config
from spacil.sweep.lifeline import SWEEP_PARENT_ENV


@dataclass
class _Worker:
    cell: Cell
    process: subprocess.Popen
    log: TextIO
    log_path: Path
    started: float


def gpu_ids() -> list[str]:
    """The GPUs the workers may be given: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_env(slot: int, jobs: int, gpus: list[str], cpus: int) -> dict[str, str]:
    """The environment of worker slot `slot` of `jobs`: one GPU (shared round-robin when there are more workers than GPUs,
    and then the number of workers on it, for the memory budget), or cores // jobs cores (SPACIL_CPU_SHARE)."""
    env = dict(os.environ)
    # the worker's share of the cores: spacil.devices.cpu_threads picks its threads within it (one for small work), and
    # OMP_NUM_THREADS set by the user still wins
    env[CPU_SHARE_ENV] = str(max(1, cpus // jobs))
    env[SWEEP_PARENT_ENV] = str(os.getpid())  # the worker ends when this process ends (spacil.sweep.lifeline)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        env[PROCESSES_PER_GPU_ENV] = str(len(range(slot % len(gpus), jobs, len(gpus))))
    return env


def _result_line(worker: _Worker, code: int) -> str:
    seconds = time.perf_counter() - worker.started
    if code == 0:
        try:
            summary = json.loads((worker.cell.folder / "summary.json").read_text())
            return (f"done    {worker.cell.name}  Ā {summary['avg_acc']:.2f}  A_B {summary['last_acc']:.2f}  "
                    f"({seconds:.0f} s)")
        except (OSError, ValueError, KeyError):
            pass
    tail = ""
    try:
        lines = [line for line in worker.log_path.read_text().splitlines() if line.strip()]
        tail = f": {lines[-1]}" if lines else ""
    except OSError:
        pass
    return f"FAILED  {worker.cell.name}  (exit {code}, log {worker.log_path}){tail}"


def run_local(cells: list[Cell], out: Path, jobs: int, echo: Callable[[str], None] = print, progress: bool = True,
              poll_seconds: float = 0.05) -> int:
    """Run `cells` with at most `jobs` workers at once; one line per finished run. 0 when all succeeded, else 1."""
    from tqdm import tqdm

    gpus = gpu_ids()
    cpus = cpu_count()
    jobs = min(jobs, len(cells))
    where = f"one GPU each ({', '.join(gpus)})" if gpus else f"at most {max(1, cpus // jobs)} CPU threads each"
    echo(f"running {len(cells)} runs on {jobs} local workers, {where}")
    logs = out / ".sweep" / "logs"
    make_dirs(logs)
    pending = deque(cells)
    running: dict[int, _Worker] = {}
    failures = 0
    bar = tqdm(total=len(cells), desc="sweep", unit="run", disable=not progress)
    say = bar.write if progress else echo
    try:
        while pending or running:
            for slot in range(jobs):
                if slot not in running and pending:
                    running[slot] = _start(pending.popleft(), out, logs, worker_env(slot, jobs, gpus, cpus))
            for slot, worker in list(running.items()):
                code = worker.process.poll()
                if code is None:
                    continue
                worker.log.close()
                del running[slot]
                failures += code != 0
                say(_result_line(worker, code))
                bar.update(1)
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        _stop(running.values())
        bar.close()
        echo(f"interrupted: {len(running)} runs stopped after their last finished task; run the sweep again to resume")
        raise
    bar.close()
    if failures:
        echo(f"{failures} of {len(cells)} runs failed (their logs: {logs}); the others are done")
    return 1 if failures else 0


def _start(cell: Cell, out: Path, logs: Path, env: dict[str, str]) -> _Worker:
    config = write_cell_config(cell, out)
    log_path = logs / f"{cell.entry}__{cell.row}__seed{cell.seed}.log"
    log = open_log(log_path)
    command = [sys.executable, "-m", "spacil", "run", "--config", str(config), "--out", str(cell.folder), "--resume", "--quiet"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _Worker(cell, process, log, log_path, time.perf_counter())


def _stop(workers, grace_seconds: float = 1.0, wait_seconds: float = 60.0) -> None:
    """Let workers that got the terminal's SIGINT finish their own way; forward SIGINT to the others; kill stragglers."""
    workers = list(workers)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(w.process.poll() is None for w in workers):
        time.sleep(0.05)
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGINT)
    for worker in workers:
        try:
            worker.process.wait(timeout=wait_seconds)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.log.close()
