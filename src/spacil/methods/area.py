"""AREA (Xie, Shi, Zhou, ICML 2026, "Attribute Extraction and Aggregation for CLIP-Based Class-Incremental Learning"), on
the store.

Follows the official code (github.com/LAMDA-CL/ICML2026-AREA): models/area.py `Learner` (`log_map`,
`_get_visual_base_matrix`, `_get_textual_base_matrix`, `train`, `_update_stat`, `sample`, `get_most_similar_task`,
`_eval_cnn`, `_generate_occluded_inputs`, `_compute_cost_matrix`, `_sinkhorn_distance`); utils/inc_net.py `Area`
(`append_S`, `forward` / `forward_inference`, `_get_visual_score`, `_get_textual_score`, `analyze_mean_cov`,
`update_stat`); exps/area/*.json.

  bases     per class, K directions of principal geodesic analysis on the hypersphere: the log map of the class's features
            at their normalised mean, then the top-K right singular vectors (visual: the class's training images; textual:
            every sentence of the class's clean description set).
  experts   per task a visual and a textual scorer, Linear(d, K) without bias (a new one starts as a copy of the last);
            one visual and one textual residual adapter, Linear(d, d) without bias, shared by all tasks. A class's image
            feature is adapter(f) + V_c scorer(f), its text feature adapter(t) + T_c scorer(t); logits are CLIP's scale times
            the cosine of the two.
  train     SGD (momentum 0.9), MultiStepLR per epoch; loss = CE(logits over the seen classes, of the batch and of Gaussian
            pseudo-features of every old class) + vib_lambda * (occlusion loss + augmentation consistency loss).
  end       each new class's mean and covariance of f (+1e-4 I), for the pseudo-features.
  predict   each image is routed to the task whose attribute manifold (its classes' visual basis vectors) has the largest
            Sinkhorn value, and that task's experts score every seen class.

What this implementation needs from the store: z (`<split>/global_pre.npy`) with `backbone/visual_proj.npy` (f = z @ proj is
open_clip's un-normalised encode_image), stored occlusion and area-augment views of the training images
(`spacil extract --views N --view-transform occlusion|area-augment`), and AREA's description sets (`spacil extract
--area-descriptions FILE`). Every difference from the official code: docs/method.md, "AREA".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from spacil.errors import InputError
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, step_bar, task_generator
from spacil.methods.engine import SharedCovarianceGDA

# Streams of task_generator used by AREA (one seed drives everything).
_STREAM_INIT = 41
_STREAM_BATCHES = 42
_STREAM_PSEUDO = 43
_STREAM_VIEWS = 44
_STREAM_SENTENCES = 45


# ----------------------------------------------------------------------------------------------------------------------
# Attribute bases (principal geodesic analysis)


def log_map(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """x [N, D], mu [1, D] unit -> [N, D] the log map at mu, as models/area.py Learner.log_map computes it:
    cos = clamp(x mu, -1 + 1e-6, 1 - 1e-6), theta = acos(cos), scaled (x - cos mu) * theta / (sin theta + 1e-6) where
    theta > 1e-4 (else unscaled). The official code feeds un-normalised features (x mu is then clamped)."""
    cos_theta = (x @ mu.reshape(-1)).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    theta = torch.acos(cos_theta)
    sin_theta = torch.sqrt(1 - cos_theta ** 2)
    coeff = theta / (sin_theta + 1e-6)
    scaling = torch.where(theta > 1e-4, coeff, torch.ones_like(coeff))
    return scaling.unsqueeze(1) * (x - cos_theta.unsqueeze(1) * mu.reshape(1, -1))


def geodesic_basis(features: torch.Tensor, rank: int) -> torch.Tensor:
    """features [N, D] of one class -> [D, rank]: models/area.py `_get_visual_base_matrix` / `_get_textual_base_matrix`
    (mean, normalised; the log map there; torch.linalg.svd on the CPU; Vh[:K].T). With fewer than `rank` features (the
    official code then fails to store the basis) the missing columns are zeros."""
    mu = F.normalize(features.mean(dim=0, keepdim=True), dim=-1)
    tangent = log_map(features, mu)
    _, _, vh = torch.linalg.svd(tangent.cpu(), full_matrices=False)
    basis = vh[:rank].t()
    if basis.shape[1] < rank:
        basis = torch.cat([basis, torch.zeros(basis.shape[0], rank - basis.shape[1])], dim=1)
    return basis.to(features.device)


# ----------------------------------------------------------------------------------------------------------------------
# Experts: scoring and residual refinement


def text_embeddings(text: torch.Tensor, textual_basis: torch.Tensor, textual_scorer: torch.Tensor,
                    textual_adapter: torch.Tensor) -> torch.Tensor:
    """text [C, D] un-normalised class-name features -> [C, D] unit: utils/inc_net.py Area.forward's text side,
    textual_adapter(t) + T_c textual_S(t), divided by (norm + 1e-6). textual_basis [C, D, K], textual_scorer [K, D],
    textual_adapter [D, D]."""
    evidence = torch.einsum("cdk,ck->cd", textual_basis, text @ textual_scorer.T)
    features = text @ textual_adapter.T + evidence
    return features / (features.norm(dim=-1, keepdim=True) + 1e-6)


def expert_logits(image: torch.Tensor, text_unit: torch.Tensor, visual_basis: torch.Tensor, visual_scorer: torch.Tensor,
                  visual_adapter: torch.Tensor, scale: float) -> torch.Tensor:
    """utils/inc_net.py Area.forward / forward_inference: image [B, D] un-normalised f; text_unit [C, D] (text_embeddings);
    visual_basis [C, D, K]; visual_scorer [K, D]; visual_adapter [D, D] -> [B, C] logits
    scale * <u_bc / (|u_bc| + 1e-6), text_c>, u_bc = visual_adapter(f_b) + V_c visual_S(f_b).

    The official code builds u [B, C, D]; here <u_bc, t_c> and |u_bc|^2 are expanded (r_b = adapter(f_b), s_b = scores):
    <r_b, t_c> + s_b . (V_c^T t_c) and |r_b|^2 + 2 s_b . (V_c^T r_b) + s_b^T (V_c^T V_c) s_b, so memory is [B, C, K]."""
    residual = image @ visual_adapter.T  # [B, D]
    score = image @ visual_scorer.T  # [B, K]
    basis_text = torch.einsum("cdk,cd->ck", visual_basis, text_unit)  # [C, K]
    numerator = residual @ text_unit.T + score @ basis_text.T  # [B, C]
    cross = torch.einsum("cdk,bd->bck", visual_basis, residual)  # [B, C, K]
    gram = torch.einsum("cdk,cdl->ckl", visual_basis, visual_basis)  # [C, K, K]
    squared = ((residual ** 2).sum(dim=-1, keepdim=True) + 2 * (cross * score.unsqueeze(1)).sum(dim=-1)
               + torch.einsum("bk,ckl,bl->bc", score, gram, score))
    return scale * numerator / (squared.clamp_min(0).sqrt() + 1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The regulariser (occlusion loss + augmentation consistency, weighted by vib_lambda)


def occlusion_loss(score_occluded: torch.Tensor, score_clean: torch.Tensor, text_occluded: torch.Tensor,
                   text_clean: torch.Tensor) -> torch.Tensor:
    """models/area.py Learner.train's `loss_mask`: mean(relu(visual score of the occluded view - of the clean image))
    + mean(relu(textual score of an occluded-image description - of "a photo of a <class>.")). Scores [B, K] and [1, K]."""
    return torch.relu(score_occluded - score_clean).mean() + torch.relu(text_occluded - text_clean).mean()


def consistency_loss(view_scores: list[torch.Tensor], text_scores: list[torch.Tensor]) -> torch.Tensor:
    """models/area.py Learner.train's `loss_cons`: for each of the M augmented views, L1(view scores [B, K], their mean
    over the views) + L1(the textual scores [1, K] of an augmented-image description, their mean), summed."""
    mean_views = torch.stack(view_scores).mean(dim=0)
    mean_texts = torch.stack(text_scores).mean(dim=0)
    loss = torch.zeros((), device=mean_views.device)
    for view, text in zip(view_scores, text_scores):
        loss = loss + F.l1_loss(view, mean_views) + F.l1_loss(text, mean_texts)
    return loss


def area_regulariser(vib_lambda: float, occlusion: torch.Tensor, consistency: torch.Tensor) -> torch.Tensor:
    """The term the official code adds to the cross-entropy, `self.vib_lambda * (loss_mask + loss_cons)`: the paper's
    variational-information-bottleneck weight scales the occlusion and consistency losses (the code has no KL term)."""
    return vib_lambda * (occlusion + consistency)


# ----------------------------------------------------------------------------------------------------------------------
# Routing over task attribute manifolds


def routing_cost(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """models/area.py `_compute_cost_matrix`: 1 - cosine, query [B, D], rows [N, D] -> [B, N]."""
    return 1.0 - F.normalize(query, p=2, dim=1) @ F.normalize(rows, p=2, dim=1).T


def sinkhorn_distance(cost: torch.Tensor, epsilon: float = 0.1, iters: int = 50) -> torch.Tensor:
    """models/area.py `_sinkhorn_distance`, cost [B, N] -> [B]: log-domain updates with mass 1 on each query and 1/N on
    each basis vector, `iters` rounds of f = log mu - logsumexp(g + log K), g = log nu - (f + log K) (each query its own
    problem: the official code evaluates one image at a time), then <f, mu> + <g, nu>."""
    batch, width = cost.shape
    mu = torch.ones(batch, 1, device=cost.device, dtype=cost.dtype)
    nu = torch.full((batch, width), 1.0 / width, device=cost.device, dtype=cost.dtype)
    f = torch.zeros(batch, 1, device=cost.device, dtype=cost.dtype)
    g = torch.zeros(batch, width, device=cost.device, dtype=cost.dtype)
    log_k = -cost / epsilon
    for _ in range(iters):
        f = torch.log(mu) - torch.logsumexp(g + log_k, dim=1, keepdim=True)
        g = torch.log(nu) - (f + log_k)
    return (f * mu).sum(dim=1) + (g * nu).sum(dim=1)


def sinkhorn_value(cost: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """What `sinkhorn_distance` returns, without its loop: the last update g = log nu - (f + log K) makes
    <f, mu> + <g, nu> = f (1 - sum nu) + <nu, log nu> + <nu, cost> / epsilon = mean(cost) / epsilon - log N, whatever f
    and the number of rounds (sum nu = 1). cost [B, N] -> [B]."""
    return cost.mean(dim=1) / epsilon - math.log(cost.shape[1])


def route(image: torch.Tensor, visual_bases: torch.Tensor, bounds: list[tuple[int, int]], epsilon: float) -> torch.Tensor:
    """models/area.py `get_most_similar_task`: image [B, D] f; visual_bases [S, D, K] of the seen classes; bounds the
    column range of each task -> [B] the task with the largest Sinkhorn value of its (C_t * K) basis vectors (computed
    by `sinkhorn_value`, equal to the official 50 rounds' result)."""
    values = []
    for start, end in bounds:
        rows = visual_bases[start:end].permute(0, 2, 1).reshape(-1, visual_bases.shape[1])  # (C K) D
        values.append(sinkhorn_value(routing_cost(image, rows), epsilon))
    return torch.stack(values, dim=1).argmax(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Pseudo-features


def class_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """utils/inc_net.py Area.analyze_mean_cov for one class: features [n, D] -> (mean [D], torch.cov + 1e-4 I [D, D]).
    A class of one image (torch.cov: NaN) gets the zero covariance (+1e-4 I)."""
    mean = features.mean(dim=0)
    eye = torch.eye(features.shape[1], device=features.device, dtype=features.dtype)
    scatter = torch.cov(features.t()) if len(features) > 1 else torch.zeros_like(eye)
    cov = scatter + 1e-4 * eye
    return mean, cov


def sample_pseudo(means: torch.Tensor, cholesky: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """models/area.py Learner.sample (shrink=False) for every old class at once: means [C, D], cholesky [C, D, D] (the
    factors of the classes' covariances; the official code factors one on the CPU at every draw, here once, at the end of
    the class's task) -> [C * size, D], class by class: noise [size, D] @ L_c^T + mean_c, noise drawn as one [C, size, D]."""
    noise = torch.randn(len(means), size, means.shape[-1], generator=generator).to(means.device)
    return (torch.einsum("ced,csd->cse", cholesky, noise) + means.unsqueeze(1)).reshape(-1, means.shape[-1])


def initial_linear(out_dim: int, in_dim: int, generator: torch.Generator) -> torch.Tensor:
    """[out, in] weight of `nn.Linear(in, out, bias=False)` under PyTorch's default init (uniform in +-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_dim)
    return (torch.rand(out_dim, in_dim, generator=generator) * 2 - 1) * bound


def multistep_lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """optim.lr_scheduler.MultiStepLR stepped once per epoch: base * gamma^(milestones passed by `epoch`, 0-based)."""
    return base * gamma ** sum(1 for m in milestones if epoch >= m)


def draw_sentence(counts: torch.Tensor, generator: torch.Generator) -> int:
    """`random.choice` over a class's real sentences: counts is that class's number of sentences."""
    return int(torch.randint(int(counts), (1,), generator=generator))


# ----------------------------------------------------------------------------------------------------------------------
# The learner


class Area(Learner):
    """AREA on stored features (see the module doc)."""

    name = "area"
    needs_patches = False
    train_arrays = ("global_pre", "views_occlusion_pre", "views_area_augment_pre")
    eval_arrays = ("global_pre",)
    text_inputs = ("area_texts",)

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.area
        device = context.device
        dim = context.dim
        self.proj = None if context.visual_proj is None else context.visual_proj.float().to(device)  # [width, d]
        generator = task_generator(config, 0, stream=_STREAM_INIT)
        # shared residual adapters (utils/inc_net.py Area.__init__: nn.Linear(512, 512, bias=False))
        self.visual_adapter = initial_linear(dim, dim, generator).to(device)
        self.textual_adapter = initial_linear(dim, dim, generator).to(device)
        self.visual_scorers = torch.zeros(0, self.knobs.basis_rank, dim, device=device)  # [T, K, d]
        self.textual_scorers = torch.zeros(0, self.knobs.basis_rank, dim, device=device)
        self.text = torch.zeros(0, dim, device=device)  # [S, d] "a good photo of a <class>." un-normalised
        self.visual_bases = torch.zeros(0, dim, self.knobs.basis_rank, device=device)  # [S, d, K]
        self.textual_bases = torch.zeros(0, dim, self.knobs.basis_rank, device=device)
        self.means = torch.zeros(0, dim, device=device)  # [S_old, d]
        self.cholesky = torch.zeros(0, dim, dim, device=device)  # [S_old, d, d]
        self.bounds: list[tuple[int, int]] = []  # the columns of each task
        self.gda = SharedCovarianceGDA(device)
        # this task's texts: {set: (raw [n_new, M, d], counts [n_new])} of the occluded/augmented sets and the clean prompt
        self._task_texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _f(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., width] -> f = z @ visual.proj [..., d], open_clip's un-normalised encode_image."""
        return z @ self.proj

    # text side and bases -----------------------------------------------------------------------------------------------
    def begin_task(self, info: TaskInfo) -> None:
        """utils/inc_net.py Area.append_S (a new pair of scorers, a copy of the last pair after the first task); the new
        classes' "a good photo of a <class>." features and textual bases (`_get_textual_base_matrix`)."""
        if info.area_texts is None:
            raise InputError("area: the feature store has no AREA description sets; add them with `spacil extract "
                             "--area-descriptions FILE`")
        super().begin_task(info)
        device = self.context.device
        texts = {name: (raw.float().to(device), counts) for name, (raw, counts) in info.area_texts.items()}
        rank = self.knobs.basis_rank
        self.text = torch.cat([self.text, texts["name_prompt"][0][:, 0]])
        bases = [geodesic_basis(raw[:int(count)], rank) for raw, count in zip(*texts["clean"])]
        self.textual_bases = torch.cat([self.textual_bases, torch.stack(bases).to(device)])
        self._task_texts = {name: texts[name] for name in ("occluded", "augmented", "photo_prompt")}
        if len(self.visual_scorers):
            visual, textual = self.visual_scorers[-1], self.textual_scorers[-1]
        else:
            generator = task_generator(self.config, info.task, stream=_STREAM_INIT)
            visual = initial_linear(rank, self.context.dim, generator).to(device)
            textual = initial_linear(rank, self.context.dim, generator).to(device)
        self.visual_scorers = torch.cat([self.visual_scorers, visual.unsqueeze(0)])
        self.textual_scorers = torch.cat([self.textual_scorers, textual.unsqueeze(0)])
        start = self.bounds[-1][1] if self.bounds else 0
        self.bounds.append((start, start + len(info.positions)))

    # training ----------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        """models/area.py Learner.incremental_train (the new classes' visual bases, the GDA statistics when g_lambda > 0)
        and Learner.train (see the module doc for the loss)."""
        knobs = self.knobs
        device = self.context.device
        task = data.take(np.arange(len(data)), with_patches=False)
        image = self._f(task.extra["global_pre"])  # [n, d]
        column = self.columns_of_positions().to(device)
        targets = column[task.targets]
        start, end = self.bounds[-1]
        new_bases = [geodesic_basis(image[targets == c], knobs.basis_rank) for c in range(start, end)]
        self.visual_bases = torch.cat([self.visual_bases, torch.stack(new_bases).to(device)])
        if knobs.g_lambda > 0:
            self.gda.update(F.normalize(task.extra["global_pre"], dim=-1), targets - start, end - start)
        if knobs.area_epochs == 0:
            return
        occluded = self._f(task.extra["views_occlusion_pre"])  # [n, V, d], f of every stored view, once per task
        augmented = self._f(task.extra["views_area_augment_pre"])  # [n, V', d]
        visual_adapter = torch.nn.Parameter(self.visual_adapter.clone())
        textual_adapter = torch.nn.Parameter(self.textual_adapter.clone())
        visual_scorer = torch.nn.Parameter(self.visual_scorers[-1].clone())
        textual_scorer = torch.nn.Parameter(self.textual_scorers[-1].clone())
        params = [visual_adapter, textual_adapter, visual_scorer, textual_scorer]
        if knobs.area_optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=knobs.area_lr, momentum=knobs.area_momentum,
                                        weight_decay=knobs.area_weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=knobs.area_lr, weight_decay=knobs.area_weight_decay)
        generators = {stream: task_generator(self.config, data.task, stream=stream)
                      for stream in (_STREAM_BATCHES, _STREAM_PSEUDO, _STREAM_VIEWS, _STREAM_SENTENCES)}
        size = knobs.area_batch_size
        old = len(self.means)
        bar = step_bar(self.context, math.ceil(len(data) / size) * knobs.area_epochs, data.task)
        for epoch in range(knobs.area_epochs):
            for group in optimizer.param_groups:
                group["lr"] = multistep_lr(knobs.area_lr, knobs.area_milestones, knobs.area_gamma, epoch)
            order = torch.randperm(len(data), generator=generators[_STREAM_BATCHES]).to(device)
            for first in range(0, len(data), size):
                rows = order[first:first + size]
                loss = self._loss(image[rows], targets[rows], self._pick_views(occluded, rows, generators),
                                  [self._pick_views(augmented, rows, generators) for _ in range(knobs.consistency_views)],
                                  old, generators, visual_adapter, textual_adapter, visual_scorer, textual_scorer)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
        bar.close()
        self.visual_adapter = visual_adapter.detach()
        self.textual_adapter = textual_adapter.detach()
        self.visual_scorers = torch.cat([self.visual_scorers[:-1], visual_scorer.detach().unsqueeze(0)])
        self.textual_scorers = torch.cat([self.textual_scorers[:-1], textual_scorer.detach().unsqueeze(0)])

    @staticmethod
    def _pick_views(views: torch.Tensor, rows: torch.Tensor, generators: dict) -> torch.Tensor:
        """One stored view of each row, drawn per batch (the official code makes a fresh one per batch): [B, d]."""
        pick = torch.randint(views.shape[1], (len(rows),), generator=generators[_STREAM_VIEWS]).to(views.device)
        return views[rows, pick]

    def _sentence(self, name: str, column: int, generators: dict) -> torch.Tensor:
        """One sentence of set `name` of the new class at `column`, drawn as `random.choice` does: [1, d] un-normalised."""
        raw, counts = self._task_texts[name]
        local = column - self.bounds[-1][0]
        pick = draw_sentence(counts[local], generators[_STREAM_SENTENCES])
        return raw[local, pick].unsqueeze(0)

    def _prompt(self, name: str, column: int) -> torch.Tensor:
        """The one sentence of prompt set `name` ("a photo of a <class>.") of the new class at `column`, no draw (the
        official code formats it): [1, d] un-normalised."""
        raw, _ = self._task_texts[name]
        return raw[column - self.bounds[-1][0], 0].unsqueeze(0)

    def _loss(self, image: torch.Tensor, labels: torch.Tensor, occluded: torch.Tensor, augmented: list[torch.Tensor],
              old: int, generators: dict, visual_adapter, textual_adapter, visual_scorer, textual_scorer) -> torch.Tensor:
        """image [B, d] f of the batch, labels [B] seen columns, occluded [B, d] and augmented M x [B, d] f of its views
        -> models/area.py Learner.train's `loss` for this batch."""
        knobs = self.knobs
        seen = self.bounds[-1][1]
        inputs, targets = image, labels
        if old > 0:  # Gaussian pseudo-features of every old class, `samples_per_class` each
            pseudo = sample_pseudo(self.means, self.cholesky, knobs.area_samples_per_class, generators[_STREAM_PSEUDO])
            inputs = torch.cat([image, pseudo])
            targets = torch.cat([labels, torch.arange(old, device=labels.device).repeat_interleave(
                knobs.area_samples_per_class)])
        text_unit = text_embeddings(self.text[:seen], self.textual_bases[:seen], textual_scorer, textual_adapter)
        logits = expert_logits(inputs, text_unit, self.visual_bases[:seen], visual_scorer, visual_adapter,
                               self.context.logit_scale)
        loss = F.cross_entropy(logits, targets)
        # the texts of the regulariser are those of the batch's first image's class (models/area.py: real_targets[0])
        first = int(labels[0])
        occlusion = occlusion_loss(occluded @ visual_scorer.T, image @ visual_scorer.T,
                                   self._sentence("occluded", first, generators) @ textual_scorer.T,
                                   self._prompt("photo_prompt", first) @ textual_scorer.T)
        view_scores, text_scores = [], []
        for view in augmented:
            view_scores.append(view @ visual_scorer.T)
            text_scores.append(self._sentence("augmented", first, generators) @ textual_scorer.T)
        return loss + area_regulariser(knobs.vib_lambda, occlusion, consistency_loss(view_scores, text_scores))

    @torch.no_grad()
    def end_task(self, data: TaskData) -> None:
        """models/area.py Learner._update_stat (utils/inc_net.py Area.analyze_mean_cov): each new class's mean and
        covariance of f; their Cholesky factors for the pseudo-features of later tasks."""
        device = self.context.device
        task = data.take(np.arange(len(data)), with_patches=False)
        image = self._f(task.extra["global_pre"])
        targets = self.columns_of_positions().to(device)[task.targets]
        start, end = self.bounds[-1]
        means, factors = [], []
        for c in range(start, end):
            mean, cov = class_statistics(image[targets == c])
            means.append(mean)
            factors.append(torch.linalg.cholesky(cov.cpu()).to(device))
        self.means = torch.cat([self.means, torch.stack(means)])
        self.cholesky = torch.cat([self.cholesky, torch.stack(factors)])
        self._task_texts = {}

    # prediction --------------------------------------------------------------------------------------------------------
    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """models/area.py _eval_cnn: route each image to a task, score every seen class with that task's experts, mixed
        with the GDA logits by g_lambda."""
        knobs = self.knobs
        image = self._f(batch.extra["global_pre"])
        seen = self.bounds[-1][1]
        chosen = route(image, self.visual_bases[:seen], self.bounds, knobs.routing_epsilon)
        outputs = torch.zeros(len(image), seen, device=image.device)
        for task in chosen.unique().tolist():
            rows = chosen == task
            text_unit = text_embeddings(self.text[:seen], self.textual_bases[:seen], self.textual_scorers[task],
                                        self.textual_adapter)
            outputs[rows] = expert_logits(image[rows], text_unit, self.visual_bases[:seen], self.visual_scorers[task],
                                          self.visual_adapter, self.context.logit_scale)
        if knobs.g_lambda > 0:
            gda = self.gda.logits(F.normalize(batch.extra["global_pre"], dim=-1))
            outputs = (1 - knobs.g_lambda) * outputs + knobs.g_lambda * gda
        return outputs

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "visual_adapter": self.visual_adapter.cpu(),
                "textual_adapter": self.textual_adapter.cpu(), "visual_scorers": self.visual_scorers.cpu(),
                "textual_scorers": self.textual_scorers.cpu(), "text": self.text.cpu(),
                "visual_bases": self.visual_bases.cpu(), "textual_bases": self.textual_bases.cpu(),
                "means": self.means.cpu(), "cholesky": self.cholesky.cpu(), "bounds": [list(b) for b in self.bounds],
                "gda": self.gda.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        for key in ("visual_adapter", "textual_adapter", "visual_scorers", "textual_scorers", "text", "visual_bases",
                    "textual_bases", "means", "cholesky"):
            setattr(self, key, state[key].to(device))
        self.bounds = [tuple(b) for b in state["bounds"]]
        self.gda.load_state_dict(state["gda"])
        self._task_texts = {}
