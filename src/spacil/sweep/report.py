"""`spacil report SWEEP_DIR`: the tables of a sweep, laid out like the PROOF / ENGINE tables.

Rows are methods (or method-variants), each data set and split is a column pair (Ā = average accuracy over the tasks, A_B =
accuracy after the last task), every entry is mean +- sample standard deviation over the seeds that finished. Written as
Markdown (report.md), CSV (report.csv, one line per row and data set, with each seed's value), LaTeX (report.tex, booktabs)
and one plot per data set and split of the mean accuracy curve with a band of one standard deviation.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from spacil.errors import InputError
from spacil.fileio import atomic_save_figure, atomic_write_text, make_dirs, read_json
from spacil.report import dataset_title, load_run, split_label
from spacil.sweep.cell import MANIFEST


@dataclass
class Group:
    """The runs of one (data set and split, method or variant) over the seeds."""

    entry: str
    row: str
    expected: int = 0  # seeds in the grid
    summaries: list[dict] = field(default_factory=list)  # complete runs only
    incomplete: int = 0

    def values(self, key: str) -> np.ndarray:
        return np.array([s[key] for s in self.summaries], dtype=float)

    def mean_std(self, key: str) -> tuple[float, Optional[float]]:
        values = self.values(key)
        if len(values) == 0:
            return float("nan"), None
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def is_sweep_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / MANIFEST).is_file() or (not (path / "summary.json").exists() and any(path.glob("*/*/seed*/summary.json")))


def _cells(folder: Path) -> list[dict]:
    manifest = folder / MANIFEST
    if manifest.is_file():
        cells = read_json(manifest).get("cells")
        if not isinstance(cells, list):
            raise InputError(f"{manifest}: key 'cells' missing or not a list")
        return cells
    found = []
    for summary in sorted(folder.glob("*/*/seed*/summary.json")):
        run = summary.parent
        found.append({"entry": run.parent.parent.name, "row": run.parent.name, "folder": str(run.relative_to(folder))})
    return found


def collect(folder: str | Path) -> tuple[list[str], list[str], dict[tuple[str, str], Group]]:
    """Entries (column groups) and rows in grid order, and each (entry, row) group's finished runs."""
    folder = Path(folder)
    cells = _cells(folder)
    if not cells:
        raise InputError(f"{folder}: no sweep here (no {MANIFEST} and no <entry>/<row>/seed<S>/summary.json)")
    entries = list(dict.fromkeys(c["entry"] for c in cells))
    rows = list(dict.fromkeys(c["row"] for c in cells))
    groups: dict[tuple[str, str], Group] = {}
    for cell in cells:
        group = groups.setdefault((cell["entry"], cell["row"]), Group(cell["entry"], cell["row"]))
        group.expected += 1
        if not (folder / cell["folder"] / "summary.json").is_file():
            continue
        summary = load_run(folder / cell["folder"])  # the same checks as `spacil report RUN_DIR`
        if summary.get("complete"):
            group.summaries.append(summary)
        else:
            group.incomplete += 1
    return entries, rows, groups


def column_titles(entries: list[str], groups: dict[tuple[str, str], Group], cells: list[dict]) -> dict[str, str]:
    """Each entry's column title: '<data set name> <split>' from its runs (the grid's data set when none finished),
    prefixed by the entry's name when two would read alike."""
    titles = {}
    for entry in entries:
        sample = next((s for (e, _), g in groups.items() if e == entry for s in g.summaries), None)
        if sample is not None:
            titles[entry] = f"{dataset_title(sample.get('dataset', entry))} {split_label(sample)}".strip()
        else:
            dataset = next((c.get("dataset") for c in cells if c["entry"] == entry and c.get("dataset")), None)
            titles[entry] = dataset_title(dataset) if dataset else entry
    counts = list(titles.values())
    return {e: (t if counts.count(t) == 1 or t == e else f"{e} ({t})") for e, t in titles.items()}


def row_titles(rows: list[str], groups: dict[tuple[str, str], Group]) -> dict[str, str]:
    """Each row's title: the label its runs carry ('spa (no OT)'), the row's id when none finished or two would read
    alike."""
    titles = {}
    for row in rows:
        sample = next((s for (_, r), g in groups.items() if r == row for s in g.summaries), None)
        titles[row] = sample["label"] if sample is not None else row
    counts = list(titles.values())
    return {r: (t if counts.count(t) == 1 else f"{t} [{r}]") for r, t in titles.items()}


def _format(mean: float, std: Optional[float], group: Group, latex: bool = False, bold: bool = False) -> str:
    if np.isnan(mean):
        return "-"
    text = f"{mean:.2f}"
    if bold:
        text = f"\\textbf{{{text}}}" if latex else f"**{text}**"
    if std is not None:
        text += f"{{\\scriptsize$\\pm${std:.2f}}}" if latex else f" ± {std:.2f}"
    if len(group.summaries) < group.expected:
        text += f" ({len(group.summaries)}/{group.expected})" if not latex else f"$^{{{len(group.summaries)}/{group.expected}}}$"
    return text


def _best(entries, rows, groups, key) -> dict[str, float]:
    best = {}
    for entry in entries:
        means = [groups[(entry, r)].mean_std(key)[0] for r in rows if (entry, r) in groups]
        means = [m for m in means if not np.isnan(m)]
        best[entry] = max(means) if len(means) > 1 else float("nan")
    return best


def _row_cells(entries, row, groups, best, latex: bool = False) -> list[str]:
    """One table row's cells: mean +- std of Ā and A_B per entry (empty where the grid has no such run), best in bold."""
    cells = []
    for entry in entries:
        group = groups.get((entry, row))
        for key in ("avg_acc", "last_acc"):
            if group is None:
                cells.append("")
                continue
            mean, std = group.mean_std(key)
            cells.append(_format(mean, std, group, latex=latex, bold=mean == best[key][entry]))
    return cells


