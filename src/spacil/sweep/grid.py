"""`spacil sweep`: a grid of runs (configs or stores x methods x variants x seeds), one run folder per cell.

The grid is a YAML file (docs/scale.md):

    configs: [cifar224_b0, cub_b100, my_config.yaml]   # packaged names or files; and/or
    features: [stores/world]                           # stores (data.init_cls / data.increment under `set`)
    methods: [spa, simplecil]                          # optional; default: each config's method
    seeds: [1993, 1994, 1995]                          # optional; default: each config's seed
    variants:                                          # optional named override sets, each one more run
      full: {}
      no_ot: {ablation.optimal_transport: false, methods: [spa]}
    set: {data.data_root: DATA, data.features: stores/{dataset}}
    slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 120}

Cell folder: OUT/<config or store>/<method>[-<variant>]/seed<S>. A variant without overrides (`full: {}`) is the method
itself (folder `<method>`); a variant's optional `methods` list says which methods it applies to (default: all). In string
values of `set` and of variants, `{dataset}` and `{config}` stand for the entry's data set key and name.

This module builds the grid, says what each cell needs (done, resume, run, changed) and hands the cells to an engine that
already exists: local worker processes (`spacil.sweep.local`) or SLURM through submitit (`spacil.sweep.slurm`), both taking cells from `spacil.sweep.cell`. It schedules nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, StrictInt

from spacil.config import build_config, dump_config, load_config, read_yaml_mapping, resolve_config_path, resolve_packaged
from spacil.errors import InputError
from spacil.sweep.cell import MANIFEST, Cell, CellState, cell_state
from spacil.fileio import atomic_write_text, make_dirs

_NAME = re.compile(r"^[A-Za-z0-9_.+]+$")


class SweepSpec(BaseModel):
    """The sweep YAML, validated: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    configs: list[str] = Field(default_factory=list)
    features: list[str] = Field(default_factory=list)
    methods: Optional[list[str]] = None
    seeds: Optional[list[Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]]] = None  # strict: `true` or "1" is a typo
    variants: Optional[dict[str, dict[str, Any]]] = None
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")
    slurm: dict[str, Any] = Field(default_factory=dict)


def packaged_sweep_dir() -> Path:
    return Path(__file__).parent.parent / "sweeps"


def resolve_sweep_path(name: str | Path) -> Path:
    return resolve_packaged(name, packaged_sweep_dir(), "sweep")


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    """Read and validate a sweep YAML (a file, or the name of a packaged one such as `paper_grid`)."""
    path = resolve_sweep_path(path)
    tree = read_yaml_mapping(path, "sweep file")
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            raise InputError(f"{path}: unknown key '{key}' (known: configs, features, methods, seeds, variants, set, slurm)") from None
        raise InputError(f"{path}: bad value {first.get('input')!r} for '{key}': {first['msg']}") from None
    if not spec.configs and not spec.features:
        raise InputError(f"{path}: nothing to run: give 'configs' (config names or files) or 'features' (stores)")
    for name in spec.variants or {}:
        if not _NAME.match(name):
            raise InputError(f"{path}: variants.{name}: a variant name may hold letters, digits, '_', '.', '+' only")
    for where, mapping in [("set", spec.overrides)] + [(f"variants.{n}", v) for n, v in (spec.variants or {}).items()]:
        for key in ("method", "seed"):
            if key in mapping:
                raise InputError(f"{path}: {where}.{key}: the grid's {key}s are given by '{key}s:' (a list), not as an override")
    from spacil.methods import METHODS

    for where, methods in [("methods", spec.methods or [])] + [(f"variants.{n}.methods", v.get("methods", []))
                                                                for n, v in (spec.variants or {}).items()]:
        if not isinstance(methods, list):
            raise InputError(f"{path}: {where}: expected a list of methods, found {methods!r}")
        for method in methods:
            if method not in METHODS:
                raise InputError(f"{path}: {where}: unknown method '{method}' (known: {', '.join(METHODS)})")
    return spec, path


