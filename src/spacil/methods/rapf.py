"""RAPF: Adaptive Representation Adjustment and Parameter Fusion (Huang et al., ECCV 2024), on spacil's stored features.

Official code: github.com/linlany/RAPF (continual_clip/models.py, main.py). Written anew for spacil's learner interface; each
component below names the official function it follows. For an image feature x = g(x) and a seen class c:
  logits  z_c = tau <normalise(W x), t_c>        W [d, d] one linear adapter (no bias), t_c the class's unit text feature
Per task t:
  begin   hard pairs (old k, new j) whose text features lie closer than `threshold`; keep W_old = W
  train   Adam on W: cross-entropy over all seen classes on the task's features plus Gaussian pseudo-features of a few old
          classes per batch, plus (t > 0) a hinge on "edge samples" drawn from each hard pair's old class, pulling them
          towards their own text feature and away from the new class's
  end     class-wise mean and covariance of the frozen features of the new classes; W <- the decomposed fusion of W and
          W_old in W_old's singular basis (t > 0)
Where spacil differs from the official code (stored unit features, no fp16, class order, prompts): docs/method.md, "RAPF".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from spacil.errors import InputError
from spacil.ops.gaussian import GaussianBank, MomentAccumulator
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, step_bar, task_generator

# Streams of task_generator used by RAPF (one seed drives everything).
_STREAM_ADAPTER_INIT = 6
_STREAM_BATCHES = 1
_STREAM_DRAWS = 2
_STREAM_REPLAY_ORDER = 3


def initial_adapter(dim: int, generator: torch.Generator) -> torch.Tensor:
    """[d, d] the adapter's starting weight. Follows models.py ClassIncrementalCLIP.__init__, whose adapter is
    `nn.Linear(512, 512, bias=False)` with PyTorch's default initialisation (Kaiming-uniform with a = sqrt(5)), i.e. every
    entry uniform in [-1/sqrt(d), 1/sqrt(d)]; here drawn from spacil's generator."""
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(dim, dim, generator=generator) * 2 - 1) * bound


def rapf_covariance(cov: torch.Tensor, ridge: float, shrinkage: bool) -> torch.Tensor:
    """The covariance RAPF samples a class from: cov [d, d] (unbiased) -> [d, d].

    Follows models.py `analyze_mean_cov` (`torch.cov(...) + 1e-4 * I`, the ridge) and, when `shrinkage`, `shrink_cov`, which
    adds (does not blend) the mean of the diagonal to the diagonal and the mean of the non-zero off-diagonal entries to every
    off-diagonal entry: cov + a * I + b * (1 - I). Where no off-diagonal entry is non-zero the official code divides 0 by 0;
    here b = 0 there.
    """
    dim = cov.shape[0]
    eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
    cov = cov + ridge * eye
    if not shrinkage:
        return cov
    diagonal_mean = cov.diagonal().mean()
    off_diagonal = cov * (1 - eye)
    nonzero = off_diagonal != 0
    off_mean = off_diagonal.sum() / nonzero.sum() if bool(nonzero.any()) else cov.new_zeros(())
    return cov + diagonal_mean * eye + off_mean * (1 - eye)


def hard_class_pairs(old_text: torch.Tensor, new_text: torch.Tensor, threshold: float) -> torch.Tensor:
    """old_text [n_old, d], new_text [n_new, d] -> pairs [P, 2] of (old index, new index) whose unit text features lie at a
    Euclidean distance below `threshold`, in row-major order (old first). Follows models.py
    ClassIncrementalCLIP.adaptation (cdist of the new classes' features to each old one, `mask = class_diff < threshold`,
    `torch.nonzero`)."""
    if len(old_text) == 0 or len(new_text) == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    old = F.normalize(old_text.float(), dim=-1)
    new = F.normalize(new_text.float(), dim=-1)
    distance = torch.cdist(old, new)  # [n_old, n_new]
    return torch.nonzero(distance < threshold).long()


def replay_classes(order: torch.Tensor, batch_index: int, per_batch: int) -> torch.Tensor:
    """The old classes whose pseudo-features join batch `batch_index`: `per_batch` consecutive entries of this epoch's
    shuffled order of old classes [n_old], wrapping around, so an epoch visits every old class. Follows main.py
    run_class_incremental (`list_for_one_batch`: entries batch_id * n + i modulo the list's length). Computed where `order`
    is, without reading it on the host."""
    offsets = torch.arange(per_batch, device=order.device) + batch_index * per_batch
    return order[offsets % len(order)]


def draw_features(means: torch.Tensor, factors: torch.Tensor, classes: list[int] | torch.Tensor, count: int,
                  generator: torch.Generator) -> torch.Tensor:
    """means [C, d], factors [C, d, d] (Cholesky factors of the classes' RAPF covariances), `count` draws of each class in
    `classes` (a list, or a tensor of slots best already where the means are) -> [len(classes) * count, d], class after
    class. Follows models.py `sample` (standard normal noise times the Cholesky factor plus the mean); the noise comes from
    `generator`, which lives where the means are (on a GPU nothing is copied from the host per call)."""
    index = torch.as_tensor(classes, dtype=torch.long, device=means.device)
    noise = torch.randn(len(index), count, means.shape[1], generator=generator, device=means.device)
    draws = means[index].unsqueeze(1) + noise @ factors[index].transpose(1, 2)
    return draws.reshape(len(classes) * count, means.shape[1])


