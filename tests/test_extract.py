import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import spacil
from spacil.backbone import FrozenCLIP
from spacil.cli import main
from spacil.data import image_transform, open_dataset
from spacil.errors import InputError
from spacil.store.extract import extract_store
from spacil.store.format import FeatureStore

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


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
    assert meta["spacil_version"] == spacil.__version__  # the spacil that wrote it


@pytest.mark.parametrize("device", DEVICES)
def test_interrupted_extraction_resumes_byte_identical(tiny_model, shapes_root, tmp_path, device):
    whole = extract_store("shapes", shapes_root, tmp_path / "whole", model=tiny_model, pretrained=None, batch_size=4,
                          device=device, progress=False)
    part = tmp_path / "part"
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=3, device=device,
                  progress=False)
    assert not (part / "meta.json").exists()
    with pytest.raises(InputError, match="unfinished extraction"):
        FeatureStore(part)
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=4, device=device,
                  progress=False)
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, device=device, progress=False)
    assert _files(part) == _files(whole)
    with pytest.raises(InputError, match="other settings"):
        extract_store("shapes", shapes_root, tmp_path / "part2", model=tiny_model, pretrained=None, batch_size=4,
                      max_batches=1, progress=False)
        extract_store("shapes", shapes_root, tmp_path / "part2", model=tiny_model, pretrained=None, batch_size=8, progress=False)


