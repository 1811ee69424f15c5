"""The nine data sets as their downloads and the field's released subsets name their class folders, and user trees.

Trees are generated: one tiny image per class folder, folder names in each data set's real convention. Where
../shared/reference/proof/labels.json is present, the folders are made from its names by that convention and every derived
name must equal the protocol's (case, spaces, `_` and `/` aside); without it, a few real folder names of each set stand
for the rest.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from conftest import REFERENCE

from spacil.cli import main
from spacil.data import DATASETS, index_dataset
from spacil.data.names import SOURCE_WORDNET, clean_class_name, derive_names, split_camel_case
from spacil.errors import InputError


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


def comparable(name: str) -> str:
    """Names as the protocol's list is compared with: case, spaces, `_` and `/` aside."""
    return " ".join(re.sub(r"[_/]", " ", name).lower().split())


def imagenet_r_wnids() -> list[str]:
    import timm

    return (Path(timm.__file__).parent / "data" / "_info" / "imagenet_r_synsets.txt").read_text().split()


# Each set's folder convention, from a protocol name (and its index) to the folder the download or released subset has.
CONVENTIONS = {
    "cub": lambda i, n: f"{i + 1:03d}." + n.replace(" ", "_"),  # CUB_200_2011/images/001.Black_footed_Albatross
    "objectnet": lambda i, n: n.replace(" ", "_"),  # objectnet-1.0/images/air_freshener
    "aircraft": lambda i, n: n.replace("/", "_"),  # variant names; `/` has no place in a folder name: F-16A_B, F_A-18
    "cars": lambda i, n: n.replace(" ", "_"),  # AM_General_Hummer_SUV_2000 (this form sorts in the protocol's order)
    "food101": lambda i, n: n.replace(" ", "_"),  # food-101/images/apple_pie
    "sun": lambda i, n: n.replace(" ", "_"),  # SUN397's category, its sub-categories (indoor/outdoor) as sub-folders
    "ucf101": lambda i, n: n.replace(" ", ""),  # UCF-101/ApplyEyeMakeup
}

# Without the reference list: real folder names of each set, and the name the protocol gives them.
SAMPLES = {
    "cub": {"001.Black_footed_Albatross": "Black footed Albatross", "022.Chuck_will_Widow": "Chuck will Widow",
            "141.Artic_Tern": "Artic Tern"},
    "objectnet": {"air_freshener": "air freshener", "bills_money": "bills money", "dress_shoe_men": "dress shoe men"},
    "aircraft": {"707-320": "707-320", "727-200": "727-200", "737-200": "737-200", "A330-200": "A330-200",
                 "F-16A_B": "F-16A/B", "F_A-18": "F/A-18", "BAE_146-200": "BAE 146-200", "Tu-134": "Tu-134"},
    "cars": {"AM_General_Hummer_SUV_2000": "AM General Hummer SUV 2000", "Audi_TTS_Coupe_2012": "Audi TTS Coupe 2012",
             "BMW_ActiveHybrid_5_Sedan_2012": "BMW ActiveHybrid 5 Sedan 2012",
             "Bugatti_Veyron_16.4_Coupe_2009": "Bugatti Veyron 16.4 Coupe 2009"},
    "food101": {"apple_pie": "apple pie", "hot_and_sour_soup": "hot and sour soup"},
    "sun": {"abbey": "abbey", "batters_box": "batters box", "mountain_snowy": "mountain snowy", "balcony": "balcony"},
    "ucf101": {"ApplyEyeMakeup": "Apply Eye Makeup", "HandStandPushups": "Hand Stand Pushups", "Skijet": "Skijet",
               "TaiChi": "Tai Chi", "PushUps": "Push Ups", "WritingOnBoard": "Writing On Board"},
}


def protocol_names(reference_labels, key) -> dict[str, str]:
    """folder -> the protocol's name, for a whole data set (the reference list) or the samples filled up to its count."""
    spec = DATASETS[key]
    if reference_labels is not None:
        names = reference_labels[key][: spec.num_classes]  # cars: its list has two names too many (PROTOCOL.md)
        return {CONVENTIONS[key](i, n): n for i, n in enumerate(names)}
    wanted = dict(SAMPLES[key])
    index = len(wanted)
    while len(wanted) < spec.num_classes:  # filler classes in the same convention
        name = "Filler " + "".join("abcdefghij"[int(d)] for d in f"{index:03d}").capitalize()  # no digit: CamelCase
        wanted[CONVENTIONS[key](index, name) if key != "cub" else f"{index + 300:03d}." + name.replace(" ", "_")] = name
        index += 1
    return wanted


