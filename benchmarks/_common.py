"""Helpers for the benchmark scripts: results are written by the scripts themselves, with the command that made them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}


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
