"""Shared fixtures. Nothing here touches the network: models are tiny random-weight open_clip models written to tmp,
images are generated, and Hugging Face is forced offline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that would download fails at once instead of reaching out
# The tests' tensors are tiny: one CPU thread is as fast as two on a quiet machine and does not collapse on a busy one
# (spacil.devices.cpu_threads chooses the same for a run on a tiny store; docs/benchmarks/threads.md). OMP_NUM_THREADS or
# MKL_NUM_THREADS set by whoever runs the suite is kept.
if not any(os.environ.get(name, "").strip() for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
    torch.set_num_threads(1)

# ../shared/reference beside the checkout; SPACIL_REFERENCE names another copy (a worktree elsewhere)
REFERENCE = Path(os.environ.get("SPACIL_REFERENCE") or Path(__file__).resolve().parents[2] / "shared" / "reference")


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from spacil.backbone import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    from spacil.demo.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("data")
    write_shapes_dataset(root, train_per_class=6, test_per_class=3, seed=1)
    return root


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_random_store(path: Path, num_classes: int = 12, dim: int = 16, num_patches: int = 9, tokens: int = 3,
                      train: int = 8, test: int = 4, seed: int = 0, ragged: bool = True, templates: int = 0,
                      unbalanced: bool = False, width: int = 0, pairwise: int = 0, views: int = 0, area: int = 0) -> Path:
    """A small store written with plain numpy.save, as another program following INTERFACES.md would.
    templates: also write text/templates.npy (and text/template_norms.npy) with that many tokens per class; unbalanced:
    class c has between half and one and a half times the images per class (a different count for each class); width:
    also write the pre-projection features z [n, width] and backbone/visual_proj.npy [width, dim] (drawn after the
    rest, from their own generator, so every other array is the same with or without them); pairwise: also ENGINE's
    pairwise descriptions with that many slots per pair (ragged); views: also that many stored views of every training
    image (both from a third generator); area: also AREA's inputs (occlusion and area-augment views, two each, and its
    description sets with up to that many sentences per class, from a fourth generator; needs width)."""
    import json

    from spacil.demo.world import lift_to_pre_projection

    rng = np.random.default_rng(seed)
    pre_rng = np.random.default_rng([seed, 18])
    proj = (pre_rng.normal(size=(width, dim)) / np.sqrt(max(width, 1))).astype(np.float32)
    centres = unit(rng.normal(size=(num_classes, dim)))
    for split, per in (("train", train), ("test", test)):
        counts = np.full(num_classes, per)
        if unbalanced:
            counts = np.maximum(1, np.round(per * (0.5 + np.arange(num_classes) / max(num_classes - 1, 1)))).astype(int)
        labels = np.repeat(np.arange(num_classes), counts)
        (path / split).mkdir(parents=True)
        np.save(path / split / "global.npy", unit(centres[labels] + 0.6 * rng.normal(size=(len(labels), dim))).astype(np.float16))
        np.save(path / split / "patches.npy", unit(rng.normal(size=(len(labels), num_patches, dim)) + centres[labels][:, None]).astype(np.float16))
        np.save(path / split / "labels.npy", labels.astype(np.int64))
        if width:
            global_ = np.load(path / split / "global.npy").astype(np.float32)
            np.save(path / split / "global_pre.npy", lift_to_pre_projection(global_, proj, pre_rng).astype(np.float16))
    (path / "text").mkdir()
    np.save(path / "text" / "prompts.npy", unit(centres + 0.3 * rng.normal(size=centres.shape)).astype(np.float32))
    desc = unit(centres[:, None] + 0.5 * rng.normal(size=(num_classes, tokens, dim))).astype(np.float32)
    mask = np.ones((num_classes, tokens), dtype=bool)
    if ragged:
        mask[::3, -1] = False
        desc[~mask] = 0
    np.save(path / "text" / "descriptions.npy", desc)
    np.save(path / "text" / "description_mask.npy", mask)
    if templates:
        np.save(path / "text" / "templates.npy",
                unit(centres[:, None] + 0.3 * rng.normal(size=(num_classes, templates, dim))).astype(np.float32))
        np.save(path / "text" / "template_norms.npy", pre_rng.uniform(5, 15, size=(num_classes, templates)).astype(np.float32))
    meta = {"format": "spacil-features", "version": 1, "dim": dim, "num_patches": num_patches,
            "classes": [f"class {i}" for i in range(num_classes)], "dataset": "random", "backbone": {"logit_scale": 50.0}}
    engine_rng = np.random.default_rng([seed, 19])
    if pairwise:
        prompts = np.load(path / "text" / "prompts.npy")
        pair_units = unit(prompts[:, None, None] + 0.5 * engine_rng.normal(size=(num_classes, num_classes, pairwise, dim)))
        pair_mask = np.ones((num_classes, num_classes, pairwise), dtype=bool)
        pair_mask[::2, :, -1] = False
        pair_units[~pair_mask] = 0
        np.save(path / "text" / "pairwise.npy", pair_units.astype(np.float32))
        np.save(path / "text" / "pairwise_norms.npy",
                (engine_rng.uniform(5, 10, size=pair_mask.shape) * pair_mask).astype(np.float32))
        np.save(path / "text" / "pairwise_mask.npy", pair_mask)
    if views:
        train_global = np.load(path / "train" / "global.npy").astype(np.float32)
        noisy = unit(train_global[:, None] + 0.3 * engine_rng.normal(size=(len(train_global), views, dim)))
        np.save(path / "train" / "views_global.npy", noisy.astype(np.float16))
    if width:
        (path / "backbone").mkdir()
        np.save(path / "backbone" / "visual_proj.npy", proj)
        meta["width"] = width
    if views:
        meta["views"] = {"count": views, "transform": "gaussian-noise", "params": {"noise": 0.25}, "seed": 0,
                         "arrays": ["train/views_global.npy"]}
    if area:
        _write_area_inputs(path, meta, area, np.random.default_rng([seed, 25]))
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _write_area_inputs(path: Path, meta: dict, sentences: int, rng) -> None:
    """AREA's inputs in a random store: views of two transforms (z of altered copies) and the description sets."""
    from spacil.store.area_texts import AREA_SETS, area_text_files
    from spacil.store.format import view_set_files

    pre = np.load(path / "train" / "global_pre.npy").astype(np.float32)
    sets = meta.setdefault("view_sets", {})
    for transform in ("occlusion", "area-augment"):
        g_file, z_file = view_set_files(transform)
        z = pre[:, None] + 0.3 * rng.normal(size=(len(pre), 2, pre.shape[1]))
        g = unit(rng.normal(size=(len(pre), 2, meta["dim"])))
        np.save(path / z_file, z.astype(np.float16))
        np.save(path / g_file, g.astype(np.float16))
        sets[transform] = {"count": 2, "transform": transform, "params": {}, "seed": 0, "arrays": [g_file, z_file]}
    prompts = np.load(path / "text" / "prompts.npy")
    for name in AREA_SETS:
        width = sentences if name in ("clean", "occluded", "augmented") else 1
        units = unit(prompts[:, None] + 0.5 * rng.normal(size=(len(prompts), width, prompts.shape[1])))
        mask = np.ones((len(prompts), width), dtype=bool)
        if width > 1:
            mask[1::2, -1] = False
        units[~mask] = 0
        features, norms, masks = area_text_files(name)
        np.save(path / features, units.astype(np.float32))
        np.save(path / norms, (rng.uniform(5, 10, size=mask.shape) * mask).astype(np.float32))
        np.save(path / masks, mask)
    meta["area_texts"] = {"source": "random", "sets": list(AREA_SETS)}


