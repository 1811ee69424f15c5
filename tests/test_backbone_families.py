"""SPA on every open_clip image-tower family (docs/backbones.md), with tiny random-weight models written as `local-dir:`
folders through open_clip's own config format: a SigLIP-style timm ViT with MAP pooling, an EVA02-style timm ViT with token
pooling, a ConvNeXt. For each: g is the model's own `encode_image` under the model's own transform, P follows the family's
rule, z (where one exists) projects onto g; extract, `spacil check`, an SPA run and `spacil explain` on the family's grid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spacil.backbone import FrozenCLIP, Preprocess, model_preprocess, write_tiny_tower_model
from spacil.cli import main
from spacil.data import DATASETS
from spacil.describe.descriptions import DescriptionSet, template_descriptions
from spacil.errors import InputError

FAMILIES = ("timm-vit-map", "timm-vit", "timm-convnext")
GRIDS = {"timm-vit-map": (14, 14), "timm-vit": (16, 16), "timm-convnext": (7, 7)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, FrozenCLIP]:
    base = tmp_path_factory.mktemp("families")
    return {family: FrozenCLIP(write_tiny_tower_model(base / family, family, seed=3), None) for family in FAMILIES}


def _photo(seed: int = 0, size: tuple[int, int] = (300, 200)):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("family", FAMILIES)
def test_g_is_the_model_s_own_encode_image_under_its_own_transform(models, family):
    clip = models[family]
    assert clip.family == family and clip.grid == GRIDS[family] and clip.num_patches == np.prod(GRIDS[family])
    images = torch.stack([clip.preprocess.transform()(_photo(s)) for s in range(2)])
    g, patches, z = clip.encode_image_features(images)
    torch.testing.assert_close(g, clip.model.encode_image(images, normalize=True), rtol=0, atol=1e-6)
    assert patches.shape == (2, clip.num_patches, clip.dim)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(2, clip.num_patches))
    if family == "timm-vit-map":  # SigLIP: the pooled feature is the embedding, nothing projects it
        assert z is None and clip.width is None
        with pytest.raises(InputError, match="timm-vit-map image tower has no pre-projection feature z"):
            clip.visual_projection()
    else:
        assert z.shape == (2, clip.width)
        torch.testing.assert_close(F.normalize(z @ torch.from_numpy(clip.visual_projection()), dim=-1), g,
                                   rtol=0, atol=1e-6)


def test_the_model_s_own_transform_is_open_clip_s(models):
    """SigLIP-style statistics (0.5) and bilinear squash: the same tensor as open_clip's own inference transform."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    clip = models["timm-vit-map"]
    assert clip.preprocess.mean == (0.5, 0.5, 0.5) and clip.preprocess.interpolation == "bilinear"
    theirs = image_transform_v2(PreprocessCfg(**clip.model.visual.preprocess_cfg), is_train=False)
    photo = _photo(1)
    torch.testing.assert_close(clip.preprocess.transform()(photo), theirs(photo), rtol=0, atol=0)
    # a `shortest` a local-dir config names itself is kept (ConvNeXt's here: ImageNet statistics)
    assert models["timm-convnext"].preprocess.resize_mode == "shortest"
    assert models["timm-convnext"].preprocess.mean == (0.485, 0.456, 0.406)


