"""The SLURM engine of `spacil sweep`, through submitit: one job array, logs per job in OUT/.submitit/.

Each array task runs one cell in its own process (`spacil.sweep.cell.run_cell`). The callable is checkpointable: when SLURM preempts the
job or its time runs out, submitit calls `checkpoint()`, which resubmits the same cell; the requeued job resumes the run from
its last finished task (the run's own checkpoint), so at most one task's work is lost.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from spacil.errors import InputError
from spacil.fileio import atomic_write_text
from spacil.sweep.cell import Cell, CellState, run_cell

SUBMITTED = "submitted.json"
DEFAULT_TIMEOUT_MIN = 120
# parameters every submitit executor understands; the rest of `slurm:` are SLURM's own (partition, account, qos, ...)
GENERIC = ("name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "stderr_to_stdout")
# states in which a submitted job still holds its cell: resubmitting it would make two writers on one run folder
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
               "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}


class SweepCellJob(submitit.helpers.Checkpointable):
    """One cell of a sweep as a submitit job: runs (or resumes) the cell and returns its summary."""

    def __call__(self, config_tree: dict, folder: str) -> dict:
        return run_cell(config_tree, folder)

    def checkpoint(self, config_tree: dict, folder: str) -> submitit.helpers.DelayedSubmission:
        # The state worth keeping is on disk (the run folder's checkpoints/last.pt): resubmit the same cell, which resumes.
        return submitit.helpers.DelayedSubmission(SweepCellJob(), config_tree, folder)


# the generic keys' values: (test, what is expected)
_GENERIC_VALUES = {
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "timeout_min": (lambda v: _positive_int(v), "a positive integer (minutes)"),
    "mem_gb": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number (GB)"),
    "nodes": (lambda v: _positive_int(v), "a positive integer"),
    "cpus_per_task": (lambda v: _positive_int(v), "a positive integer"),
    "gpus_per_node": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "tasks_per_node": (lambda v: _positive_int(v), "a positive integer"),
    "stderr_to_stdout": (lambda v: isinstance(v, bool), "true or false"),
}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def missing_slurm_commands() -> list[str]:
    """The SLURM commands a submission needs (submitit calls sbatch, srun, and sacct/squeue to watch) not on PATH."""
    return [name for name in ("sbatch", "srun", "squeue") if shutil.which(name) is None]


def slurm_parameters(mapping: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """The sweep's `slurm:` mapping as AutoExecutor parameters: generic keys as they are, the others prefixed `slurm_`."""
    parameters = {}
    for key, value in mapping.items():
        if key in _GENERIC_VALUES and not _GENERIC_VALUES[key][0](value):
            raise InputError(f"{source}: slurm.{key}: {value!r}, expected {_GENERIC_VALUES[key][1]}")
        name = key if key in GENERIC or key.startswith("slurm_") else f"slurm_{key}"
        parameters[name] = value
    probe = submitit.AutoExecutor(folder=Path(tempfile.gettempdir()) / "spacil-slurm-probe", cluster="debug")
    for name, value in parameters.items():
        try:
            probe.update_parameters(**{name: value})
        except (NameError, AssertionError, TypeError, ValueError) as err:
            reason = str(err).splitlines()[0]
            raise InputError(f"{source}: slurm.{name.removeprefix('slurm_')}: {reason}") from None
    return parameters


def _executor(out: Path, make_executor: Optional[Callable[[Path], Any]]):
    folder = out / ".submitit"
    return make_executor(folder) if make_executor else submitit.AutoExecutor(folder=folder, cluster="slurm")


def submit(cells: list[Cell], out: Path, parameters: dict[str, Any], echo: Callable[[str], None] = print,
           make_executor: Optional[Callable[[Path], Any]] = None) -> list:
    """Submit the cells as one job array (each task one cell); record the job ids; print how to watch."""
    executor = _executor(out, make_executor)
    # submitit's own default time limit is 5 minutes: far too short for a run (a timed-out job is requeued and resumes,
    # but only 3 times); 2 hours unless the sweep says otherwise
    executor.update_parameters(**{"name": "spacil-sweep", "timeout_min": DEFAULT_TIMEOUT_MIN, **parameters})
    jobs = executor.map_array(SweepCellJob(), [c.config.to_dict() for c in cells], [str(c.folder.absolute()) for c in cells])
    submitted = _read_submitted(out)
    submitted.update({c.name: job.job_id for c, job in zip(cells, jobs)})
    atomic_write_text(out / ".submitit" / SUBMITTED, json.dumps(submitted, indent=1))
    array = str(jobs[0].job_id).split("_")[0]
    echo(f"submitted {len(jobs)} runs as job array {array} (logs: {out / '.submitit'}/<job id>_<task>_log.out/.err)")
    echo(f"watch: squeue -j {array}    or: tail -f {out / '.submitit'}/{array}_*_log.out")
    echo(f"run the same `spacil sweep` again to see which cells are done (it resubmits only cells whose job is gone); "
         f"then: spacil report {out}")
    return jobs


def _read_submitted(out: Path) -> dict[str, str]:
    path = out / ".submitit" / SUBMITTED
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def live_submissions(out: Path, states: list[CellState], make_executor: Optional[Callable[[Path], Any]] = None) -> dict[str, str]:
    """Cells (by name) whose recorded job is still queued or running, so a rerun does not submit them twice."""
    submitted = _read_submitted(out)
    wanted = {s.cell.name for s in states if s.cell.name in submitted}
    if not wanted:
        return {}
    executor = _executor(out, make_executor)
    engine = getattr(executor, "_executor", executor)  # AutoExecutor wraps the engine whose job class reads states
    live = {}
    for name in sorted(wanted):
        job_id = str(submitted[name])
        try:
            state = engine.job_class(folder=engine.folder, job_id=job_id).state.split()[0].upper()
        except Exception:  # noqa: BLE001 - sacct unreachable: the job may still run, so it is not submitted twice
            state = "UNKNOWN"
        if state in LIVE_STATES:
            live[name] = job_id
        elif state == "UNKNOWN":  # no accounting (sacct) to ask: never risk two jobs writing one run folder
            live[name] = f"{job_id} (state unknown; once it is gone, delete its entry in {out / '.submitit' / 'submitted.json'})"
    return live
