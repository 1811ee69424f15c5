import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_state, interrupt_at_task, make_random_store
from spacil.cli import main
from spacil.config import AblationConfig
from spacil.data import class_order, task_boundaries, task_sizes
from spacil.methods import METHODS

RUN = ["--init-cls", "3", "--increment", "3", "--quiet"]


def _run(store, out, *extra):
    return main(["run", "--features", str(store), "--out", str(out), *RUN, *extra])


@pytest.mark.parametrize("method", ["zeroshot", "simplecil", "finetune", "spa"])
def test_same_command_twice_gives_identical_summary(random_store, tmp_path, method):
    assert _run(random_store, tmp_path / "a", "--method", method, "--set", "epochs=2") == 0
    assert _run(random_store, tmp_path / "b", "--method", method, "--set", "epochs=2") == 0
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert a == b and a["method"] == method and len(a["curve"]) == 4
    for name in ("config.yaml", "class_order.json", "metrics.jsonl", "acc_matrix.csv", "log.txt"):
        assert (tmp_path / "a" / name).is_file()
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "top1 curve" in log and "Average Accuracy" in log


# Every registered method, and SPA with each of its parts switched off: methods added later are covered automatically.
# Settings that keep a method small here (its own sections' epochs and batches, RanPAC's projection width).
SMALL_SETTINGS = {
    "ranpac": ("--set", "ranpac.M=64"),
    "bofa": ("--set", "stage1_epochs=2", "--set", "stage2_epochs=2", "--set", "bofa_batch_size=8", "--set", "Kt=4"),
    "engine": ("--set", "engine_epochs=2", "--set", "engine_batch_size=8"),
    "area": ("--set", "area_epochs=2", "--set", "area_batch_size=8", "--set", "basis_rank=2",
             "--set", "area_samples_per_class=2"),
}
CONFIGURATIONS = [(name, SMALL_SETTINGS.get(name, ())) for name in METHODS] + [
    ("spa", ("--set", f"ablation.{part}=false")) for part in AblationConfig.model_fields
]
CONFIGURATION_IDS = list(METHODS) + [f"spa-no-{part}" for part in AblationConfig.model_fields]
# Batches smaller than a task (a task has 3 classes of 4 to 12 images): shuffles and schedules take several steps.
SMALL_BATCHES = ("--set", "epochs=2", "--set", "batch_size=8")


@pytest.fixture()
def rich_store(tmp_path) -> Path:
    """Templates (the no-LLM ablation's tokens), a different number of images for every class, z (what RanPAC and BOFA read),
    pairwise descriptions and stored views (what ENGINE reads)."""
    return make_random_store(tmp_path / "rich_store", templates=3, unbalanced=True, width=24, pairwise=2, views=3, area=4)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method,extra", CONFIGURATIONS, ids=CONFIGURATION_IDS)
