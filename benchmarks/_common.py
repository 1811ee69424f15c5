"""Helpers for the benchmark scripts: results are written by the scripts themselves, with the command that made them."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_when_written": [round(v, 2) for v in os.getloadavg()]}


def run_timed(command: list[str], env: Optional[dict] = None, cwd=None, stdout=subprocess.DEVNULL,
              poll_seconds: float = 2.0) -> dict:
    """Run `command` to its end and measure it: wall clock, CPU time (user + system of the process and its children, from
    the kernel's accounting), the 1-minute load average before it started and sampled while it ran, and whether the
    machine was busy (`busy_machine`). Exit status in "returncode"."""
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=stdout)
    load = []
    while process.poll() is None:
        load.append(os.getloadavg()[0])
        time.sleep(poll_seconds)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process, reaped by poll()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    mean_load = sum(load) / len(load) if load else load_before
    return {"wall": wall, "cpu": cpu, "load_before": load_before, "mean_load": mean_load, "max_load": max(load, default=load_before),
            "returncode": process.returncode, **busy_machine(load_before, mean_load)}


def busy_machine(load_before: float, mean_load: float, own_threads: int = 1) -> dict:
    """Whether other jobs kept the cores busy while a figure was taken: the load average (before, or during less the
    measured process's own `own_threads`) above the core count. A figure taken so is marked: its wall clock is inflated."""
    from spacil.devices import usable_cores

    cores = usable_cores()
    load = max(load_before, mean_load - own_threads)
    busy = load > cores
    note = (f"a busy machine (load average {load:.1f} above its {cores} cores: the wall clock is inflated by other jobs; "
            f"the CPU time is the steadier figure)" if busy else f"a quiet machine (load average {load:.1f}, {cores} cores)")
    return {"cores": cores, "busy": busy, "load_note": note}


def write_result(name: str, title: str, rows: list[tuple[str, str]], data: dict, notes: str = "") -> None:
    """docs/benchmarks/<name>.json (the numbers) and <name>.md (a table, the command, the machine)."""
    DOCS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    payload = {"benchmark": name, "command": command, "machine": machine(), **data}
    (DOCS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {payload['machine']}", "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if notes:
        lines += ["", notes]
    (DOCS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


class Results:
    """The rows and numbers a benchmark of several parts has gathered so far; `write` (after every part) writes them, so a
    run cut short keeps what it finished."""

    def __init__(self, name: str, title: str, rows: list[tuple[str, str]], data: dict, notes: str = ""):
        self.name, self.title, self.rows, self.data, self.notes = name, title, rows, data, notes

    def add(self, key: str, value: str) -> None:
        self.rows.append((key, value))
        print(f"{key}: {value}", flush=True)

    def write(self) -> None:
        write_result(self.name, self.title, self.rows, self.data, notes=self.notes)


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def device_description(device: torch.device) -> str:
    """'cpu' or the GPU's name, for the results."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_reset() -> int:
    """Reset the process's peak resident set (Linux) and return the current resident set in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)
