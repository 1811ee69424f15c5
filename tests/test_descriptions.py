import json

import numpy as np
import pytest

from spacil.cli import main
from spacil.describe.descriptions import (default_token_counter, diverse_subset, import_descriptions, load_descriptions, parse_answer, validate_descriptions)
from spacil.errors import InputError
from spacil.store.format import FeatureStore


def test_parse_and_validate():
    count = default_token_counter()
    assert parse_answer("1. long ears\n- fluffy tail\n\n* \"white fur\"\n(4) pink nose") == ["long ears", "fluffy tail", "white fur", "pink nose"]
    assert validate_descriptions(["a", "b"], 2, count) is None
    assert "expected 3" in validate_descriptions(["a", "b"], 3, count)
    assert "duplicate" in validate_descriptions(["Long ears.", "long ears"], 2, count)
    assert "77 tokens" in validate_descriptions(["ok", "word " * 80], 2, count)


def test_diverse_subset_is_deterministic_distinct_and_spread():
    sentences = ["a red apple on a table", "a red apple on the table", "a green apple in grass", "an apple core on a plate",
                 "a red apple on a table", "sliced apple pieces in a bowl"]
    chosen = diverse_subset(sentences, 3)
    assert chosen == diverse_subset(sentences, 3) and len(set(chosen)) == 3
    assert not {"a red apple on a table", "a red apple on the table"} <= set(chosen)  # near-duplicates are not both kept
    assert diverse_subset(sentences, 10) == list(dict.fromkeys(sentences))


def test_import_area_reference_set(reference, tmp_path):
    out = tmp_path / "cifar.json"
    assert main(["descriptions", "import", "--format", "area", str(reference / "area_descriptions" / "cifar100"),
                 "--out", str(out), "--num-descriptions", "8", "--dataset", "cifar224"]) == 0
    result = load_descriptions(out)
    labels = json.loads((reference / "area_descriptions" / "labels_area.json").read_text())["cifar224"]
    assert sorted(result.classes) == sorted(labels)
    count = default_token_counter()
    for name, entry in result.classes.items():
        assert 1 <= len(entry["descriptions"]) <= 8 and len(set(entry["descriptions"])) == len(entry["descriptions"])
        assert all(count(s) <= 77 for s in entry["descriptions"])
    assert result.source == "area" and result.dataset == "cifar224"


def test_import_cub_area_names_match_folder_names(reference, tmp_path):
    result, report = import_descriptions("area", reference / "area_descriptions" / "CUB", 4)
    assert "Black footed Albatross" in result.classes and report.classes == 200


def test_import_json_and_engine(tmp_path):
    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"red square": ["a red block", "four equal sides", "sharp corners", "a red block"]}))
    result, _ = import_descriptions("json", cupl, 8)
    assert result.classes["red square"]["descriptions"] == ["a red block", "four equal sides", "sharp corners"]
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"cat": {"cat": ["a small furry pet"], "dog": ["pointed ears", "slit pupils"], "lion": ["no mane"]}}))
    result, _ = import_descriptions("engine", engine, 3)
    assert result.classes["cat"]["descriptions"][0] == "a small furry pet" and len(result.classes["cat"]["descriptions"]) == 3
    with pytest.raises(InputError, match="expected a JSON object"):
        import_descriptions("engine", cupl, 3)
    bad = tmp_path / "area"
    bad.mkdir()
    (bad / "x_descriptions.txt").write_text("no tab here\n")
    with pytest.raises(InputError, match="line 1"):
        import_descriptions("area", bad, 3)


def test_descriptions_become_the_stores_semantic_tokens(tiny_model, shapes_root, tmp_path):
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({"red_square": ["a red block", "four sharp corners"], "Green Circle": ["a round green disc"]}))
    store = tmp_path / "store"
    with pytest.warns(UserWarning, match="2 of 4 classes have none"):
        assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
                     "--out", str(store), "--quiet", "--descriptions", str(descriptions)]) == 0
    loaded = FeatureStore(store)
    assert loaded.description_mask.sum(axis=1).tolist() == [2, 1, 0, 0]
    np.testing.assert_allclose(np.linalg.norm(loaded.descriptions[0, :2], axis=-1), 1, atol=1e-5)
    # recorded relative to the store (issue 26: it resolves from any working directory)
    assert json.loads((store / "meta.json").read_text())["text"]["descriptions_source"] == "../" + descriptions.name


def test_descriptions_can_be_added_to_a_finished_store_only_with_its_model(tiny_model, shapes_root, tmp_path):
    from spacil.backbone import write_tiny_model

    store = tmp_path / "store"
    assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
                 "--out", str(store), "--quiet"]) == 0
    assert FeatureStore(store).descriptions is None
    images = (store / "train" / "patches.npy").read_bytes()
    descriptions = tmp_path / "d.json"
    descriptions.write_text(json.dumps({name: [f"a {name}", f"the {name} shape"] for name in
                                        ["red square", "green circle", "blue triangle", "yellow cross"]}))
    assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", tiny_model, "--pretrained", "",
                 "--out", str(store), "--quiet", "--descriptions", str(descriptions)]) == 0
    assert FeatureStore(store).description_mask.all() and (store / "train" / "patches.npy").read_bytes() == images
    other = write_tiny_model(tmp_path / "other_clip", seed=5)
    assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", other, "--pretrained", "",
                 "--out", str(store), "--quiet", "--descriptions", str(descriptions)]) == 2