@pytest.fixture()
def random_store(tmp_path) -> Path:
    return make_random_store(tmp_path / "store")


def interrupt_at_task(monkeypatch, learner_class, task: int):
    """Make `learner_class.fit_task` raise KeyboardInterrupt (what Ctrl-C raises) when task `task` (0-based) starts
    training; returns the original method, to put back for the resume."""
    original = learner_class.fit_task

    def interrupted(self, data):
        if data.task == task:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(learner_class, "fit_task", interrupted)
    return original


def assert_same_state(a, b, where: str = "state") -> None:
    """Exactly equal: every tensor bit for bit (dtype too), every other value by ==."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{index}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


# small disks (issue 26): a failed write must be one line and leave no partial file --------------------------------------
def _mounted_tmpfs(path: Path, options: str, what: str):
    """Mount a tmpfs with `options` at `path` for one test (root only: skipped otherwise), then unmount it."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip(f"no {what} here (needs root and mount)")
    yield path
    subprocess.run(["umount", str(path)])


@pytest.fixture()
def full_disk(tmp_path):
    """A 4 KiB tmpfs (one page): room for a folder, none for a figure."""
    yield from _mounted_tmpfs(tmp_path / "disk", "size=4k", "small tmpfs")


@pytest.fixture()
def readonly_disk(tmp_path):
    yield from _mounted_tmpfs(tmp_path / "readonly", "ro,size=4k", "read-only tmpfs")


def no_partial_files(folder: Path) -> bool:
    """Nothing empty and no temporary file of a write left under `folder`."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return not any(p.name.endswith(".tmp") or p.stat().st_size == 0 for p in files)
