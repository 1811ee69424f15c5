"""Bad input, file by file: every fault of every file spacil reads is exit 2 and one line naming the file (and the key or
row), never a traceback; nothing spacil reads can carry code. All through `spacil.cli.main`, in-process."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from conftest import interrupt_at_task, make_random_store
from spacil.cli import main

ARRAYS = ["train/global.npy", "train/patches.npy", "train/labels.npy", "test/global.npy", "test/patches.npy",
          "test/labels.npy", "text/prompts.npy", "text/templates.npy", "text/descriptions.npy", "text/description_mask.npy",
          "text/template_norms.npy", "train/global_pre.npy", "test/global_pre.npy", "backbone/visual_proj.npy"]
# the pre-projection arrays are required in a store whose meta.json names their width
REQUIRED = {"train/global.npy", "train/labels.npy", "test/global.npy", "test/labels.npy", "text/description_mask.npy",
            "train/global_pre.npy", "test/global_pre.npy", "backbone/visual_proj.npy"}
NOT_UNIT = {"text/template_norms.npy", "train/global_pre.npy", "test/global_pre.npy", "backbone/visual_proj.npy"}
FEATURES = {name for name in ARRAYS if not name.endswith(("labels.npy", "mask.npy")) and name not in NOT_UNIT}  # unit vectors
CHEAP = {"missing", "empty", "truncated", "garbage", "pickle", "dtype", "shape", "label"}  # found by `run` before any work


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
    return make_random_store(tmp_path_factory.mktemp("pristine") / "store", templates=3, width=24)


def _object_array(shape) -> np.ndarray:
    array = np.empty(shape, dtype=object)
    array.fill(0)
    return array


def _break_array(file: pathlib.Path, fault: str) -> None:
    array = np.load(file)
    if fault == "missing":
        file.unlink()
    elif fault == "empty":
        file.write_bytes(b"")
    elif fault == "truncated":
        file.write_bytes(file.read_bytes()[:-7])
    elif fault == "garbage":
        file.write_bytes(b"this is not a .npy file, only some bytes that happen to be here\n" * 3)
    elif fault == "pickle":
        np.save(file, _object_array(array.shape), allow_pickle=True)
    elif fault == "dtype":
        wrong = {"b": np.uint8, "i": np.float32}.get(array.dtype.kind, np.float64)
        np.save(file, array.astype(wrong))
    elif fault == "shape":
        if array.ndim == 1:
            np.save(file, np.concatenate([array, array[:1]]))
        else:
            np.save(file, np.concatenate([array, array[..., :1]], axis=-1))
    elif fault == "nan":
        array = array.copy()
        array.reshape(-1, array.shape[-1])[5, 2] = np.nan
        np.save(file, array)
    elif fault == "norm":
        array = array.copy()
        array.reshape(-1, array.shape[-1])[4] *= 2
        np.save(file, array)
    elif fault == "direction":  # z of row 6 no longer projects onto its global row
        array = array.copy()
        array[6] = np.roll(array[6], 1)
        np.save(file, array)
    elif fault == "label":
        array = array.copy()
        array[7] = 99
        np.save(file, array)
    else:
        raise AssertionError(fault)


def _array_cases():
    for name in ARRAYS:
        faults = ["empty", "truncated", "garbage", "pickle", "dtype", "shape"]
        faults += ["missing"] if name in REQUIRED else []
        faults += ["nan", "norm"] if name in FEATURES else []
        faults += ["nan"] if name in NOT_UNIT else []
        faults += ["direction"] if name.endswith("global_pre.npy") else []
        faults += ["label"] if name.endswith("labels.npy") else []
        for fault in faults:
            yield pytest.param(name, fault, id=f"{name}-{fault}")


def _one_line_naming(err: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spacil: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("name,fault", list(_array_cases()))
def test_every_fault_of_every_array(pristine, tmp_path, capsys, name, fault):
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    _break_array(store / name, fault)
    assert main(["check", str(store), "--quiet"]) == 2
    line = _one_line_naming(capsys.readouterr().err, str(store / name))
    if fault in ("nan", "norm", "label", "direction"):
        assert "first: row" in line  # the row at fault
    if fault in CHEAP:
        code = main(["run", "--features", str(store), "--method", "simplecil", "--init-cls", "3", "--increment", "3",
                     "--out", str(tmp_path / "run"), "--quiet"])
        assert code == 2
        _one_line_naming(capsys.readouterr().err, str(store / name))
        assert not (tmp_path / "run").exists()  # refused before any work


META_FAULTS = {
    "missing": None,
    "empty": "",
    "not json": "{'format': 'spacil-features',",
    "not an object": "[1, 2]",
    "version": {"version": 2},
    "key missing": {"dim": None},
    "wrong type": {"dim": "16"},
    "classes not names": {"classes": [1, 2, 3]},
}


@pytest.mark.parametrize("fault", list(META_FAULTS))
def test_every_fault_of_meta_json(pristine, tmp_path, capsys, fault):
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    meta = store / "meta.json"
    change = META_FAULTS[fault]
    if change is None:
        meta.unlink()
    elif isinstance(change, str):
        meta.write_text(change)
    else:
        data = json.loads(meta.read_text())
        for key, value in change.items():
            data.pop(key) if value is None else data.__setitem__(key, value)
        meta.write_text(json.dumps(data))
    assert main(["check", str(store), "--quiet"]) == 2
    _one_line_naming(capsys.readouterr().err, "meta.json")
    assert main(["run", "--features", str(store), "--method", "simplecil", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    _one_line_naming(capsys.readouterr().err, "meta.json")


def test_a_sound_store_passes(pristine, capsys):
    assert main(["check", str(pristine), "--quiet"]) == 0
    assert "sound feature store" in capsys.readouterr().out


def test_every_finding_is_printed(pristine, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    for name, fault in (("train/patches.npy", "truncated"), ("test/labels.npy", "label"), ("text/prompts.npy", "norm")):
        _break_array(store / name, fault)
    assert main(["check", str(store), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("spacil: error: ") for line in lines)


def test_a_large_array_is_read_in_chunks(pristine, tmp_path, capsys, monkeypatch):
    """The streaming pass reads bounded chunks: with a chunk of a few rows a fault deep in the file is still found."""
    import spacil.store.check

    monkeypatch.setattr(spacil.store.check, "CHUNK_BYTES", 1000)
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    patches = np.load(store / "train" / "patches.npy")
    patches[90, 3] *= 3
    np.save(store / "train" / "patches.npy", patches)
    assert main(["check", str(store), "--quiet"]) == 2
    _one_line_naming(capsys.readouterr().err, "train/patches.npy", "row 90, token 3")


# ----------------------------------------------------------------------------------------------------------------------
# Run folders on --resume

RUN = ["--method", "spa", "--init-cls", "6", "--increment", "6", "--set", "epochs=1", "--quiet"]


class _Touch:
    """Unpickling this object (with a plain pickle.load) creates a file: a stand-in for code carried by a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture()
