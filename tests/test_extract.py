import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spacil.backbone import FrozenCLIP
from spacil.cli import main
from spacil.data import image_transform, open_dataset
from spacil.errors import InputError
from spacil.extract import extract_store
from spacil.features import FeatureStore


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extract_writes_a_valid_store(tiny_model, shapes_root, tmp_path):
    with pytest.warns(UserWarning, match="3 of 4 classes have none"):
        out = extract_store("shapes", shapes_root, tmp_path / "store", model=tiny_model, pretrained=None, batch_size=5,
                            descriptions={"red square": ["a red block.", "four sharp corners."]}, progress=False)
    store = FeatureStore(out)
    assert store.classes == ["red square", "green circle", "blue triangle", "yellow cross"]
    assert store.backbone["checkpoint_sha256"] and store.backbone["model"] == tiny_model
    train = store.split("train")
    assert train.global_.dtype == np.float16 and train.patches.shape == (24, 16, 32)
    assert store.prompts.shape == (4, 32) and store.templates.shape == (4, 2, 32)
    assert store.descriptions.shape == (4, 2, 32) and store.description_mask.tolist()[0] == [True, True]
    assert not store.description_mask[1:].any()
    # the stored g(x) are the model's own image embeddings
    clip = FrozenCLIP(tiny_model, None)
    _, splits = open_dataset("shapes", shapes_root)
    image = image_transform(clip.image_size)(splits["train"].loader(splits["train"].items[7]))
    expected = clip.model.encode_image(image[None], normalize=True)[0]
    np.testing.assert_allclose(train.global_[7].astype(np.float32), expected.numpy(), atol=2e-3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["text"]["semantic_tokens"] == "sentence" and not (out / ".progress.json").exists()


def test_interrupted_extraction_resumes_byte_identical(tiny_model, shapes_root, tmp_path):
    whole = extract_store("shapes", shapes_root, tmp_path / "whole", model=tiny_model, pretrained=None, batch_size=4, progress=False)
    part = tmp_path / "part"
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=3, progress=False)
    assert not (part / "meta.json").exists()
    with pytest.raises(InputError, match="unfinished extraction"):
        FeatureStore(part)
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=4, progress=False)
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, progress=False)
    assert _files(part) == _files(whole)
    with pytest.raises(InputError, match="other settings"):
        extract_store("shapes", shapes_root, tmp_path / "part2", model=tiny_model, pretrained=None, batch_size=4,
                      max_batches=1, progress=False)
        extract_store("shapes", shapes_root, tmp_path / "part2", model=tiny_model, pretrained=None, batch_size=8, progress=False)


def test_killed_extraction_resumes_byte_identical(tiny_model, tmp_path):
    """SIGKILL a real `spacil extract` process mid-run, run it again, compare with an uninterrupted store."""
    from spacil.shapes import write_shapes_dataset

    root = tmp_path / "data"
    write_shapes_dataset(root, train_per_class=60, test_per_class=10, seed=2)
    command = [sys.executable, "-m", "spacil", "extract", "--dataset", "shapes", "--data-root", str(root), "--model", tiny_model,
               "--pretrained", "", "--batch-size", "2", "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(command + [str(killed)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        progress = killed / ".progress.json"
        if progress.exists() and json.loads(progress.read_text())["done"]["train"] >= 20:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "meta.json").exists(), "the extraction finished before it could be killed"
    assert subprocess.run(command + [str(killed)], env=env).returncode == 0
    whole = tmp_path / "whole"
    assert subprocess.run(command + [str(whole)], env=env).returncode == 0
    assert _files(killed) == _files(whole)


def test_bad_images_and_folders_exit_2(tiny_model, shapes_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes_root / "shapes", root / "shapes")
    bad = root / "shapes" / "train" / "01.green_circle" / "002.png"
    bad.write_bytes(b"not a png at all")
    args = ["extract", "--dataset", "shapes", "--data-root", str(root), "--model", tiny_model, "--pretrained", "",
            "--out", str(tmp_path / "store"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
    assert main(["extract", "--dataset", "shapes", "--data-root", str(tmp_path / "nowhere"), "--model", tiny_model,
                 "--pretrained", "", "--out", str(tmp_path / "s2"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_word_level_semantic_tokens(tiny_model, shapes_root, tmp_path):
    with pytest.warns(UserWarning, match="3 of 4 classes have none"):
        out = extract_store("shapes", shapes_root, tmp_path / "store", model=tiny_model, pretrained=None, batch_size=8,
                            descriptions={"red square": ["red block", "sharp corners here"]}, semantic_tokens="word",
                            progress=False)
    store = FeatureStore(out)
    assert store.description_mask[0].sum() == 5 and store.descriptions.shape[1] == 5
