"""Semantic-guided patch selection (SPEC.md section 3).

The relevance of patch i to class c is r_ic = max_j <p_i, s_cj> (or the mean over j) in the frozen space, over the class's
real semantic tokens only. The top-k patches per (image, class) are kept. Everything here uses frozen features, so it runs
without gradients and the selection is fixed during training.
"""

from __future__ import annotations

from typing import Optional

import torch


def token_similarity(patches: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
    """patches [B, N, d], semantic [C, M, d] (the same classes for every image) or [B, C, M, d] (each image its own, as
    with SPA's class shortlist) -> cosines [B, N, C, M] from one (batched) matrix product (no [B, C, N, d] tensor)."""
    batch, num_patches, dim = patches.shape
    if semantic.dim() == 4:
        classes, tokens = semantic.shape[1:3]
        flat = torch.bmm(patches, semantic.reshape(batch, classes * tokens, dim).transpose(1, 2))
        return flat.view(batch, num_patches, classes, tokens)
    classes, tokens, _ = semantic.shape
    flat = patches.reshape(batch * num_patches, dim) @ semantic.reshape(classes * tokens, dim).T
    return flat.view(batch, num_patches, classes, tokens)


def relevance_from_similarity(similarity: torch.Tensor, mask: torch.Tensor, mode: str = "max",
                              mask_full: Optional[bool] = None) -> torch.Tensor:
    """similarity [B, N, C, M], mask [C, M] -> relevance [B, C, N] (classes without tokens get zeros). `mask_full`: whether
    the mask is all True, when the caller knows (asking a device tensor waits for the device)."""
    if mode == "max":
        if mask_full if mask_full is not None else bool(mask.all()):  # no masking pass over the [B, N, C, M] similarities
            return similarity.amax(dim=-1).permute(0, 2, 1)
        scores = similarity.masked_fill(~mask, float("-inf")).amax(dim=-1)
        scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    else:
        weights = mask.to(similarity.dtype) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        scores = (similarity * weights).sum(dim=-1)
    return scores.permute(0, 2, 1)


@torch.no_grad()
def patch_relevance(patches: torch.Tensor, semantic: torch.Tensor, mask: torch.Tensor, mode: str = "max",
                    mask_full: Optional[bool] = None) -> torch.Tensor:
    """patches [B, N, d], semantic [C, M, d], mask [C, M] -> relevance r [B, C, N]."""
    return relevance_from_similarity(token_similarity(patches, semantic), mask, mode, mask_full)


@torch.no_grad()
def select_top_k(relevance: torch.Tensor, top_k_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """relevance [B, C, N] -> (indices [B, C, k], their relevance [B, C, k]), k = min(top_k_patches, N)."""
    k = min(top_k_patches, relevance.shape[-1])
    values, indices = relevance.topk(k, dim=-1, sorted=True)
    return indices, values


@torch.no_grad()
def random_patches(batch: int, classes: int, num_patches: int, top_k_patches: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The ablation of semantic selection: k random patches per image (the same for every class) -> indices [B, C, k], on
    the generator's device."""
    k = min(top_k_patches, num_patches)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator is not None else None)
    return noise.argsort(dim=-1)[:, :k].unsqueeze(1).expand(batch, classes, k)
