"""Issue 26: every file spacil writes goes through spacil.fileio, figures and images included: a failed write (a full disk,
a read-only folder) is exit 2 in one line naming the path and the free space, and leaves no partial or empty file."""

import errno
from pathlib import Path

import pytest

from conftest import make_random_store, no_partial_files
from spacil.cli import main
from spacil.errors import InputError


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spacil: error: "), err
    return err


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_a_failed_figure_or_image_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """By injection (any machine): the disk fills while the rendered bytes are written."""
    from PIL import Image

    import spacil.fileio as fileio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    for path, write in ((tmp_path / "curves.png", lambda p: fileio.atomic_save_figure(p, _figure())),
                        (tmp_path / "grid.png", lambda p: fileio.atomic_save_image(p, Image.new("RGB", (8, 8)))),
                        (tmp_path / "world.npz", lambda p: fileio.atomic_save_npz(p, a=[1, 2]))):
        with pytest.raises(InputError, match=f"{path}: cannot write \\(No space left on device; .* free\\)"):
            write(path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    fileio.atomic_save_figure(tmp_path / "curves.png", _figure())  # the format follows the suffix
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def finished_run(tmp_path) -> Path:
    store = make_random_store(tmp_path / "store", num_classes=6, dim=8, num_patches=4, train=4, test=2)
    assert main(["run", "--features", str(store), "--method", "simplecil", "--init-cls", "3", "--increment", "3",
                 "--quiet", "--out", str(tmp_path / "runs" / "simplecil")]) == 0
    return tmp_path / "runs" / "simplecil"


def test_report_on_a_full_disk_and_a_readonly_folder(finished_run, full_disk, readonly_disk, capsys):
    assert main(["report", str(finished_run), "--out", str(full_disk / "report")]) == 2
    err = _one_line(capsys)
    assert str(full_disk / "report") in err and "No space left on device" in err and "free" in err
    assert no_partial_files(full_disk)
    assert main(["report", str(finished_run), "--out", str(readonly_disk / "report")]) == 2
    assert f"{readonly_disk / 'report'}: cannot write (Read-only file system" in _one_line(capsys)


def test_describe_grid_image_on_a_full_disk(shapes_root, tiny_model, full_disk, capsys, monkeypatch):
    from llm_server import LLMServer

    monkeypatch.setenv("SPACIL_TEST_KEY", "test-key")
    out = full_disk / "descriptions.json"
    with LLMServer({}) as server:
        assert main(["describe", "--dataset", "shapes", "--data-root", str(shapes_root), "--out", str(out),
                     "--base-url", server.base_url, "--api-key-env", "SPACIL_TEST_KEY", "--clip-model", tiny_model,
                     "--pretrained", "", "--num-descriptions", "4", "--visual-samples", "3", "--quiet"]) == 2
    err = _one_line(capsys)
    assert f"{full_disk / 'descriptions_grids'}" in err and "No space left on device" in err and "free" in err
    assert no_partial_files(full_disk)


def test_nothing_outside_fileio_opens_a_file_for_writing_or_makes_a_folder():
    """The one writer: a grep of the package for the calls that write (fileio itself aside)."""
    import re

    import spacil

    package = Path(spacil.__file__).parent
    writes = re.compile(r"\.savefig\(|np\.save|\.mkdir\(|\.write_text\(|\.write_bytes\(|open\([^)]*[\"'][wax]b?\+?[\"']|"
                        r"torch\.save\((?!.*, buffer\))|\.save\((?!buffer)[^)]*\.png")
    found = [f"{path.relative_to(package)}:{number}: {line.strip()}"
             for path in package.rglob("*.py") if path.name != "fileio.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert found == [], found


def test_a_memory_map_created_on_a_full_disk_is_one_line_not_a_sigbus(full_disk):
    """Stored views are written through memory maps created at their final size: their blocks are reserved first."""
    from spacil.fileio import reserve_space

    sparse = full_disk / "views_global.npy"
    with open(sparse, "wb") as handle:  # a sparse file of 1 MiB: creating it takes no room
        handle.truncate(1 << 20)
    with pytest.raises(InputError, match=f"{sparse}: cannot write \\(No space left on device; .* free\\)"):
        reserve_space(sparse)
