"""Issue 23.5: the store's size is estimated before an extraction writes anything, and a disk too small for it is exit 2
naming both figures; a resumed extraction counts only what it has left. ImageNet-1k at ViT-B/16 is about 260 GB."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from spacil.cli import main
from spacil.data.store_size import StoreShape, estimate_store, format_bytes, model_shape
from spacil.errors import InputError

Usage = namedtuple("Usage", "total used free")


def _fake_free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(*real(path)[:2], free))


def test_imagenet1k_at_vit_b16_is_about_260_gb():
    shape = model_shape("ViT-B-16")
    assert shape == StoreShape(dim=512, num_patches=196, width=768)
    rows = {"train": 1_281_167, "test": 50_000}  # ILSVRC-2012's train and val images
    estimate = estimate_store(shape, "float16", rows, with_pre=True, classes=1000, templates=80)
    assert 250e9 < estimate.total < 280e9  # 270.6 GB = 252 GiB
    assert estimate.parts["patches"] == sum(rows.values()) * 196 * 512 * 2
    assert estimate.parts["z"] == sum(rows.values()) * 768 * 2
    assert estimate_store(shape, "float32", rows, with_pre=True).total > 2 * 260e9
    assert format_bytes(estimate.total).endswith(" GB") and format_bytes(950) == "950 B"


def test_a_disk_too_small_stops_extraction_before_any_write(tiny_model, shapes_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stores" / "shapes"
    _fake_free(monkeypatch, 12_000)  # 12 kB: the tiny store needs about 50 kB
    command = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained",
               "", "--out", str(out)]
    assert main(command) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith(f"spacil: error: --out {out}: the store needs about ")
    assert "only 12.0 kB free there" in err
    assert "store size: about" in captured.out and "patches" in captured.out and "12.0 kB free at" in captured.out
    assert not out.exists()  # nothing written, not even the folder


def test_a_real_small_disk_is_refused_before_any_write(tiny_model, shapes_root, tmp_path, capsys):
    """On a real 12 kB tmpfs (where the test runs as root and may mount one)."""
    import subprocess

    from test_robustness import _small_disk

    disk = tmp_path / "disk"
    if not _small_disk(disk, "12k"):
        pytest.skip("no small tmpfs here (needs root and mount)")
    try:
        assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model,
                     "--pretrained", "", "--quiet", "--out", str(disk / "store")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {disk / 'store'}: the store needs about " in err and " free there" in err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_resumed_extraction_counts_only_what_is_left(tiny_model, shapes_root, tmp_path, monkeypatch):
    import spacil.store.extract as extract

    seen = []
    real_room_line = extract.room_line
    monkeypatch.setattr(extract, "room_line", lambda out, estimate, *what: seen.append(estimate)
                        or real_room_line(out, estimate, *what))
    common = dict(model=tiny_model, pretrained=None, batch_size=8, progress=False, device="cpu")
    out = tmp_path / "store"
    # 24 training and 12 test images; two batches of 8 written, then stopped
    extract.extract_store("shapes", shapes_root, out, max_batches=2, **common)
    whole, = seen
    row_bytes = whole.parts["patches"] // 36
    assert whole.parts["patches"] == 36 * row_bytes and whole.parts["labels and paths"] > 0
    # free space between what is left and the whole: a new extraction is refused, the resumed one goes on
    _fake_free(monkeypatch, (whole.total + (whole.total - 16 * row_bytes)) // 2)
    with pytest.raises(InputError, match="the store needs about"):
        extract.extract_store("shapes", shapes_root, tmp_path / "other", **common)
    assert not (tmp_path / "other").exists()
    extract.extract_store("shapes", shapes_root, out, **common)
    left = seen[-1]
    assert left.parts["patches"] == 20 * row_bytes  # the 20 rows no record names done
    assert left.parts["labels and paths"] > 0  # the test split was not begun: its labels and paths are still to write
    assert (out / "meta.json").is_file()
    # the whole estimate is the store's bytes but for the .npy headers (128 bytes each here) and meta.json
    files = [p for p in out.rglob("*") if p.is_file()]
    slack = 128 * sum(p.suffix == ".npy" for p in files) + (out / "meta.json").stat().st_size
    assert 0 <= sum(p.stat().st_size for p in files) - whole.total <= slack