def edge_samples(means: torch.Tensor, factors: torch.Tensor, pairs: torch.Tensor, count: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edge samples of one batch: `count` draws from the old class of every hard pair.

    pairs [P, 2] (old class column, new class column) -> (features [P * count, d], own class [P * count], new class
    [P * count]). Follows main.py run_class_incremental: for each entry of `model.hard_pairs`, `sample(class_mean_list[old],
    class_cov_list[old], int(20 * beta))` with the positive target `old` and the negative target `new`. (models.py also keeps
    per-class edge distances and edge-sample lists, which nothing reads; the samples are plain draws of the old class.)
    """
    features = draw_features(means, factors, pairs[:, 0], count, generator)
    return features, _repeat_each(pairs[:, 0], count), _repeat_each(pairs[:, 1], count)


def _repeat_each(values: torch.Tensor, count: int) -> torch.Tensor:
    """[n] -> [n * count], each value `count` times in a row (repeat_interleave without a look at the values)."""
    return values.unsqueeze(1).expand(-1, count).reshape(-1)


def edge_hinge_loss(adapted: torch.Tensor, text: torch.Tensor, own: torch.Tensor, new: torch.Tensor,
                    margin: float) -> torch.Tensor:
    """adapted [E, d] adapted edge samples, text [C, d] seen classes' text features, own/new [E] columns -> the hinge of
    main.py run_class_incremental (`loss_hinge`): mean_e relu(-<f_e, t_own(e)> + <f_e, t_new(e)> + margin), f and t unit
    vectors, t held fixed."""
    f = F.normalize(adapted, dim=-1)
    t = F.normalize(text, dim=-1).detach()
    return torch.relu(-(f * t[own]).sum(-1) + (f * t[new]).sum(-1) + margin).mean()


def fuse_adapter(weight_new: torch.Tensor, weight_old: torch.Tensor, mix_bias: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed parameter fusion after a task: weights [d, d] -> (fused weight [d, d], mask [d, d]).

    Follows models.py ClassIncrementalCLIP.mix_matrix. With W_old = U S V^T, both weights are written in the old adapter's
    left singular basis: P_new = U^T W_new, P_old = U^T W_old = S V^T. Each entry's change |P_new - P_old|, divided by the
    largest change, plus `mix_bias` and clamped at 1, is the mask M; the fused weight is U (M * P_new + (1 - M) * P_old).
    Entries that changed most keep the new value; the others stay partly at the old adapter's. Computed in float64.
    """
    new = weight_new.double()
    old = weight_old.double()
    u, s, vh = torch.linalg.svd(old)
    projected_new = u.T @ new
    projected_old = torch.diag(s) @ vh
    change = (projected_new - projected_old).abs()
    largest = change.max()
    mask = change / largest if bool(largest > 0) else torch.zeros_like(change)
    mask = (mask + mix_bias).clamp(max=1)
    fused = u @ (projected_new * mask + projected_old * (1 - mask))
    return fused.to(weight_new.dtype), mask.to(weight_new.dtype)


def step_lr(base: float, epoch: int, milestones: list[int], gamma: float) -> float:
    """The learning rate of epoch `epoch` (0-based) under main.py's MultiStepLR stepped once per epoch."""
    return base * gamma ** sum(1 for milestone in milestones if milestone <= epoch)


class RAPF(Learner):
    name = "rapf"
    needs_patches = False
    # Class statistics are factorised on the CPU in float64 (the same factors on every device) and go to the device once
    # per task, with the hard pairs, in fit_task.
    kept_on_host = ("bank", "hard_pairs")

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.rapf
        dim = context.dim
        self.weight = initial_adapter(dim, task_generator(config, 0, stream=_STREAM_ADAPTER_INIT)).to(context.device)
        self.prompts = torch.zeros(0, dim, device=context.device)  # unit t_c of the seen classes, in seen order
        # Per class: mean and the Cholesky factor of its RAPF covariance (ridge and shrinkage applied before factorising).
        self.bank = GaussianBank(dim, "full", cov_shrink=0.0)
        self.old_weight = None
        self.hard_pairs = torch.zeros(0, 2, dtype=torch.long)

    # text side ---------------------------------------------------------------------------------------------------------
    def begin_task(self, info: TaskInfo) -> None:
        """Follows models.py ClassIncrementalCLIP.adaptation: the text features of all seen classes, a copy of the adapter as
        it is before this task, and the hard (old, new) pairs by text distance, as columns of the seen classes."""
        if info.prompts is None:
            raise InputError("rapf: the feature store has no class prompts (text/prompts.npy)")
        super().begin_task(info)
        old_count = len(self.prompts)
        new = F.normalize(info.prompts.float(), dim=-1).to(self.context.device)
        self.prompts = torch.cat([self.prompts, new])
        self.old_weight = self.weight.clone() if info.task > 0 else None
        pairs = hard_class_pairs(self.prompts[:old_count].cpu(), new.cpu(), self.knobs.threshold)
        pairs[:, 1] += old_count
        self.hard_pairs = pairs

    # scoring -----------------------------------------------------------------------------------------------------------
    def _logits(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """features [B, d] (frozen or pseudo) -> [B, seen classes]."""
        adapted = F.normalize(features @ weight.T, dim=-1)
        return self.context.logit_scale * adapted @ self.prompts.T

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return self._logits(batch.global_, self.weight)

    # hooks -------------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        """Follows main.py run_class_incremental's training loop (Adam, MultiStepLR per epoch, replay, edge hinge)."""
        knobs = self.knobs
        if knobs.adapter_epochs == 0:
            return
        device = self.context.device
        weight = torch.nn.Parameter(self.weight.clone())
        optimizer = torch.optim.Adam([weight], lr=knobs.adapter_lr, weight_decay=knobs.adapter_weight_decay)
        column = self.columns_of_positions().to(device)
        batch_generator = task_generator(self.config, data.task, stream=_STREAM_BATCHES)
        # Gaussian draws on the run's device (on the CPU the generator the CPU always used): no noise copied per batch.
        draw_generator = task_generator(self.config, data.task, stream=_STREAM_DRAWS, device=device)
        order_generator = task_generator(self.config, data.task, stream=_STREAM_REPLAY_ORDER)
        # The bank holds the old classes in seen order, so a bank slot is the class's logit column.
        old_classes = len(self.bank)
        means = self.bank.means.to(device)
        factors = self.bank.factors.to(device)
        replay_count = int(knobs.replay_per_class * knobs.beta)
        edge_count = int(knobs.edge_per_pair * knobs.beta)
        pairs = self.hard_pairs.to(device)
        use_edges = len(pairs) > 0 and edge_count > 0 and old_classes > 0
        # Every epoch's shuffle and order of old classes, drawn on the CPU as before and moved to the device once per task
        # (a copy from the host per batch would wait for the device each time).
        epochs = range(knobs.adapter_epochs)
        shuffles = torch.stack([torch.randperm(len(data), generator=batch_generator) for _ in epochs]).to(device)
        orders = (torch.stack([torch.randperm(old_classes, generator=order_generator) for _ in epochs]).to(device)
                  if old_classes else None)
        # The task's global features are small ([n, d]): moved to the device once, batches are index sets of them.
        task = data.take(np.arange(len(data)), with_patches=False)
        task_targets = column[task.targets]
        size = knobs.adapter_batch_size
        bar = step_bar(self.context, math.ceil(len(data) / size) * knobs.adapter_epochs, data.task)
        for epoch in epochs:
            for group in optimizer.param_groups:
                group["lr"] = step_lr(knobs.adapter_lr, epoch, knobs.milestones, knobs.lr_gamma)
            shuffle = shuffles[epoch]  # a DataLoader's shuffle=True
            for batch_index, start in enumerate(range(0, len(data), size)):
                rows = shuffle[start:start + size]
                features = task.global_[rows]
                targets = task_targets[rows]
                if orders is not None and replay_count > 0:
                    classes = replay_classes(orders[epoch], batch_index, knobs.replay_classes_per_batch)
                    features = torch.cat([features, draw_features(means, factors, classes, replay_count, draw_generator)])
                    targets = torch.cat([targets, _repeat_each(classes, replay_count)])
                loss = F.cross_entropy(self._logits(features, weight), targets)
                if use_edges:
                    edges, own, new = edge_samples(means, factors, pairs, edge_count, draw_generator)
                    loss = loss + edge_hinge_loss(edges @ weight.T, self.prompts, own, new, knobs.margin)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
        bar.close()
        self.weight = weight.detach()

    @torch.no_grad()
    def end_task(self, data: TaskData) -> None:
        """Follows main.py's statistics pass and models.py analyze_mean_cov (per new class: mean and unbiased covariance of
        the frozen features, the ridge, and shrink_cov when `shrinkage`), then models.py mix_matrix (t > 0)."""
        new_positions = self.seen_positions[len(self.bank):]
        slot = {position: i for i, position in enumerate(new_positions)}
        moments = MomentAccumulator(len(new_positions), self.context.dim, full=True)
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
            targets = batch.targets.cpu()
            for position in targets.unique().tolist():
                moments.add(slot[position], batch.global_[(targets == position).to(batch.global_.device)])
        for position, i in slot.items():
            mean, cov = moments.moments(i)
            self.bank.add(position, mean, rapf_covariance(cov, self.knobs.cov_ridge, self.knobs.shrinkage))
        if self.old_weight is not None:
            self.weight, _ = fuse_adapter(self.weight, self.old_weight, self.knobs.mix_bias)
            self.old_weight = None

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "weight": self.weight.cpu(), "prompts": self.prompts.cpu(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.weight = state["weight"].to(self.context.device)
        self.prompts = state["prompts"].to(self.context.device)
        self.bank.load_state_dict(state["bank"])
