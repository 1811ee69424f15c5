"""SPA: Semantic-guided Patch-level Alignment (SPEC.md sections 3-8) on a frozen CLIP's features.

For an image x and a seen class c:
  global score  z^g_c = <phi(g(x)), psi(t_c)>
  patch score   z^p_c = sum_ij T*_ij <phi(p_i), psi(s_cj)>   over the top-k patches i of x for class c (frozen relevance)
                                                                 and the real semantic tokens j of c, T* the entropic OT plan
  logits        z_c = tau * (z^g_c + lambda * z^p_c)
trained with cross-entropy over all seen classes on the current task's images plus pseudo-features of old classes drawn
from their stored Gaussians. Beyond the paper (docs/method.md, "SPA at scale"): `class_shortlist` runs the patch branch only
for each sample's classes of highest global score, `pseudo_per_batch` bounds the pseudo-features per batch, and scoring
works in chunks within one memory budget (spacil.devices.working_memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from spacil.devices import working_memory
from spacil.errors import InputError
from spacil.ops.gaussian import GaussianBank, MomentAccumulator
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, make_optimizer, step_bar, steps_per_task, task_generator
from spacil.ops.ot import sinkhorn_log, uniform_log_weights
from spacil.ops.patch_selection import (patch_relevance, random_patches, relevance_from_similarity, select_top_k, token_similarity)
from spacil.ops.projectors import ProjectorStack

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
    # with spa.class_shortlist: shortlist [B, S] the logit columns the patch branch scored for each image, and the class
    # axis of relevance, indices and plan runs over those S slots (`slot` finds a column's); None: every column
    shortlist: Optional[torch.Tensor] = None

    def slot(self, b: int, column: int) -> Optional[int]:
        """Where logit column `column` of image b sits on the class axis of relevance, indices and plan (None: outside
        the image's shortlist, its patch score is the stand-in)."""
        if self.shortlist is None:
            return column
        hits = (self.shortlist[b] == column).nonzero()
        return int(hits[0, 0]) if len(hits) else None


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
        self._eval_budget = 0  # bytes a chunk of prediction's scoring may use, measured when an evaluation starts
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
    def _text_features(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prompts [C, d], semantic tokens [C, M, d]) of the seen classes through the text projector (semantic None without
        the patch branch). Computed once per step or evaluation: every chunk of samples scores against the same ones."""
        device = self.context.device
        prompts = self.text_projector(self.prompts.to(device))
        semantic = self.text_projector(self.semantic.to(device)) if self.ablation.patch_branch else None
        return prompts, semantic

    def _shortlist(self, global_scores: torch.Tensor, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """global_scores [B, C], labels [B] logit columns (training) -> the columns [B, S] the patch branch scores for each
        sample: its `class_shortlist` classes of highest global score, and in training its label and the N highest others
        (S = min(N + 1, C): one width for every sample). None: every column (class_shortlist 0)."""
        count = self.knobs.class_shortlist
        if count == 0:
            return None
        ranking = global_scores.detach()
        if labels is not None:
            ranking = ranking.scatter(1, labels.unsqueeze(1), float("inf"))
            count += 1
        return ranking.topk(min(count, ranking.shape[1]), dim=1).indices

    def _pair_bytes(self, tokens: int, shortlisted: bool) -> int:
        """The working memory of scoring one (sample, class) pair whose sample has `tokens` patch tokens: the frozen
        similarities of every token to the class's M tokens and its relevance, about 12 [k, M] blocks (kept similarities,
        cost, plan, the solver's buffers, what the backward pass keeps), and the projected similarities of every token
        (every class) or with a shortlist the class's tokens gathered for the sample and the kept patches, frozen and
        projected."""
        width, dim, k = self.semantic.shape[1], self.context.dim, min(self.knobs.top_k_patches, tokens)
        floats = tokens * width + tokens + 12 * k * width
        floats += 2 * (width + k) * dim if shortlisted else tokens * width
        return 4 * floats

    def _rows_per_chunk(self, tokens: int, columns: int, budget: int) -> int:
        """How many samples one chunk scores against `columns` classes within `budget` bytes (at least one: a single sample
        beyond the budget is split over classes instead, in `_scores`)."""
        shortlisted = self.knobs.class_shortlist > 0
        return max(1, budget // max(1, columns * self._pair_bytes(tokens, shortlisted)))

    def _scores(self, global_: torch.Tensor, patches: Optional[torch.Tensor], text: tuple[torch.Tensor, Optional[torch.Tensor]],
                pseudo: bool = False, labels: Optional[torch.Tensor] = None, random_picks: Optional[torch.Tensor] = None,
                budget: Optional[int] = None, detail: bool = False) -> SPAScores:
        """The scores of B samples against every seen class.

        global_ [B, d]; patches [B, N, d] the frozen tokens of real images (top-k per class by relevance, or the
        `random_picks` [B, >=1, k] of the random-patch ablation), or with `pseudo` pseudo-patches [B, k, d] (every one
        kept); text: `_text_features()`; labels [B] logit columns, always in the shortlist (training); budget: bytes a chunk
        of classes may use (None: all at once); detail: keep relevance, indices and plan (`explain`)."""
        prompts, semantic = text
        global_scores = self.image_projector(global_) @ prompts.T  # [B, C]
        if not self.ablation.patch_branch:
            return SPAScores(self.context.with_bias(self.context.logit_scale * global_scores), global_scores)
        columns = self._shortlist(global_scores, labels)
        projected = self.image_projector(patches)
        width = len(self.semantic) if columns is None else columns.shape[1]
        step = width
        if budget is not None:
            step = max(1, budget // max(1, len(global_) * self._pair_bytes(patches.shape[1], columns is not None)))
        parts = [self._patch_part(patches, projected, semantic, columns, slice(start, start + step), pseudo, random_picks,
                                  detail) for start in range(0, width, step)]
        patch_scores = torch.cat([part[0] for part in parts], dim=1)  # [B, width]
        if columns is not None:
            # outside the shortlist: the smallest patch score inside it (detached: a constant of the sample), so no class
            # outside outranks one inside on the patch score, and an image's prediction is always a shortlisted class
            stand_in = patch_scores.detach().amin(dim=1, keepdim=True)
            patch_scores = stand_in.expand(-1, global_scores.shape[1]).scatter(1, columns, patch_scores)
        logits = self.context.with_bias(self.context.logit_scale * (global_scores + self.knobs.patch_weight * patch_scores))
        scores = SPAScores(logits, global_scores, patch_scores, shortlist=columns)
        if detail:
            scores.relevance, scores.indices, scores.plan = (
                None if parts[0][i] is None else torch.cat([part[i] for part in parts], dim=1) for i in (1, 2, 3))
        return scores

    def _patch_part(self, patches: torch.Tensor, projected: torch.Tensor, semantic: torch.Tensor,
                    columns: Optional[torch.Tensor], part: slice, pseudo: bool, random_picks: Optional[torch.Tensor],
                    detail: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The patch branch for the classes `part` of every class (columns None) or of each sample's shortlist (columns
        [B, S]) -> (patch scores [B, c], relevance [B, c, N], indices [B, c, k], plan [B, c, k, M]; the last three None
        unless `detail`, relevance and indices also None for pseudo-samples). patches [B, N, d] frozen, projected: them
        through the image projector; semantic [C, M, d] projected tokens."""
        if columns is None:  # the same classes for every sample: [c, M, d] tokens, [c, M] mask, [c] present
            frozen, tokens = self.semantic[part], semantic[part]
            mask, present = self.semantic_mask[part], self.semantic_present[part]
            relevance_mask = mask
        else:  # each sample its own classes: [B, c, M, d], [B, c, M], [B, c]
            chosen = columns[:, part]
            frozen, tokens = self.semantic[chosen], semantic[chosen]
            mask, present = self.semantic_mask[chosen], self.semantic_present[chosen]
            relevance_mask = mask.unsqueeze(1)  # broadcast over the tokens axis of [B, N, c, M]
        knobs, classes = self.knobs, frozen.shape[-3]
        relevance = indices = kept = None
        if pseudo:
            similarity = token_similarity(projected, tokens).permute(0, 2, 1, 3)  # [B, c, k, M]
            if knobs.patch_weights == "relevance":  # only the relevance weights need it
                with torch.no_grad():
                    kept = relevance_from_similarity(token_similarity(patches, frozen), relevance_mask, knobs.relevance,
                                                     self._mask_full)
        else:
            with torch.no_grad():  # frozen relevance [B, c, N]
                relevance = relevance_from_similarity(token_similarity(patches, frozen), relevance_mask, knobs.relevance,
                                                      self._mask_full)
                if self.ablation.semantic_selection:
                    indices, kept = select_top_k(relevance, knobs.top_k_patches)
                else:
                    indices = random_picks[:, :1].expand(-1, classes, -1)
                    kept = relevance.gather(-1, indices)
            if columns is None:  # one matrix product over every patch, then the kept ones: [B, c, k, M]
                similarity = token_similarity(projected, tokens).permute(0, 2, 1, 3)  # [B, c, N, M], a view
                similarity = similarity.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, similarity.shape[-1]))
            else:  # each sample its own few classes: the kept patches first [B, c, k, d], then their cosines [B, c, k, M]
                batch, _, dim = projected.shape
                picked = projected.gather(1, indices.reshape(batch, -1, 1).expand(-1, -1, dim)).view(*indices.shape, dim)
                similarity = picked @ tokens.transpose(-1, -2)
        patch_scores, plan = self._patch_scores(similarity, kept, mask)
        # a class without descriptions has no semantic tokens: its patch score is exactly 0
        patch_scores = torch.where(present, patch_scores, torch.zeros_like(patch_scores))
        if not detail:
            return patch_scores, None, None, None
        return patch_scores, relevance, indices, plan

    def _patch_scores(self, similarity: torch.Tensor, relevance: Optional[torch.Tensor],
                      mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """similarity [B, c, k, M] of the kept patches with the class tokens (projected), relevance [B, c, k] (needed only
        for patch_weights=relevance), mask [c, M] or [B, c, M] the classes' real tokens -> (o [B, c], the plan [B, c, k, M])."""
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

    def _random_picks(self, patches: torch.Tensor, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """The random-patch ablation's k patches of each image [B, C, k] (the same for every class), drawn once per batch,
        before any chunking, so chunks never change the draws; None when patches are selected by relevance."""
        if not self.ablation.patch_branch or self.ablation.semantic_selection:
            return None
        picks = random_patches(len(patches), len(self.semantic), patches.shape[1], self.knobs.top_k_patches, generator)
        return picks.to(patches.device)

    def _pseudo_batch(self, generator: torch.Generator) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]:
        """Pseudo-features of the old classes: (global [P, d], patches [P, k, d] or None, target positions [P]).
        pseudo_per_batch 0: pseudo_per_class of every old class; P > 0: P of them, each class equally likely (a random
        permutation of the old classes per full pass, its first P mod (old classes) for the rest)."""
        bank = self.global_bank
        per_batch, count = self.knobs.pseudo_per_batch, self.knobs.pseudo_per_class
        if not self.ablation.gaussian_calibration or len(bank) == 0 or (per_batch == 0 and count == 0):
            return None
        k = self.knobs.top_k_patches
        patches = None
        if per_batch == 0:
            global_, targets = bank.sample(count, generator)
            if self.ablation.patch_branch:
                tokens, _ = self.patch_bank.sample(count * k, generator)
                patches = F.normalize(tokens, dim=-1).view(len(targets), k, -1)
            return F.normalize(global_, dim=-1), patches, targets
        old = len(bank)
        device = bank.means.device
        passes, rest = divmod(per_batch, old)
        slots = torch.cat([torch.randperm(old, generator=generator, device=device) for _ in range(passes)]
                          + [torch.randperm(old, generator=generator, device=device)[:rest]])
        global_ = bank.sample_slots(slots, 1, generator).squeeze(1)
        if self.ablation.patch_branch:
            patches = F.normalize(self.patch_bank.sample_slots(slots, k, generator), dim=-1)
        return F.normalize(global_, dim=-1), patches, bank.positions_of(slots)

    def _real_logits(self, batch: FeatureBatch, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The logits [B, C] of a batch of real images, unchunked (benchmarks)."""
        picks = None if batch.patches is None else self._random_picks(batch.patches, generator)
        return self._scores(batch.global_, batch.patches, self._text_features(), random_picks=picks).logits

    def _pseudo_logits(self, global_: torch.Tensor, patches: Optional[torch.Tensor]) -> torch.Tensor:
        """The logits [P, C] of pseudo-samples, unchunked (benchmarks)."""
        return self._scores(global_, patches, self._text_features(), pseudo=True).logits

    def step_gradients(self, batch: FeatureBatch, targets: torch.Tensor, generator: torch.Generator,
                       budget: Optional[int] = None) -> torch.Tensor:
        """One training step's loss (returned, detached) and its gradients, accumulated into the projectors' .grad: the
        cross-entropy over all seen classes of the batch (targets [B] logit columns) and of the pseudo-features drawn from
        `generator`. The samples are scored in chunks within `budget` bytes (None: one chunk), each chunk's backward pass
        run before the next is scored, so memory does not grow with the batch; the text side is projected once and its
        gradient, summed over the chunks, goes back through the text projector at the end. The same gradients as one
        chunk (the loss is a mean over samples, each sample's logits depend on it alone), to float rounding."""
        device = self.context.device
        picks = None if batch.patches is None else self._random_picks(batch.patches, generator)
        groups = [(batch.global_, batch.patches, targets, picks, False)]
        pseudo = self._pseudo_batch(generator)
        if pseudo is not None:
            global_, patches, positions = pseudo
            column = self.columns_of_positions().to(device)
            groups.append((global_.to(device), None if patches is None else patches.to(device), column[positions.to(device)],
                           None, True))
        # the loss is the mean over the batch and SPEC.md's pseudo_per_class pseudo-samples of every old class; with the
        # per-batch budget each of its P draws stands for (pseudo_per_class x old classes) / P of them, so the loss's
        # expectation over the draws is exact SPA's (pseudo_per_class 0: the plain mean over the batch and the P draws)
        weights = [1.0] * len(groups)
        total = sum(len(group[2]) for group in groups)
        if pseudo is not None and self.knobs.pseudo_per_batch > 0 and self.knobs.pseudo_per_class > 0:
            represented = self.knobs.pseudo_per_class * len(self.global_bank)
            weights[1] = represented / self.knobs.pseudo_per_batch
            total = len(targets) + represented
        text = self._text_features()
        leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in text)
        loss_total = torch.zeros((), device=device)
        for (global_, patches, labels, random_picks, pseudo_rows), weight in zip(groups, weights):
            rows = len(labels)
            if budget is not None and patches is not None:
                width = len(self.semantic) if self.knobs.class_shortlist == 0 else min(self.knobs.class_shortlist + 1, len(self.semantic))
                rows = self._rows_per_chunk(patches.shape[1], width, budget)
            for start in range(0, len(labels), rows):
                part = slice(start, start + rows)
                scores = self._scores(global_[part], None if patches is None else patches[part], leaves, pseudo_rows,
                                      labels[part], None if random_picks is None else random_picks[part], budget)
                loss = F.cross_entropy(scores.logits, labels[part], reduction="sum") * (weight / total)
                if loss.requires_grad:
                    loss.backward()
                loss_total += loss.detach()
        outputs = [(t, leaf.grad) for t, leaf in zip(text, leaves) if t is not None and leaf.grad is not None]
        if outputs:
            torch.autograd.backward([t for t, _ in outputs], [grad for _, grad in outputs])
        return loss_total

    # hooks -------------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        params = self.image_projector.trainable() + self.text_projector.trainable()
        if not params or self.config.train.epochs == 0:
            return
        train = self.config.train
        optimizer, schedule = make_optimizer(params, train, steps_per_task(len(data), train))
        device = self.context.device
        column = self.columns_of_positions().to(device)
        budget = working_memory(device, train.device_memory_budget)  # measured once per task
        batch_generator = task_generator(self.config, data.task, stream=1)  # the batch order is drawn on the CPU
        sample_generator = task_generator(self.config, data.task, stream=2, device=device)
        self.image_projector.train()
        self.text_projector.train()
        bar = step_bar(self.context, steps_per_task(len(data), train), data.task)
        for _ in range(train.epochs):
            for batch in data.batches(train.batch_size, batch_generator, with_patches=self.ablation.patch_branch):
                optimizer.zero_grad(set_to_none=True)
                self.step_gradients(batch, column[batch.targets.to(device)], sample_generator, budget)
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

    def _prediction_scores(self, batch: FeatureBatch, detail: bool = False) -> Iterator[SPAScores]:
        """The scores prediction uses, part by part of the batch (in row order), each part within the working-memory budget
        (measured once per evaluation; the [B, N, C, M] relevance is split over images and, for one image beyond the
        budget, over classes). In the random-patch ablation one generator serves a whole evaluation (it starts after
        `end_task`), so every test batch gets fresh patches, not row i of every batch the same ones."""
        if self._eval_generator is None:
            self._eval_generator = task_generator(self.config, len(self.seen_positions), stream=5,
                                                  device=self.context.device)
            self._eval_budget = working_memory(self.context.device, self.config.train.device_memory_budget)
        text = self._text_features()
        if not self.ablation.patch_branch:
            yield self._scores(batch.global_, None, text)
            return
        picks = self._random_picks(batch.patches, self._eval_generator)
        width = len(self.semantic) if self.knobs.class_shortlist == 0 else min(self.knobs.class_shortlist, len(self.semantic))
        step = self._rows_per_chunk(batch.patches.shape[1], width, self._eval_budget)
        for start in range(0, len(batch.global_), step):
            part = slice(start, start + step)
            yield self._scores(batch.global_[part], batch.patches[part], text,
                               random_picks=None if picks is None else picks[part], budget=self._eval_budget, detail=detail)

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return torch.cat([part.logits for part in self._prediction_scores(batch)])

    @torch.no_grad()
    def explain(self, batch: FeatureBatch) -> SPAScores:
        """The scores `logits` predicts with and every quantity they come from, for a (small) batch."""
        parts = list(self._prediction_scores(batch, detail=True))
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