def test_resume_after_interruption_gives_the_same_run(rich_store, tmp_path, method, extra, monkeypatch):
    """Interrupted after two tasks and resumed: the same summary and metrics, and the same final checkpoint to the bit."""
    args = ("--method", method, *SMALL_BATCHES, *extra)
    assert _run(rich_store, tmp_path / "whole", *args) == 0
    learner = METHODS[method]
    original = interrupt_at_task(monkeypatch, learner, 2)
    assert _run(rich_store, tmp_path / "cut", *args) == 130
    partial = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert len(partial["curve"]) == 2 and partial["complete"] is False
    monkeypatch.setattr(learner, "fit_task", original)
    assert _run(rich_store, tmp_path / "cut", *args, "--resume") == 0
    for name in ("summary.json", "metrics.jsonl", "acc_matrix.csv"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert_same_state(_state(tmp_path / "cut" / "checkpoints" / "last.pt"),
                       _state(tmp_path / "whole" / "checkpoints" / "last.pt"))


class _Killed(BaseException):
    """A kill: nothing in spacil catches it, nothing after it runs."""


@pytest.mark.parametrize("method", ["spa", "finetune"])
def test_a_kill_at_any_write_of_the_run_folder_then_resume_ends_as_an_uninterrupted_run(rich_store, tmp_path, method,
                                                                                           monkeypatch):
    """Every file of the run folder is replaced whole (a temporary file, then os.replace) and the log is appended to.
    Kill the run before each of these writes in turn (the temporary file left half-done); --resume then ends with the
    summary, metrics and checkpoint of a run that was never killed."""
    import os

    from spacil.runner import Run

    args = ("--method", method, "--init-cls", "6", "--increment", "6", *SMALL_BATCHES)
    real_replace, real_log = os.replace, Run._log
    writes = [0]

    def counting_replace(src, dst):
        writes[0] += 1
        real_replace(src, dst)

    def counting_log(self, line):
        writes[0] += 1
        real_log(self, line)

    monkeypatch.setattr(os, "replace", counting_replace)
    monkeypatch.setattr(Run, "_log", counting_log)
    assert main(["run", "--features", str(rich_store), "--out", str(tmp_path / "whole"), "--quiet", *args]) == 0
    total = writes[0]
    assert total >= 15
    for kill_at in range(1, total + 1):
        seen = [0]

        def dying_replace(src, dst, kill_at=kill_at, seen=seen):
            seen[0] += 1
            if seen[0] == kill_at:
                raise _Killed
            real_replace(src, dst)

        def dying_log(self, line, kill_at=kill_at, seen=seen):
            seen[0] += 1
            if seen[0] == kill_at:
                raise _Killed
            real_log(self, line)

        out = tmp_path / f"kill_{kill_at}"
        monkeypatch.setattr(os, "replace", dying_replace)
        monkeypatch.setattr(Run, "_log", dying_log)
        with pytest.raises(_Killed):
            main(["run", "--features", str(rich_store), "--out", str(out), "--quiet", *args])
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(Run, "_log", real_log)
        assert main(["run", "--features", str(rich_store), "--out", str(out), "--quiet", *args, "--resume"]) == 0, kill_at
        for name in ("summary.json", "metrics.jsonl", "acc_matrix.csv", "config.yaml", "class_order.json"):
            assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), (kill_at, name)
        assert_same_state(_state(out / "checkpoints" / "last.pt"), _state(tmp_path / "whole" / "checkpoints" / "last.pt"),
                           f"kill {kill_at}")


def test_resume_refuses_other_settings_and_reruns_are_refused(random_store, tmp_path, capsys):
    assert _run(random_store, tmp_path / "r", "--method", "simplecil") == 0
    before = (tmp_path / "r" / "summary.json").read_bytes()
    assert _run(random_store, tmp_path / "r", "--method", "simplecil") == 2
    assert "holds a run already" in capsys.readouterr().err
    assert _run(random_store, tmp_path / "r", "--method", "zeroshot", "--resume") == 2
    assert "differs from this run's config" in capsys.readouterr().err
    assert (tmp_path / "r" / "summary.json").read_bytes() == before


