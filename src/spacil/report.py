"""`spacil report`: one table (Markdown and CSV) of runs, and their pictures: accuracy after each task, accuracy matrices."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from spacil.errors import InputError
from spacil.fileio import atomic_save_figure, atomic_write_text, make_dirs, read_json


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_summary(summary: dict, path: Path) -> None:
    """Every field sweep and report read, typed; Ā and A_B must agree with the curve they summarise."""
    for key in ("method", "avg_acc", "last_acc", "curve", "forgetting"):
        if key not in summary:
            raise InputError(f"{path}: key '{key}' missing")
    for key in ("avg_acc", "last_acc", "forgetting"):
        if not _number(summary[key]):
            raise InputError(f"{path}: '{key}' is {summary[key]!r}, expected a number")
    curve = summary["curve"]
    if not isinstance(curve, list) or not curve or not all(_number(v) and math.isfinite(v) for v in curve):
        raise InputError(f"{path}: 'curve' must be a non-empty list of finite numbers (accuracy after each task)")
    for key, kind, check in (("method", "a string", lambda v: isinstance(v, str) and v),
                             ("label", "a string", lambda v: isinstance(v, str) and v),
                             ("dataset", "a string", lambda v: isinstance(v, str)),
                             ("seed", "an integer in 0..2**32-1", lambda v: isinstance(v, int) and not isinstance(v, bool)
                              and 0 <= v < 2**32),
                             ("complete", "true or false", lambda v: isinstance(v, bool)),
                             ("task_sizes", "a list of positive integers", lambda v: isinstance(v, list) and v and all(
                                 isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v))):
        if key in summary and not check(summary[key]):
            raise InputError(f"{path}: '{key}' is {summary[key]!r}, expected {kind}")
    sizes = summary.get("task_sizes")
    if sizes is not None and len(curve) > len(sizes):
        raise InputError(f"{path}: 'curve' has {len(curve)} tasks, 'task_sizes' only {len(sizes)}")
    if sizes is not None and summary.get("complete") and len(curve) != len(sizes):
        raise InputError(f"{path}: 'complete' is true but 'curve' has {len(curve)} of {len(sizes)} tasks")
    # half of the last digit a report shows: a hand-rounded summary passes, a contradicting one does not
    mean = sum(curve) / len(curve)
    for key, expected in (("avg_acc", mean), ("last_acc", curve[-1])):
        if not math.isclose(summary[key], expected, abs_tol=0.005):
            raise InputError(f"{path}: '{key}' is {summary[key]!r} but its 'curve' gives {expected:.4f}; "
                             f"the summary contradicts itself")


def load_run(folder: str | Path) -> dict:
    """A run folder's summary.json, every field checked (InputError naming the file otherwise)."""
    folder = Path(folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; not a run folder (or a run that finished no task)")
    summary = read_json(path)
    _check_summary(summary, path)
    summary.setdefault("label", summary["method"])
    summary["folder"] = str(folder)
    return summary


def read_matrix(folder: str | Path) -> np.ndarray:
    path = Path(folder) / "acc_matrix.csv"
    try:
        rows = list(csv.reader(path.read_text().splitlines()))[1:]
        matrix = np.array([[float(v) if v else np.nan for v in row[1:]] for row in rows], dtype=float)
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"{path}: not an accuracy matrix ({err})") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"{path}: not a square accuracy matrix (rows after_task, columns task_1..task_B)")
    return matrix


def dataset_title(key: str) -> str:
    """A data set's name as a paper prints it ('CIFAR-100'), from its key ('cifar224'); other keys as they are."""
    from spacil.data import DATASETS

    spec = DATASETS.get(key)
    return spec.title if spec is not None else key


def split_label(summary: dict) -> str:
    """'B0 Inc10' (all tasks equal) or 'B50 Inc10' (a larger first task), from the run's task sizes."""
    sizes = summary.get("task_sizes") or []
    if not sizes:
        return ""
    increment = sizes[1] if len(sizes) > 1 else sizes[0]
    base = 0 if sizes[0] == increment else sizes[0]
    return f"B{base} Inc{increment}"


