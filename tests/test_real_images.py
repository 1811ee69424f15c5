"""Real photos (the ones scikit-image ships) in every mode the field's loader meets, through `spacil extract`; rows
traceable to their images; a broken image stops the run by name, and the run resumes once it is fixed or removed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spacil.backbone import FrozenCLIP
from spacil.cli import main
from spacil.data import image_transform, open_store_image
from spacil.store.check import check_store
from spacil.store.format import FeatureStore

skimage_data = pytest.importorskip("skimage.data")


def _photo_files(folder: Path) -> dict[str, Path]:
    """One file per mode: greyscale, palette, RGBA, CMYK (JPEG), 16-bit greyscale, an EXIF-rotated JPEG, and plain RGB."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = Image.fromarray(skimage_data.astronaut()).resize((96, 96))
    coffee = Image.fromarray(skimage_data.coffee()).resize((120, 80))
    camera = skimage_data.camera()[::4, ::4]
    files = {"grey": folder / "grey.png", "palette": folder / "palette.png", "rgba": folder / "rgba.png",
             "cmyk": folder / "cmyk.jpg", "sixteen_bit": folder / "sixteen_bit.png", "exif": folder / "exif.jpg",
             "rgb": folder / "rgb.jpg"}
    Image.fromarray(camera).save(files["grey"])
    astronaut.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(files["palette"])
    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (80, 1))))
    rgba.save(files["rgba"])
    astronaut.convert("CMYK").save(files["cmyk"], "JPEG")
    Image.fromarray((camera.astype(np.uint16) * 257)).save(files["sixteen_bit"])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the field's loader ignores it, and so does spacil
    coffee.save(files["exif"], "JPEG", exif=exif)
    coffee.save(files["rgb"], "JPEG")
    return files


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    _photo_files(root / "photos" / "train" / "cup")
    _photo_files(root / "photos" / "test" / "cup")
    for split in ("train", "test"):
        shutil.copytree(root / "photos" / split / "cup", root / "photos" / split / "astronaut")
    return root


def test_every_image_mode_goes_through_extract(tiny_model, photos, tmp_path):
    from PIL import Image

    modes = {p.stem: Image.open(p).mode for p in (photos / "photos" / "train" / "cup").iterdir()}
    assert modes == {"grey": "L", "palette": "P", "rgba": "RGBA", "cmyk": "CMYK", "sixteen_bit": "I;16", "exif": "RGB",
                     "rgb": "RGB"}
    out = tmp_path / "store"
    assert main(["extract", "--dataset", "folder:photos", "--data-root", str(photos), "--model", tiny_model,
                 "--pretrained", "", "--out", str(out), "--quiet"]) == 0
    store = FeatureStore(out)
    assert store.classes == ["astronaut", "cup"] and len(store.split("train")) == 14
    assert store.meta["image_root"] == str((photos / "photos").absolute())
    assert store.meta["class_names_source"] == "folders"
    paths = store.image_paths("train")
    assert paths[0] == "train/astronaut/cmyk.jpg" and len(paths) == 14
    assert check_store(out) == []
    clip = FrozenCLIP(tiny_model, None)
    transform = image_transform(clip.image_size)
    for row, rel in enumerate(paths):
        image = open_store_image(store, "train", row)
        expected = Image.open(photos / "photos" / rel).convert("RGB")  # PIL's convert, as PROOF's pil_loader
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(expected)), rel
        encoded = clip.model.encode_image(transform(image)[None], normalize=True)[0].detach().numpy()
        np.testing.assert_allclose(store.split("train").global_[row].astype(np.float32), encoded, atol=3e-3)
    exif_row = paths.index("train/astronaut/exif.jpg")
    assert open_store_image(out, "train", exif_row).size == (120, 80)  # not rotated
    # a paths file that no longer fits its rows is found by `spacil check`
    (out / "test" / "image_paths.json").write_text(json.dumps(["test/x.png"]))
    assert any("1 image paths for the 14 rows" in line for line in check_store(out))


def test_a_broken_image_stops_by_name_and_the_rerun_resumes(tiny_model, photos, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(photos / "photos", root / "photos")
    broken = root / "photos" / "train" / "cup" / "rgb.jpg"
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # truncated mid-scan
    args = ["extract", "--dataset", "folder:photos", "--data-root", str(root), "--model", tiny_model, "--pretrained", "",
            "--batch-size", "4", "--quiet"]
    whole = tmp_path / "whole"
    fixed = tmp_path / "fixed"
    assert main(args + ["--out", str(fixed)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and err.count("\n") == 1
    row = json.loads((fixed / "train" / "image_paths.json").read_text()).index("train/cup/rgb.jpg")
    done = json.loads((fixed / ".progress.rank0.json").read_text())["done"]["train"]
    assert all(end <= row - row % 4 for _, end in done)  # nothing of the broken image's batch is recorded done
    broken.write_bytes(good)
    assert main(args + ["--out", str(fixed)]) == 0  # repaired: resumes
    assert main(args + ["--out", str(whole)]) == 0
    files = {p.relative_to(fixed): p.read_bytes() for p in sorted(fixed.rglob("*")) if p.is_file()}
    assert files == {p.relative_to(whole): p.read_bytes() for p in sorted(whole.rglob("*")) if p.is_file()}
    # removed instead: the rerun re-encodes that split and finishes with one row fewer
    removed = tmp_path / "removed"
    broken.write_bytes(good[:100])
    assert main(args + ["--out", str(removed)]) == 2
    broken.unlink()
    assert main(args + ["--out", str(removed)]) == 0
    store = FeatureStore(removed)
    assert len(store.split("train")) == 13 and "train/cup/rgb.jpg" not in store.image_paths("train")
    assert check_store(removed) == []
