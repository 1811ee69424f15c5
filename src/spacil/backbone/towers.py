"""Image-tower adapters: how g(x), P(x) and z are read from each open_clip image-tower family (docs/backbones.md).

One adapter per family, registered by name in `TOWERS` and chosen by `image_tower(visual)`, the first whose `accepts`
says yes. Each gives, from one forward pass of the trunk (run under autocast in the backbone's precision; the head path in
fp32, as SPEC.md's native path does):

- g [B, d]: the model's own image embedding (what `encode_image` returns, before normalisation), computed by the
  model's own pooling and head;
- P [B, N, d]: one token per patch or feature-map position, mapped into the joint space by the same head as the pooled
  feature, applied to that patch alone (the rule of docs/backbones.md: for a ViT with token pooling this is the final
  norm and projection of the patch token, SPEC.md's native rule; for attention (MAP) pooling the pooling head run on a
  one-token sequence, where the softmax over one key is 1 and attention reduces to its value/output path, MaskCLIP's
  rule; for a ConvNeXt the head's norm and projection of one position, a 1x1 map);
- z [B, width] or None: the input of the last linear projection (g = normalise(z @ projection)); None where the family
  ends in no linear layer (a SigLIP head) or in an MLP.

The native open_clip ViT keeps the path of spacil 0.3 operation for operation, so its stores are the same bytes.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from spacil.devices import autocast
from spacil.errors import InputError


class ImageTower:
    """The adapter interface. `family` names it in meta.json and messages; `grid` is (rows, columns) of P's patches in
    image order; `dim` is d; `width` is z's dimension (None: no z); `z_reason` says why not, when there is none."""

    family = "base"
    label = ""  # the open_clip models of this family, for messages and docs

    def __init__(self, visual: torch.nn.Module):
        self.visual = visual
        self.grid: tuple[int, int] = (0, 0)
        self.dim = 0
        self.width: Optional[int] = None
        self.z_reason = ""

    @classmethod
    def accepts(cls, visual: torch.nn.Module) -> bool:
        raise NotImplementedError

    def features(self, images: torch.Tensor, device: torch.device, precision: str
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """images [B, 3, H, W] normalised -> (g [B, d], P [B, N, d], z [B, width] or None), float32, g and P not yet
        normalised."""
        raise NotImplementedError

    def projection(self) -> Optional[np.ndarray]:
        """float32 [width, d] with g = normalise(z @ it), or None when the tower has no z."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        return int(self.grid[0] * self.grid[1])


class NativeViT(ImageTower):
    """open_clip's own VisionTransformer (OpenAI, LAION, DataComp, DFN, MetaCLIP weights): SPEC.md's rule. g is the CLS
    token after ln_post times visual.proj; P the patch tokens after ln_post times visual.proj; z the CLS token after
    ln_post (open_clip transformer.py VisionTransformer.forward, split at the projection)."""

    family = "open_clip-vit"
    label = "open_clip VisionTransformer (ViT-B-16, ViT-L-14, ... : OpenAI, LAION, DataComp, DFN, MetaCLIP)"

    @classmethod
    def accepts(cls, visual) -> bool:
        return hasattr(visual, "ln_post") and hasattr(visual, "transformer") and hasattr(visual, "_global_pool")

    def __init__(self, visual):
        super().__init__(visual)
        if getattr(visual, "attn_pool", None) is not None:
            raise InputError("the ViT's attentional pooler (attn_pool, CoCa style) has no SPA adapter: SPA needs the patch "
                             "tokens after ln_post and a projection")
        if getattr(visual, "proj", None) is None:
            raise InputError("the ViT has no projection (visual.proj): its patch tokens cannot be put in the joint space")
        grid = visual.grid_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.dim = int(visual.output_dim)
        self.width = int(visual.proj.shape[0])

    def features(self, images, device, precision):
        visual = self.visual
        with autocast(device, precision):
            tokens = visual.transformer(visual._embeds(images.to(device, non_blocking=True)))
        with torch.autocast(device_type=device.type, enabled=False):
            tokens = visual.ln_post(tokens.float())
            pooled, patches = visual._global_pool(tokens)
            proj = visual.proj.float()
            return pooled @ proj, patches @ proj, pooled

    def projection(self):
        return self.visual.proj.detach().float().cpu().numpy()


class _TimmTower(ImageTower):
    """A timm trunk in open_clip's TimmModel (timm_model.py): image embedding = visual.head(trunk.head(pre_logits)),
    where trunk.head is the timm classifier (a Linear when `timm_proj` is null, else Identity) and visual.head open_clip's
    projection (`timm_proj` linear or mlp; empty for `none`). The last linear layer of that chain is the projection z
    meets; a bias there is folded in: z gets a trailing 1 and the projection the bias as its last row."""

    def __init__(self, visual):
        super().__init__(visual)
        self.trunk = visual.trunk
        head = getattr(visual, "head", torch.nn.Sequential())
        if any(name == "pool" for name, _ in head.named_children()):
            raise InputError(f"the timm tower {type(self.trunk).__name__} pools by open_clip's attention pool "
                             f"(timm_pool abs_attn/rot_attn), for which SPA has no patch rule")
        self.head = head
        self.last: Optional[torch.nn.Linear] = None
        proj = getattr(head, "proj", None)
        classifier = self._classifier()
        if isinstance(proj, torch.nn.Linear):
            self.last, self.dim = proj, proj.out_features
        elif hasattr(head, "mlp"):
            self.z_reason = "its projection is an MLP (timm_proj mlp), not one linear layer"
            self.dim = int(head.mlp.fc2.out_features)
        elif isinstance(classifier, torch.nn.Linear):
            self.last, self.dim = classifier, classifier.out_features
        else:
            self.z_reason = "it ends in no linear projection (timm_proj none: the pooled feature is the embedding)"
            self.dim = int(self.trunk.num_features)
        if self.last is not None:
            self.width = int(self.last.in_features) + (self.last.bias is not None)

    def _classifier(self) -> torch.nn.Module:
        """The timm classifier layer after pre_logits (a Linear or Identity)."""
        raise NotImplementedError

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features -> the pooled pre-logits feature, by the trunk's own forward_head."""
        return self.trunk.forward_head(x, pre_logits=True)

    def _to_joint(self, pre: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pre-logits [M, C] -> (embedding [M, d], z [M, width] or None): the classifier then open_clip's head."""
        classifier = self._classifier()
        if self.last is None:
            return self.head(classifier(pre)), None
        if self.last is classifier:  # timm's classifier is the projection (timm_proj null); open_clip's head is empty
            z, out = pre, self.head(classifier(pre))
        else:  # open_clip's head projects (timm_proj linear); timm's classifier is the identity
            z = classifier(pre)
            out = self.head(z)
        if self.last.bias is not None:
            z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        return out, z

    def projection(self):
        if self.last is None:
            return None
        weight = self.last.weight.detach().float().cpu().T
        if self.last.bias is not None:
            weight = torch.cat([weight, self.last.bias.detach().float().cpu()[None]], dim=0)
        return weight.numpy()

    def _trunk_features(self, images, device, precision) -> torch.Tensor:
        with autocast(device, precision):
            return self.trunk.forward_features(images.to(device, non_blocking=True))

    def _joint(self, pooled_pre: torch.Tensor, patch_pre: torch.Tensor):
        """(pooled pre-logits [B, C], per-patch pre-logits [B, N, C]) -> (g, P, z), all float32."""
        batch, count = patch_pre.shape[:2]
        g, z = self._to_joint(pooled_pre)
        patches, _ = self._to_joint(patch_pre.reshape(batch * count, -1))
        return g, patches.reshape(batch, count, -1), z


class TimmViT(_TimmTower):
    """A timm ViT trunk (VisionTransformer or Eva) with token or average pooling: EVA02-CLIP. g: the model's own pooling,
    fc_norm and head; patch i: the patch token (after the trunk's final norm, as the pooled token) through fc_norm and the
    same head (the native rule, with the head timm and open_clip give)."""

    family = "timm-vit"
    label = "timm ViT trunk, token/avg pooling (EVA02-B-16, EVA02-L-14, EVA01-g-14)"

    @classmethod
    def accepts(cls, visual) -> bool:
        trunk = getattr(visual, "trunk", None)
        return (trunk is not None and hasattr(trunk, "patch_embed") and hasattr(trunk, "num_prefix_tokens")
                and getattr(trunk, "attn_pool", None) is None)

    def __init__(self, visual):
        super().__init__(visual)
        grid = self.trunk.patch_embed.grid_size
        self.grid = (int(grid[0]), int(grid[1]))

    def _classifier(self):
        return self.trunk.head

    def _patch_pre_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, C] -> each patch's pre-logits [B, N, C']: fc_norm (pooling leaves a single token as it is)."""
        return self.trunk.fc_norm(patches)

    def features(self, images, device, precision):
        tokens = self._trunk_features(images, device, precision)
        with torch.autocast(device_type=device.type, enabled=False):
            tokens = tokens.float()
            patches = tokens[:, self.trunk.num_prefix_tokens:]
            return self._joint(self._pre_logits(tokens), self._patch_pre_logits(patches))


class TimmViTMAP(TimmViT):
    """A timm ViT trunk with attention pooling (MAP: a learned query attends over the tokens, then an MLP): SigLIP,
    SigLIP2, PE-Core. g: the model's own pooling and head. Patch i: the pooling head applied to that patch alone, a
    one-token sequence, where the softmax over a single key is 1, so the query drops out and the attention is its
    value/output path, followed by the pool's MLP, fc_norm and head (MaskCLIP's rule for CLIP's attention pool,
    docs/backbones.md)."""

    family = "timm-vit-map"
    label = "timm ViT trunk, attention (MAP) pooling (ViT-B-16-SigLIP, ViT-SO400M-14-SigLIP2, PE-Core-B-16)"

    @classmethod
    def accepts(cls, visual) -> bool:
        trunk = getattr(visual, "trunk", None)
        return (trunk is not None and hasattr(trunk, "patch_embed") and hasattr(trunk, "num_prefix_tokens")
                and getattr(trunk, "attn_pool", None) is not None)

    def __init__(self, visual):
        super().__init__(visual)
        if getattr(self.trunk.attn_pool, "pos_embed", None) is not None:
            raise InputError("the MAP pool has its own position embedding (attn_pool.pos_embed): a patch alone has no "
                             "position in it, so SPA has no patch rule for this tower")

    def _patch_pre_logits(self, patches):
        batch, count, channels = patches.shape
        alone = self.trunk.attn_pool(patches.reshape(batch * count, 1, channels))
        return self.trunk.fc_norm(alone.reshape(batch, count, -1))


class TimmConvNeXt(_TimmTower):
    """A timm ConvNeXt trunk (ConvNeXt-CLIP): g the model's own head (global average pool, LayerNorm, projection); patch
    (r, c) the final feature map's position (r, c) through the same head without pooling: the head applied to a 1x1
    map, whose pooling is the identity (timm convnext.py NormMlpClassifierHead)."""

    family = "timm-convnext"
    label = "timm ConvNeXt trunk (convnext_base_w, convnext_large_d, convnext_xxlarge)"

    @classmethod
    def accepts(cls, visual) -> bool:
        trunk = getattr(visual, "trunk", None)
        return trunk is not None and type(trunk).__name__ == "ConvNeXt"

    def __init__(self, visual):
        super().__init__(visual)
        size = visual.image_size
        reduction = int(self.trunk.feature_info[-1]["reduction"])
        self.grid = (int(size[0]) // reduction, int(size[1]) // reduction)

    def _classifier(self):
        return self.trunk.head.fc

    def features(self, images, device, precision):
        fmap = self._trunk_features(images, device, precision)
        with torch.autocast(device_type=device.type, enabled=False):
            fmap = fmap.float()
            batch, channels, rows, cols = fmap.shape
            cells = fmap.permute(0, 2, 3, 1).reshape(batch * rows * cols, channels, 1, 1)
            patch_pre = self._pre_logits(cells).reshape(batch, rows * cols, -1)
            return self._joint(self._pre_logits(fmap), patch_pre)


class NativeResNet(ImageTower):
    """open_clip's ModifiedResNet (OpenAI / YFCC / CC12M RN50, RN101, RN50x4...): the final feature map, pooled by a QKV
    attention whose query is the map's mean. g: that attention pool (open_clip modified_resnet.py AttentionPool2d,
    computed head by head); position i: MaskCLIP's rule, the pool applied to that position alone, whose attention is its
    value, c_proj(v_proj(x_i + pos_i)); z: the attention output before c_proj (its bias folded in: a trailing 1)."""

    family = "open_clip-resnet"
    label = "open_clip ModifiedResNet (RN50, RN101, RN50x4, RN50x16, RN50x64)"

    @classmethod
    def accepts(cls, visual) -> bool:
        return hasattr(visual, "attnpool") and hasattr(visual, "layer4") and hasattr(visual, "stem")

    def __init__(self, visual):
        super().__init__(visual)
        side = int(visual.image_size) // 32
        self.grid = (side, side)
        pool = visual.attnpool
        self.dim = int(pool.c_proj.out_features)
        self.width = int(pool.c_proj.in_features) + 1

    def features(self, images, device, precision):
        visual = self.visual
        pool = visual.attnpool
        with autocast(device, precision):
            x = visual.stem(images.to(device, non_blocking=True))
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        with torch.autocast(device_type=device.type, enabled=False):
            x = x.float().flatten(2).transpose(1, 2)  # [B, HW, C]
            seq = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding[None].float()
            batch, length, channels = seq.shape
            heads = pool.num_heads
            query = pool.q_proj(seq[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2)  # [B, h, 1, c]
            keys = pool.k_proj(seq).reshape(batch, length, heads, -1).transpose(1, 2)  # [B, h, L, c]
            values = pool.v_proj(seq)  # [B, L, C]
            weights = (query @ keys.transpose(-2, -1) / query.shape[-1] ** 0.5).softmax(dim=-1)  # [B, h, 1, L]
            pooled = (weights @ values.reshape(batch, length, heads, -1).transpose(1, 2)).transpose(1, 2).reshape(batch, -1)
            z = torch.cat([pooled, torch.ones_like(pooled[:, :1])], dim=1)
            return pool.c_proj(pooled), pool.c_proj(values[:, 1:]), z

    def projection(self):
        c_proj = self.visual.attnpool.c_proj
        return torch.cat([c_proj.weight.detach().float().cpu().T, c_proj.bias.detach().float().cpu()[None]]).numpy()


# The adapters by family name, in the order `image_tower` tries them.
TOWERS: dict[str, Callable[[torch.nn.Module], ImageTower]] = {
    tower.family: tower for tower in (NativeViT, NativeResNet, TimmViTMAP, TimmViT, TimmConvNeXt)
}


def image_tower(visual: torch.nn.Module, model: str) -> ImageTower:
    """The adapter of `visual`'s family; InputError (exit 2) naming what is missing when SPA cannot read patches from it."""
    for tower in TOWERS.values():
        if tower.accepts(visual):
            try:
                return tower(visual)
            except InputError as err:
                raise InputError(f"--model {model}: {err}") from None
    trunk = getattr(visual, "trunk", None)
    what = f"{type(visual).__name__}" + (f" with timm trunk {type(trunk).__name__}" if trunk is not None else "")
    raise InputError(f"--model {model}: the image tower {what} has no usable patch tokens for SPA: it needs a ViT's token "
                     f"sequence (open_clip or timm ViT/Eva), open_clip's ModifiedResNet or a timm ConvNeXt's final feature map "
                     f"(families: {', '.join(TOWERS)})")

