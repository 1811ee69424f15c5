import json

import numpy as np
import pytest

from spacil.cli import main
from spacil.errors import InputError
from spacil.store.format import FeatureStore


def test_store_written_by_another_program_runs_simplecil(random_store, tmp_path, capsys):
    assert main(["run", "--features", str(random_store), "--method", "simplecil", "--init-cls", "4", "--increment", "4",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "simplecil" and len(summary["curve"]) == 3 and summary["complete"]


def _break(store, change):
    change(store)
    with pytest.raises(InputError) as caught:
        FeatureStore(store)
    return str(caught.value)


def test_wrong_version(random_store):
    meta = json.loads((random_store / "meta.json").read_text())
    meta["version"] = 2
    message = _break(random_store, lambda s: (s / "meta.json").write_text(json.dumps(meta)))
    assert "meta.json" in message and "version 2" in message


def test_missing_array(random_store):
    message = _break(random_store, lambda s: (s / "test" / "labels.npy").unlink())
    assert "test/labels.npy: missing array" in message


def test_mismatched_shapes(random_store):
    message = _break(random_store, lambda s: np.save(s / "train" / "patches.npy", np.zeros((5, 9, 16), np.float16)))
    assert "train/patches.npy: shape [5, 9, 16], expected [96, 9, 16]" in message


def test_wrong_description_mask_and_labels(random_store, tmp_path):
    message = _break(random_store, lambda s: np.save(s / "text" / "description_mask.npy", np.ones((12, 2), bool)))
    assert "description_mask.npy: shape [12, 2], expected [12, 3]" in message


def test_labels_out_of_range(random_store):
    message = _break(random_store, lambda s: np.save(s / "train" / "labels.npy", np.full(96, 40, np.int64)))
    assert "labels outside 0..11" in message


def test_cli_reports_a_bad_store_in_one_line(random_store, tmp_path, capsys):
    (random_store / "train" / "global.npy").write_bytes(b"garbage")
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train/global.npy" in err and "\n" not in err
    assert not (tmp_path / "r").exists()