def interrupted_run(pristine, tmp_path, monkeypatch):
    """A run folder whose run stopped after its first task (of two)."""
    from spacil.methods.spa import SPA

    original = interrupt_at_task(monkeypatch, SPA, 1)
    out = tmp_path / "run"
    assert main(["run", "--features", str(pristine), "--out", str(out), *RUN]) == 130
    monkeypatch.setattr(SPA, "fit_task", original)
    return out


def _resume(store, out, capsys, *needles):
    assert main(["run", "--features", str(store), "--out", str(out), *RUN, "--resume"]) == 2
    return _one_line_naming(capsys.readouterr().err, *needles)


def test_resume_refuses_a_truncated_checkpoint(pristine, interrupted_run, capsys):
    checkpoint = interrupted_run / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    _resume(pristine, interrupted_run, capsys, str(checkpoint), "not a readable checkpoint")


def test_resume_refuses_a_checkpoint_that_carries_code(pristine, interrupted_run, tmp_path, capsys):
    checkpoint = interrupted_run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "code_ran"
    state["learner"]["hook"] = _Touch(marker)
    torch.save(state, checkpoint)
    _resume(pristine, interrupted_run, capsys, str(checkpoint), "refused")
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # the same file under a plain pickle load runs it: the test is real
    assert marker.exists()


def test_resume_refuses_a_checkpoint_of_another_learner(pristine, interrupted_run, capsys):
    checkpoint = interrupted_run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["learner"]["global_bank"]
    torch.save(state, checkpoint)
    _resume(pristine, interrupted_run, capsys, str(checkpoint), "global_bank")


@pytest.mark.parametrize("edit,needles", [
    (lambda text: text.replace("epochs: 1", "epochs: 3"), ("config.yaml", "train.epochs")),
    (lambda text: text + "\n  broken: [\n", ("config.yaml", "not valid YAML")),
    (lambda text: "!!python/object/apply:os.system ['echo pwned']\n", ("config.yaml", "not valid YAML")),
    (lambda text: "- a list\n", ("config.yaml", "mapping")),
], ids=["value", "syntax", "python-tag", "not-a-mapping"])
def test_resume_refuses_an_edited_config(pristine, interrupted_run, capsys, edit, needles):
    config = interrupted_run / "config.yaml"
    config.write_text(edit(config.read_text()))
    _resume(pristine, interrupted_run, capsys, *needles)


