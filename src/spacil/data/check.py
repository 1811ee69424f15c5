"""`spacil data check`: read a data set's tree, open every image, and say on one screen what an extraction would get.

The screen: classes found against the protocol's count, images per split (total, fewest and most per class), where the
names came from and every name that differs from its folder, then one line per fault (unreadable images, empty class
folders, two classes with one name, a class count or names-file mismatch). Exit 2 on any fault, else 0 and the
`spacil extract` command to run next. `spacil extract` runs the same check without opening the images
(`spacil.data.folders.index_dataset`).
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Callable, Optional

from spacil.data.folders import SPLITS, DatasetIndex, index_dataset
from spacil.data.names import load_names_file, normalise_name

SHOWN_RENAMES = 12  # renamed classes listed in full on a screen; the rest are counted


def add_names_and_templates(p) -> None:
    """The options of `extract`, `data check` and `describe` that name a data set's classes and templates."""
    p.add_argument("--class-names", help="class names by folder index: a JSON list, a JSON {dataset: [names]} or one per line")
    p.add_argument("--templates", help="prompt templates (a JSON list or one per line, each with {}); default: the data set's")


def add_data_parser(sub) -> None:
    """`spacil data check` (the CLI adds it with this)."""
    data = sub.add_parser("data", help="data sets: `data check` reads a tree and every image before an extraction")
    p = data.add_subparsers(dest="data_command", required=True).add_parser("check", help="check a data set (docs/data.md)")
    p.add_argument("--dataset", required=True, help="a benchmark key, or folder:NAME for <data-root>/NAME")
    p.add_argument("--data-root", required=True)
    p.add_argument("--names-file", help="class names the derived ones must equal")
    add_names_and_templates(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def unreadable_images(index: DatasetIndex, progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Open and decode every image as an extraction would (`SplitIndex.loader`); one line per file that fails."""
    faults = []
    for split in SPLITS:
        part = index.splits[split]
        for item in part.items:
            try:
                part.loader(item)
            except Exception as err:  # noqa: BLE001 - any decoding failure is reported by path
                faults.append(f"{item}: unreadable image ({type(err).__name__}: {err})")
            if progress:
                progress(1)
    return faults


def names_file_faults(index: DatasetIndex, names_file: str | Path) -> list[str]:
    """`--names-file`: a list of another length, or names that differ, is a fault of the check (a warning in extract)."""
    listed = load_names_file(names_file, index.spec.key)
    if len(listed) != len(index.names):
        return [f"--names-file {names_file}: {len(listed)} names for the {len(index.names)} class folders"]
    bad = [i for i, (a, b) in enumerate(zip(index.names, listed)) if normalise_name(a) != normalise_name(b)]
    if bad:
        return [f"--names-file {names_file}: {len(bad)} names differ from the derived ones (first: index {bad[0]}, "
                f"'{index.names[bad[0]]}' vs '{listed[bad[0]]}')"]
    return []


def _folder_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").split())


def format_report(index: DatasetIndex, data_root: str | Path, faults: list[str], extra_args: list[str]) -> str:
    """The screen `spacil data check` prints on standard output (its faults also go to standard error, one line each)."""
    spec = index.spec
    expected = f" (the protocol's {spec.title}: {spec.num_classes})" if spec.num_classes else " (any number: folder:NAME)"
    lines = [f"{spec.key}: {index.root}", f"classes: {len(index.folders)}{expected}"]
    for split in SPLITS:
        counts = index.splits[split].counts(len(index.folders))
        low, high = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
        lines.append(f"{split}: {int(counts.sum())} images, {low} to {high} per class")
    renamed = [(f, n) for f, n in zip(index.folders, index.names) if _folder_name(f) != n]
    lines.append(f"class names: {index.names_source}; {len(renamed)} of {len(index.names)} differ from their folder")
    for folder, name in renamed[:SHOWN_RENAMES]:
        lines.append(f"  {folder} -> {name}")
    if len(renamed) > SHOWN_RENAMES:
        lines.append(f"  ... and {len(renamed) - SHOWN_RENAMES} more")
    if faults:
        lines.append(f"{len(faults)} fault{'s' if len(faults) > 1 else ''}:")
        lines += [f"  {fault}" for fault in faults]
    else:
        command = ["spacil", "extract", "--dataset", spec.key, "--data-root", str(data_root), *extra_args,
                   "--out", f"stores/{spec.root_name}"]
        lines += ["no fault found; next:", "  " + shlex.join(command)]
    return "\n".join(lines)


def run_data_check(dataset: str, data_root: str, class_names: Optional[str] = None, names_file: Optional[str] = None,
                   templates: Optional[str] = None, quiet: bool = False, echo: Callable[[str], None] = print) -> int:
    """The command: the screen on standard output, each fault also on standard error; 2 on any fault, else 0."""
    import sys

    from tqdm import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the names-file comparison is a fault line here, not a warning
        index = index_dataset(dataset, data_root, class_names=class_names, templates=templates)
    faults = list(index.faults)
    if names_file is not None:
        faults += names_file_faults(index, names_file)
    total = sum(len(index.splits[split].items) for split in SPLITS)
    with tqdm(total=total, desc=f"open {index.spec.key} images", unit="img", disable=quiet, leave=False) as bar:
        faults += unreadable_images(index, bar.update)
    extra = []
    for flag, value in (("--class-names", class_names), ("--templates", templates)):
        if value is not None:
            extra += [flag, str(value)]
    echo(format_report(index, data_root, faults, extra))
    for fault in faults:
        print(f"spacil: error: {fault}", file=sys.stderr)
    return 2 if faults else 0
