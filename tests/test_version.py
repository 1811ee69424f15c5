"""One version, kept in spacil.__version__: what `spacil --version` prints, what pyproject.toml builds the package with,
the CHANGELOG's top section, and what every store and run records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import spacil
from spacil.cli import main
from spacil.store.format import write_store

ROOT = Path(__file__).resolve().parents[1]


def test_spacil_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"spacil {spacil.__version__}"


def test_pyproject_and_changelog_agree_with_the_package():
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(ROOT / "pyproject.toml", expand=True, ignore_option_errors=False)["project"]
    assert project["version"] == spacil.__version__  # setuptools reads spacil.__version__ (dynamic), no second copy
    top = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert top and top.group(1) == spacil.__version__, "CHANGELOG.md's top section names another version"


def test_installed_metadata_agrees():
    from importlib.metadata import version

    # pip's record of the installed package; a mismatch means the environment predates the last bump (pip install -e .)
    assert version("spacil") == spacil.__version__


def test_stores_and_runs_record_the_version(random_store, tmp_path):
    import numpy as np

    written = write_store(tmp_path / "written", classes=["a", "b"], dataset="x", backbone={},
                          splits={"train": (np.eye(2, dtype=np.float16), None, np.arange(2))})
    assert json.loads((written / "meta.json").read_text())["spacil_version"] == spacil.__version__
    assert main(["run", "--features", str(random_store), "--method", "zeroshot", "--init-cls", "6", "--increment", "6",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["spacil_version"] == spacil.__version__
