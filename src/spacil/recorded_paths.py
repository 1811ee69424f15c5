"""Paths spacil records in its files, so that they resolve from any working directory (docs/interfaces.md).

A path a file records is written relative to the folder of that file: a run folder's config.yaml names its store (and the
other path keys of `data`) relative to the run folder, a store's meta.json names its descriptions files relative to the
store folder. Read back, such a path resolves against that folder, whatever the working directory, and still does after
the folders are moved together (a store moved with its runs). A sweep's worker configs (`.sweep/configs/`, read by
`spacil run --config` in a worker that may start elsewhere) record absolute paths.

Files written before spacil 0.4 hold paths as given on the command line, relative to where that command ran: when
nothing lies at the recorded place relative to the folder, such a path is read from the working directory, as then.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

# the keys of a config's `data` section that name files or folders (data.pretrained, a tag or a file, is kept as given)
DATA_PATH_KEYS = ("features", "data_root", "descriptions", "pairwise_descriptions", "names_file", "class_names",
                  "templates")


def relative_to(path: str | Path, folder: str | Path) -> str:
    """`path` (relative to the working directory, or absolute) as a POSIX path relative to `folder`."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


def resolve_recorded(value: str | Path, folder: str | Path) -> Path:
    """A path recorded by a file in `folder`, as an absolute path: an absolute one as it is; a relative one against
    `folder`, or, when nothing is there but something is at `value` from the working directory (a file of spacil
    before 0.4), that."""
    path = Path(value)
    if path.is_absolute():
        return path
    recorded = Path(os.path.normpath(os.path.abspath(Path(folder) / path)))
    if not recorded.exists() and path.exists():
        return Path(os.path.abspath(path))
    return recorded


def _map_data_paths(tree: dict, convert) -> dict:
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree
    data = {key: (convert(value) if key in DATA_PATH_KEYS and isinstance(value, str) and value else value)
            for key, value in data.items()}
    return {**tree, "data": data}


def record_data_paths(tree: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """A config tree (Config.to_dict) with its data paths relative to `folder`, the folder of the file it is written to."""
    return _map_data_paths(tree, lambda value: relative_to(value, folder))


def resolve_data_paths(tree: dict[str, Any], folder: Optional[str | Path]) -> dict[str, Any]:
    """A config tree read from a file in `folder` with its data paths absolute (resolve_recorded); with `folder` None
    (a config given by the user), relative to the working directory."""
    if folder is None:
        return _map_data_paths(tree, os.path.abspath)
    return _map_data_paths(tree, lambda value: str(resolve_recorded(value, folder)))
