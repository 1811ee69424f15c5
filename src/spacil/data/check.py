"""`spacil data check`: read a data set's tree, open every image, and say on one screen what an extraction would get.

The screen: classes found against the protocol's count, images per split (total, fewest and most per class), where the
names came from and every name that differs from its folder in any way, the store's estimated size against the free
space at `--out`, then one line per fault (unreadable images, empty class folders, two classes with one name, a class
count or names-file mismatch, a disk too small). Exit 2 on any fault, else 0 and the `spacil extract` command to run
next, with every flag it needs (model, checkpoint, out). `spacil extract` runs the same check without opening the images
(`spacil.data.folders.index_dataset`).
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Callable, Optional

from spacil.data.folders import SPLITS, DatasetIndex, index_dataset
from spacil.data.names import load_names_file, normalise_name
from spacil.data.store_size import estimate_store, model_shape, room_line

SHOWN_RENAMES = 12  # renamed classes listed in full on a screen; the rest are counted
DEFAULT_MODEL, DEFAULT_TAG = "ViT-B-16", "laion400m_e32"  # `spacil extract`'s defaults
CHECKPOINT_PLACEHOLDER = "PATH/TO/open_clip_pytorch_model.bin"


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
    # what the extraction will be: its store's size is checked against the free space at --out, and the suggested
    # `spacil extract` names them all
    p.add_argument("--model", default=DEFAULT_MODEL, help="the open_clip model the store will be extracted with")
    p.add_argument("--pretrained", help="its checkpoint (a local file, or a tag where there is network)")
    p.add_argument("--out", help="where the store will be written (default: stores/<data set>)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="the store's dtype")
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


def store_size_line(index: DatasetIndex, model: str, dtype: str, out: str | Path) -> tuple[str, Optional[str]]:
    """(the store's estimated size and the free space at `out`, a fault when it does not fit), for a default extraction
    (z written, no views or descriptions) with `model`'s sizes from its open_clip config."""
    shape = model_shape(model)
    if shape is None:
        return f"store size: not known before {model} is built (spacil extract says it before writing)", None
    rows = {split: len(index.splits[split].items) for split in SPLITS}
    estimate = estimate_store(shape, dtype, rows, with_pre=True, classes=len(index.names),
                              templates=len(index.spec.templates),
                              paths={split: index.splits[split].paths for split in SPLITS})
    return room_line(out, estimate, f" for {model} in {dtype}")


def extract_command(index: DatasetIndex, data_root: str | Path, model: str, pretrained: Optional[str], out: str | Path,
                    extra_args: list[str]) -> list[str]:
    """The `spacil extract` to run next, every flag a user has to supply named: the model, its checkpoint (a placeholder
    for a local file unless one was given: the default tag needs a download; none for a `local-dir:` or `hf-hub:` model,
    which carries its weights) and where the store goes."""
    checkpoint = [] if _carries_weights(model) else ["--pretrained", pretrained or CHECKPOINT_PLACEHOLDER]
    return ["spacil", "extract", "--dataset", index.spec.key, "--data-root", str(data_root), "--model", model,
            *checkpoint, *extra_args, "--out", str(out)]


def _carries_weights(model: str) -> bool:
    return model.startswith(("local-dir:", "hf-hub:"))


def format_report(index: DatasetIndex, data_root: str | Path, faults: list[str], extra_args: list[str],
                  model: str = DEFAULT_MODEL, pretrained: Optional[str] = None, out: Optional[str | Path] = None,
                  size_line: str = "") -> str:
    """The screen `spacil data check` prints on standard output (its faults also go to standard error, one line each)."""
    spec = index.spec
    expected = f" (the protocol's {spec.title}: {spec.num_classes})" if spec.num_classes else " (any number: folder:NAME)"
    lines = [f"{spec.key}: {index.root}", f"classes: {len(index.folders)}{expected}"]
    for split in SPLITS:
        counts = index.splits[split].counts(len(index.folders))
        low, high = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
        lines.append(f"{split}: {int(counts.sum())} images, {low} to {high} per class")
    renamed = [(f, n) for f, n in zip(index.folders, index.names) if f != n]  # any change: `_`, spaces, case, ...
    lines.append(f"class names: {index.names_source}; {len(renamed)} of {len(index.names)} differ from their folder")
    for folder, name in renamed[:SHOWN_RENAMES]:
        lines.append(f"  {folder} -> {name}")
    if len(renamed) > SHOWN_RENAMES:
        lines.append(f"  ... and {len(renamed) - SHOWN_RENAMES} more")
    if size_line:
        lines.append(size_line)
    if faults:
        lines.append(f"{len(faults)} fault{'s' if len(faults) > 1 else ''}:")
        lines += [f"  {fault}" for fault in faults]
    else:
        out = out if out is not None else f"stores/{spec.root_name}"
        lines += ["no fault found; next:", "  " + shlex.join(extract_command(index, data_root, model, pretrained, out,
                                                                            extra_args))]
        if not pretrained and not _carries_weights(model):  # say what the placeholder stands for
            which = (f"{model}'s {DEFAULT_TAG} weights as a local file; `--pretrained {DEFAULT_TAG}` downloads them"
                     if model == DEFAULT_MODEL else f"a local checkpoint file of {model}, or one of its open_clip tags")
            lines.append(f"  ({CHECKPOINT_PLACEHOLDER}: {which} where there is network)")
    return "\n".join(lines)


def run_data_check(dataset: str, data_root: str, class_names: Optional[str] = None, names_file: Optional[str] = None,
                   templates: Optional[str] = None, quiet: bool = False, echo: Callable[[str], None] = print,
                   model: str = DEFAULT_MODEL, pretrained: Optional[str] = None, out: Optional[str] = None,
                   dtype: str = "float16") -> int:
    """The command: the screen on standard output, each fault also on standard error; 2 on any fault (a disk at `out`
    too small for the store included), else 0."""
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
    out = out if out is not None else f"stores/{index.spec.root_name}"
    size_line, size_fault = store_size_line(index, model, dtype, out)
    faults += [size_fault] if size_fault else []
    extra = []
    for flag, value in (("--class-names", class_names), ("--templates", templates),
                        ("--dtype", dtype if dtype != "float16" else None)):
        if value is not None:
            extra += [flag, str(value)]
    echo(format_report(index, data_root, faults, extra, model, pretrained, out, size_line))
    for fault in faults:
        print(f"spacil: error: {fault}", file=sys.stderr)
    return 2 if faults else 0
