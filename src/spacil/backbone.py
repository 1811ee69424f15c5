"""The frozen CLIP of SPEC.md ("Frozen features"), over open_clip.

`FrozenCLIP` gives, for a batch of images, the global embedding g(x) and the projected patch tokens P(x) from one forward pass,
and for strings the text embedding e(s) or, for `semantic_tokens=word`, the per-token outputs. Every weight is frozen.

A model is named as open_clip names it: a built-in architecture (`ViT-B-16`) with a pretrained tag (`laion400m_e32`) or a
local checkpoint file, or `local-dir:PATH` (a folder with `open_clip_config.json` and weights).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spacil.devices import autocast, check_precision
from spacil.errors import InputError
from spacil.fileio import atomic_write_bytes, atomic_write_text, make_dirs


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies the frozen encoder; recorded in every feature store."""

    model: str
    pretrained: Optional[str]
    checkpoint_sha256: Optional[str]
    image_size: int
    dim: int
    num_patches: int
    logit_scale: float

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "image_size": self.image_size,
            "dim": self.dim,
            "num_patches": self.num_patches,
            "logit_scale": self.logit_scale,
        }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def local_dir_checkpoint(model_name: str) -> Optional[Path]:
    folder = Path(model_name[len("local-dir:"):])
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def create_open_clip(model: str, pretrained: Optional[str], device: str = "cpu") -> tuple[torch.nn.Module, Optional[str]]:
    """Build an open_clip model; returns (model, checkpoint sha256 or None). InputError when weights cannot be had."""
    import open_clip

    checkpoint_hash = None
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise InputError(f"{folder}: not an open_clip model folder (expected open_clip_config.json inside)")
        if pretrained and (Path(pretrained).suffix or "/" in pretrained):  # a weights file that would be ignored
            raise InputError(f"--pretrained {pretrained}: a local-dir: model loads the weights in its own folder ({folder}); "
                             f"put them there or use --model ARCH --pretrained FILE")
        ckpt = local_dir_checkpoint(model)
        checkpoint_hash = file_sha256(ckpt) if ckpt else None
        pretrained = None
    elif model.startswith("hf-hub:"):
        pretrained = None
    else:
        if model not in open_clip.list_models():
            raise InputError(f"--model {model}: not an open_clip architecture (see open_clip.list_models())")
        if pretrained and Path(pretrained).is_file():
            checkpoint_hash = file_sha256(pretrained)
        elif pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(model):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise InputError(f"--pretrained {pretrained}: not a tag of {model} (tags: {tags}) nor a checkpoint file")
    logging.disable(logging.ERROR)  # open_clip logs a failed download itself; spacil reports it in one line below
    try:
        net = open_clip.create_model(model, pretrained=pretrained or None, device=device)
    except RuntimeError as err:
        if "download" in str(err).lower() or "hub" in str(err).lower():
            raise InputError(
                f"--pretrained {pretrained}: weights for {model} could not be downloaded (no network?); "
                f"download the checkpoint elsewhere and pass it with --pretrained PATH"
            ) from None
        raise
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"--model {model}: {err}") from None
    finally:
        logging.disable(logging.NOTSET)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net, checkpoint_hash