def test_killed_extraction_resumes_byte_identical(tiny_model, tmp_path):
    """SIGKILL a real `spacil extract` process mid-run, run it again, compare with an uninterrupted store."""
    from spacil.demo.shapes import write_shapes_dataset

    root = tmp_path / "data"
    write_shapes_dataset(root, train_per_class=60, test_per_class=10, seed=2)
    command = [sys.executable, "-m", "spacil", "extract", "--dataset", "shapes", "--data-root", str(root), "--model", tiny_model,
               "--pretrained", "", "--batch-size", "2", "--quiet", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(command + [str(killed)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        record = killed / ".progress.rank0.json"
        if record.exists() and sum(hi - lo for lo, hi in json.loads(record.read_text())["done"]["train"]) >= 20:
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


# ----------------------------------------------------------------------------------------------------------------------
# A kill at any instant (issue 9): every file creation and every write is a place a kill can land


class _Kill(BaseException):
    """Stands for a SIGKILL: nothing in spacil catches it."""


def _kill_at(mp, at: int, map_file_created: bool = True) -> dict:
    """Make the `at`-th file operation of an extraction leave what a kill in its middle would, then raise _Kill. A kill
    while a memory map is created leaves an empty file (`map_file_created`) or none (killed just before)."""
    import spacil.store.extract as extract
    import spacil.store.format as features

    calls = {"count": 0}

    def strikes() -> bool:
        calls["count"] += 1
        return calls["count"] == at

    real_open_memmap, real_write_rows = extract.open_memmap, extract._write_rows
    real_flush, real_remove = extract._flush, extract._remove

    def open_memmap(path, *args, **kwargs):
        if strikes():
            if map_file_created:
                Path(path).write_bytes(b"")  # created, nothing in it yet
            raise _Kill
        return real_open_memmap(path, *args, **kwargs)

    def atomic(real, partial: bytes):
        def write(path, content):
            if strikes():
                path = Path(path)
                path.with_name(f".{path.name}.tmp").write_bytes(partial)  # the temporary file, half written
                raise _Kill
            return real(path, content)
        return write

    def write_rows(fd, offset, data):
        if strikes():
            real_write_rows(fd, offset, data[: len(data) // 2])
            raise _Kill
        real_write_rows(fd, offset, data)

    def flush(fd):
        if strikes():
            raise _Kill
        real_flush(fd)

    def remove(path):
        if strikes():
            raise _Kill
        real_remove(path)

    for module in (extract, features):
        mp.setattr(module, "atomic_write_text", atomic(features.atomic_write_text, b'{"fingerp'))
        mp.setattr(module, "atomic_save_npy", atomic(features.atomic_save_npy, b"\x93NUMPY"))
    mp.setattr(extract, "open_memmap", open_memmap)
    mp.setattr(extract, "_write_rows", write_rows)
    mp.setattr(extract, "_flush", flush)
    mp.setattr(extract, "_remove", remove)
    return calls


def _kill_at_every_operation(tmp_path, extract, whole: dict, map_file_created: bool, start=None) -> int:
    """Kill `extract(out)` at its first, second, ... file operation, each time in a new folder (empty, or a copy of the
    store `start`), run it again and compare with `whole`; returns the number of file operations."""
    import shutil

    kills = 0
    while True:
        out = tmp_path / f"killed{kills + 1}"
        if start is not None:
            shutil.copytree(start, out)
        with pytest.MonkeyPatch.context() as mp:
            calls = _kill_at(mp, kills + 1, map_file_created)
            try:
                extract(out)
            except _Kill:
                kills += 1
            else:
                assert calls["count"] == kills  # every operation has been struck once
                return kills
        if start is not None:
            FeatureStore(out)  # still readable: meta.json names no width until z is complete
        extract(out)
        assert _files(out) == whole, f"the rerun after a kill at file operation {kills} differs"


@pytest.mark.parametrize("map_file_created", [True, False], ids=["map-file-empty", "map-file-absent"])
def test_a_kill_at_any_file_operation_resumes_byte_identical(tiny_model, tmp_path, map_file_created):
    from spacil.demo.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", train_per_class=2, test_per_class=1, seed=3, size=32)
    clip = FrozenCLIP(tiny_model, None)

    def extract(out):
        return extract_store("shapes", tmp_path / "data", out, model=tiny_model, pretrained=None, batch_size=3,
                             progress=False, backbone=clip)

    kills = _kill_at_every_operation(tmp_path, extract, _files(extract(tmp_path / "whole")), map_file_created)
    # the store record, 2 splits x (3 maps + labels + image paths), 5 batches x (3 writes + 3 flushes + record),
    # 3 text arrays, visual_proj, meta.json, 2 records removed
    assert kills == 1 + 2 * 5 + 5 * 7 + 3 + 1 + 1 + 2


def test_meta_json_not_json_is_one_line(tiny_model, shapes_root, tmp_path, capsys):
    out = extract_store("shapes", shapes_root, tmp_path / "store", model=tiny_model, pretrained=None, batch_size=8, progress=False)
    (out / "meta.json").write_text("{not json")
    assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "meta.json: not valid JSON" in err and err.count("\n") == 1


def test_a_complete_store_refuses_another_dtype_and_a_local_dir_model_refuses_a_weights_file(tiny_model, shapes_root,
                                                                                             tmp_path, capsys):
    out = extract_store("shapes", shapes_root, tmp_path / "store", model=tiny_model, pretrained=None, batch_size=8, progress=False)
    base = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--quiet"]
    assert main([*base, "--pretrained", "", "--dtype", "float32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--dtype float32" in err and "float16" in err and err.count("\n") == 1
    assert main([*base, "--pretrained", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "weights.bin" in err and "local-dir" in err and err.count("\n") == 1
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Devices and precision (issue 8)



@pytest.mark.parametrize("device", DEVICES)
def test_bf16_features_agree_with_fp32(tiny_model, shapes_root, tmp_path, device):
    stores = {}
    for precision in ("fp32", "bf16"):
        out = extract_store("shapes", shapes_root, tmp_path / precision, model=tiny_model, pretrained=None, batch_size=8,
                            dtype="float32", device=device, precision=precision, progress=False)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["precision"] == precision and meta["device"] == device
        stores[precision] = FeatureStore(out)
    for split in ("train", "test"):
        exact, reduced = stores["fp32"].split(split), stores["bf16"].split(split)
        assert not np.array_equal(exact.global_, reduced.global_)  # bf16 did run
        assert (np.sum(exact.global_ * reduced.global_, axis=-1) > 0.999).all()
        assert (np.sum(exact.patches * reduced.patches, axis=-1) > 0.999).all()
    assert (np.sum(stores["fp32"].prompts * stores["bf16"].prompts, axis=-1) > 0.999).all()


@pytest.mark.parametrize("device", DEVICES)
def test_resuming_with_another_precision_is_refused(tiny_model, shapes_root, tmp_path, capsys, device):
    out = tmp_path / "store"
    extract_store("shapes", shapes_root, out, model=tiny_model, pretrained=None, batch_size=4, max_batches=2,
                  device=device, precision="bf16", progress=False)
    args = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
            "--batch-size", "4", "--device", device, "--out", str(out), "--quiet"]
    assert main(args + ["--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "encoded in bf16" in err and err.count("\n") == 1
    assert main(args) == 0  # without --precision a resume keeps the store's
    assert json.loads((out / "meta.json").read_text())["precision"] == "bf16"
    assert main(args + ["--precision", "fp16"]) == 2  # a finished store's text features are refreshed in its precision only


def test_an_unfinished_spacil_0_1_extraction_resumes(tiny_model, shapes_root, tmp_path):
    """0.1 kept row counts in .progress.json and had no precision (it encoded in fp32)."""
    whole = extract_store("shapes", shapes_root, tmp_path / "whole", model=tiny_model, pretrained=None, batch_size=4,
                          progress=False)
    part = tmp_path / "part"
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=2, progress=False)
    record = json.loads((part / ".progress.json").read_text())
    del record["fingerprint"]["precision"], record["devices"]
    (part / ".progress.json").write_text(json.dumps({**record, "done": {"train": 8, "test": 0}}))
    (part / ".progress.rank0.json").unlink()
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, max_batches=1, progress=False)
    assert json.loads((part / ".progress.rank0.json").read_text())["done"] == {"train": [[0, 12]], "test": []}
    extract_store("shapes", shapes_root, part, model=tiny_model, pretrained=None, batch_size=4, progress=False)
    assert _files(part) == _files(whole)


def test_images_normalised_on_the_device_equal_torchvision_s(shapes_root):
    from spacil.store.extract import _ImageRows, _Normalise

    split = open_dataset("shapes", shapes_root)[1]["test"]
    transform = image_transform(32)
    rows = _ImageRows(split, transform)
    assert rows[0][0].dtype == torch.uint8
    expected = torch.stack([transform(split.loader(item)) for item in split.items])
    assert torch.equal(_Normalise(torch.device("cpu"))(torch.stack([rows[i][0] for i in range(len(rows))])), expected)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-projection features (issue 18): z, visual.proj, the text features' norms


def test_pre_projection_features_are_the_model_s(tiny_model, shapes_root, tmp_path):
    from spacil.store.check import check_store

    out = extract_store("shapes", shapes_root, tmp_path / "store", model=tiny_model, pretrained=None, batch_size=5,
                        progress=False)
    store = FeatureStore(out)
    clip = FrozenCLIP(tiny_model, None)
    visual = clip.model.visual
    assert store.width == clip.width == 64 and json.loads((out / "meta.json").read_text())["width"] == 64
    np.testing.assert_array_equal(store.visual_proj, visual.proj.detach().numpy())
    # z: the CLS token after ln_post, before visual.proj, computed here directly from open_clip's modules
    _, splits = open_dataset("shapes", shapes_root)
    test = store.split("test")
    images = torch.stack([image_transform(clip.image_size)(splits["test"].loader(item)) for item in splits["test"].items])
    with torch.no_grad():
        z = visual.ln_post(visual.transformer(visual._embeds(images)))[:, 0]
    assert test.global_pre.dtype == np.float16 and test.global_pre.shape == (len(images), 64)
    np.testing.assert_allclose(test.global_pre.astype(np.float32), z.numpy(), rtol=2e-3, atol=2e-3)
    g = z.numpy() @ store.visual_proj
    np.testing.assert_allclose(test.global_.astype(np.float32), g / np.linalg.norm(g, axis=-1, keepdims=True), atol=2e-3)
    # template norms: templates * norms are open_clip's un-normalised text features
    texts = [template.format(name) for name in store.classes for template in json.loads((out / "meta.json").read_text())["text"]["templates"]]
    with torch.no_grad():
        raw = clip.model.encode_text(clip.tokenizer(texts), normalize=False).numpy().reshape(store.templates.shape)
    np.testing.assert_allclose(store.templates * store.template_norms[..., None], raw, rtol=1e-5, atol=1e-5)
    assert check_store(out) == []


def test_a_store_without_z_gets_it_added_byte_identical(tiny_model, shapes_root, tmp_path, capsys):
    from spacil.store.format import require_pre_projection

    whole = extract_store("shapes", shapes_root, tmp_path / "whole", model=tiny_model, pretrained=None, batch_size=4,
                          progress=False)
    args = ["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
            "--batch-size", "4", "--quiet", "--out", str(tmp_path / "late")]
    assert main(args + ["--no-pre-projection"]) == 0
    late = tmp_path / "late"
    store = FeatureStore(late)
    assert store.width is None and store.visual_proj is None and store.split("train").global_pre is None
    assert not (late / "train" / "global_pre.npy").exists() and not (late / "backbone").exists()
    with pytest.raises(InputError, match=r"no pre-projection features \(train/global_pre.npy\), which ranpac needs") as err:
        require_pre_projection(store, "ranpac")
    assert "spacil extract --dataset shapes" in str(err.value) and "\n" not in str(err.value)
    assert main(args + ["--no-pre-projection"]) == 0  # refreshes text features only
    assert FeatureStore(late).width is None
    before = {name: data for name, data in _files(late).items() if "global_pre" not in name}
    assert main(args) == 0  # the same command without the flag adds z
    assert _files(late) == _files(whole)
    assert all(_files(late)[name] == data for name, data in before.items() if name != "meta.json")
    require_pre_projection(FeatureStore(late), "ranpac")


@pytest.mark.parametrize("map_file_created", [True, False], ids=["map-file-empty", "map-file-absent"])
def test_a_kill_while_z_is_added_resumes_byte_identical(tiny_model, tmp_path, map_file_created):
    from spacil.demo.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", train_per_class=2, test_per_class=1, seed=3, size=32)
    clip = FrozenCLIP(tiny_model, None)

    def extract(out, pre_projection=None):
        return extract_store("shapes", tmp_path / "data", out, model=tiny_model, pretrained=None, batch_size=3,
                             progress=False, backbone=clip, pre_projection=pre_projection)

    whole = _files(extract(tmp_path / "whole"))
    without = extract(tmp_path / "without", pre_projection=False)
    kills = _kill_at_every_operation(tmp_path, extract, whole, map_file_created, start=without)
    # the store record, 2 splits x 1 map, 5 batches x (write + flush + record), 3 text arrays, visual_proj, meta.json,
    # 2 records removed
    assert kills == 1 + 2 + 5 * 3 + 3 + 1 + 1 + 2


def test_resuming_against_the_pre_projection_choice_is_refused(tiny_model, shapes_root, tmp_path):
    out = tmp_path / "store"
    extract_store("shapes", shapes_root, out, model=tiny_model, pretrained=None, batch_size=4, max_batches=1, progress=False)
    with pytest.raises(InputError, match="with pre-projection features"):
        extract_store("shapes", shapes_root, out, model=tiny_model, pretrained=None, batch_size=4, progress=False,
                      pre_projection=False)
    other = tmp_path / "other"
    extract_store("shapes", shapes_root, other, model=tiny_model, pretrained=None, batch_size=4, max_batches=1,
                  progress=False, pre_projection=False)
    with pytest.raises(InputError, match="without pre-projection features"):
        extract_store("shapes", shapes_root, other, model=tiny_model, pretrained=None, batch_size=4, progress=False,
                      pre_projection=True)
    extract_store("shapes", shapes_root, other, model=tiny_model, pretrained=None, batch_size=4, progress=False)
    assert FeatureStore(other).width is None  # resumed as started
