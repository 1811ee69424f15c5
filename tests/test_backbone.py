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
    assert [len(w) for w in words] == [len(tokenizer.encode(t)) - (t.endswith(".")) for t in texts]  # the '.' is dropped
    assert clip.count_tokens("a bird") == 4
    # the per-token output at the EOT position is the sentence embedding: check via a sentence with its EOT token kept
    assert clip.info.checkpoint_sha256 is not None and clip.info.num_patches == 16


def test_word_tokens_drop_punctuation_only_tokens(tiny_model):
    """Against a direct computation: every token's output through open_clip's text tower, the rows of ',', '...' and
    ')!' left out; '$' (a symbol, not punctuation) kept."""
    clip = FrozenCLIP(tiny_model, None)
    text = "a red block, with sharp corners... (really)! $5"
    model = clip.model
    ids = clip.tokenizer([text])
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask)) @ model.text_projection
    pieces = [clip.tokenizer.decode([i]).strip() for i in clip.tokenizer.encode(text)]
    assert pieces == ["a", "red", "block", ",", "with", "sharp", "corners", "...", "(", "really", ")!", "$", "5"]
    kept = [i + 1 for i, piece in enumerate(pieces) if piece not in (",", "...", "(", ")!")]  # +1: after the start token
    words = clip.encode_text_tokens([text])[0]
    assert len(words) == 9
    torch.testing.assert_close(words, F.normalize(x[0, kept], dim=-1), rtol=0, atol=1e-6)


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


def test_the_text_head_runs_in_fp32_under_a_reduced_precision(tiny_model):
    """bf16: the text transformer runs under autocast, ln_final, the projection and the normalisation in fp32 (as the
    image side's ln_post and projection), so the reduced precision rounds the tokens, not the embedding."""
    clip = FrozenCLIP(tiny_model, None, precision="bf16")
    texts = ["a photo of a red square.", "a bird", "a small blue circle on grass"]
    embedded = clip.encode_texts(texts)
    model, ids = clip.model, clip.tokenizer(texts)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = model.transformer(model.token_embedding(ids) + model.positional_embedding, attn_mask=model.attn_mask)
        pooled = model.ln_final(tokens.float())[torch.arange(len(texts)), ids.argmax(dim=-1)]
        assert torch.equal(embedded, F.normalize(pooled @ model.text_projection, dim=-1))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole tower under autocast, as before: bf16 embeddings
            everything = model.encode_text(ids, normalize=True)
    assert everything.dtype == torch.bfloat16 and not torch.equal(embedded, everything.float())
    torch.testing.assert_close(embedded.norm(dim=-1), torch.ones(len(texts)), rtol=0, atol=1e-6)
    words = clip.encode_text_tokens(texts[:1])[0]
    word_ids = [i for i in clip.tokenizer.encode(texts[0]) if not clip._is_punctuation(i)]  # the final '.' is dropped
    assert words.dtype == torch.float32 and len(words) == len(word_ids) == len(clip.tokenizer.encode(texts[0])) - 1
    torch.testing.assert_close(words.norm(dim=-1), torch.ones(len(words)), rtol=0, atol=1e-6)
