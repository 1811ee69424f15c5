import json

import numpy as np
import pytest

from spacil.data import (DATASETS, check_names, class_order, clean_class_name, open_dataset, open_store_image, task_boundaries,
                         task_sizes)
from spacil.errors import InputError

BENCHMARKS = [k for k in DATASETS if k not in ("shapes", "imagenet1k")]  # the paper's nine


@pytest.mark.parametrize("num_classes, first_ten", [
    (100, [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]),
    (200, [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]),
    (300, [169, 221, 146, 296, 92, 229, 49, 70, 126, 77]),
    (1000, [54, 7, 894, 512, 126, 337, 988, 11, 284, 493]),  # ImageNet-1k: np.random.seed(1993); permutation(1000)
])
def test_class_order_matches_the_protocol(num_classes, first_ten):
    state = np.random.get_state()
    assert class_order(num_classes, 1993)[:10] == first_ten
    # the legacy global generator is left untouched
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert sorted(class_order(num_classes, 1993)) == list(range(num_classes))


def test_splits():
    assert task_sizes(100, 10, 10) == [10] * 10
    assert task_sizes(200, 100, 20) == [100] + [20] * 5
    assert task_boundaries([50, 10, 10]) == [(0, 50), (50, 60), (60, 70)]
    with pytest.raises(InputError, match="increment=7"):
        task_sizes(100, 10, 7)
    with pytest.raises(InputError, match="init_cls=400"):
        task_sizes(300, 400, 30)


def test_nine_benchmarks_and_their_sizes():
    expected = {"cifar224": 100, "cub": 200, "imagenetr": 200, "objectnet": 200, "aircraft": 100, "cars": 100,
                "food101": 100, "sun": 300, "ucf101": 100}
    assert {k: DATASETS[k].num_classes for k in BENCHMARKS} == expected
    for key in BENCHMARKS:
        spec = DATASETS[key]
        assert spec.num_classes % spec.increment == 0 and spec.half_base * 2 == spec.num_classes


def test_templates_match_the_reference(reference):
    published = json.loads((reference / "proof" / "templates.json").read_text())
    for key in BENCHMARKS:
        assert list(DATASETS[key].templates) == published[key], key


def test_folder_names_become_reference_names(reference):
    labels = json.loads((reference / "proof" / "labels.json").read_text())
    # CUB's folders carry an index prefix, ImageNet-R's PROOF names keep underscores: both normalise to the same name
    assert clean_class_name("001.Black_footed_Albatross") == labels["cub"][0]
    assert clean_class_name("great_white_shark") == labels["imagenetr"][1].replace("_", " ")
    area = json.loads((reference / "area_descriptions" / "labels_area.json").read_text())
    assert len(area["cifar224"]) == 100


def test_names_file_mismatch_warns_and_never_shifts(reference, tmp_path):
    labels = json.loads((reference / "proof" / "labels.json").read_text())
    folders = [f"folder {i}" for i in range(100)]
    with pytest.warns(UserWarning) as record:
        bad = check_names(folders, labels["cars"], "labels.json")
    messages = [str(w.message) for w in record]
    assert any("102 names for 100 class folders; keeping the folder names" in m for m in messages)
    assert any("100 names differ from the folders" in m for m in messages) and len(bad) == 100


def test_imagefolder_names_from_folders(shapes_root, tmp_path):
    names, splits = open_dataset("shapes", shapes_root)
    assert names == ["red square", "green circle", "blue triangle", "yellow cross"]
    assert len(splits["train"].items) == 24 and splits["test"].labels.tolist() == sorted(splits["test"].labels.tolist())
    listed = tmp_path / "names.json"
    listed.write_text(json.dumps(["red square", "green circle", "blue square", "yellow cross"]))
    with pytest.warns(UserWarning, match="folder 'blue triangle' vs 'blue square'"):
        names2, _ = open_dataset("shapes", shapes_root, listed)
    assert names2 == names


def test_bad_data_roots(tmp_path, shapes_root):
    with pytest.raises(InputError, match="no such folder"):
        open_dataset("shapes", tmp_path / "missing")
    with pytest.raises(InputError, match="data set folder not found"):
        open_dataset("cub", tmp_path)
    with pytest.raises(InputError, match="CIFAR-100 not found"):
        open_dataset("cifar224", tmp_path)
    broken = tmp_path / "b"
    import shutil

    shutil.copytree(shapes_root / "shapes", broken / "shapes")
    shutil.rmtree(broken / "shapes" / "test" / "03.yellow_cross")
    with pytest.raises(InputError, match="train and test class folders differ.*03.yellow_cross"):
        open_dataset("shapes", broken)
    with pytest.raises(InputError, match="unknown data set"):
        open_dataset("mnist", tmp_path)


def test_cifar100_through_torchvision(tmp_path, monkeypatch):
    """A CIFAR-100 folder in torchvision's own format (written here with two images per split) is read by torchvision."""
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"class_{i}" for i in range(100)]
    fine[1] = "aquarium_fish"
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": ["c"] * 20}, f)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": np.zeros((2, 3072), dtype=np.uint8), "fine_labels": [1, 5], "coarse_labels": [0, 0]}, f)
    import torchvision.datasets.cifar as cifar

    with pytest.raises(InputError, match="cifar-100-python.*corrupt"):
        open_dataset("cifar224", tmp_path)  # our two-image files do not carry the official checksums
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    names, splits = open_dataset("cifar224", tmp_path)
    assert names[1] == "aquarium fish" and splits["train"].labels.tolist() == [1, 5]
    assert splits["test"].loader(0).size == (32, 32)
    # a stored row's image comes back through torchvision from its `<split>/<index>` entry
    assert splits["train"].paths == ("train/0", "train/1")

    class Store:  # what open_store_image needs of a FeatureStore
        meta = {"dataset": "cifar224", "image_root": str(tmp_path)}

        def image_paths(self, split):
            return list(splits[split].paths)

    image = open_store_image(Store(), "test", 1)
    assert image.mode == "RGB" and image.size == (32, 32)
