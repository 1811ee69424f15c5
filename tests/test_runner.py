import json
import shutil

import numpy as np
import pytest

from spacil.cli import main
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


@pytest.mark.parametrize("method", ["finetune", "spa"])
def test_resume_after_interruption_gives_the_same_summary(random_store, tmp_path, method, monkeypatch):
    assert _run(random_store, tmp_path / "whole", "--method", method, "--set", "epochs=2") == 0
    learner = METHODS[method]
    original = learner.fit_task

    def interrupted(self, data):
        if data.task == 2:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(learner, "fit_task", interrupted)
    assert _run(random_store, tmp_path / "cut", "--method", method, "--set", "epochs=2") == 130
    partial = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert len(partial["curve"]) == 2 and partial["complete"] is False
    monkeypatch.setattr(learner, "fit_task", original)
    assert _run(random_store, tmp_path / "cut", "--method", method, "--set", "epochs=2", "--resume") == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == whole
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


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
    """Replace everything of the classes of tasks after `after_task`: features, names, prompts, descriptions."""
    meta = json.loads((store / "meta.json").read_text())
    num_classes = len(meta["classes"])
    order = class_order(num_classes, 1993)
    bounds = task_boundaries(task_sizes(num_classes, 3, 3))
    later = order[bounds[after_task][1]:]
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        labels = np.load(store / split / "labels.npy")
        rows = np.isin(labels, later)
        for name in ("global.npy", "patches.npy"):
            array = np.load(store / split / name)
            array[rows] = rng.normal(size=array[rows].shape).astype(array.dtype)
            np.save(store / split / name, array)
    for name in ("prompts.npy", "descriptions.npy"):
        array = np.load(store / "text" / name)
        array[later] = rng.normal(size=array[later].shape)
        np.save(store / "text" / name, array)
    for c in later:
        meta["classes"][c] = f"renamed {c}"
    (store / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("method", ["spa", "simplecil", "finetune", "zeroshot", "proof"])
def test_nothing_of_a_later_task_is_read_before_it_starts(random_store, tmp_path, method):
    """Exemplar-free and causal: results up to task t do not change when every later class is replaced."""
    assert _run(random_store, tmp_path / "clean", "--method", method, "--set", "epochs=2") == 0
    clean = (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()
    for t in range(3):
        changed = tmp_path / f"store_{t}"
        shutil.copytree(random_store, changed)
        _perturb_later_classes(changed, t, seed=t)
        assert _run(changed, tmp_path / f"run_{t}", "--method", method, "--set", "epochs=2") == 0
        lines = (tmp_path / f"run_{t}" / "metrics.jsonl").read_text().splitlines()
        assert lines[: t + 1] == clean[: t + 1]
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