# ----------------------------------------------------------------------------------------------------------------------
# Config files and descriptions files


@pytest.mark.parametrize("text,needles", [
    ("train: [epochs: 1\n", ("not valid YAML",)),
    ("train:\n  epochs: ten\n", ("train.epochs", "ten")),
    ("train:\n  epoch: 3\n", ("unknown config key", "train.epoch")),
    ("train: 5\n", ("section 'train'",)),
    ("- method: spa\n", ("mapping",)),
    ("method: !!python/object/apply:os.system ['echo pwned']\n", ("not valid YAML",)),
    ("seed: !!python/name:os.system\n", ("not valid YAML",)),
], ids=["syntax", "type", "unknown-key", "section-type", "top-level-list", "python-object", "python-name"])
def test_bad_config_files(tmp_path, capsys, text, needles):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_line_naming(capsys.readouterr().err, str(config), *needles)


GOOD_DESCRIPTIONS = {"format": "spacil-descriptions", "version": 1, "dataset": "shapes", "source": "llm", "model": "gpt-5",
                     "prompt_version": "spa-describe-v1", "num_descriptions": 2,
                     "classes": {"red square": {"descriptions": ["a red square", "four equal sides"]}},
                     "failed": {}, "usage": {"total_tokens": 3}}


@pytest.mark.parametrize("change,needles", [
    ("{not json", ("not valid JSON",)),
    ("[]", ("expected a JSON object",)),
    ({"version": 7}, ("version 7",)),
    ({"classes": ["red square"]}, ("'classes'",)),
    ({"classes": {"red square": {"descriptions": "a red square"}}}, ("classes.red square",)),
    ({"classes": {"red square": {"descriptions": [1, 2]}}}, ("classes.red square",)),
    ({"failed": ["red square"]}, ("'failed'",)),
    ({"usage": {"total_tokens": "many"}}, ("'usage'",)),
    ({"num_descriptions": "8"}, ("'num_descriptions'",)),
    ({"format": None, "version": None}, ("neither a spacil descriptions file",)),
], ids=["syntax", "not-object", "version", "classes-list", "descriptions-string", "descriptions-numbers", "failed-list",
        "usage-type", "count-type", "unknown-shape"])
def test_bad_descriptions_files(tmp_path, capsys, change, needles):
    """Read where a run reads them: `data.descriptions`, before the store is extracted."""
    bad = tmp_path / "descriptions.json"
    if isinstance(change, str):
        bad.write_text(change)
    else:
        data = {**GOOD_DESCRIPTIONS, **change}
        bad.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  dataset: shapes\n  data_root: {tmp_path}\n  features: {tmp_path / 'store'}\n"
                      f"  descriptions: {bad}\n")
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    _one_line_naming(capsys.readouterr().err, str(bad), *needles)
    assert not (tmp_path / "store").exists()


def test_descriptions_imports_refuse_bad_files(tmp_path, capsys):
    for fmt, text, needle in (("json", "{\"a\": 1}", "expected a JSON object"), ("engine", "[1]", "expected a JSON object"),
                              ("json", "nope", "not valid JSON")):
        source = tmp_path / f"{fmt}.json"
        source.write_text(text)
        assert main(["descriptions", "import", "--format", fmt, str(source), "--out", str(tmp_path / "o.json")]) == 2
        _one_line_naming(capsys.readouterr().err, str(source), needle)
    area = tmp_path / "area"
    area.mkdir()
    (area / "cat_descriptions.txt").write_bytes(b"img.jpg\t\xff\xfe broken\n")
    assert main(["descriptions", "import", "--format", "area", str(area), "--out", str(tmp_path / "o.json")]) == 2
    _one_line_naming(capsys.readouterr().err, "cat_descriptions.txt", "UTF-8")


def test_nothing_unpickles(pristine, tmp_path, capsys):
    """Object-dtype arrays are refused by `run` and `check` without being unpickled."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    marker = tmp_path / "code_ran"
    array = np.empty(3, dtype=object)
    array[0] = _Touch(marker)
    with open(store / "text" / "prompts.npy", "wb") as handle:
        np.save(handle, array, allow_pickle=True)
    assert main(["check", str(store), "--quiet"]) == 2
    _one_line_naming(capsys.readouterr().err, "prompts.npy", "pickle")
    assert main(["run", "--features", str(store), "--method", "zeroshot", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    _one_line_naming(capsys.readouterr().err, "prompts.npy", "pickle")
    assert not marker.exists()
    np.load(store / "text" / "prompts.npy", allow_pickle=True)  # a loader that unpickles would have run it
    assert marker.exists()
