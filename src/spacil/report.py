"""`spacil report`: one table (Markdown and CSV) of runs, and their pictures: accuracy after each task, accuracy matrices."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from spacil.errors import InputError
from spacil.fileio import atomic_write_text, make_dirs, read_json


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


def table_rows(summaries: Sequence[dict]) -> list[list[str]]:
    rows = []
    for s in summaries:
        rows.append([s["label"], s.get("dataset", ""), f"{s['avg_acc']:.2f}", f"{s['last_acc']:.2f}", f"{s['forgetting']:.2f}",
                     str(len(s["curve"])) + ("" if s.get("complete", True) else " (incomplete)")])
    return rows


HEADER = ["method", "data", "avg acc", "last acc", "forgetting", "tasks"]


def markdown_table(summaries: Sequence[dict]) -> str:
    rows = table_rows(summaries)
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(HEADER) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(summaries: Sequence[dict], path: str | Path, title: str = "Accuracy after each task") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for s in summaries:
        seen = np.cumsum(s.get("task_sizes") or [1] * len(s["curve"]))[: len(s["curve"])]
        style = "-" if s["method"] == "spa" else "--"
        ax.plot(seen, s["curve"], style, marker="o", markersize=3, label=f"{s['label']} ({s['avg_acc']:.1f})")
    ax.set_xlabel("classes seen")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_matrix(matrix: np.ndarray, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(runs: Sequence[str | Path], out: Optional[str | Path] = None) -> str:
    """Write report.md, report.csv and curves.png (and one matrix PNG per run) to `out`; return the Markdown table."""
    summaries = [load_run(r) for r in runs]
    out = Path(out) if out else Path(runs[0]).resolve().parent
    make_dirs(out)
    table = markdown_table(summaries)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER + ["curve", "folder"])
    for s, row in zip(summaries, table_rows(summaries)):
        writer.writerow(row + [" ".join(f"{v:.2f}" for v in s["curve"]), s["folder"]])
    atomic_write_text(out / "report.csv", buffer.getvalue())
    plot_curves(summaries, out / "curves.png")
    pictures = ["![accuracy after each task](curves.png)"]
    for s in summaries:
        name = "matrix_" + "".join(ch if ch.isalnum() else "_" for ch in s["label"]).strip("_") + ".png"
        plot_matrix(read_matrix(s["folder"]), out / name, f"{s['label']}: accuracy matrix")
        pictures.append(f"![{s['label']} accuracy matrix]({name})")
    atomic_write_text(out / "report.md", "# spacil report\n\n" + table + "\n\n" + "\n\n".join(pictures) + "\n")
    return table
