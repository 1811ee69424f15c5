"""One cell of a sweep: what it is, what its folder needs, and running it in this process.

Both engines (`spacil.sweep.local`, `spacil.sweep.slurm`) take cells from here; this module imports neither of them.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from spacil.config import Config, build_config, differing_keys, dump_config
from spacil.fileio import atomic_write_text, make_dirs
from spacil.report import load_run
from spacil.runlock import folder_writer

MANIFEST = "sweep.json"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    entry: str  # the config's or store's name: the first folder level, one column group of the report
    row: str  # <method> or <method>-<variant>: one row of the report
    method: str
    variant: Optional[str]
    seed: int
    config: Config
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.entry}/{self.row}/seed{self.seed}"


@dataclass(frozen=True)
class CellState:
    """What a cell needs: 'done' (skipped), 'resume' (from its checkpoint), 'run', 'changed' (settings differ, or its
    checkpoint is damaged: redone under --force) or 'busy' (another process writes its folder: never started twice)."""

    cell: Cell
    action: str
    detail: str = ""


def cell_state(cell: Cell) -> CellState:
    """Compare the cell's folder with its config: a finished run with the same settings is done, one with a checkpoint is
    resumed, one whose settings differ (placement keys such as the device aside) is 'changed'."""
    folder = cell.folder
    writer = folder_writer(folder)
    if writer is not None:
        return CellState(cell, "busy", f"written by {writer}")
    saved_path = folder / "config.yaml"
    if not saved_path.is_file():
        return CellState(cell, "run")
    try:
        saved = yaml.safe_load(saved_path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as err:
        return CellState(cell, "changed", f"config.yaml unreadable: {err}")
    differ = differing_keys(saved, cell.config, folder=folder)
    if differ:
        return CellState(cell, "changed", ", ".join(differ))
    summary = load_run(folder) if (folder / "summary.json").is_file() else None  # every field checked
    if summary is not None and summary.get("complete"):
        return CellState(cell, "done", f"Ā {summary['avg_acc']:.2f}  A_B {summary['last_acc']:.2f}")
    checkpoint = folder / "checkpoints" / "last.pt"
    if checkpoint.is_file() and not zipfile.is_zipfile(checkpoint):  # torch's format is a zip: its end is readable
        return CellState(cell, "changed", "checkpoints/last.pt truncated or damaged")
    if checkpoint.is_file():
        finished = len(summary.get("curve", [])) if summary else 0
        total = len(summary.get("task_sizes", [])) if summary else 0
        return CellState(cell, "resume", f"after task {finished}/{total}" if total else "from its checkpoint")
    return CellState(cell, "run", "started, no task finished")


def run_cell(config_tree: dict, folder: str | Path) -> dict:
    """Run (or resume) one cell in this process: the store is prepared (extracted once under a lock if missing), the run
    continues from its checkpoint when it has one. What a SLURM job calls."""
    from spacil.pipeline import prepare_store
    from spacil.runner import run_from_store

    config = build_config(config_tree, source=str(Path(folder) / "config.yaml"))
    store = prepare_store(config, progress=False)
    return run_from_store(config, store, folder, resume=True)


def write_cell_config(cell: Cell, out: Path) -> Path:
    """The cell's resolved config as a file a worker can be pointed at (`spacil run --config`)."""
    path = out / ".sweep" / "configs" / cell.entry / cell.row / f"seed{cell.seed}.yaml"
    make_dirs(path.parent)
    atomic_write_text(path, dump_config(cell.config, absolute=True))  # a worker may start in another directory
    return path