def test_bad_values_exit_2_with_one_line(random_store, tmp_path, capsys):
    assert main(["run", "--features", str(random_store), "--increment", "5", "--out", str(tmp_path / "x")]) == 2
    assert "increment=5" in capsys.readouterr().err
    assert main(["run", "--features", str(random_store), "--method", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["run", "--features", str(random_store), "--set", "spa.k2=3", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key" in err and err.count("\n") == 1
    assert main(["run", "--out", str(tmp_path / "z")]) == 2
    assert main(["frobnicate"]) == 2


def _perturb_later_classes(store, after_task: int, seed: int):
    """Replace everything of the classes of tasks after `after_task`: their number of images in each split, their
    features (z and stored views too), names, prompts, templates and their norms, descriptions, and every pairwise
    description that involves a later class (its row and its column). Rows of earlier classes keep their values and their
    order."""
    meta = json.loads((store / "meta.json").read_text())
    num_classes = len(meta["classes"])
    order = class_order(num_classes, 1993)
    bounds = task_boundaries(task_sizes(num_classes, 3, 3))
    later = order[bounds[after_task][1]:]
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        labels = np.load(store / split / "labels.npy")
        keep = ~np.isin(labels, later)
        counts = {c: int(rng.integers(1, 2 * max(1, int((labels == c).sum())) + 2)) for c in later}
        new_labels = np.concatenate([labels[keep], np.repeat(later, [counts[c] for c in later])]).astype(np.int64)
        np.save(store / split / "labels.npy", new_labels)
        for name in ("global.npy", "patches.npy", "global_pre.npy", "views_global.npy", "views_occlusion_global.npy",
                     "views_occlusion_global_pre.npy", "views_area_augment_global.npy", "views_area_augment_global_pre.npy"):
            if not (store / split / name).exists():
                continue
            array = np.load(store / split / name)
            fresh = rng.normal(size=(len(new_labels) - int(keep.sum()), *array.shape[1:]))
            fresh /= np.linalg.norm(fresh, axis=-1, keepdims=True)
            np.save(store / split / name, np.concatenate([array[keep], fresh.astype(array.dtype)]))
    from spacil.store.area_texts import all_area_text_files

    area_texts = [Path(rel).name for rel in all_area_text_files() if not rel.endswith("_mask.npy")]
    for name in ("prompts.npy", "descriptions.npy", "templates.npy", "template_norms.npy", "pairwise.npy",
                 "pairwise_norms.npy", *area_texts):
        if not (store / "text" / name).exists():
            continue
        array = np.load(store / "text" / name)
        draw = (lambda shape: rng.uniform(1, 10, size=shape)) if name.endswith("norms.npy") else \
            (lambda shape: rng.normal(size=shape))
        array[later] = draw(array[later].shape)
        if name.startswith("pairwise"):  # how an earlier class differs from a later one: later too
            array[:, later] = draw(array[:, later].shape)
        np.save(store / "text" / name, array)
    for c in later:
        meta["classes"][c] = f"renamed {c}"
    (store / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("method,extra", CONFIGURATIONS, ids=CONFIGURATION_IDS)
def test_nothing_of_a_later_task_is_read_before_it_starts(rich_store, tmp_path, method, extra, monkeypatch):
    """Exemplar-free and causal: the learner after task t (every tensor of its checkpoint) and the results up to task t do
    not change when every later class is replaced, its number of images included."""
    from spacil.runner import Run

    real_checkpoint = Run._checkpoint

    def keep_every_checkpoint(self):  # the learner after each task, not only the last
        real_checkpoint(self)
        shutil.copyfile(self.out / "checkpoints" / "last.pt", self.out / "checkpoints" / f"task_{len(self.evaluations)}.pt")

    monkeypatch.setattr(Run, "_checkpoint", keep_every_checkpoint)
    args = ("--method", method, *SMALL_BATCHES, *extra)
    assert _run(rich_store, tmp_path / "clean", *args) == 0
    clean = (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()
    for t in range(3):
        changed = tmp_path / f"store_{t}"
        shutil.copytree(rich_store, changed)
        _perturb_later_classes(changed, t, seed=t)
        run = tmp_path / f"run_{t}"
        assert _run(changed, run, *args) == 0
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert lines[: t + 1] == clean[: t + 1]
        for task in range(1, t + 2):
            assert_same_state(_state(run / "checkpoints" / f"task_{task}.pt"),
                               _state(tmp_path / "clean" / "checkpoints" / f"task_{task}.pt"), f"after task {task}")
        assert lines[t + 1:] != clean[t + 1:]  # the perturbation is real


def test_one_command_from_images_to_results(tiny_model, shapes_root, tmp_path):
    """`spacil run --config` with a data root extracts the store on the way (once), then runs; a second method reuses it."""
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({n: [f"a {n}", f"a small {n}"] for n in
                                        ["red square", "green circle", "blue triangle", "yellow cross"]}))
    config = tmp_path / "shapes.yaml"
    config.write_text(f"""
method: spa
data:
  dataset: shapes
  data_root: {shapes_root}
  features: {tmp_path / 'store'}
  model: {tiny_model}
  pretrained: null
  descriptions: {descriptions}
  init_cls: 2
  increment: 2
train:
  epochs: 1
spa:
  top_k_patches: 4
""")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "spa"), "--quiet"]) == 0
    assert (tmp_path / "store" / "meta.json").is_file()
    stamp = (tmp_path / "store" / "train" / "patches.npy").stat().st_mtime_ns
    assert main(["run", "--config", str(config), "--method", "simplecil", "--out", str(tmp_path / "simplecil"), "--quiet"]) == 0
    assert (tmp_path / "store" / "train" / "patches.npy").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "spa" / "summary.json").read_text())["complete"]
    assert main(["run", "--config", str(config), "--set", "semantic_tokens=word", "--out", str(tmp_path / "w")]) == 2