def _settings_but_seed(folder: str) -> Optional[str]:
    """The run's config.yaml without the keys that may differ between seeds of one setting (seed, device)."""
    import yaml

    try:
        config = yaml.safe_load((Path(folder) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return yaml.safe_dump({k: v for k, v in config.items() if k not in ("seed", "device")}, sort_keys=True)


def group_by_setting(summaries: Sequence[dict]) -> list[list[dict]]:
    """Runs that differ only by seed (same label, data, split and settings), together, in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        key = (s["label"], s.get("dataset", ""), tuple(s.get("task_sizes") or ()), _settings_but_seed(s["folder"]))
        groups.setdefault(key, []).append(s)
    return list(groups.values())


def run_name(summary: dict, summaries: Sequence[dict]) -> str:
    """The run's label, with its seed when another run of the report carries the same label."""
    if sum(s["label"] == summary["label"] for s in summaries) > 1:
        return f"{summary['label']} seed {summary.get('seed', '?')}"
    return summary["label"]


def _mean_std(values: list[float]) -> str:
    """'57.17' for one run; '57.17 ± 0.42' (sample std) for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _with_seeds(summaries: Sequence[dict]) -> bool:
    """Whether the table shows seed columns: when the runs do not all share one seed."""
    return len({s.get("seed") for s in summaries}) > 1


def header(summaries: Sequence[dict]) -> list[str]:
    seeds = ["seeds", "n"] if _with_seeds(summaries) else []
    return ["method", "data", "split", *seeds, "avg acc", "last acc", "forgetting", "tasks"]


def table_rows(summaries: Sequence[dict]) -> list[list[str]]:
    """One row per setting: runs that differ only by seed become mean ± sample std, with their seeds and count (the
    seed columns appear when the runs do not all share one seed)."""
    with_seeds = _with_seeds(summaries)
    rows = []
    for group in group_by_setting(summaries):
        first = group[0]
        incomplete = sum(not s.get("complete", True) for s in group)
        tasks = str(len(first["curve"])) if len({len(s["curve"]) for s in group}) == 1 else "/".join(
            str(len(s["curve"])) for s in group)
        seeds = [" ".join(str(s.get("seed", "?")) for s in group), str(len(group))] if with_seeds else []
        rows.append([first["label"], dataset_title(first.get("dataset", "")), split_label(first), *seeds,
                     *(_mean_std([s[key] for s in group]) for key in ("avg_acc", "last_acc", "forgetting")),
                     tasks + (f" ({incomplete} incomplete)" if incomplete else "")])
    return rows


CSV_HEADER = ["method", "data", "split", "seed", "avg acc", "last acc", "forgetting", "tasks", "curve", "folder"]


def markdown_table(summaries: Sequence[dict]) -> str:
    rows = table_rows(summaries)
    names = header(summaries)
    lines = ["| " + " | ".join(names) + " |", "| " + " | ".join(["---"] * 3 + ["---:"] * (len(names) - 3)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(summaries: Sequence[dict], path: str | Path, title: str = "Accuracy after each task") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spacil.plotstyle import fonts_for, legend_outside, run_styles

    names = [run_name(s, summaries) for s in summaries]
    styles = run_styles([(s["method"], s["label"]) for s in summaries])  # SPA's family warm and dashed, SPA itself solid
    with fonts_for(names + [title]) as shown:
        fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
        for s, name, style in zip(summaries, names, styles):
            seen = np.cumsum(s.get("task_sizes") or [1] * len(s["curve"]))[: len(s["curve"])]
            ax.plot(seen, s["curve"], label=f"{shown(name)} ({s['avg_acc']:.1f})", **style.plot_kwargs())
        ax.set_xlabel("classes seen")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(shown(title))
        ax.grid(alpha=0.3)
        legend_outside(ax, title="run (average accuracy)")  # outside the axes: no line hidden behind it
        fig.tight_layout()
    try:
        atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def plot_matrix(matrix: np.ndarray, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spacil.plotstyle import fonts_for

    with fonts_for([title]) as shown:  # the title holds the run's label, which may be in any script
        fig, ax = plt.subplots(figsize=(4.8, 4.2), dpi=110)
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis")
        for (b, j), value in np.ndenumerate(matrix):
            if not np.isnan(value) and matrix.shape[0] <= 12:
                ax.text(j, b, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
        ticks = np.arange(matrix.shape[0])
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("classes of task j")
        ax.set_ylabel("after task b")
        ax.set_title(shown(title), fontsize=9)
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
    try:
        atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


# files a run folder holds from its start, before its first task is finished (summary.json comes with that task)
RUN_STARTED_FILES = ("config.yaml", "class_order.json", "log.txt", ".writer.lock")


REPORT_FILES = ("report.md", "report.csv", "curves.png")  # write_report's own outputs, beside matrix_<run>.png


def _is_report_output(path: Path) -> bool:
    return path.is_file() and (path.name in REPORT_FILES or (path.name.startswith("matrix_") and path.suffix == ".png"))


def reportable_runs(runs: Sequence[str | Path], warn: Callable[[str], None]) -> list[Path]:
    """The runs of `runs` that have a summary to report. The others are skipped with one line each through `warn`: a run
    that finished no task yet (`skipped (unfinished run): PATH`) and anything that is not a run folder (`skipped (not a
    run folder): PATH`: another folder, a file such as an earlier report's, which `spacil report runs/*` also names).
    None left is an InputError (exit 2); a damaged summary.json stays one (load_run)."""
    kept = []
    for run in map(Path, runs):
        if (run / "summary.json").is_file():
            kept.append(run)
        elif _is_report_output(run):
            continue  # what an earlier `spacil report runs/*` wrote into runs/: the same glob names it, nothing to say
        elif run.is_dir() and any((run / name).exists() for name in RUN_STARTED_FILES):
            warn(f"skipped (unfinished run): {run}")
        else:
            warn(f"skipped (not a run folder): {run}")
    if not kept:
        raise InputError(f"nothing to report: none of the {len(runs)} paths given is a run folder with a finished task "
                         f"(summary.json)")
    return kept


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_report(runs: Sequence[str | Path], out: Optional[str | Path] = None,
                 warn: Callable[[str], None] = _stderr) -> str:
    """Write report.md, report.csv and curves.png (and one matrix PNG per run) to `out`; return the Markdown table.
    Unfinished runs and paths that are not run folders are skipped, one line each through `warn` (reportable_runs)."""
    runs = reportable_runs(runs, warn)
    summaries = [load_run(r) for r in runs]
    out = Path(out) if out else Path(runs[0]).resolve().parent
    make_dirs(out)
    table = markdown_table(summaries)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)  # one line per run, each with its seed: the numbers behind the table's means
    for s in summaries:
        writer.writerow([s["label"], dataset_title(s.get("dataset", "")), split_label(s), s.get("seed", ""),
                         *(f"{s[key]:.2f}" for key in ("avg_acc", "last_acc", "forgetting")),
                         str(len(s["curve"])) + ("" if s.get("complete", True) else " (incomplete)"),
                         " ".join(f"{v:.2f}" for v in s["curve"]), s["folder"]])
    atomic_write_text(out / "report.csv", buffer.getvalue())
    plot_curves(summaries, out / "curves.png")
    pictures = ["![accuracy after each task](curves.png)"]
    for s in summaries:
        title = run_name(s, summaries)
        name = "matrix_" + "".join(ch if ch.isalnum() else "_" for ch in title).strip("_") + ".png"
        plot_matrix(read_matrix(s["folder"]), out / name, f"{title}: accuracy matrix")
        pictures.append(f"![{title} accuracy matrix]({name})")
    atomic_write_text(out / "report.md", "# spacil report\n\n" + table + "\n\n" + "\n\n".join(pictures) + "\n")
    return table
