"""`spacil explain`: the figure and its numbers, on real photos (scikit-image's) through a tiny random-weight CLIP.

The numbers must be the ones the learner predicts with: the test encodes the photos itself and compares explain's logits
with the runner's prediction path on those features, and the picked patches with `select_top_k` on the relevance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from spacil.cli import main
from spacil.config import build_config
from spacil.describe.descriptions import DescriptionSet, load_descriptions, template_descriptions
from spacil.data import DATASETS
from spacil.explain import DPI, HEIGHT, PANEL_WIDTHS, explain_images, load_backbone, load_run
from spacil.learner import TaskData
from spacil.ops.patch_selection import select_top_k
from spacil.runner import Run
from spacil.store.extract import encode_pil_images, extract_store
from spacil.store.format import FeatureStore

RUNS = {
    "spa": ("spa", {}),
    "random_patches": ("spa", {"ablation": {"semantic_selection": False}}),
    "no_ot": ("spa", {"ablation": {"optimal_transport": False}}),
    "global_only": ("spa", {"ablation": {"patch_branch": False}}),
    "template_tokens": ("spa", {"ablation": {"llm_descriptions": False}}),
    "simplecil": ("simplecil", {}),
}


@pytest.fixture(scope="module")
def world(tiny_model, shapes_root, tmp_path_factory):
    """A store of the generated shapes (descriptions from a file), one finished run per variant, three real photos."""
    from PIL import Image
    from skimage import data

    base = tmp_path_factory.mktemp("explain")
    names = ["red square", "green circle", "blue triangle", "yellow cross"]
    descriptions = base / "descriptions.json"
    sentences = template_descriptions(names, DATASETS["shapes"].templates)
    DescriptionSet(source="templates", classes={n: {"descriptions": s} for n, s in sentences.items()}).save(descriptions)
    store = base / "store"
    extract_store("shapes", shapes_root, store, model=tiny_model, pretrained=None, batch_size=8, device="cpu",
                  descriptions=load_descriptions(descriptions).sentences, descriptions_source=str(descriptions),
                  progress=False)
    runs = {}
    for name, (method, extra) in RUNS.items():
        tree = {"method": method, "device": "cpu", "data": {"features": str(store), "init_cls": 2, "increment": 2},
                "train": {"epochs": 1}, "spa": {"top_k_patches": 4}, **extra}
        Run(build_config(tree), FeatureStore(store), base / name).run()
        runs[name] = base / name
    photos = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = base / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        photos.append(path)
    return {"store": store, "runs": runs, "photos": photos, "descriptions": descriptions, "base": base}


def _expected_size(panels: list[str]) -> tuple[int, int]:
    return round(sum(PANEL_WIDTHS[p] for p in panels) * DPI), round(HEIGHT * DPI)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _runner_logits(run_dir: Path, photos: list[Path], device: str = "cpu") -> torch.Tensor:
    """The photos encoded here, then scored through the runner's prediction path (TaskData batches -> learner.logits)."""
    from PIL import Image

    run = load_run(run_dir, device=device)
    backbone = load_backbone(run.store, run.device)
    images = [Image.open(p).convert("RGB") for p in photos]
    global_, patches = encode_pil_images(backbone, images, str(run.store.split("test").global_.dtype))
    data = TaskData(0, global_.cpu().numpy(), patches.cpu().numpy(), np.zeros(len(images), dtype=np.int64), run.device)
    logits = [run.learner.logits(batch) for batch in data.batches(run.config.train.eval_batch_size)]
    return torch.cat(logits).cpu()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_spa_figure_and_numbers_are_the_learners(world, tmp_path, device):
    out = tmp_path / "out"
    written = explain_images(world["runs"]["spa"], world["photos"], class_name="Green_Circle", out=out, device=device,
                             top=3, echo=lambda line: None)
    assert [p.name for p in written] == ["astronaut.json", "chelsea.json", "coffee.json"]
    logits = _runner_logits(world["runs"]["spa"], world["photos"], device)
    for b, path in enumerate(written):
        text = path.read_text()
        record = json.loads(text)
        assert json.loads(json.dumps(record)) == record  # plain JSON: redrawn or checked from the file alone
        np.testing.assert_allclose(record["logits"], logits[b].numpy(), atol=1e-5, rtol=0)
        scale, weight = record["logit_scale"], record["patch_weight"]
        np.testing.assert_allclose(record["logits"], scale * (np.array(record["global"]) + weight * np.array(record["patch"])),
                                   atol=1e-5, rtol=0)
        assert record["predicted"] == record["classes"][int(np.argmax(record["logits"]))]
        assert [t["class"] for t in record["top"]] == [record["classes"][i] for i in np.argsort(record["logits"])[::-1][:3]]
        roles = [e["role"] for e in record["explained"]]
        assert roles in (["predicted", "given"], ["predicted and given"])
        assert record["explained"][-1]["class"] == "green circle"
        for explained in record["explained"]:
            relevance = torch.tensor(explained["relevance"])
            assert len(relevance) == 16  # the tiny model's 4x4 grid
            picked, _ = select_top_k(relevance.view(1, 1, -1), 4)
            assert explained["picked"] == picked.view(-1).tolist()
            plan = np.array(explained["plan"])
            assert plan.shape == (4, 2)  # k patches x the class's two template sentences
            assert plan.sum() == pytest.approx(1.0, abs=1e-4)
            assert explained["sentences"] == [t.format(explained["class"]) for t in DATASETS["shapes"].templates]
        from PIL import Image

        png = Image.open(out / f"{path.stem}.png")
        assert record["panels"] == ["sentences"] * (len(roles) - 1) + ["photo", "sentences", "scores"]
        assert png.size == _expected_size(record["panels"])


