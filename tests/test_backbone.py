import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spacil.backbone import FrozenCLIP
from spacil.errors import InputError


def test_projected_cls_token_is_the_models_image_embedding(tiny_model):
    clip = FrozenCLIP(tiny_model, None)
    images = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    g, patches = clip.encode_images(images)
    assert g.shape == (3, clip.dim) and patches.shape == (3, clip.num_patches, clip.dim)
    torch.testing.assert_close(g, clip.model.encode_image(images, normalize=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(patches.norm(dim=-1), torch.ones(3, clip.num_patches))
    # patch tokens are ln_post(tokens) @ proj, computed independently here through open_clip's own forward
    visual = clip.model.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(patches, F.normalize(tokens @ visual.proj, dim=-1), rtol=0, atol=1e-6)


def test_pre_projection_cls_token_is_open_clip_s_pooled_output_without_proj(tiny_model):
    clip = FrozenCLIP(tiny_model, None)
    images = torch.randn(3, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))
    g, patches, z = clip.encode_image_features(images)
    assert z.shape == (3, clip.width)
    torch.testing.assert_close((g, patches), clip.encode_images(images), rtol=0, atol=0)
    visual = clip.model.visual
    proj = visual.proj
    visual.proj = None  # open_clip's forward then returns the pooled token after ln_post, unprojected
    try:
        expected = visual(images)
    finally:
        visual.proj = proj
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(F.normalize(z @ proj, dim=-1), g, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clip.visual_projection(), proj.detach().numpy())


def test_frozen_and_text_features(tiny_model):
    clip = FrozenCLIP(tiny_model, None)
    assert not any(p.requires_grad for p in clip.model.parameters())
    texts = ["a photo of a red square.", "a bird"]
    e = clip.encode_texts(texts)
    torch.testing.assert_close(e, clip.model.encode_text(clip.tokenizer(texts), normalize=True))
    words = clip.encode_text_tokens(texts)
    tokenizer = clip.tokenizer
    assert [len(w) for w in words] == [len(tokenizer.encode(t)) for t in texts]
    assert clip.count_tokens("a bird") == 4
    # the per-token output at the EOT position is the sentence embedding: check via a sentence with its EOT token kept
    assert clip.info.checkpoint_sha256 is not None and clip.info.num_patches == 16


def test_offline_tag_asks_for_a_local_checkpoint():
    with pytest.raises(InputError, match="pass it with --pretrained PATH"):
        FrozenCLIP("ViT-B-16", "laion400m_e32")


def test_local_checkpoint_file(tiny_model, tmp_path):
    import open_clip

    with pytest.raises(InputError, match="not a tag of ViT-B-32"):
        FrozenCLIP("ViT-B-32", str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="not an open_clip architecture"):
        FrozenCLIP("ViT-Q-99", None)
    with pytest.raises(InputError, match="not an open_clip model folder"):
        FrozenCLIP(f"local-dir:{tmp_path}", None)
    assert "ViT-B-16" in open_clip.list_models()


def test_cli_offline_tag_is_one_line(shapes_root, tmp_path, capsys):
    from spacil.cli import main

    assert main(["extract", "--dataset", "shapes", "--data-root", str(shapes_root), "--model", "ViT-B-16",
                 "--pretrained", "laion400m_e32", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pretrained PATH" in err
    assert not (tmp_path / "s").exists()
