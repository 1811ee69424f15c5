"""The frozen CLIP of SPEC.md ("Frozen features"), over open_clip.

`FrozenCLIP` gives, for a batch of images, the global embedding g(x) and the projected patch tokens P(x) from one forward pass,
and for strings the text embedding e(s) or, for `semantic_tokens=word`, the per-token outputs. Every weight is frozen.
How g, P and z are read depends on the image tower's family (`spacil.backbone.towers`: open_clip ViT, timm ViT with token
or attention pooling, timm ConvNeXt); the images are prepared by the model's own preprocessing
(`spacil.backbone.preprocess`). docs/backbones.md lists the families.

A model is named as open_clip names it: a built-in architecture (`ViT-B-16`) with a pretrained tag (`laion400m_e32`) or a
local checkpoint file, or `local-dir:PATH` (a folder with `open_clip_config.json` and weights).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import pickle
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from spacil.backbone.preprocess import Preprocess, model_preprocess
from spacil.backbone.towers import TOWERS, ImageTower, image_tower
from spacil.devices import autocast, check_precision
from spacil.errors import InputError
from spacil.fileio import atomic_write_bytes, atomic_write_text, make_dirs

__all__ = ["TOWERS", "BackboneInfo", "FrozenCLIP", "ImageTower", "Preprocess", "create_open_clip", "file_sha256",
           "image_tower", "local_dir_checkpoint", "model_preprocess", "write_tiny_model"]


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
    logit_bias: Optional[float] = None  # SigLIP's learned bias of the image-text logits; None for CLIP

    def to_dict(self) -> dict:
        """The record in meta.json; `logit_bias` only where the model has one (a CLIP's record is as before)."""
        bias = {} if self.logit_bias is None else {"logit_bias": self.logit_bias}
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint_sha256": self.checkpoint_sha256,
            "image_size": self.image_size,
            "dim": self.dim,
            "num_patches": self.num_patches,
            "logit_scale": self.logit_scale,
            **bias,
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
    except _NOT_ITS_WEIGHTS as err:
        if checkpoint_hash is None or not _raised_loading_weights(err):  # the model itself could not be built
            _reraise_build_error(err, model, pretrained)
        # not loadable (junk, a pickle that is no state dict) or another architecture's tensors (missing or unexpected
        # keys, size mismatches): open_clip says so in a traceback; spacil in one line naming the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        weights_file = f"--pretrained {pretrained}" if pretrained else str(local_dir_checkpoint(model))
        why = f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__
        raise InputError(f"{weights_file}: this file does not hold weights of {model} ({why})") from None
    finally:
        logging.disable(logging.NOTSET)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net, checkpoint_hash


# What open_clip's load_checkpoint raises on a file that is not a checkpoint of the architecture (torch.load's
# UnpicklingError/EOFError, load_state_dict's RuntimeError for missing keys or size mismatches, resize_pos_embed's
# AssertionError, a state dict of the wrong type or an empty one)
_NOT_ITS_WEIGHTS = (pickle.UnpicklingError, EOFError, RuntimeError, AssertionError, KeyError, ValueError, StopIteration,
                    AttributeError, TypeError, FileNotFoundError)


def _raised_loading_weights(err: BaseException) -> bool:
    """Whether `err` came from open_clip loading a checkpoint into the built model (factory.load_checkpoint), not from
    building the model."""
    frame = err.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "load_checkpoint":
            return True
        frame = frame.tb_next
    return False


def _reraise_build_error(err: BaseException, model: str, pretrained: Optional[str]):
    """A failure of open_clip.create_model with no checkpoint file: a download that could not happen (no network) or a
    bad model name/folder, as one-line InputErrors; anything else propagates as it is."""
    if isinstance(err, RuntimeError):
        if "download" in str(err).lower() or "hub" in str(err).lower():
            raise InputError(
                f"--pretrained {pretrained}: weights for {model} could not be downloaded (no network?); "
                f"download the checkpoint elsewhere and pass it with --pretrained PATH"
            ) from None
        raise err
    if isinstance(err, (ValueError, FileNotFoundError)):
        raise InputError(f"--model {model}: {err}") from None
    raise err


class FrozenCLIP:
    """A frozen open_clip CLIP that yields the features SPA works on (SPEC.md notation)."""

    def __init__(self, model: str = "ViT-B-16", pretrained: Optional[str] = "laion400m_e32", device: str = "cpu",
                 precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = check_precision(precision)  # the encoders' forward passes run under autocast in this precision
        self.model, checkpoint_hash = create_open_clip(model, pretrained, device)
        self.tower: ImageTower = image_tower(self.model.visual, model)
        self.family = self.tower.family
        self.preprocess: Preprocess = model_preprocess(self.model, model, pretrained)
        self.tokenizer = _get_tokenizer(model)
        self.image_size = self.preprocess.image_size
        self.grid = self.tower.grid  # (rows, columns) of the patches, in P's order
        self.num_patches = self.tower.num_patches
        self.dim = int(self.tower.dim)
        self.width = self.tower.width  # z's dimension (None: the family has no z, `self.tower.z_reason` says why)
        self.context_length = int(getattr(self.model, "context_length", 77))
        # the text tower whose parts spacil runs itself: the CLIP (built-in tower) or CustomTextCLIP's TextTransformer
        # (SigLIP, EVA, PE); None for a Hugging Face text encoder or a CoCa tower, which only give their pooled output
        text = self.model if hasattr(self.model, "token_embedding") else getattr(self.model, "text", None)
        self._text = text if hasattr(text, "token_embedding") and getattr(text, "cls_emb", None) is None else None
        bias = getattr(self.model, "logit_bias", None)
        self.info = BackboneInfo(
            model=model,
            pretrained=pretrained if not model.startswith(("local-dir:", "hf-hub:")) else None,
            checkpoint_sha256=checkpoint_hash,
            image_size=self.image_size,
            dim=self.dim,
            num_patches=self.num_patches,
            logit_scale=float(self.model.logit_scale.exp().item()),
            logit_bias=None if bias is None else float(bias.detach().float().reshape(-1)[0].item()),
        )

    def tower_record(self) -> dict:
        """meta.json's `image_tower`: the family, the patch grid, whether z exists (and why not)."""
        record = {"family": self.family, "grid": list(self.grid), "pre_projection": self.width is not None}
        if self.width is None:
            record["no_pre_projection"] = self.tower.z_reason
        return record

    def require_pre_projection(self) -> None:
        """InputError (exit 2) naming the family when it has no z."""
        if self.width is None:
            raise InputError(f"{self.info.model}: the {self.family} image tower has no pre-projection feature z "
                             f"({self.tower.z_reason}); RanPAC, BOFA and ENGINE need one")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] (normalised) -> (g [B, d], P [B, N, d]), both L2-normalised, one forward pass.

        g is the model's own image embedding (for the native ViT the CLS token after ln_post times visual.proj); P the
        patches in the joint space by the tower family's rule (towers.py). The same as `encode_image_features` without z.
        """
        global_, patches, _ = self.encode_image_features(images)
        return global_, patches

    @torch.no_grad()
    def encode_image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """images [B, 3, H, W] (normalised) -> (g [B, d], P [B, N, d], z [B, width] or None) from one forward pass.

        g is the model's own image embedding, P the patches in the joint space (the tower's rule, towers.py), both
        L2-normalised; z the input of the last projection, not normalised (g = normalise(z @ visual_projection())), None
        where the family has none. For the native ViT: z the CLS token after ln_post, g = normalise(z @ visual.proj), P
        the patch tokens after ln_post times visual.proj.

        The trunk runs under autocast in `self.precision`; the head, the projection and the normalisation run in fp32
        (2% of the cost), so a reduced precision only rounds the tokens, not the final embedding. Outputs are float32 on
        `self.device`.
        """
        global_, patches, pre = self.tower.features(images, self.device, self.precision)
        with torch.autocast(device_type=self.device.type, enabled=False):
            return F.normalize(global_, dim=-1), F.normalize(patches, dim=-1), pre

    def visual_projection(self):
        """The last projection as a float32 numpy array [width, d] (g = normalise(z @ it)); InputError where no z exists."""
        self.require_pre_projection()
        return self.tower.projection()

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
            if self._text is None:  # a Hugging Face or CoCa text tower: only its output can be had, under autocast
                with autocast(self.device, self.precision):
                    raw = self.model.encode_text(ids).float()
            else:
                tokens = self._text_transformer(ids)
                with torch.autocast(device_type=self.device.type, enabled=False):
                    raw = self._project_text(self._pool_text(self._text.ln_final(tokens.float()), ids))
            out.append(F.normalize(raw, dim=-1))
            norms.append(raw.norm(dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat(out), torch.cat(norms)

    def _text_transformer(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> the text transformer's outputs [B, L, width], before ln_final, under autocast."""
        model = self.model
        with autocast(self.device, self.precision):
            if self._text is not model:  # CustomTextCLIP's TextTransformer: its own embedding and (pad) mask
                x, mask = self._text._embeds(ids)
                return self._text.transformer(x, attn_mask=mask)
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
            return model.transformer(x, attn_mask=model.attn_mask)

    def _pool_text(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, width]: the token the model pools (the EOT token for CLIP, the last position for SigLIP's
        non-causal tower), by open_clip's own rule."""
        from open_clip.model import text_global_pool

        pool, eos = self._text_pooling()
        extra = {"eos_token_id": eos} if pool == "eos" else {}
        pooled = text_global_pool(x, ids, pool, **extra)
        return pooled[0] if isinstance(pooled, tuple) else pooled  # some open_clip releases also return the tokens

    def _text_pooling(self) -> tuple[str, Optional[int]]:
        """(open_clip pool type, eos token id) of the text tower."""
        if self._text is self.model:
            return getattr(self.model, "text_pool_type", "argmax"), getattr(self.model, "text_eos_id", None)
        return self._text.pool_type, getattr(self._text, "eos_id", None)

    def _project_text(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] after ln_final -> [..., d] through text_projection, in fp32 (call with autocast off)."""
        projection = self._text.text_projection
        if projection is None:
            return x
        if isinstance(projection, torch.nn.Linear):
            return F.linear(x, projection.weight.float(), None if projection.bias is None else projection.bias.float())
        return x @ projection.float()

    @torch.no_grad()
    def encode_text_tokens(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """texts -> per-text [n_words, d]: every token's output after ln_final times text_projection, L2-normalised,
        start/end tokens, padding and punctuation-only tokens dropped (the `semantic_tokens=word` variant of SPEC.md)."""
        if self._text is None:
            raise InputError(f"semantic_tokens=word: the text tower of {self.info.model} "
                             f"({type(getattr(self.model, 'text', self.model)).__name__}) gives no per-token outputs in the "
                             f"joint space; use semantic_tokens=sentence")
        return [self._word_tokens(text) for text in texts]

    def _word_tokens(self, text: str) -> torch.Tensor:
        """One text -> [n_words, d] float32 (see encode_text_tokens): the transformer under autocast, ln_final, the
        projection and the normalisation in fp32, as for sentences."""
        ids = self._tokenize([text])
        tokens = self._text_transformer(ids)
        words = self.word_token_positions(ids[0])
        with torch.autocast(device_type=self.device.type, enabled=False):
            x = self._project_text(self._text.ln_final(tokens[0, words].float()))
            return F.normalize(x, dim=-1)

    def word_token_positions(self, ids: torch.Tensor) -> list[int]:
        """One tokenised text [L] -> the positions `semantic_tokens=word` keeps: between the start and the EOT token (the
        largest id) for CLIP's tokenizer; for a Hugging Face tokenizer (SigLIP) every token that is not a special one
        (padding, end); punctuation-only tokens left out."""
        special = _special_ids(self.tokenizer)
        if special is None:
            positions = range(1, int(ids.argmax()))
        else:
            positions = [i for i in range(len(ids)) if int(ids[i]) not in special]
        return [i for i in positions if not self._is_punctuation(int(ids[i]))]

    def _is_punctuation(self, token_id: int) -> bool:
        """Whether a token is punctuation only ('.', ',', '!)'): it names no visual part, so `semantic_tokens=word` drops it
        (the words after it keep the context it gave them). Symbols such as '$' or '+' are kept."""
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers tokenizer
        decode = getattr(inner if inner is not None else self.tokenizer, "decode", None)
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


def _special_ids(tokenizer) -> Optional[set]:
    """The special token ids of a Hugging Face tokenizer (open_clip's HFTokenizer), None for CLIP's own BPE tokenizer."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "all_special_ids"):
        return None
    return set(inner.all_special_ids) | ({inner.pad_token_id} if inner.pad_token_id is not None else set())


def _get_tokenizer(model: str):
    """open_clip's tokenizer of `model`; an InputError in one line when it is a Hugging Face tokenizer that cannot be
    loaded here (transformers missing, or its files not in the Hugging Face cache on an offline machine)."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model)
    except Exception as err:  # noqa: BLE001 - transformers/huggingface_hub raise many kinds; all mean "not loadable"
        from open_clip.factory import get_model_config, parse_model_name

        schema, name = parse_model_name(model)
        config = None
        if schema == "local-dir":
            config_file = Path(name) / "open_clip_config.json"
            config = json.loads(config_file.read_text()).get("model_cfg") if config_file.is_file() else None
        elif schema is None:
            config = get_model_config(name)
        hf_name = ((config or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
        if hf_name is None:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--model {model}: its tokenizer is Hugging Face's {hf_name}, which could not be loaded "
                         f"({type(err).__name__}: {first}); install `transformers` and put the tokenizer in the Hugging "
                         f"Face cache on a machine with network (AutoTokenizer.from_pretrained('{hf_name}'))") from None


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


# Tiny random-weight models of each image-tower family, in open_clip's config format (timm's smallest trunks, a 1-layer
# text tower): tests, `spacil demo`-style checks and benchmarks/bench_backbones.py build them offline.
_TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_TOWER_CONFIGS: dict[str, dict] = {
    # SigLIP style: MAP pooling, no projection after it, a non-causal text tower pooling its last token, a logit bias,
    # SigLIP's statistics (0.5) and resize (squash, bilinear)
    "timm-vit-map": {
        "model_cfg": {"embed_dim": 192, "init_logit_bias": -10, "custom_text": True,
                      "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                                     "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                      "text_cfg": {**_TINY_TEXT, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                           "resize_mode": "squash"},
    },
    # EVA02-CLIP style: token pooling, the projection is timm's classifier (a Linear with bias), CLIP's text tower
    "timm-vit": {
        "model_cfg": {"embed_dim": 32, "custom_text": True,
                      "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                                     "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
                      "text_cfg": dict(_TINY_TEXT)},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    },
    # ConvNeXt-CLIP style: timm's head (average pool, LayerNorm) then open_clip's linear projection
    "timm-convnext": {
        "model_cfg": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 224, "timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                     "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0},
                      "text_cfg": dict(_TINY_TEXT)},
        "preprocess_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    },
}


def write_tiny_tower_model(folder: str | Path, family: str, seed: int = 0) -> str:
    """Write a tiny random-weight model of image-tower `family` (a key of TINY_TOWER_CONFIGS) as an open_clip
    `local-dir:` folder through open_clip's own config format and model classes; returns its model name."""
    import open_clip

    folder = Path(folder)
    make_dirs(folder)
    atomic_write_text(folder / "open_clip_config.json", json.dumps(TINY_TOWER_CONFIGS[family], indent=2))
    generator_state = torch.random.get_rng_state()
    logging.disable(logging.WARNING)  # "no pretrained weights": these are random on purpose
    try:
        torch.manual_seed(seed)  # open_clip and timm initialise from torch's global generator; restored below
        net = open_clip.create_model(f"local-dir:{folder}")
    finally:
        logging.disable(logging.NOTSET)
        torch.random.set_rng_state(generator_state)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    atomic_write_bytes(folder / "open_clip_pytorch_model.bin", buffer.getbuffer())
    return f"local-dir:{folder}"