def _override(key: str, value: Any) -> str:
    """A `KEY=VALUE` override whose VALUE reads back (YAML) as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text == "...":
        text = ""
    return f"{key}={text}"


def _expand(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, replacement in names.items():
            value = value.replace("{" + key + "}", replacement)
    return value


def _entries(spec: SweepSpec) -> list[tuple[str, Optional[Path], list[str], str]]:
    """(entry name, config file or None, base overrides, data set key) for each config and store of the grid."""
    entries = []
    for name in spec.configs:
        path = resolve_config_path(name)
        entry = Path(name).stem if Path(name).is_file() else name
        entries.append((entry, path, [], load_config(path).data.dataset))
    for store in spec.features:
        meta = Path(store) / "meta.json"
        dataset = Path(store).name
        if not meta.is_file() and "data.data_root" not in spec.overrides:
            raise InputError(f"features: {store}: no feature store there (meta.json missing), and no data.data_root under "
                             f"`set` to extract one")
        if meta.is_file():
            try:
                dataset = json.loads(meta.read_text()).get("dataset") or dataset
            except ValueError:
                pass  # `spacil run` names the broken file when the cell runs
        entries.append((Path(store).name, None, [_override("data.features", store)], dataset))
    return entries


def build_grid(spec: SweepSpec, out: str | Path, source: str | Path = "sweep") -> list[Cell]:
    """Every cell of the grid with its validated config, in the order of the YAML (entry, method, variant, seed)."""
    from spacil.methods import METHODS

    out = Path(out)
    cells: list[Cell] = []
    seen: dict[Path, str] = {}
    same_settings: dict[str, str] = {}  # resolved config.yaml -> the first cell with it
    variants = spec.variants if spec.variants else {None: {}}
    try:
        entries = _entries(spec)
    except InputError as err:
        raise InputError(f"{source}: configs: {err}") from None
    names = [e[0] for e in entries]
    for entry in names:
        if names.count(entry) > 1:
            raise InputError(f"{source}: two entries of the grid are named '{entry}' (run folders would collide); rename one")
    for entry, config_path, base, dataset in entries:
        placeholders = {"dataset": dataset, "config": entry}
        shared = base + [_override(k, _expand(v, placeholders)) for k, v in spec.overrides.items()]
        try:
            plain = load_config(config_path, shared) if config_path else build_config({}, shared, source=str(source))
        except InputError as err:
            raise InputError(f"{source}: {entry}: {err}") from None
        methods = spec.methods or [plain.method]
        seeds = spec.seeds or [plain.seed]
        for method in methods:
            if method not in METHODS:
                raise InputError(f"{source}: {entry}: unknown method '{method}' (known: {', '.join(METHODS)})")
            for variant, settings in variants.items():
                settings = dict(settings)
                only = settings.pop("methods", None)
                if only is not None and method not in only:
                    continue
                row = method if not settings else f"{method}-{variant}"
                extra = [_override(k, _expand(v, placeholders)) for k, v in settings.items()]
                for seed in seeds:
                    overrides = shared + extra + [_override("method", method), _override("seed", seed)]
                    where = f"{source}: {entry}" + (f": variants.{variant}" if variant else "")
                    try:
                        config = load_config(config_path, overrides) if config_path else build_config({}, overrides, source=str(source))
                    except InputError as err:
                        raise InputError(f"{where}: {err}") from None
                    folder = out / entry / row / f"seed{seed}"
                    cell = Cell(entry, row, method, variant if settings else None, seed, config, folder)
                    settings_key = dump_config(config)
                    if settings_key in same_settings:
                        raise InputError(f"{where}: cell {cell.name} is the same run as {same_settings[settings_key]} "
                                         f"(identical settings); drop one")
                    same_settings[settings_key] = cell.name
                    if folder in seen:
                        raise InputError(f"{where}: cell {cell.name} appears twice (variants {seen[folder]} and "
                                         f"{variant} give the same run)")
                    seen[folder] = str(variant)
                    cells.append(cell)
    return cells


def check_splits(cells: list[Cell], source: str | Path) -> None:
    """Every cell's split (data.init_cls, data.increment) against its data set's classes, before anything is launched:
    the store's meta.json when it exists, else the data set's known class count."""
    from spacil.data import DATASETS, task_sizes
    from spacil.store.format import read_meta

    for cell in cells:
        data = cell.config.data
        meta = Path(data.features) / "meta.json" if data.features else None
        if meta is not None and meta.is_file():
            num_classes, where = len(read_meta(meta)["classes"]), str(meta)
        elif data.dataset in DATASETS:
            num_classes, where = DATASETS[data.dataset].num_classes, f"data set {data.dataset}"
        else:
            continue  # the run names what is missing
        try:
            task_sizes(num_classes, data.init_cls, data.increment)
        except InputError as err:
            raise InputError(f"{source}: {cell.name}: {err} ({where})") from None


def plan_lines(states: list[CellState], out: Path, force: bool) -> list[str]:
    """One line per cell, then the counts: what a sweep would skip, resume, run or refuse."""
    words = {"done": "skip (done)", "resume": "resume", "run": "run",
             "changed": "redo (--force)" if force else "REFUSE (changed)", "busy": "skip (running)"}
    width = max(len(w) for w in words.values())
    lines = []
    for state in states:
        detail = f"  [{state.detail}]" if state.detail else ""
        if state.action == "changed" and not force and not state.detail.startswith("checkpoints/"):
            detail = f"  [settings changed: {state.detail}]"
        lines.append(f"{words[state.action]:<{width}}  {state.cell.name}{detail}")
    counts = {a: sum(s.action == a for s in states) for a in words}
    lines.append(f"{len(states)} cells under {out}: {counts['done']} done, {counts['resume']} to resume, "
                 f"{counts['run']} to run, {counts['changed']} with changed settings"
                 + (f", {counts['busy']} running in another process" if counts["busy"] else "")
                 + (" (redone under --force)" if force and counts["changed"] else ""))
    return lines


def write_manifest(spec: SweepSpec, cells: list[Cell], out: Path, source: Path) -> None:
    """OUT/sweep.json: the grid, in order, for `spacil report OUT` and for people."""
    payload = {"format": "spacil-sweep", "version": 1, "source": str(Path(source).resolve()),
               "spec": spec.model_dump(mode="json", by_alias=True),
               "entries": list(dict.fromkeys(c.entry for c in cells)),
               "rows": list(dict.fromkeys(c.row for c in cells)),
               "cells": [{"entry": c.entry, "row": c.row, "method": c.method, "variant": c.variant, "seed": c.seed,
                          "dataset": c.config.data.dataset, "folder": str(c.folder.relative_to(out))} for c in cells]}
    make_dirs(out)
    atomic_write_text(out / MANIFEST, json.dumps(payload, indent=1))


def run_sweep(sweep: str | Path, out: str | Path, executor: str = "local", jobs: int = 1, dry_run: bool = False,
              force: bool = False, echo: Callable[[str], None] = print, progress: bool = True,
              make_submitit_executor: Optional[Callable[[Path], Any]] = None) -> int:
    """Plan the grid, refuse changed cells unless `force`, then run what is left locally or submit it to SLURM.

    Returns the exit status: 0 all went well (or, for SLURM, all was submitted), 1 some run failed.
    `make_submitit_executor(folder)` replaces the SLURM executor (tests use submitit's local one)."""
    if executor not in ("local", "slurm"):
        raise InputError(f"--executor {executor}: expected local or slurm")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: expected at least 1")
    out = Path(out)
    spec, source = load_sweep(sweep)
    cells = build_grid(spec, out, source)
    slurm_parameters = None
    if executor == "slurm":
        from spacil.sweep.slurm import missing_slurm_commands, slurm_parameters as convert

        slurm_parameters = convert(spec.slurm, source)
        missing = missing_slurm_commands() if make_submitit_executor is None and not dry_run else []
        if missing:
            raise InputError(f"--executor slurm: SLURM is not on this machine ({', '.join(missing)} not on PATH); "
                             f"run the sweep on a SLURM login node, or use --executor local")
    check_splits(cells, source)
    states = [cell_state(c) for c in cells]
    pending_jobs = {}
    if executor == "slurm" and not dry_run:
        from spacil.sweep.slurm import live_submissions

        pending_jobs = live_submissions(out, [s for s in states if s.action != "done"], make_submitit_executor)
    if dry_run:
        for line in plan_lines(states, out, force):
            echo(line)
        return 0
    changed = [s for s in states if s.action == "changed"]
    if changed and not force:
        first = changed[0]
        more = f" (and {len(changed) - 1} more cells)" if len(changed) > 1 else ""
        what = first.detail if first.detail.startswith("checkpoints/") else f"settings changed since it ran ({first.detail})"
        raise InputError(f"{first.cell.folder}: {what}{more}; pass --force to redo, or use another --out")
    for state in changed:
        if state.cell.name in pending_jobs:  # its job still writes the folder: deleting it under the job helps nobody
            raise InputError(f"{state.cell.folder}: settings changed, but its SLURM job {pending_jobs[state.cell.name]} "
                             f"is queued or running; cancel it (scancel) before --force")
        shutil.rmtree(state.cell.folder)
    write_manifest(spec, cells, out, source)
    done = [s for s in states if s.action == "done"]
    busy = [s for s in states if s.action == "busy"]
    todo = [s for s in states if s.action not in ("done", "busy") and s.cell.name not in pending_jobs]
    for name, job_id in pending_jobs.items():
        echo(f"queued or running as SLURM job {job_id}: {name}")
    for state in busy:  # never a second writer on one run folder
        echo(f"not started, its folder is {state.detail}: {state.cell.name}")
    if done:
        echo(f"{len(done)} of {len(cells)} cells already done (skipped)")
    if not todo:
        echo(f"nothing to run: {len(done)} done, {len(pending_jobs) + len(busy)} queued or running; "
             f"report: spacil report {out}")
        return 0
    if executor == "local":
        from spacil.sweep.local import run_local

        return run_local([s.cell for s in todo], out, jobs, echo=echo, progress=progress)
    from spacil.sweep.slurm import submit

    submit([s.cell for s in todo], out, slurm_parameters, echo=echo, make_executor=make_submitit_executor)
    return 0