def write_tree(root: Path, key: str, folders, nested: dict | None = None) -> Path:
    """<root>/<key>/{train,test}/<folder>/x.png; `nested` folders get their images in sub-folders instead."""
    for split in ("train", "test"):
        for folder in folders:
            subs = (nested or {}).get(folder, [""])
            for sub in subs:
                target = root / key / split / folder / sub
                target.mkdir(parents=True, exist_ok=True)
                (target / "x.png").write_bytes(PNG)
    return root


@pytest.fixture(scope="module")
def reference_labels():
    file = REFERENCE / "proof" / "labels.json"
    return json.loads(file.read_text()) if file.is_file() else None


@pytest.mark.parametrize("key", sorted(CONVENTIONS))
def test_each_data_set_s_folders_give_the_protocol_s_names(key, reference_labels, tmp_path):
    wanted = protocol_names(reference_labels, key)
    nested = {"balcony": ["exterior", "interior"]} if key == "sun" else None  # SUN397's /b/balcony/{exterior,interior}
    write_tree(tmp_path, key, wanted, nested)
    index = index_dataset(key, tmp_path)
    assert index.faults == []
    assert len(index.names) == DATASETS[key].num_classes
    got = dict(zip(index.folders, index.names))
    wrong = {f: (got[f], n) for f, n in wanted.items() if comparable(got[f]) != comparable(n)}
    assert not wrong, wrong
    if reference_labels is not None:
        assert [comparable(n) for n in index.names] == [comparable(n) for n in reference_labels[key][: len(index.names)]]
    if key == "sun":
        balcony = index.folders.index("balcony")
        assert int((index.splits["train"].labels == balcony).sum()) == 2  # both sub-folders read, as ImageFolder does


def test_aircraft_names_keep_their_numbers():
    folders = ["707-320", "727-200", "737-200", "A330-200", "A340-200", "Cessna_172"]
    names = derive_names(folders).names
    assert names == ("707-320", "727-200", "737-200", "A330-200", "A340-200", "Cessna 172")
    assert clean_class_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert clean_class_name("707-320") == "707-320" and clean_class_name("Bugatti_Veyron_16.4_Coupe_2009").endswith("2009")
    assert split_camel_case("BlowDryHair") == "Blow Dry Hair" and split_camel_case("A300B4") == "A300B4"


def test_imagenet_r_wordnet_folders(reference_labels, tmp_path, caplog):
    wnids = imagenet_r_wnids()
    assert len(wnids) == 200
    write_tree(tmp_path, "imagenetr", wnids)
    with caplog.at_level(logging.WARNING, logger="spacil.data.names"):
        index = index_dataset("imagenetr", tmp_path)
    warning = [r.getMessage() for r in caplog.records]
    assert len(warning) == 1 and "WordNet" in warning[0] and "--class-names" in warning[0] and "\n" not in warning[0]
    assert index.names_source == SOURCE_WORDNET and index.faults == []
    assert index.names[:3] == ["goldfish", "great white shark", "hammerhead"]
    if reference_labels is None:
        return
    labels = REFERENCE / "proof" / "labels.json"
    with pytest.warns(UserWarning, match="names differ"):  # --names-file compares only
        assert index_dataset("imagenetr", tmp_path, names_file=labels).names == index.names
    named = index_dataset("imagenetr", tmp_path, class_names=labels)
    assert [comparable(n) for n in named.names] == [comparable(n) for n in reference_labels["imagenetr"]]
    assert named.names_source.startswith("class-names file") and str(labels.resolve()) in named.names_source
    # cars: the reference list has 102 names for the 100 folders: exit 2 naming both counts
    write_tree(tmp_path, "cars", protocol_names(reference_labels, "cars"))
    assert main(["data", "check", "--dataset", "cars", "--data-root", str(tmp_path), "--class-names", str(labels),
                 "--quiet"]) == 2