@pytest.mark.parametrize("variant", ["random_patches", "no_ot", "global_only", "template_tokens", "simplecil"])
def test_what_each_run_really_uses(world, tmp_path, variant):
    lines = []
    (path,) = explain_images(world["runs"][variant], world["photos"][1:2], out=tmp_path, device="cpu", echo=lines.append)
    record = json.loads(path.read_text())
    logits = _runner_logits(world["runs"][variant], world["photos"][1:2])
    np.testing.assert_allclose(record["logits"], logits[0].numpy(), atol=1e-5, rtol=0)
    from PIL import Image

    assert Image.open(path.with_suffix(".png")).size == _expected_size(record["panels"])
    if variant in ("global_only", "simplecil"):
        assert record["panels"] == ["photo", "scores"] and record["explained"] == []
        if variant == "global_only":
            assert record["patch"] is None and len(record["global"]) == len(record["classes"])
        if variant == "simplecil":
            assert "global" not in record and any("class scores only" in line for line in lines)
        return
    (explained,) = record["explained"]
    plan = np.array(explained["plan"])
    if variant == "random_patches":
        assert "random patches" in record["shows"]
    if variant == "no_ot":
        assert "uniform plan" in record["shows"]
        np.testing.assert_allclose(plan, np.full_like(plan, 1 / plan.size), atol=1e-7)
    if variant == "template_tokens":
        assert explained["sentences"] == [t.format(explained["class"]) for t in DATASETS["shapes"].templates]


def test_a_stored_row_through_the_image_paths_scores_as_the_stored_features(world, tmp_path):
    run_dir = world["runs"]["spa"]
    (path,) = explain_images(run_dir, rows=["test:4"], out=tmp_path, device="cpu", echo=lambda line: None)
    assert path.name == "test_4.json"
    record = json.loads(path.read_text())
    run = load_run(run_dir, device="cpu")
    test = run.store.split("test")
    true_name = run.store.classes[int(test.labels[4])]
    assert record["explained"][-1]["class"] == true_name  # the store knows the row's class: drawn as --class is
    stored = TaskData(0, test.global_[4:5], test.patches[4:5], np.zeros(1, dtype=np.int64), run.device)
    (batch,) = stored.batches(8)
    np.testing.assert_allclose(record["logits"], run.learner.logits(batch)[0].numpy(), atol=1e-3, rtol=0)


