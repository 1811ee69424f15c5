"""SPA: Semantic-guided Patch-level Alignment (SPEC.md sections 3-8) on a frozen CLIP's features.

For an image x and a seen class c:
  global score  z^g_c = <phi(g(x)), psi(t_c)>
  patch score   z^p_c = sum_ij T*_ij <phi(p_i), psi(s_cj)>   over the top-k patches i of x for class c (frozen relevance)
                                                                 and the real semantic tokens j of c, T* the entropic OT plan
  logits        z_c = tau * (z^g_c + lambda * z^p_c)
trained with cross-entropy over all seen classes on the current task's images plus pseudo-features of old classes drawn
from their stored Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from spacil.errors import InputError
from spacil.ops.gaussian import GaussianBank, MomentAccumulator
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, make_optimizer, step_bar, steps_per_task, task_generator
from spacil.ops.ot import sinkhorn_log, uniform_log_weights
from spacil.ops.patch_selection import (patch_relevance, random_patches, relevance_from_similarity, select_top_k, token_similarity)
from spacil.ops.projectors import ProjectorStack

# Above this many patch-token similarities ([B, N, C, M] elements) prediction splits the batch, to bound memory.
_PREDICT_SIMILARITY_BUDGET = 1 << 25

ABLATION_LABELS = {
    "patch_branch": "global only",
    "optimal_transport": "no OT",
    "semantic_selection": "random patches",
    "projectors": "no projectors",
    "gaussian_calibration": "no calibration",
    "llm_descriptions": "template tokens",
}


@dataclass
class SPAScores:
    """What SPA's logits are made of, for B images and the C seen classes (columns in `seen_positions` order); `spacil
    explain` draws them. logits [B, C] = logit_scale * (global_ + patch_weight * patch); global_ [B, C] the global score
    z^g; patch [B, C] the patch score z^p; relevance [B, C, N] the frozen relevance of every patch; indices [B, C, k] the
    kept patches; plan [B, C, k, M] the transport plan (the uniform plan without OT). Everything but logits and global_ is
    None without the patch branch; relevance and indices also for pseudo-features."""

    logits: torch.Tensor
    global_: torch.Tensor
    patch: Optional[torch.Tensor] = None
    relevance: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    plan: Optional[torch.Tensor] = None


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, M, d], [C, M] -> [C, width, d], [C, width] (zero rows, masked)."""
    extra = width - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _present(semantic: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """semantic [C, M, d], mask [C, M] -> [C] bool: whether a class has a real token (its placeholder is a zero vector;
    an embedded sentence or word never is)."""
    return (mask & (semantic != 0).any(dim=-1)).any(dim=-1)


class SPA(Learner):
    name = "spa"
    needs_patches = True

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.spa
        self.ablation = config.ablation
        self.needs_patches = self.ablation.patch_branch  # calibration without the patch branch keeps global Gaussians only
        dim = context.dim
        device = context.device  # text features, projectors and Gaussians live there from the start
        self.prompts = torch.zeros(0, dim, device=device)
        self.semantic = torch.zeros(0, 1, dim, device=device)  # [C, M, d] semantic tokens s_cj of seen classes
        self.semantic_mask = torch.zeros(0, 1, dtype=torch.bool, device=device)
        self._mask_full = True  # whether semantic_mask is all True (known on the host, so scoring never asks the device)
        self.semantic_present = torch.zeros(0, dtype=torch.bool, device=device)  # [C]: classes with real semantic tokens
        self._eval_generator: Optional[torch.Generator] = None  # random-patch ablation: one stream per evaluation
        self.image_projector = ProjectorStack(dim, self.knobs.projector).to(device)
        self.text_projector = ProjectorStack(dim, self.knobs.projector).to(device)
        self.global_bank = GaussianBank(dim, self.knobs.cov_type, self.knobs.cov_shrink, device)
        self.patch_bank = GaussianBank(dim, self.knobs.cov_type, self.knobs.cov_shrink, device)

    @property
    def label(self) -> str:
        off = [ABLATION_LABELS[k] for k, on in self.ablation.model_dump().items() if not on]
        return "spa" if not off else f"spa ({', '.join(off)})"

    # text side ---------------------------------------------------------------------------------------------------------
    def _semantic_tokens(self, info: TaskInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """The new classes' semantic tokens [n_new, M, d] and mask, from descriptions or (ablation) templates."""
        if self.ablation.llm_descriptions:
            if info.descriptions is None:
                raise InputError(
                    "spa: the feature store has no text/descriptions.npy; add descriptions (`spacil describe` or "
                    "`spacil descriptions import`, then `spacil extract --descriptions FILE`) or set ablation.llm_descriptions=false"
                )
            return info.descriptions.cpu(), info.description_mask.cpu()
        if info.templates is not None:
            tokens = info.templates.cpu()
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)
        if info.prompts is None:
            raise InputError("spa: the feature store has neither descriptions nor prompts (text/prompts.npy)")
        return info.prompts.cpu().unsqueeze(1), torch.ones(len(info.prompts), 1, dtype=torch.bool)

    def begin_task(self, info: TaskInfo) -> None:
        if info.prompts is None:
            raise InputError("spa: the feature store has no class prompts (text/prompts.npy)")
        device = self.context.device
        tokens, mask = self._semantic_tokens(info)
        tokens, mask = tokens.to(device), mask.to(device)
        # A class without descriptions keeps one zero token (its OT problem stays well posed); its patch score is set to
        # exactly 0 in `_logits` (the text projector's bias would otherwise make the zero token score).
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(dim=1)
        self._eval_generator = None
        super().begin_task(info)
        width = max(self.semantic.shape[1], tokens.shape[1])
        old_tokens, old_mask = _pad_tokens(self.semantic, self.semantic_mask, width)
        tokens, mask = _pad_tokens(tokens, mask, width)
        self.semantic = torch.cat([old_tokens, tokens])
        self.semantic_mask = torch.cat([old_mask, mask])
        self._mask_full = bool(self.semantic_mask.all())
        self.semantic_present = _present(self.semantic, self.semantic_mask)
        self.prompts = torch.cat([self.prompts, info.prompts.to(device)])
        if self.ablation.projectors:
            # initialised on the CPU from a CPU generator, then moved: the same starting weights on every device
            generator = task_generator(self.config, info.task, stream=3)
            self.image_projector.add_task(generator)
            self.text_projector.add_task(generator)
            self.image_projector.to(device)  # placed here, once per task: scoring uses them where they are
            self.text_projector.to(device)

    # scoring -----------------------------------------------------------------------------------------------------------
    def _select(self, patches: torch.Tensor, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """patches [B, N, d] frozen -> (relevance [B, C, N] of every patch, indices [B, C, k] of the kept patches, their
        relevance [B, C, k])."""
        semantic, mask = self.semantic.to(patches.device), self.semantic_mask.to(patches.device)
        relevance = patch_relevance(patches, semantic, mask, self.knobs.relevance, self._mask_full)
        if self.ablation.semantic_selection:
            return (relevance, *select_top_k(relevance, self.knobs.top_k_patches))
        batch, classes, num_patches = relevance.shape
        indices = random_patches(batch, classes, num_patches, self.knobs.top_k_patches, generator).to(patches.device)
        return relevance, indices, relevance.gather(-1, indices)

    def _patch_scores(self, similarity: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """similarity [B, C, k, M] of the kept patches with the class tokens (projected), relevance [B, C, k] (needed only for
        patch_weights=relevance) -> (o [B, C], the plan [B, C, k, M])."""
        mask = self.semantic_mask.to(similarity.device)  # [C, M]
        log_b = uniform_log_weights(mask).expand(similarity.shape[0], -1, -1)
        if not self.ablation.optimal_transport:
            weights = torch.exp(log_b).unsqueeze(2) / similarity.shape[2]  # the uniform plan: mean of the cosines
            plan = weights.expand_as(similarity)
            return (plan * similarity).sum(dim=(-1, -2)), plan
        if self.knobs.patch_weights == "relevance":
            log_a = torch.log_softmax(relevance / self.knobs.relevance_temperature, dim=-1)
        else:
            log_a = torch.full(similarity.shape[:-1], -math.log(similarity.shape[2]), device=similarity.device)
        cost = 1.0 - similarity
        if self.knobs.ot_grad == "detach":
            with torch.no_grad():
                plan = sinkhorn_log(cost, log_a, log_b, self.knobs.ot_epsilon, self.knobs.ot_iters)
        else:
            plan = sinkhorn_log(cost, log_a, log_b, self.knobs.ot_epsilon, self.knobs.ot_iters)
        return (plan * similarity).sum(dim=(-1, -2)), plan

    def _scores(self, global_: torch.Tensor, patches: Optional[torch.Tensor], indices: Optional[torch.Tensor],
                relevance: Optional[torch.Tensor]) -> SPAScores:
        """global_ [B, d]; patches [B, N, d] frozen tokens; indices [B, C, k] kept patches (None: every token is kept for
        every class, as for pseudo-samples with N = k); relevance [B, C, k] -> the scores (logits [B, C], their parts)."""
        device = global_.device
        text, image = self.text_projector, self.image_projector  # on the run's device since begin_task / load_state_dict
        global_scores = image(global_) @ text(self.prompts.to(device)).T
        if not self.ablation.patch_branch:
            return SPAScores(self.context.with_bias(self.context.logit_scale * global_scores), global_scores)
        semantic = text(self.semantic.to(device))  # [C, M, d]
        similarity = token_similarity(image(patches), semantic)  # [B, N, C, M]
        similarity = similarity.permute(0, 2, 1, 3)  # [B, C, N, M], a view
        if indices is not None:
            tokens = similarity.shape[-1]
            similarity = similarity.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, tokens))
        patch_scores, plan = self._patch_scores(similarity, relevance)
        # a class without descriptions has no semantic tokens: its patch score is exactly 0
        patch_scores = torch.where(self.semantic_present.to(device), patch_scores, torch.zeros_like(patch_scores))
        logits = self.context.with_bias(self.context.logit_scale * (global_scores + self.knobs.patch_weight * patch_scores))
        return SPAScores(logits, global_scores, patch_scores, indices=indices, plan=plan)

    def _pseudo_batch(self, generator: torch.Generator) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
        """Pseudo-features of every old class: (global [P, d], patches [P, k, d] or None, targets [P])."""
        count = self.knobs.pseudo_per_class
        if not self.ablation.gaussian_calibration or count == 0 or len(self.global_bank) == 0:
            return None
        global_, targets = self.global_bank.sample(count, generator)
        patches = None
        if self.ablation.patch_branch:
            k = self.knobs.top_k_patches
            tokens, _ = self.patch_bank.sample(count * k, generator)
            patches = F.normalize(tokens, dim=-1).view(len(targets), k, -1)
        return F.normalize(global_, dim=-1), patches, targets

    def _real_scores(self, batch: FeatureBatch, generator: Optional[torch.Generator]) -> SPAScores:
        if not self.ablation.patch_branch:
            return self._scores(batch.global_, None, None, None)
        relevance, indices, kept = self._select(batch.patches, generator)
        scores = self._scores(batch.global_, batch.patches, indices, kept)
        scores.relevance = relevance
        return scores

    def _real_logits(self, batch: FeatureBatch, generator: Optional[torch.Generator]) -> torch.Tensor:
        return self._real_scores(batch, generator).logits

    def _pseudo_logits(self, global_: torch.Tensor, patches: Optional[torch.Tensor]) -> torch.Tensor:
        relevance = None
        if patches is not None and self.knobs.patch_weights == "relevance":  # only the relevance weights need it
            mask = self.semantic_mask.to(patches.device)
            relevance = relevance_from_similarity(token_similarity(patches, self.semantic.to(patches.device)), mask,
                                                  self.knobs.relevance, self._mask_full)
        return self._scores(global_, patches, None, relevance).logits

    # hooks -------------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        params = self.image_projector.trainable() + self.text_projector.trainable()
        if not params or self.config.train.epochs == 0:
            return
        train = self.config.train
        optimizer, schedule = make_optimizer(params, train, steps_per_task(len(data), train))
        device = self.context.device
        column = self.columns_of_positions().to(device)
        batch_generator = task_generator(self.config, data.task, stream=1)  # the batch order is drawn on the CPU
        sample_generator = task_generator(self.config, data.task, stream=2, device=device)
        self.image_projector.train()
        self.text_projector.train()
        bar = step_bar(self.context, steps_per_task(len(data), train), data.task)
        for _ in range(train.epochs):
            for batch in data.batches(train.batch_size, batch_generator, with_patches=self.ablation.patch_branch):
                logits = self._real_logits(batch, sample_generator)
                targets = column[batch.targets.to(device)]
                pseudo = self._pseudo_batch(sample_generator)
                if pseudo is not None:
                    global_, patches, positions = pseudo
                    device = logits.device
                    logits = torch.cat([logits, self._pseudo_logits(global_.to(device), None if patches is None else patches.to(device))])
                    targets = torch.cat([targets, column[positions].to(device)])
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
        bar.close()
        self.image_projector.eval()
        self.text_projector.eval()

    @torch.no_grad()
    def end_task(self, data: TaskData) -> None:
        """Store each new class's Gaussian of frozen global features and of its own top-k patches (pooled)."""
        self._eval_generator = None  # the evaluation that follows draws its random patches afresh
        if not self.ablation.gaussian_calibration:
            return
        new_positions = self.seen_positions[len(self.global_bank):]
        slot = {position: i for i, position in enumerate(new_positions)}
        full = self.knobs.cov_type == "full"
        device = self.context.device
        global_moments = MomentAccumulator(len(new_positions), self.context.dim, full, device)
        patch_moments = MomentAccumulator(len(new_positions), self.context.dim, full, device)
        seen_column = {position: i for i, position in enumerate(self.seen_positions)}
        generator = task_generator(self.config, data.task, stream=4, device=device)
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=self.ablation.patch_branch):
            targets = batch.targets.cpu()
            for position in targets.unique().tolist():
                rows = (targets == position).nonzero().squeeze(1)
                global_moments.add(slot[position], batch.global_[rows.to(batch.global_.device)])
                if self.ablation.patch_branch:
                    patches = batch.patches[rows.to(batch.patches.device)]
                    own = seen_column[position]
                    semantic = self.semantic[own:own + 1].to(patches.device)
                    mask = self.semantic_mask[own:own + 1].to(patches.device)
                    if self.ablation.semantic_selection:
                        relevance = patch_relevance(patches, semantic, mask, self.knobs.relevance)  # one class: cheap
                        indices, _ = select_top_k(relevance, self.knobs.top_k_patches)
                    else:
                        indices = random_patches(len(rows), 1, patches.shape[1], self.knobs.top_k_patches, generator)
                    kept = patches.gather(1, indices[:, 0].unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
                    patch_moments.add(slot[position], kept.reshape(-1, kept.shape[-1]))
        for position, i in slot.items():
            self.global_bank.add(position, *global_moments.moments(i))
            if self.ablation.patch_branch:
                self.patch_bank.add(position, *patch_moments.moments(i))

    def _prediction_scores(self, batch: FeatureBatch) -> Iterator[SPAScores]:
        """The scores prediction uses, part by part of the batch (in row order). In the random-patch ablation one generator
        serves a whole evaluation (it starts after `end_task`), so every test batch gets fresh patches, not row i of every
        batch the same ones."""
        if self._eval_generator is None:
            self._eval_generator = task_generator(self.config, len(self.seen_positions), stream=5,
                                                  device=self.context.device)
        generator = self._eval_generator
        if not self.ablation.patch_branch:
            yield self._real_scores(batch, generator)
            return
        per_image = batch.patches.shape[1] * self.semantic.shape[0] * self.semantic.shape[1]
        step = max(1, _PREDICT_SIMILARITY_BUDGET // per_image)
        for start in range(0, len(batch.global_), step):
            yield self._real_scores(FeatureBatch(batch.global_[start:start + step], batch.patches[start:start + step]), generator)

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return torch.cat([part.logits for part in self._prediction_scores(batch)])

    @torch.no_grad()
    def explain(self, batch: FeatureBatch) -> SPAScores:
        """The scores `logits` predicts with and every quantity they come from, for a (small) batch."""
        parts = list(self._prediction_scores(batch))
        return SPAScores(**{field.name: None if getattr(parts[0], field.name) is None
                            else torch.cat([getattr(part, field.name) for part in parts]) for field in fields(SPAScores)})

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "prompts": self.prompts,
            "semantic": self.semantic,
            "semantic_mask": self.semantic_mask,
            "num_projectors": len(self.image_projector.layers),
            "image_projector": self.image_projector.state_dict(),
            "text_projector": self.text_projector.state_dict(),
            "global_bank": self.global_bank.state_dict(),
            "patch_bank": self.patch_bank.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.prompts, self.semantic, self.semantic_mask = (state[key].to(device) for key in ("prompts", "semantic", "semantic_mask"))
        self._mask_full = bool(state["semantic_mask"].all())  # asked of the checkpoint's CPU copy, not of the device
        self.semantic_present = _present(self.semantic, self.semantic_mask)
        self._eval_generator = None
        for stack, key in ((self.image_projector, "image_projector"), (self.text_projector, "text_projector")):
            for task in range(state["num_projectors"]):
                stack.add_task(task_generator(self.config, task, stream=3))
            stack.to(device)
            stack.load_state_dict(state[key])
            for param in stack.parameters():
                param.requires_grad_(False)
            stack.eval()
        self.global_bank.load_state_dict(state["global_bank"])
        self.patch_bank.load_state_dict(state["patch_bank"])