def test_class_names_files(tmp_path, capsys):
    write_tree(tmp_path, "mini", ["b_class", "a_class"])
    forms = {"list.json": json.dumps(["Alpha", "Beta"]), "keyed.json": json.dumps({"folder:mini": ["Alpha", "Beta"]}),
             "lines.txt": "Alpha\n\nBeta\n"}
    for file, text in forms.items():
        (tmp_path / file).write_text(text)
        index = index_dataset("folder:mini", tmp_path, class_names=tmp_path / file)
        assert index.folders == ["a_class", "b_class"] and index.names == ["Alpha", "Beta"], file
    (tmp_path / "three.json").write_text(json.dumps(["A", "B", "C"]))
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--class-names",
                 str(tmp_path / "three.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 names for the 2 class folders" in err


def test_two_classes_with_one_name_is_exit_2(tmp_path, capsys):
    write_tree(tmp_path, "mini", ["Black_Tern", "Black Tern", "Gull"])
    code = main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and "'Black Tern' and 'Black_Tern' both get the name 'Black Tern'" in captured.err
    assert "1 fault:" in captured.out and "classes: 3" in captured.out


def test_torchvision_s_walk_hidden_files_and_empty_folders(tmp_path, capsys):
    write_tree(tmp_path, "mini", ["cat", "dog"])
    cat = tmp_path / "mini" / "train" / "cat"
    (cat / "deeper" / "deepest").mkdir(parents=True)
    (cat / "deeper" / "deepest" / "y.PNG").write_bytes(PNG)  # nested, upper-case extension: torchvision reads both
    (cat / ".hidden.png").write_bytes(PNG)
    (cat / "notes.txt").write_text("not an image")
    (cat / ".ipynb_checkpoints").mkdir()
    (cat / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(PNG)
    (tmp_path / "mini" / "train" / ".cache").mkdir()  # ImageFolder would take it for a class; hidden: skipped here
    index = index_dataset("folder:mini", tmp_path)
    assert index.folders == ["cat", "dog"] and index.faults == []
    assert list(index.splits["train"].paths) == ["train/cat/x.png", "train/cat/deeper/deepest/y.PNG", "train/dog/x.png"]
    from torchvision.datasets import ImageFolder

    assert [p for p, _ in ImageFolder(str(tmp_path / "mini" / "test")).samples] == list(index.splits["test"].items)
    (tmp_path / "mini" / "test" / "dog" / "x.png").unlink()
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mini' / 'test' / 'dog'}: empty class folder" in err and err.count("\n") == 1


def test_data_check_screen_and_the_next_command(tmp_path, capsys):
    write_tree(tmp_path, "mini", ["ApplyEyeMakeup", "Archery"])
    (tmp_path / "t.txt").write_text("a photo of a person doing {}.\n")
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--templates",
                 str(tmp_path / "t.txt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "classes: 2" in out and "train: 2 images, 1 to 1 per class" in out
    assert "ApplyEyeMakeup -> Apply Eye Makeup" in out and "folders (CamelCase split)" in out
    assert "spacil extract --dataset folder:mini" in out and "--templates" in out
    assert main(["data", "check", "--dataset", "mini", "--data-root", str(tmp_path), "--quiet"]) == 2
    assert "unknown data set" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(InputError, match="exactly one"):
        index_dataset("folder:mini", tmp_path, templates=tmp_path / "bad.txt")


def test_a_benchmark_with_another_class_count_is_a_fault(tmp_path, capsys):
    write_tree(tmp_path, "cub", ["001.Black_footed_Albatross", "002.Laysan_Albatross"])
    assert main(["data", "check", "--dataset", "cub", "--data-root", str(tmp_path), "--quiet"]) == 2
    assert "2 class folders, the protocol's CUB-200-2011 has 200" in capsys.readouterr().err


def test_a_user_tree_in_a_config_and_in_describe(tiny_model, tmp_path, capsys):
    """`folder:NAME` and a templates file: the same spelling for a config (extraction through `spacil run`'s pipeline)
    and for `spacil describe`."""
    from spacil.config import build_config
    from spacil.pipeline import prepare_store
    from spacil.store.format import FeatureStore

    write_tree(tmp_path, "mini", ["ApplyEyeMakeup", "Archery"])
    (tmp_path / "t.json").write_text(json.dumps(["a photo of {}.", "a video of {}."]))
    (tmp_path / "names.txt").write_text("applying eye make-up\narchery\n")
    config = build_config({}, ["data.dataset=folder:mini", f"data.data_root={tmp_path}", f"data.features={tmp_path / 's'}",
                               f"data.model={tiny_model}", "data.pretrained=", f"data.templates={tmp_path / 't.json'}",
                               f"data.class_names={tmp_path / 'names.txt'}"], source="--set")
    store = FeatureStore(prepare_store(config, progress=False))
    assert store.classes == ["applying eye make-up", "archery"] and store.templates.shape[:2] == (2, 2)
    assert store.meta["dataset"] == "folder:mini" and store.meta["text"]["templates"] == ["a photo of {}.", "a video of {}."]
    assert store.meta["class_names_source"].startswith("class-names file")
    out = tmp_path / "d.json"
    assert main(["describe", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--llm", "none", "--out", str(out),
                 "--templates", str(tmp_path / "t.json"), "--num-descriptions", "2"]) == 0
    described = json.loads(out.read_text())
    assert set(described["classes"]) == {"Apply Eye Makeup", "Archery"}
    assert "a photo of Archery." in json.dumps(described)


# ImageNet-1k (PROTOCOL.md, "Beyond the nine"): a few real WordNet ids, from both ends of the class index
IMAGENET_SAMPLE = ["n01440764", "n01443537", "n02123045", "n04592741", "n15075141"]


def write_imagenet_tree(root: Path, wnids) -> Path:
    """<root>/imagenet1k/{train,val}/<wnid>/x.png, as the official download unpacks with val/ sorted into folders."""
    for split in ("train", "val"):
        for wnid in wnids:
            (root / "imagenet1k" / split / wnid).mkdir(parents=True, exist_ok=True)
            (root / "imagenet1k" / split / wnid / "x.png").write_bytes(PNG)
    return root


def test_imagenet1k_names_templates_and_val_as_test(tmp_path, capsys):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo

    from spacil.data import dataset_spec
    from spacil.data.names import SOURCE_OPEN_CLIP_IMAGENET

    wnids = ImageNetInfo("imagenet-1k").label_names()
    spec = dataset_spec("imagenet1k")
    # the protocol's count is open_clip's and timm's: 1000 classes, B0 Inc100 and B500 Inc100
    assert spec.num_classes == len(IMAGENET_CLASSNAMES) == len(wnids) == 1000
    assert (spec.increment, spec.half_base) == (100, 500)
    assert spec.templates == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES) and len(spec.templates) == 80
    assert DATASETS["imagenet1k"].templates == ()  # open_clip is read when the spec is looked up, not at import
    write_imagenet_tree(tmp_path, IMAGENET_SAMPLE)
    index = index_dataset("imagenet1k", tmp_path)
    # each folder gets open_clip's name at its own id's class index, whatever other classes the tree holds
    assert index.names == ["tench", "goldfish", "tabby cat", "airplane wing", "toilet paper"]
    assert index.names == [IMAGENET_CLASSNAMES[wnids.index(w)] for w in IMAGENET_SAMPLE]
    assert index.names_source == SOURCE_OPEN_CLIP_IMAGENET
    assert index.splits["test"].paths[0] == "val/n01440764/x.png"  # val/ is the test split
    assert index.faults == [f"{index.root}: 5 class folders, the protocol's ImageNet-1k has 1000"]
    assert main(["data", "check", "--dataset", "imagenet1k", "--data-root", str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "classes: 5 (the protocol's ImageNet-1k: 1000)" in out and "n01440764 -> tench" in out
    assert "test: 5 images" in out and "store size: about" in out
    # an id that is not an ImageNet-1k class (ImageNet-21k's `n00004475`), and a tree without val/
    write_imagenet_tree(tmp_path / "b", ["n00004475", "n01440764"])
    with pytest.raises(InputError, match="class folder n00004475: not one of ImageNet-1k's 1000 WordNet ids"):
        index_dataset("imagenet1k", tmp_path / "b")
    write_tree(tmp_path / "c", "imagenet1k", IMAGENET_SAMPLE)  # train/ and test/: test/ is not read
    with pytest.raises(InputError, match=r"imagenet1k/val: missing split folder"):
        index_dataset("imagenet1k", tmp_path / "c")


def test_imagenet1k_shared_open_clip_names_and_flat_val(tmp_path, capsys, caplog):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    from spacil.data.names import open_clip_imagenet_names

    wnids = ImageNetInfo("imagenet-1k").label_names()
    names = open_clip_imagenet_names(wnids).names
    # all 1,000 ids: 1,000 names no two alike, open_clip's but for the four classes open_clip names twice, which get
    # timm's WordNet descriptions (n03773504's is open_clip's own `missile`: 997 names stay open_clip's)
    assert len({n.lower() for n in names}) == 1000 and len(set(IMAGENET_CLASSNAMES)) == 998
    renamed = {"n03773504": "missile", "n04008634": "projectile, missile",
               "n04355933": "sunglass", "n04356056": "sunglasses, dark glasses, shades"}
    assert [names[wnids.index(w)] for w in renamed] == list(renamed.values())
    differ = [w for w, n, o in zip(wnids, names, IMAGENET_CLASSNAMES) if n != o]
    assert differ == ["n04008634", "n04355933", "n04356056"]
    # a tree holding only the four: the same names (the rule looks at all 1,000), data check passes but for the count
    four = sorted(renamed)
    write_imagenet_tree(tmp_path, four)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spacil.data.names"):
        index = index_dataset("imagenet1k", tmp_path)
    assert index.names == [renamed[w] for w in four]
    assert index.faults == [f"{index.root}: 4 class folders, the protocol's ImageNet-1k has 1000"]
    assert [r.getMessage() for r in caplog.records if "timm's WordNet description" in r.getMessage()] == [
        "spacil: warning: imagenet1k: open_clip gives one name to two classes, so these are named by timm's WordNet "
        "description instead: n03773504 'missile', n04008634 'projectile, missile', n04355933 'sunglass', "
        "n04356056 'sunglasses, dark glasses, shades'"]
    # `data check`'s one fault is the class count a four-class tree cannot help
    assert main(["data", "check", "--dataset", "imagenet1k", "--data-root", str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "n04008634 -> projectile, missile" in out and "1 fault:" in out and "both get the name" not in out
    # the official val/ as it unpacks: images directly in val/ -> one line pointing to docs/data.md's recipe
    flat = tmp_path / "flat" / "imagenet1k"
    write_imagenet_tree(tmp_path / "flat", four)
    shutil.rmtree(flat / "val")
    (flat / "val").mkdir()
    for i in range(3):
        (flat / "val" / f"ILSVRC2012_val_0000000{i + 1}.JPEG").write_bytes(PNG)
    assert main(["data", "check", "--dataset", "imagenet1k", "--data-root", str(tmp_path / "flat"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"spacil: error: {flat / 'val'}: 3 images directly in val/, none in WordNet-id class folders "
                       "(the official archive's flat layout); sort them into folders as docs/data.md shows "
                       "(ImageNet-1k, \"`val/` sorted, in one command\")")


def test_imagenet1k_configs_and_sweep(tmp_path, capsys):
    from spacil.config import load_config

    b0, b500 = load_config("imagenet1k_b0"), load_config("imagenet1k_b500")
    assert (b0.data.dataset, b0.data.init_cls, b0.data.increment) == ("imagenet1k", 100, 100)
    assert (b500.data.init_cls, b500.data.increment) == (500, 100)
    assert main(["sweep", "imagenet1k", "--out", str(tmp_path / "sweep"), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[-1].startswith("66 cells under")
    assert any(line.endswith("imagenet1k_b500/spa-global_only/seed1995") for line in plan)


def test_data_check_counts_every_renamed_class_and_names_every_flag_of_the_next_command(tmp_path, capsys, monkeypatch,
                                                                                       tiny_model):
    import shlex
    import shutil
    from collections import namedtuple

    # a space doubled, an underscore, a case change (CamelCase split), and one folder left as it is
    write_tree(tmp_path, "mini", ["hot  dog", "apple_pie", "TaiChi", "zebra"])
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 differ from their folder" in out
    assert "hot  dog -> hot dog" in out and "apple_pie -> apple pie" in out and "TaiChi -> Tai Chi" in out
    command = shlex.split(next(line for line in out.splitlines() if line.strip().startswith("spacil extract")))
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags == {"--dataset": "folder:mini", "--data-root": str(tmp_path), "--model": "ViT-B-16",
                     "--pretrained": "PATH/TO/open_clip_pytorch_model.bin", "--out": "stores/mini"}
    assert "store size: about " in out and " for ViT-B-16 in float16; " in out
    # what the user gives is what the command names; a disk too small for the store is a fault (exit 2)
    checkpoint, store = tmp_path / "ckpt.bin", tmp_path / "stores" / "mini"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 ** 9, 10 ** 9, 5_000))
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--pretrained",
                 str(checkpoint), "--out", str(store), "--dtype", "float32", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert f"--out {store}: the store needs about" in captured.err and "only 5.0 kB free there" in captured.err
    monkeypatch.undo()
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--pretrained",
                 str(checkpoint), "--out", str(store), "--dtype", "float32", "--quiet"]) == 0
    next_command = capsys.readouterr().out.splitlines()[-1].strip()
    assert next_command.endswith(f"--model ViT-B-16 --pretrained {checkpoint} --dtype float32 --out {store}")
    # a local-dir: model carries its weights (extract refuses a --pretrained file beside it); its sizes are its config's
    assert main(["data", "check", "--dataset", "folder:mini", "--data-root", str(tmp_path), "--model", tiny_model,
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].strip().endswith(f"--model {tiny_model} --out stores/mini") and "--pretrained" not in out
    assert f"for {tiny_model} in float16" in out