def test_the_command_line(world, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["explain", str(world["runs"]["spa"]), str(world["photos"][0]), "--row", "test:0", "--top", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.json", "astronaut.png", "test_0.json", "test_0.png"]
    assert len(json.loads((out / "astronaut.json").read_text())["top"]) == 2


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_descriptions_gone_or_changed_are_refused_in_one_line(world, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    moved = tmp_path / "elsewhere.json"
    shutil.copy(world["descriptions"], moved)
    meta = json.loads((store / "meta.json").read_text())
    meta["text"]["descriptions_source"] = str(tmp_path / "gone.json")
    (store / "meta.json").write_text(json.dumps(meta))
    argv = ["explain", str(world["runs"]["spa"]), str(world["photos"][0]), "--store", str(store), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    assert "gone.json: the descriptions file" in _one_line_error(capsys, argv)
    assert main(argv + ["--descriptions", str(moved)]) == 0  # the file, moved: named on the command line
    changed = json.loads(moved.read_text())
    changed["classes"]["blue triangle"]["descriptions"].append("a third sentence.")
    moved.write_text(json.dumps(changed))
    err = _one_line_error(capsys, argv + ["--descriptions", str(moved)])
    assert "class 'blue triangle' has 3 sentences" in err and "2" in err


def test_missing_backbone_weights_name_the_file(world, tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model[len("local-dir:"):], model)
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    meta = json.loads((store / "meta.json").read_text())
    meta["backbone"]["model"] = f"local-dir:{model}"
    (store / "meta.json").write_text(json.dumps(meta))
    argv = ["explain", str(world["runs"]["spa"]), str(world["photos"][0]), "--store", str(store), "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    (model / "open_clip_pytorch_model.bin").unlink()
    assert "open_clip_pytorch_model.bin: missing" in _one_line_error(capsys, argv)
    shutil.rmtree(model)
    assert "open_clip_config.json: missing" in _one_line_error(capsys, argv)
    assert "--pretrained" in _one_line_error(capsys, argv + ["--pretrained", str(tmp_path / "w.pt")])  # local-dir: its own
    meta["backbone"]["model"], meta["backbone"]["pretrained"] = "ViT-B-16", str(tmp_path / "ViT-B-16.pt")
    (store / "meta.json").write_text(json.dumps(meta))
    assert "ViT-B-16.pt: missing" in _one_line_error(capsys, argv)
    assert "moved.pt: missing" in _one_line_error(capsys, argv + ["--pretrained", str(tmp_path / "moved.pt")])
    meta["backbone"]["pretrained"] = "laion400m_e32"  # an open_clip tag, not cached here and no network
    (store / "meta.json").write_text(json.dumps(meta))
    err = _one_line_error(capsys, argv)
    assert "weights of ViT-B-16 'laion400m_e32' are missing" in err and "--pretrained FILE" in err


def test_bad_arguments_are_one_line(world, tmp_path, capsys):
    run, options = str(world["runs"]["spa"]), ["--out", str(tmp_path), "--device", "cpu"]
    photo = str(world["photos"][0])
    assert "--class violet hexagon" in _one_line_error(capsys, ["explain", run, photo, "--class", "violet hexagon", *options])
    assert "--row test-3" in _one_line_error(capsys, ["explain", run, "--row", "test-3", *options])
    assert "--row test:999" in _one_line_error(capsys, ["explain", run, "--row", "test:999", *options])
    assert "no image given" in _one_line_error(capsys, ["explain", run, *options])
    assert "not a readable image" in _one_line_error(capsys, ["explain", run, str(world["descriptions"]), *options])
    assert "missing; not a run folder" in _one_line_error(capsys, ["explain", str(tmp_path), photo, *options])


def test_word_tokens_are_mapped_to_their_sentences(world, tiny_model, shapes_root, tmp_path):
    store = tmp_path / "store"
    extract_store("shapes", shapes_root, store, model=tiny_model, pretrained=None, batch_size=8, device="cpu",
                  descriptions=load_descriptions(world["descriptions"]).sentences,
                  descriptions_source=str(world["descriptions"]), semantic_tokens="word", progress=False)
    tree = {"device": "cpu", "data": {"features": str(store), "init_cls": 2, "increment": 2}, "train": {"epochs": 1},
            "spa": {"top_k_patches": 4, "semantic_tokens": "word"}}
    Run(build_config(tree), FeatureStore(store), tmp_path / "run").run()
    (path,) = explain_images(tmp_path / "run", world["photos"][:1], out=tmp_path / "out", device="cpu", echo=lambda line: None)
    (explained,) = json.loads(path.read_text())["explained"]
    words = [len(s.rstrip(".").split()) for s in explained["sentences"]]  # "a photo of a red square.": 6 words ('.' dropped)
    assert explained["token_sentence"] == [i for i, n in enumerate(words) for _ in range(n)]
    assert np.array(explained["plan"]).shape == (4, sum(words))


# issue 26: write failures and recorded paths ----------------------------------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("spacil: error: "), err
    return err


def test_explain_on_a_full_disk_or_a_readonly_folder_is_one_line(world, full_disk, readonly_disk, capsys):
    from conftest import no_partial_files

    run, photo = str(world["runs"]["spa"]), str(world["photos"][0])
    assert main(["explain", run, photo, "--out", str(full_disk / "explain"), "--device", "cpu"]) == 2
    err = _one_line(capsys)
    assert str(full_disk / "explain" / "astronaut.png") in err and "No space left on device" in err and "free" in err
    assert no_partial_files(full_disk)
    assert main(["explain", run, photo, "--out", str(readonly_disk / "explain"), "--device", "cpu"]) == 2
    assert f"{readonly_disk / 'explain'}: cannot write (Read-only file system" in _one_line(capsys)


def test_a_store_moved_with_its_runs_and_explain_from_another_directory(world, tmp_path, monkeypatch, capsys):
    import yaml

    moved = tmp_path / "moved"
    shutil.copytree(world["store"], moved / "store")
    shutil.copytree(world["runs"]["spa"], moved / "spa")
    shutil.copy(world["descriptions"], moved / "descriptions.json")
    config = yaml.safe_load((moved / "spa" / "config.yaml").read_text())
    assert config["data"]["features"] == "../store"  # recorded relative to the run folder
    assert json.loads((moved / "store" / "meta.json").read_text())["text"]["descriptions_source"] == "../descriptions.json"
    shutil.move(str(world["base"] / "descriptions.json"), str(tmp_path / "elsewhere.json"))  # only the moved copy is left
    try:
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert main(["explain", "../moved/spa", str(world["photos"][0]), "--out", "out", "--device", "cpu"]) == 0
        assert (elsewhere / "out" / "astronaut.png").is_file()
        record = json.loads((elsewhere / "out" / "astronaut.json").read_text())
        assert record["explained"][0]["sentences"]  # the sentences came from the descriptions file moved beside the store
    finally:
        shutil.move(str(tmp_path / "elsewhere.json"), str(world["base"] / "descriptions.json"))
    # a run folder of spacil 0.3 recorded the store as given, relative to where `spacil run` ran: still read from there
    config["data"]["features"] = "store"
    (moved / "spa" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(moved)
    assert main(["explain", "spa", str(world["photos"][0]), "--out", str(tmp_path / "old"), "--device", "cpu"]) == 0


def test_runs_record_their_store_relative_and_resume_from_anywhere(world, tmp_path, monkeypatch, capsys):
    import yaml

    project = tmp_path / "project"
    shutil.copytree(world["store"], project / "stores" / "shapes")
    monkeypatch.chdir(project)
    args = ["run", "--method", "simplecil", "--init-cls", "2", "--increment", "2", "--quiet", "--device", "cpu"]
    assert main([*args, "--features", "stores/shapes", "--out", "runs/simplecil"]) == 0
    run = project / "runs" / "simplecil"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["features"] == "../../stores/shapes"
    monkeypatch.chdir(tmp_path)  # the same store named from elsewhere is the same setting
    assert main([*args, "--features", "project/stores/shapes", "--out", "project/runs/simplecil", "--resume"]) == 0
    # the store moved without its runs: a resume that names its new place goes on, and records it
    shutil.move(str(project / "stores" / "shapes"), str(tmp_path / "shapes"))
    assert main([*args, "--features", str(tmp_path / "shapes"), "--out", str(run), "--resume"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["features"] == "../../../shapes"
    # a run's config.yaml runs again as it is, from any directory (its paths resolve against its folder)
    assert main(["run", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    other = tmp_path / "other"
    shutil.copytree(world["store"], other)
    assert main([*args, "--features", str(other), "--out", str(run), "--resume"]) == 2  # another store: refused
    assert "data.features" in _one_line(capsys)