def markdown(entries, rows, groups, titles, row_names) -> str:
    header = ["method"] + [part for e in entries for part in (f"{titles[e]} Ā", "A_B")]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    best = {key: _best(entries, rows, groups, key) for key in ("avg_acc", "last_acc")}
    for row in rows:
        lines.append("| " + " | ".join([row_names[row]] + _row_cells(entries, row, groups, best)) + " |")
    return "\n".join(lines)


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%").replace("#", "\\#")


def latex(entries, rows, groups, titles, row_names) -> str:
    best = {key: _best(entries, rows, groups, key) for key in ("avg_acc", "last_acc")}
    lines = ["% spacil report: mean +- sample std over seeds; needs \\usepackage{booktabs}",
             "\\begin{tabular}{l" + "cc" * len(entries) + "}", "\\toprule",
             " & " + " & ".join(f"\\multicolumn{{2}}{{c}}{{{_tex(titles[e])}}}" for e in entries) + " \\\\",
             " ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(entries))),
             "Method & " + " & ".join("$\\bar{A}$ & $A_B$" for _ in entries) + " \\\\", "\\midrule"]
    for row in rows:
        lines.append(" & ".join([_tex(row_names[row])] + _row_cells(entries, row, groups, best, latex=True)) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(entries, rows, groups, titles, row_names) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["entry", "data", "method", "label", "seeds_done", "seeds_in_grid", "incomplete", "avg_acc_mean", "avg_acc_std",
                     "last_acc_mean", "last_acc_std", "forgetting_mean", "seeds", "avg_acc_per_seed", "last_acc_per_seed"])
    for entry in entries:
        for row in rows:
            group = groups.get((entry, row))
            if group is None:
                continue
            numbers = []
            for key in ("avg_acc", "last_acc"):
                mean, std = group.mean_std(key)
                numbers += ["" if np.isnan(mean) else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
            forgetting = group.mean_std("forgetting")[0] if group.summaries else float("nan")
            writer.writerow([entry, titles[entry], row, row_names[row], len(group.summaries), group.expected, group.incomplete, *numbers,
                             "" if np.isnan(forgetting) else f"{forgetting:.4f}",
                             " ".join(str(s.get("seed", "")) for s in group.summaries),
                             " ".join(f"{v:.4f}" for v in group.values("avg_acc")),
                             " ".join(f"{v:.4f}" for v in group.values("last_acc"))])
    return buffer.getvalue()


def plot_entry(entry: str, title: str, rows: list[str], groups: dict[tuple[str, str], Group], path: Path,
               row_names: Optional[dict[str, str]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spacil.plotstyle import fonts_for, legend_outside, run_styles

    drawn = [row for row in rows if groups.get((entry, row)) is not None and groups[(entry, row)].summaries]
    names = [(row_names or {}).get(row, row) for row in drawn]
    # SPA's family (method spa) warm and dashed, SPA itself (label 'spa') solid
    styles = run_styles([(groups[(entry, row)].summaries[0]["method"], groups[(entry, row)].summaries[0]["label"])
                         for row in drawn])
    with fonts_for(names + [title]) as shown:
        fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
        for row, name, style in zip(drawn, names, styles):
            group = groups[(entry, row)]
            curves = np.array([s["curve"] for s in group.summaries if len(s["curve"]) == len(group.summaries[0]["curve"])])
            seen = np.cumsum(group.summaries[0].get("task_sizes") or [1] * curves.shape[1])[: curves.shape[1]]
            mean, std = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
            ax.plot(seen, mean, label=f"{shown(name)} ({mean.mean():.1f})", **style.plot_kwargs())
            ax.fill_between(seen, mean - std, mean + std, color=style.color, alpha=0.15)
        ax.set_xlabel("classes seen")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{shown(title)}: mean over seeds (band: one std)")
        ax.grid(alpha=0.3)
        legend_outside(ax, title="row (average accuracy)")
        fig.tight_layout()
    try:
        atomic_save_figure(path, fig)
    finally:
        plt.close(fig)


def write_sweep_report(folder: str | Path, out: Optional[str | Path] = None) -> str:
    """Write report.md, report.csv, report.tex and curves_<entry>.png for the sweep in `folder`; return the Markdown table."""
    folder = Path(folder)
    entries, rows, groups = collect(folder)
    out = Path(out) if out else folder
    make_dirs(out)
    titles = column_titles(entries, groups, _cells(folder))
    row_names = row_titles(rows, groups)
    table = markdown(entries, rows, groups, titles, row_names)
    atomic_write_text(out / "report.csv", csv_text(entries, rows, groups, titles, row_names))
    atomic_write_text(out / "report.tex", latex(entries, rows, groups, titles, row_names))
    pictures = []
    for entry in entries:
        name = "curves_" + "".join(ch if ch.isalnum() else "_" for ch in entry) + ".png"
        if any(groups.get((entry, r)) and groups[(entry, r)].summaries for r in rows):
            plot_entry(entry, titles[entry], rows, groups, out / name, row_names)
            pictures.append(f"![{titles[entry]}]({name})")
    done = sum(len(g.summaries) for g in groups.values())
    total = sum(g.expected for g in groups.values())
    note = (f"Mean ± sample standard deviation over seeds ({done} of {total} runs finished; '(n/m)': n of m seeds). "
            "Ā: average of the accuracies after each task; A_B: accuracy after the last task.")
    atomic_write_text(out / "report.md", "# spacil sweep report\n\n" + table + "\n\n" + note + "\n\n" + "\n\n".join(pictures) + "\n")
    return table
