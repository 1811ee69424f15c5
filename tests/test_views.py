"""Stored views (store/views.py): deterministic, resumable byte-identically after a kill, added to a finished store without
touching its other arrays, checked by `spacil check`, and their transforms."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from spacil.cli import main
from spacil.errors import InputError
from spacil.store.check import check_store
from spacil.store.extract import extract_store
from spacil.store.format import FeatureStore
from spacil.store.views import FlipJitter, GaussianNoise, add_views, make_view_transform, normalise_pixels


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_store(tiny_model, shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("views") / "store"
    extract_store("shapes", shapes_root, out, model=tiny_model, pretrained=None, batch_size=8, progress=False, device="cpu")
    return out


def _views(store, shapes_root, tiny_model, **kwargs):
    return add_views(store, "shapes", shapes_root, kwargs.pop("count", 2), kwargs.pop("transform", GaussianNoise(0.25)),
                     seed=3, model=tiny_model, pretrained=None, device="cpu", batch_size=8, progress=False, **kwargs)


def test_views_are_added_without_touching_the_rest_and_resume_byte_identical(finished_store, shapes_root, tiny_model,
                                                                             tmp_path, monkeypatch):
    before = _digest(finished_store)
    whole = tmp_path / "whole"
    shutil.copytree(finished_store, whole)
    _views(whole, shapes_root, tiny_model)
    after = _digest(whole)
    assert {k: v for k, v in after.items() if k in before and k != "meta.json"} == \
        {k: v for k, v in before.items() if k != "meta.json"}
    meta = json.loads((whole / "meta.json").read_text())
    assert meta["views"] == {"count": 2, "transform": "gaussian-noise", "params": {"noise": 0.25}, "seed": 3,
                             "arrays": meta["views"]["arrays"]}
    store = FeatureStore(whole)
    views = np.load(whole / "train" / "views_global.npy")
    assert views.shape == (len(store.split("train")), 2, store.dim)
    assert not np.array_equal(views[:, 0], views[:, 1])
    assert not np.array_equal(views[:, 0], np.asarray(store.split("train").global_))
    assert check_store(whole) == []
    _views(whole, shapes_root, tiny_model)  # again: nothing to do
    assert _digest(whole) == after
    # stopped after one batch, then resumed
    cut = tmp_path / "cut"
    shutil.copytree(finished_store, cut)
    _views(cut, shapes_root, tiny_model, max_batches=1)
    assert "views" not in json.loads((cut / "meta.json").read_text()) and (cut / ".views.progress.json").exists()
    _views(cut, shapes_root, tiny_model)
    assert _digest(cut) == after
    # killed at each record write in turn (the rows of that batch written, not yet recorded), then rerun
    import spacil.store.views as views_module

    real = views_module.atomic_write_text
    for kill_at in (1, 2, 3):
        calls = [0]

        def dying(path, text, kill_at=kill_at, calls=calls):
            calls[0] += 1
            if calls[0] == kill_at:
                raise KeyboardInterrupt
            real(path, text)

        killed = tmp_path / f"kill_{kill_at}"
        shutil.copytree(finished_store, killed)
        monkeypatch.setattr(views_module, "atomic_write_text", dying)
        with pytest.raises(KeyboardInterrupt):
            _views(killed, shapes_root, tiny_model)
        monkeypatch.setattr(views_module, "atomic_write_text", real)
        _views(killed, shapes_root, tiny_model)
        assert _digest(killed) == after, kill_at
    with pytest.raises(InputError, match="views made otherwise"):
        _views(whole, shapes_root, tiny_model, count=3)


def test_transforms_are_deterministic_per_image():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    for transform in (GaussianNoise(0.25), FlipJitter()):
        a = transform(images, np.array([0, 1, 2]), 0, 7)
        b = transform(images[1:], np.array([1, 2]), 0, 7)  # another batch: the same image, the same view
        assert torch.equal(a[1:], b)
        assert not torch.equal(transform(images, np.array([0, 1, 2]), 1, 7), a)
    pixels = images.float() / 255
    noisy = GaussianNoise(0.0)(images, np.arange(3), 0, 0)
    assert torch.allclose(noisy, normalise_pixels(pixels).clamp(0, 1))  # ENGINE clamps the normalised tensor
    with pytest.raises(InputError, match="view-transform"):
        make_view_transform("rotate")


def test_extract_command_writes_views_and_pairwise_descriptions(tiny_model, shapes_root, tmp_path, capsys):
    from spacil.data import open_dataset

    names, _ = open_dataset("shapes", shapes_root)
    pairs = {a: {b: [f"{a} differs from {b}", "it has a plain edge"] for b in names} for a in names}
    file = tmp_path / "des.json"
    file.write_text(json.dumps(pairs))
    out = tmp_path / "store"
    args = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
            "--device", "cpu", "--batch-size", "8", "--out", str(out), "--quiet"]
    assert main(args + ["--views", "2", "--view-transform", "flip-jitter"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["views"]["transform"] == "flip-jitter" and meta["views"]["count"] == 2
    assert main(args + ["--pairwise-descriptions", str(file)]) == 0  # added to the finished store
    store = FeatureStore(out)
    assert store.pairwise is not None and store.pairwise.mask.shape[:2] == (len(names), len(names))
    assert json.loads((out / "meta.json").read_text())["views"] == meta["views"]  # kept
    assert main(["check", str(out), "--quiet"]) == 0
    assert main(args[:-1] + ["--view-transform", "flip-jitter"]) == 2  # a transform without a count
    assert "--views" in capsys.readouterr().err