def test_built_in_models_get_their_tags_preprocessing_and_the_protocol_path_stays():
    """A built-in architecture with a checkpoint file gets the config its pretrained tags share; open_clip's default
    `shortest` becomes the protocol's squash, so ViT-B-16 keeps CLIP's statistics, bicubic, squash to 224."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    net = SimpleNamespace(visual=SimpleNamespace(preprocess_cfg={**asdict(PreprocessCfg()), "size": (224, 224)}))
    siglip = model_preprocess(net, "ViT-B-16-SigLIP", __file__)
    assert (siglip.mean, siglip.std, siglip.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "squash")
    protocol = model_preprocess(net, "ViT-B-16", __file__)
    assert protocol == Preprocess(source=protocol.source)  # CLIP_MEAN / CLIP_STD, bicubic, squash, 224


def test_map_patch_is_the_pool_on_that_patch_alone(models):
    """MAP rule: patch i through the attention pool as a one-token sequence (softmax over one key = 1: the value/output
    path, then the pool's MLP), then fc_norm and the head. Distinct patch tokens, so a pool over all patches (or over a
    neighbour) gives other rows."""
    clip = models["timm-vit-map"]
    tower = clip.tower
    trunk = tower.trunk
    tokens = torch.randn(1, trunk.num_prefix_tokens + 196, trunk.embed_dim, generator=torch.Generator().manual_seed(0))
    tower._trunk_features = lambda images, device, precision: tokens
    try:
        _, patches, _ = tower.features(None, clip.device, clip.precision)
    finally:
        del tower._trunk_features
    attn = trunk.attn_pool
    half = attn.kv.out_features // 2  # kv's outputs are [keys, values]

    def head(pooled):  # fc_norm, timm's classifier, open_clip's head: the same chain g goes through
        return clip.model.visual.head(trunk.head(trunk.fc_norm(pooled)))

    for i in (0, 1, 100, 195):
        token = tokens[:, trunk.num_prefix_tokens + i]  # [1, C]
        value_path = attn.proj(F.linear(token, attn.kv.weight[half:], attn.kv.bias[half:]))
        alone = value_path + attn.mlp(attn.norm(value_path))
        torch.testing.assert_close(patches[:, i], head(alone), rtol=0, atol=1e-5)  # the tower gives them unnormalised
        torch.testing.assert_close(patches[:, i], head(attn(token[:, None])), rtol=0, atol=1e-5)
    assert (patches[0, 0] - patches[0, 1]).abs().max() > 1e-2


def test_token_pooling_patch_is_the_patch_token_through_the_head(models):
    clip = models["timm-vit"]
    trunk = clip.tower.trunk
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    _, patches, _ = clip.encode_image_features(images)
    tokens = trunk.forward_features(images)[:, trunk.num_prefix_tokens:]
    torch.testing.assert_close(patches, F.normalize(trunk.head(trunk.fc_norm(tokens)), dim=-1), rtol=0, atol=1e-6)


def test_convnext_patch_is_a_feature_map_position_through_the_head(models):
    clip = models["timm-convnext"]
    trunk = clip.tower.trunk
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    _, patches, _ = clip.encode_image_features(images)
    fmap = trunk.forward_features(images)  # [1, C, 7, 7]
    position = fmap[0, :, 2, 5]  # row 2, column 5: patch 2 * 7 + 5
    expected = clip.model.visual.head(trunk.head.norm(position[None, :, None, None]).flatten(1))
    torch.testing.assert_close(patches[0, 2 * 7 + 5], F.normalize(expected, dim=-1)[0], rtol=0, atol=1e-6)


def test_siglip_text_tower_and_logit_bias(models):
    clip = models["timm-vit-map"]
    texts = ["a photo of a red square.", "a bird"]
    torch.testing.assert_close(clip.encode_texts(texts), clip.model.encode_text(clip.tokenizer(texts), normalize=True),
                               rtol=0, atol=1e-6)
    assert clip.info.logit_bias == -10.0 and clip.info.to_dict()["logit_bias"] == -10.0
    words = clip.encode_text_tokens(["a red square."])[0]
    assert words.shape == (3, clip.dim)  # a, red, square ('.' dropped)


def test_a_tower_without_patch_tokens_and_an_uncached_hf_tokenizer_exit_2(small_shapes, tmp_path, capsys):
    import open_clip

    folder = tmp_path / "resnet"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 64, "timm_model_name": "resnet10t", "timm_model_pretrained": False,
                                        "timm_pool": "avg", "timm_proj": "linear"},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}))
    torch.save(open_clip.create_model(f"local-dir:{folder}").state_dict(), folder / "open_clip_pytorch_model.bin")
    code = main(["extract", "--dataset", "shapes", "--data-root", str(small_shapes[0]), "--model", f"local-dir:{folder}",
                 "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "no usable patch tokens" in err and "ResNet" in err and len(err.strip().splitlines()) == 1

    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads(json.dumps(__import__("spacil.backbone", fromlist=["x"]).TINY_TOWER_CONFIGS["timm-vit-map"]))
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "spacil-test/not-cached-tokenizer"
    (hf / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="Hugging Face's spacil-test/not-cached-tokenizer, which could not be loaded"):
        FrozenCLIP(f"local-dir:{hf}", None)


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> tuple[Path, Path]:
    from spacil.demo.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("family_data")
    write_shapes_dataset(root, train_per_class=2, test_per_class=1, seed=4)
    names = ["red square", "green circle", "blue triangle", "yellow cross"]
    descriptions = root / "descriptions.json"
    sentences = template_descriptions(names, DATASETS["shapes"].templates)
    DescriptionSet(source="templates", classes={n: {"descriptions": s} for n, s in sentences.items()}).save(descriptions)
    return root, descriptions


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_check_spa_run_and_explain(models, small_shapes, tmp_path, capsys, family):
    root, descriptions = small_shapes
    model = models[family].info.model
    store, run = tmp_path / "store", tmp_path / "run"
    assert main(["extract", "--dataset", "shapes", "--data-root", str(root), "--model", model, "--batch-size", "8",
                 "--device", "cpu", "--out", str(store), "--quiet"] + _descriptions_args(descriptions)) == 0
    meta = json.loads((store / "meta.json").read_text())
    assert meta["image_tower"]["family"] == family and meta["image_tower"]["grid"] == list(GRIDS[family])
    assert meta["preprocess"] == models[family].preprocess.to_dict()
    assert ("width" in meta) == (family != "timm-vit-map")
    assert main(["check", str(store), "--quiet"]) == 0
    # the rows went through the model's own transform (SigLIP's 0.5 statistics, ConvNeXt's ImageNet ones and centre crop)
    from PIL import Image

    from spacil.store.format import FeatureStore

    features = FeatureStore(store)
    clip = models[family]
    image = Image.open(Path(meta["image_root"]) / features.image_paths("test")[0]).convert("RGB")
    expected = clip.encode_images(clip.preprocess.transform()(image)[None])[0]
    stored = torch.from_numpy(np.asarray(features.split("test").global_[:1], dtype=np.float32))
    torch.testing.assert_close(stored, expected, rtol=0, atol=2e-3)  # float16 rows
    assert main(["run", "--features", str(store), "--method", "spa", "--init-cls", "2", "--increment", "2",
                 "--set", "train.epochs=1", "--set", "spa.top_k_patches=4", "--device", "cpu", "--out", str(run),
                 "--quiet"]) == 0
    capsys.readouterr()
    if family == "timm-vit-map":
        code = main(["run", "--features", str(store), "--method", "ranpac", "--init-cls", "2", "--increment", "2",
                     "--device", "cpu", "--out", str(tmp_path / "ranpac"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "timm-vit-map image tower has none" in err and len(err.strip().splitlines()) == 1
    photo = tmp_path / "photo.png"
    _photo(5).save(photo)
    assert main(["explain", str(run), str(photo), "--out", str(tmp_path / "explain"), "--device", "cpu"]) == 0
    record = json.loads(next((tmp_path / "explain").glob("*.json")).read_text())
    assert record["grid"] == list(GRIDS[family])
    assert len(record["explained"][0]["relevance"]) == np.prod(GRIDS[family])
    top = record["top"][0]  # the logit is the model's: scale * (global + w * patch) + its bias (SigLIP's -10)
    bias = -10.0 if family == "timm-vit-map" else 0.0
    assert record.get("logit_bias", 0.0) == bias
    assert top["logit"] == pytest.approx(record["logit_scale"] * (top["global"] + record["patch_weight"] * top["patch"])
                                         + bias, abs=1e-4)


def _descriptions_args(descriptions: Path) -> list[str]:
    return ["--descriptions", str(descriptions)]


def test_pe_core_style_map_pool_with_a_projection_has_z(tmp_path):
    """PE-Core: an Eva trunk (rope, a CLS token the MAP pool attends to) whose MAP output goes through a linear
    classifier: z is the pooled feature, the projection is that classifier."""
    import open_clip

    config = {"model_cfg": {"embed_dim": 16, "custom_text": True,
                            "vision_cfg": {"image_size": 384, "timm_model_name": "vit_pe_core_tiny_patch16_384",
                                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": None},
                            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(open_clip.create_model(f"local-dir:{tmp_path}").state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    clip = FrozenCLIP(f"local-dir:{tmp_path}", None)
    assert clip.family == "timm-vit-map" and clip.grid == (24, 24) and clip.width == 192 + 1  # the head's bias folded in
    images = clip.preprocess.transform()(_photo(7))[None]
    g, patches, z = clip.encode_image_features(images)
    torch.testing.assert_close(g, clip.model.encode_image(images, normalize=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(F.normalize(z @ torch.from_numpy(clip.visual_projection()), dim=-1), g, rtol=0, atol=1e-6)
    assert patches.shape == (1, 576, 16)


def test_modified_resnet_positions_follow_maskclip(tmp_path):
    """open_clip's ModifiedResNet (RN50 family): g is its attention pool; position i is MaskCLIP's value path
    c_proj(v_proj(x_i + pos_i)); z the pool's output before c_proj."""
    import open_clip

    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                                            "head_width": 8},
                            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(open_clip.create_model(f"local-dir:{tmp_path}").state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    clip = FrozenCLIP(f"local-dir:{tmp_path}", None)
    assert clip.family == "open_clip-resnet" and clip.grid == (2, 2)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    g, patches, z = clip.encode_image_features(images)
    torch.testing.assert_close(g, clip.model.encode_image(images, normalize=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(F.normalize(z @ torch.from_numpy(clip.visual_projection()), dim=-1), g, rtol=0, atol=1e-6)
    visual = clip.model.visual
    fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
    pool = visual.attnpool
    cell = fmap[:, :, 1, 0] + pool.positional_embedding[1 + 2]  # row 1, column 0: patch 2 (after the mean token)
    torch.testing.assert_close(patches[:, 2], F.normalize(pool.c_proj(pool.v_proj(cell)), dim=-1), rtol=0, atol=1e-6)


PRECISIONS = ["bf16", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("where", PRECISIONS)
def test_reduced_precision_rounds_the_trunk_only(models, where):
    """The trunk under autocast (bf16 on the CPU; the device's default on CUDA), the heads in fp32: g, P and z stay close
    to fp32's, float32 on the backbone's device."""
    for family, clip in models.items():
        images = torch.stack([clip.preprocess.transform()(_photo(s)) for s in range(2)])
        exact = clip.encode_image_features(images)
        if where == "cuda":
            other = FrozenCLIP(clip.info.model, None, "cuda", "bf16")
        else:
            other = clip.with_precision("bf16")
        reduced = other.encode_image_features(images)
        for a, b in zip(exact, reduced):
            if a is None:
                assert b is None
                continue
            assert b.dtype == torch.float32 and b.device.type == other.device.type
            cos = F.cosine_similarity(a.flatten(0, -2), b.cpu().flatten(0, -2), dim=-1)
            assert cos.min() > 0.97, (family, float(cos.min()))


def test_word_positions_under_a_hugging_face_tokenizer(models):
    """SigLIP tokenizes with a Hugging Face tokenizer (not cached here): `semantic_tokens=word` keeps every non-special
    token (no start token; the end and padding ids are special), punctuation-only tokens dropped. A stand-in with the
    attributes open_clip's HFTokenizer exposes."""
    import copy

    vocabulary = {5: "▁a", 10: "▁red", 11: "▁square", 4: ".", 1: "</s>", 0: "<pad>"}
    inner = SimpleNamespace(all_special_ids=[1], pad_token_id=0,
                            decode=lambda ids: "".join(vocabulary[i] for i in ids).replace("▁", " "))
    clip = copy.copy(models["timm-vit-map"])
    clip.tokenizer = SimpleNamespace(tokenizer=inner)
    assert clip.word_token_positions(torch.tensor([5, 10, 11, 4, 1, 0, 0, 0])) == [0, 1, 2]


def test_the_native_vit_path_is_spacil_0_3_s_bit_for_bit(tiny_model):
    """The native ViT adapter runs 0.3's operations in 0.3's order: the same bits (so its stores are the same bytes),
    and its preprocessing is the protocol's."""
    clip = FrozenCLIP(tiny_model, None)
    assert clip.family == "open_clip-vit" and clip.preprocess == Preprocess(image_size=32, source=clip.preprocess.source)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    g, patches, z = clip.encode_image_features(images)
    visual = clip.model.visual
    with torch.no_grad():  # spacil 0.3's FrozenCLIP.encode_image_features, inlined
        tokens = visual.ln_post(visual.transformer(visual._embeds(images)).float())
        pooled, rest = visual._global_pool(tokens)
        proj = visual.proj.float()
        expected = F.normalize(pooled @ proj, dim=-1), F.normalize(rest @ proj, dim=-1), pooled
    for a, b in zip((g, patches, z), expected):
        assert torch.equal(a, b)


def test_zero_shot_logits_carry_the_model_s_logit_bias():
    """SigLIP's logit bias is part of every image-text logit: zero-shot's logit is scale * cos + bias."""
    from spacil.config import Config
    from spacil.learner import FeatureBatch, LearnerContext, TaskInfo
    from spacil.methods.zeroshot import ZeroShot

    generator = torch.Generator().manual_seed(11)
    prompts = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    images = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    context = LearnerContext(dim=8, num_patches=4, logit_scale=7.5, device=torch.device("cpu"), logit_bias=-10.0)
    learner = ZeroShot(Config(), context)
    learner.begin_task(TaskInfo(task=0, positions=[0, 1, 2], names=["a", "b", "c"], prompts=prompts, descriptions=None,
                                description_mask=None, templates=None))
    logits = learner.logits(FeatureBatch(global_=images, patches=None))
    torch.testing.assert_close(logits, 7.5 * images @ prompts.T - 10.0, rtol=0, atol=1e-6)


def test_average_pooling_vit_patch_goes_through_fc_norm_and_the_head(tmp_path):
    """A timm ViT (EVA02-CLIP's adapter) with `timm_pool: avg` (fc_norm a real LayerNorm after the pool, no final norm on
    the tokens): patch i is the patch token through fc_norm and timm's classifier, as the pooled mean is. timm's
    test_vit trunk (4 blocks of width 64 at 160 px) keeps it fast."""
    import open_clip

    config = {"model_cfg": {"embed_dim": 16, "custom_text": True,
                            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit",
                                           "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": None},
                            "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(open_clip.create_model(f"local-dir:{tmp_path}").state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    clip = FrozenCLIP(f"local-dir:{tmp_path}", None)
    trunk = clip.tower.trunk
    assert clip.family == "timm-vit" and clip.grid == (10, 10) and isinstance(trunk.fc_norm, torch.nn.LayerNorm)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():  # an affine part that is not the identity, so that it shows
        trunk.fc_norm.weight.copy_(1 + 0.5 * torch.randn(trunk.fc_norm.weight.shape, generator=generator))
        trunk.fc_norm.bias.copy_(0.5 * torch.randn(trunk.fc_norm.bias.shape, generator=generator))
    images = torch.randn(2, 3, 160, 160, generator=generator)
    g, patches, _ = clip.encode_image_features(images)
    torch.testing.assert_close(g, clip.model.encode_image(images, normalize=True), rtol=0, atol=1e-6)
    tokens = trunk.forward_features(images)[:, trunk.num_prefix_tokens:]  # [2, 100, C]
    normed = F.layer_norm(tokens, tokens.shape[-1:], trunk.fc_norm.weight, trunk.fc_norm.bias, trunk.fc_norm.eps)
    expected = normed @ trunk.head.weight.T + trunk.head.bias  # timm's classifier is the projection (timm_proj null)
    torch.testing.assert_close(patches, F.normalize(expected, dim=-1), rtol=0, atol=1e-5)


BAD_PREPROCESS = [("std", [0, 0, 0], "expected three numbers > 0"), ("mean", [0.5, 0.5], "expected three finite numbers"),
                  ("mean", "abc", "expected three finite numbers"), ("std", [0.5, None, 0.5], "expected three finite"),
                  ("size", 0, "expected a positive whole number")]


def test_a_bad_preprocess_cfg_is_one_line_naming_the_file_and_key(tiny_model, small_shapes, tmp_path, capsys):
    """A local-dir: config's preprocess_cfg with a zero std (all-NaN rows), a mean of two numbers or a string, or a size
    of 0: exit 2, one line naming the config file and the key, before anything is written."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model[len("local-dir:"):], folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    for key, value, expected in BAD_PREPROCESS:
        bad = {**config, "preprocess_cfg": {**config["preprocess_cfg"], key: value}}
        (folder / "open_clip_config.json").write_text(json.dumps(bad))
        with pytest.raises(InputError) as caught:
            model_preprocess(SimpleNamespace(visual=SimpleNamespace(preprocess_cfg=bad["preprocess_cfg"])),
                             f"local-dir:{folder}", None)
        assert f"{folder / 'open_clip_config.json'} preprocess_cfg: {key} " in str(caught.value)
        assert expected in str(caught.value)
    # through the CLI (the first case: a zero std, which open_clip itself accepts)
    key, value, expected = BAD_PREPROCESS[0]
    (folder / "open_clip_config.json").write_text(json.dumps({**config, "preprocess_cfg": {key: value}}))
    code = main(["extract", "--dataset", "shapes", "--data-root", str(small_shapes[0]), "--model", f"local-dir:{folder}",
                 "--device", "cpu", "--out", str(tmp_path / "store"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "open_clip_config.json preprocess_cfg: std" in err
    assert not (tmp_path / "store" / "meta.json").exists()


def test_a_pretrained_file_of_no_or_other_weights_is_one_line(tiny_model, small_shapes, tmp_path, monkeypatch, capsys):
    """--model ARCH --pretrained FILE where FILE is no checkpoint (torch.load cannot read it) or a checkpoint of another
    architecture (load_state_dict's size mismatch): exit 2, one line naming the file. The architectures are tiny ones
    registered in open_clip's registry for this test only (a built-in one takes seconds to build)."""
    import open_clip.factory

    folder = Path(tiny_model[len("local-dir:"):])
    own_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "spacil-test-tiny", own_cfg)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "spacil-test-narrow", {**own_cfg, "embed_dim": 16})
    checkpoint = str(folder / "open_clip_pytorch_model.bin")  # weights of spacil-test-tiny
    assert FrozenCLIP("spacil-test-tiny", checkpoint).info.checkpoint_sha256  # the mechanism itself loads its own
    with pytest.raises(InputError, match=r"^--pretrained .*open_clip_pytorch_model.bin: this file does not hold weights "
                                         r"of spacil-test-narrow \(RuntimeError: Error\(s\) in loading state_dict"):
        FrozenCLIP("spacil-test-narrow", checkpoint)
    junk = tmp_path / "junk.bin"
    junk.write_text("not a checkpoint\n")
    code = main(["extract", "--dataset", "shapes", "--data-root", str(small_shapes[0]), "--model", "spacil-test-tiny",
                 "--pretrained", str(junk), "--device", "cpu", "--out", str(tmp_path / "store"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--pretrained {junk}: this file does not hold weights of spacil-test-tiny (UnpicklingError" in err
    # a local-dir: folder whose own checkpoint is another architecture's: the same line, naming that file
    other = tmp_path / "narrow"
    other.mkdir()
    (other / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**own_cfg, "embed_dim": 16}}))
    (other / "open_clip_pytorch_model.bin").write_bytes(Path(checkpoint).read_bytes())
    line = f"{other / 'open_clip_pytorch_model.bin'}: this file does not hold weights of local-dir:{other} (RuntimeError"
    with pytest.raises(InputError, match="^" + re.escape(line)):
        FrozenCLIP(f"local-dir:{other}", None)