class FrozenCLIP:
    """A frozen open_clip CLIP that yields the features SPA works on (SPEC.md notation)."""

    def __init__(self, model: str = "ViT-B-16", pretrained: Optional[str] = "laion400m_e32", device: str = "cpu",
                 precision: str = "fp32"):
        import open_clip

        self.device = torch.device(device)
        self.precision = check_precision(precision)  # the encoders' forward passes run under autocast in this precision
        self.model, checkpoint_hash = create_open_clip(model, pretrained, device)
        visual = self.model.visual
        if not hasattr(visual, "ln_post") or not hasattr(visual, "proj") or getattr(visual, "attn_pool", None) is not None:
            raise InputError(f"--model {model}: SPA needs a ViT image tower with ln_post and a projection (got {type(visual).__name__})")
        self.tokenizer = open_clip.get_tokenizer(model)
        grid = visual.grid_size
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_patches = int(grid[0] * grid[1])
        self.dim = int(visual.output_dim)
        self.width = int(visual.proj.shape[0])  # z's dimension: the CLS token after ln_post, before visual.proj
        self.context_length = int(getattr(self.model, "context_length", 77))
        self.info = BackboneInfo(
            model=model,
            pretrained=pretrained if not model.startswith(("local-dir:", "hf-hub:")) else None,
            checkpoint_sha256=checkpoint_hash,
            image_size=self.image_size,
            dim=self.dim,
            num_patches=self.num_patches,
            logit_scale=float(self.model.logit_scale.exp().item()),
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (normalised) -> (g [B, d], P [B, N, d]), both L2-normalised, one forward pass.

        g is the CLS token after ln_post times visual.proj (the model's own image embedding); P are the patch tokens after
        ln_post, each times visual.proj. The same as `encode_image_features` without z.
        """
        global_, patches, _ = self.encode_image_features(images)
        return global_, patches

    @torch.no_grad()
    def encode_image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (normalised) -> (g [B, d], P [B, N, d], z [B, width]) from one forward pass.

        z is the CLS token after ln_post, before visual.proj, not normalised; g = normalise(z @ visual.proj); P are the
        patch tokens after ln_post, each times visual.proj, normalised.

        The transformer runs under autocast in `self.precision`; ln_post, the projection and the normalisation run in fp32
        (2% of the cost), so a reduced precision only rounds the tokens, not the final embedding. Outputs are float32 on
        `self.device`.
        """
        visual = self.model.visual
        with autocast(self.device, self.precision):
            tokens = visual.transformer(visual._embeds(images.to(self.device, non_blocking=True)))
        with torch.autocast(device_type=self.device.type, enabled=False):
            tokens = visual.ln_post(tokens.float())
            pooled, patches = visual._global_pool(tokens)
            proj = visual.proj.float()
            return F.normalize(pooled @ proj, dim=-1), F.normalize(patches @ proj, dim=-1), pooled

    def visual_projection(self):
        """visual.proj as a float32 numpy array [width, d] (g = normalise(z @ it))."""
        return self.model.visual.proj.detach().float().cpu().numpy()

    def _tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` including start and end tokens, without the context-length cut (for the 77-token check)."""
        inner = self.tokenizer.encode(text) if hasattr(self.tokenizer, "encode") else None
        if inner is None:
            raise InputError("the model's tokenizer cannot count tokens")
        return len(inner) + 2

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """texts -> e(s) [len, d] float32 on `self.device`: EOT token after ln_final times text_projection, L2-normalised.

        As on the image side, the text transformer runs under autocast in `self.precision` and ln_final, the projection
        and the normalisation in fp32 (open_clip's CLIP.encode_text, split in two)."""
        return self.encode_texts_with_norms(texts, batch_size)[0]

    @torch.no_grad()
    def encode_texts_with_norms(self, texts: Sequence[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (e(s) [len, d], norms [len]) float32: `encode_texts` and the L2 norm of each text feature before its
        normalisation (e(s) * norm is the un-normalised feature), both from the fp32 head."""
        out, norms = [], []
        for start in range(0, len(texts), batch_size):
            ids = self._tokenize(texts[start:start + batch_size])
            if not hasattr(self.model, "token_embedding"):  # a custom text tower: only its output can be had in fp32
                with autocast(self.device, self.precision):
                    raw = self.model.encode_text(ids).float()
            else:
                tokens = self._text_transformer(ids)
                with torch.autocast(device_type=self.device.type, enabled=False):
                    raw = self._project_text(self._pool_text(self.model.ln_final(tokens.float()), ids))
            out.append(F.normalize(raw, dim=-1))
            norms.append(raw.norm(dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat(out), torch.cat(norms)

    def _text_transformer(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the text transformer's outputs [B, L, width], before ln_final, under autocast."""
        model = self.model
        with autocast(self.device, self.precision):
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
            return model.transformer(x, attn_mask=model.attn_mask)

    def _pool_text(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, width]: the token the model pools (the EOT token for CLIP), by open_clip's own rule."""
        from open_clip.model import text_global_pool

        pool = getattr(self.model, "text_pool_type", "argmax")
        extra = {"eos_token_id": self.model.text_eos_id} if pool == "eos" else {}
        pooled = text_global_pool(x, ids, pool, **extra)
        return pooled[0] if isinstance(pooled, tuple) else pooled  # some open_clip releases also return the tokens

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] after ln_final -> [..., d] through text_projection, in fp32 (call with autocast off)."""
        projection = self.model.text_projection
        if isinstance(projection, torch.nn.Linear):
            return F.linear(x, projection.weight.float(), None if projection.bias is None else projection.bias.float())
        return x @ projection.float()

    @torch.no_grad()
    def encode_text_tokens(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """texts -> per-text [n_words, d]: every token's output after ln_final times text_projection, L2-normalised,
        start/end tokens, padding and punctuation-only tokens dropped (the `semantic_tokens=word` variant of SPEC.md)."""
        model = self.model
        if not hasattr(model, "token_embedding") or getattr(model, "text_pool_type", "argmax") != "argmax":
            raise InputError("semantic_tokens=word needs an open_clip CLIP with a built-in causal text tower")
        return [self._word_tokens(text) for text in texts]

    def _word_tokens(self, text: str) -> torch.Tensor:
        """One text -> [n_words, d] float32 (see encode_text_tokens): the transformer under autocast, ln_final, the
        projection and the normalisation in fp32, as for sentences."""
        ids = self._tokenize([text])
        tokens = self._text_transformer(ids)
        words = self.word_token_positions(ids[0])
        with torch.autocast(device_type=self.device.type, enabled=False):
            x = self._project_text(self.model.ln_final(tokens[0, words].float()))
            return F.normalize(x, dim=-1)

    def word_token_positions(self, ids: torch.Tensor) -> list[int]:
        """One tokenised text [L] -> the positions `semantic_tokens=word` keeps: between the start and the EOT token (the
        largest id), punctuation-only tokens left out."""
        end = int(ids.argmax())
        return [i for i in range(1, end) if not self._is_punctuation(int(ids[i]))]

    def _is_punctuation(self, token_id: int) -> bool:
        """Whether a token is punctuation only ('.', ',', '!)'): it names no visual part, so `semantic_tokens=word` drops it
        (the words after it keep the context it gave them). Symbols such as '$' or '+' are kept."""
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:
            return False
        text = decode([token_id]).strip()
        return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)

    def with_precision(self, precision: str) -> "FrozenCLIP":
        """The same frozen model (shared, not copied) whose encoders run in `precision`."""
        if check_precision(precision) == self.precision:
            return self
        other = copy.copy(self)
        other.precision = precision
        return other

    @property
    def logit_scale(self) -> float:
        return self.info.logit_scale


def write_tiny_model(folder: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, embed_dim: int = 32) -> str:
    """Write a tiny random-weight CLIP as an open_clip `local-dir:` folder and return its model name.

    The architecture goes through open_clip's own CLIP class and config format; only the sizes are small, so tests and the demo
    exercise exactly the code path of a real ViT-B-16.
    """
    import open_clip

    folder = Path(folder)
    make_dirs(folder)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": patch_size, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # open_clip initialises from torch's global generator; restored below
        net = open_clip.model.CLIP(**model_cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    atomic_write_text(folder / "open_clip_config.json", json.dumps(config, indent=2))
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(folder / "open_clip_pytorch_model.bin", buffer.getbuffer())
    return f"local-dir:{folder}"
