"""ENGINE (Zhou et al., ICCV 2025, "External Knowledge Injection for CLIP-Based Class-Incremental Learning"), on the store.

Follows the official code (github.com/LAMDA-CL/ICCV25-ENGINE): models/engine.py `Learner.train` and `_eval_cnn`;
utils/inc_net.py `Engine` (`update_task`, `Image_encode`, `Text_encode`, `update_stat`, `rerank`, `visual_forward_`);
convs/linears.py `MLP_Adapter`; utils/loss.py `contrastive_loss`; utils/toolkit.py `ClipLoss`; exps/engine/*.json.

  per task  one image adapter and one text adapter, each Linear(d, d) with a bias, appended; the earlier ones frozen; an
            encoder's output is the sum of its adapters' outputs. Image adapters read the projected image feature before
            normalisation (f = z @ visual.proj), text adapters template 0's text feature before normalisation.
  train     SGD, per-epoch cosine; loss = ClipLoss(image, own class text; both through the adapters)
            + text_des * contrastive(class text through the adapters, frozen "classname with description")
            + image_aug * contrastive(image through the adapters, frozen feature of a noisy view of the same image);
            old classes join every batch as their stored mean f plus Gaussian noise (`sample_noise`), through the adapters.
  end       GDA statistics of the new classes on the normalised z (class means, one shared shrunk covariance, merged over
            tasks as update_stat merges them); each new class's prototype (mean f).
  predict   stat * normalise(GDA logits) + (1 - stat) * [rerank * rerank logits + (1 - rerank) * adapter logits]; the rerank
            re-scores the adapter's top `rerank_top` classes with the pairwise descriptions (des[a][b]: how a differs from b).

What this implementation needs from the store: z (`<split>/global_pre.npy`) with `backbone/visual_proj.npy`, un-normalised
template features (`text/templates.npy` with `text/template_norms.npy`), the pairwise descriptions (`text/pairwise*.npy`)
and, when `image_aug` > 0, stored views of the training images (`train/views_global.npy`). Every difference from the
official code: docs/method.md, "ENGINE".
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from spacil.errors import InputError
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, step_bar, task_generator

# Streams of task_generator used by ENGINE (one seed drives everything).
_STREAM_ADAPTER_INIT = 31
_STREAM_BATCHES = 32
_STREAM_REPLAY = 33
_STREAM_DESCRIPTIONS = 34


# ----------------------------------------------------------------------------------------------------------------------
# Adapters


def initial_linear(dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [d, d], bias [d]) of a new adapter: convs/linears.py MLP_Adapter is `nn.Sequential(nn.Linear(512, 512))` with
    PyTorch's default initialisation (its kaiming_normal_ init is commented out): weight and bias uniform in
    [-1/sqrt(d), 1/sqrt(d)]; here drawn from spacil's generator."""
    bound = 1.0 / math.sqrt(dim)
    weight = (torch.rand(dim, dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(dim, generator=generator) * 2 - 1) * bound
    return weight, bias


class AdapterStack:
    """The adapters of one encoder, one per task. Follows utils/inc_net.py Engine.update_task (freeze the last adapter,
    append a new MLP_Adapter) and Image_encode / Text_encode (the sum of every adapter's output).

    weights [T, d, d], biases [T, d]: the frozen adapters; `current` (weight, bias) the one the task trains (Parameters).
    """

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.frozen_weights = torch.zeros(0, dim, dim, device=device)
        self.frozen_biases = torch.zeros(0, dim, device=device)
        self.current: Optional[tuple[torch.nn.Parameter, torch.nn.Parameter]] = None

    def __len__(self) -> int:
        return len(self.frozen_weights) + (self.current is not None)

    def add(self, generator: torch.Generator) -> None:
        """Freeze the trained adapter (if any), append a new one."""
        self.freeze()
        weight, bias = initial_linear(self.dim, generator)
        self.current = (torch.nn.Parameter(weight.to(self.device)), torch.nn.Parameter(bias.to(self.device)))

    def freeze(self) -> None:
        if self.current is None:
            return
        weight, bias = (p.detach() for p in self.current)
        self.frozen_weights = torch.cat([self.frozen_weights, weight.unsqueeze(0)])
        self.frozen_biases = torch.cat([self.frozen_biases, bias.unsqueeze(0)])
        self.current = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.current is None else list(self.current)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> sum over adapters of (x W_i^T + b_i) [..., d]; gradients reach the current adapter only."""
        out = torch.zeros(*x.shape[:-1], self.dim, device=x.device, dtype=x.dtype)
        for weight, bias in zip(self.frozen_weights, self.frozen_biases):
            out = out + F.linear(x, weight, bias)
        if self.current is not None:
            out = out + F.linear(x, *self.current)
        return out

    def state_dict(self) -> dict:
        weights, biases = self.frozen_weights, self.frozen_biases
        if self.current is not None:
            weights = torch.cat([weights, self.current[0].detach().unsqueeze(0)])
            biases = torch.cat([biases, self.current[1].detach().unsqueeze(0)])
        return {"weights": weights.cpu(), "biases": biases.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints are taken between tasks: every adapter comes back frozen (the next task's `add` appends)."""
        self.frozen_weights = state["weights"].to(self.device)
        self.frozen_biases = state["biases"].to(self.device)
        self.current = None


# ----------------------------------------------------------------------------------------------------------------------
# Losses


def contrastive_loss(similarity: torch.Tensor) -> torch.Tensor:
    """similarity [n, n] -> cross-entropy with row i's target column i (utils/loss.py contrastive_loss; no temperature)."""
    return F.cross_entropy(similarity, torch.arange(len(similarity), device=similarity.device))


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """image [n, d], text [n, d] unit rows -> utils/toolkit.py ClipLoss (one process): the mean of the image-to-text and the
    text-to-image cross-entropies of scale * image @ text^T with targets on the diagonal."""
    logits = scale * image @ text.T
    return (contrastive_loss(logits) + contrastive_loss(logits.T)) / 2


# ----------------------------------------------------------------------------------------------------------------------
# GDA on z


class SharedCovarianceGDA:
    """Gaussian discriminant analysis on the normalised pre-projection features with one shared, shrunk covariance.

    Follows utils/inc_net.py Engine.update_stat. Per task, over the new classes' normalised z (n rows, width w):
    mu [C_new, w] class means; X the rows centred on their class mean; S = X^T X; Sigma = S / (n - 1);
    P_new = w * pinv(S + tr(Sigma) I). After the first task the precision is merged as the official code merges it:
    P = (k/T) P_old + ((T-k)/T) P_new + (k/T) ((T-k)/T^2) (m_old - m_new)(m_old - m_new)^T, k the classes known before,
    T the classes after, m_old and m_new the means over the old and the new class means. Then (uniform prior over the T
    classes) W = P^T mu^T [w, T], b_c = log(1/T) - mu_c P mu_c^T / 2, and the logits of a normalised z are z W + b.
    Computed in float64 (the official code: float32 on the GPU).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mu: Optional[torch.Tensor] = None  # [C, w] float64
        self.precision: Optional[torch.Tensor] = None  # [w, w] float64
        self.weight: Optional[torch.Tensor] = None  # [w, C]
        self.bias: Optional[torch.Tensor] = None  # [C]

    def update(self, z: torch.Tensor, classes: torch.Tensor, num_new: int) -> None:
        """z [n, w] normalised pre-projection features of the new classes' training rows; classes [n] in 0..num_new-1."""
        z = z.double().to(self.device)
        classes = classes.to(self.device)
        mu = torch.stack([z[classes == c].mean(dim=0) for c in range(num_new)])
        centred = z - mu[classes]
        n, width = centred.shape
        scatter = centred.T @ centred
        trace = scatter.trace() / (n - 1)
        precision = width * torch.linalg.pinv(scatter + trace * torch.eye(width, dtype=z.dtype, device=z.device))
        if self.mu is None:
            self.mu, self.precision = mu, precision
        else:
            known = len(self.mu)
            total = known + num_new
            gap = (self.mu.mean(dim=0) - mu.mean(dim=0)).unsqueeze(1)
            self.precision = ((known / total) * self.precision + (num_new / total) * precision
                              + ((known / total) * num_new / total ** 2) * (gap @ gap.T))
            self.mu = torch.cat([self.mu, mu])
        total = len(self.mu)
        self.weight = (self.mu @ self.precision).T
        prior = torch.full((total,), 1.0 / total, dtype=torch.float64, device=self.device)
        self.bias = prior.log() - torch.einsum("nd,dc,nc->n", self.mu, self.precision, self.mu) / 2

    def logits(self, z_unit: torch.Tensor) -> torch.Tensor:
        """z_unit [B, w] normalised z -> [B, C] raw GDA scores z W + b (float32)."""
        return (z_unit.double() @ self.weight + self.bias).float()

    def state_dict(self) -> dict:
        if self.mu is None:
            return {}
        return {"mu": self.mu.cpu(), "precision": self.precision.cpu(), "weight": self.weight.cpu(), "bias": self.bias.cpu()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("mu", "precision", "weight", "bias"):
            setattr(self, key, state[key].to(self.device) if key in state else None)


# ----------------------------------------------------------------------------------------------------------------------
# Pairwise descriptions


def _mix64(values: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (splitmix64's finaliser), elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_choice(counts: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """A reproducible uniform choice in 0..counts-1 for every element, a function of the integer `keys` alone (broadcast
    together with `counts`): the same image gets the same draws whatever the batch it sits in, on every device."""
    state = np.zeros(np.broadcast(counts, *keys).shape, dtype=np.uint64)
    for key in keys:
        state = _mix64(state ^ np.asarray(key).astype(np.int64).astype(np.uint64))
    return (state % np.maximum(np.asarray(counts), 1).astype(np.uint64)).astype(np.int64)


def rerank_logits(outputs: torch.Tensor, image_unit: torch.Tensor, pairwise: torch.Tensor, pairwise_counts: np.ndarray,
                  top: int, draws: int, keys: np.ndarray) -> torch.Tensor:
    """Re-score each image's top classes with their pairwise descriptions. Follows utils/inc_net.py Engine.rerank.

    outputs [B, C] scores that pick the top `top` classes; image_unit [B, d] the frozen normalised image feature;
    pairwise [C, C, M, d] un-normalised description features (des[a][b][m]: how class a differs from class b),
    pairwise_counts [C, C] how many of the M are real; keys [B] int per image (with the seed, what the draws depend on).
    For every draw (the official code: 3) and every top class a: one description of (a, b) drawn for each other top class
    b, their mean normalised; the draw's score is <image, that mean>. The scores, averaged over the draws, replace zeros at
    the top classes' columns: -> [B, C].
    """
    top = min(top, outputs.shape[1])
    chosen = outputs.topk(top, dim=1).indices  # [B, k], best first
    batch = len(outputs)
    if top < 2:
        return torch.zeros_like(outputs)
    # every ordered pair (a, b), a != b, of the top classes: [k, k-1] slots of b for each a
    slots = np.array([[j for j in range(top) if j != i] for i in range(top)])
    classes = chosen.cpu().numpy()
    main = classes[:, :, None].repeat(top - 1, axis=2)  # [B, k, k-1]
    other = classes[:, slots]  # [B, k, k-1]
    counts = pairwise_counts[main, other]
    total = torch.zeros(batch, top, device=outputs.device)
    main_t = torch.from_numpy(main).to(outputs.device)
    other_t = torch.from_numpy(other).to(outputs.device)
    for draw in range(draws):
        pick = hashed_choice(counts, keys[:, None, None], np.full_like(main, draw), main, other)
        texts = pairwise[main_t, other_t, torch.from_numpy(pick).to(outputs.device)]  # [B, k, k-1, d]
        texts = F.normalize(texts.mean(dim=2), dim=-1)
        total = total + torch.einsum("bd,bkd->bk", image_unit, texts)
    scores = torch.zeros_like(outputs)
    scores.scatter_(1, chosen, total / draws)
    return scores


def fuse_predictions(adapter: torch.Tensor, gda: torch.Tensor, rerank: torch.Tensor, stat: float,
                     rerank_weight: float) -> torch.Tensor:
    """models/engine.py _eval_cnn: stat * normalise(gda) + (1 - stat) * (rerank_weight * rerank + (1 - rerank_weight) *
    adapter), all [B, C] (the GDA scores L2-normalised over the classes)."""
    return stat * F.normalize(gda, dim=-1) + (1 - stat) * (rerank_weight * rerank + (1 - rerank_weight) * adapter)


# ----------------------------------------------------------------------------------------------------------------------
# The learner


def cosine_epoch_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """The learning rate of epoch `epoch` (0-based) under CosineAnnealingLR(T_max=epochs, eta_min=minimum) stepped once per
    epoch (models/engine.py Learner.train)."""
    return minimum + (base - minimum) * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2


def draw_descriptions(counts: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One description per entry of `classes` [n] (seen columns), uniform over every description of that class against
    any seen class (models/engine.py `_get_batch_des`: `random.choice` over the class's pooled pairwise lists).

    counts [S, S] real slots per pair -> (other class [n], slot [n])."""
    cumulative = counts.cumsum(dim=1)  # [S, S]
    totals = cumulative[:, -1]
    u = torch.rand(len(classes), generator=generator)
    pick = (u * totals[classes].cpu().double()).long().clamp(min=0)  # 0..total-1
    pick = torch.minimum(pick, (totals[classes].cpu() - 1).clamp(min=0))
    rows = cumulative[classes].cpu()
    other = torch.searchsorted(rows, pick.unsqueeze(1), right=True).squeeze(1)
    before = torch.where(other > 0, rows.gather(1, (other - 1).clamp(min=0).unsqueeze(1)).squeeze(1), torch.zeros_like(pick))
    return other, pick - before


class Engine(Learner):
    """ENGINE on stored features (see the module doc). Reads z and, when `image_aug` > 0, the stored views."""

    name = "engine"
    needs_patches = False
    train_arrays = ("global_pre",)  # and "views_global" when image_aug > 0 (set per instance, from the config)
    eval_arrays = ("global_pre",)

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.engine
        if self.knobs.image_aug > 0:
            self.train_arrays = ("global_pre", "views_global")
        device = context.device
        # [width, d]; the runner refuses a store without z before a learner exists (store.rows.row_arrays)
        self.proj = None if context.visual_proj is None else context.visual_proj.float().to(device)
        self.image_adapters = AdapterStack(context.dim, device)
        self.text_adapters = AdapterStack(context.dim, device)
        self.text0 = torch.zeros(0, context.dim, device=device)  # [S, d] template 0, un-normalised
        self.templates: Optional[torch.Tensor] = None  # [S, K, d] every template, un-normalised
        self.prototypes = torch.zeros(0, context.dim, device=device)  # [S_old, d] mean f per class
        self.gda = SharedCovarianceGDA(device)
        self.pairwise: Optional[torch.Tensor] = None  # [S, S, M, d] un-normalised, seen order
        self.pairwise_counts: Optional[torch.Tensor] = None  # [S, S]
        self._eval_text: Optional[torch.Tensor] = None

    @property
    def scale(self) -> float:
        """The temperature of ClipLoss: the official code passes `model.logit_scale`, the *log* of CLIP's scale (the
        parameter, not its exp), so the contrastive logits are ln(100) ~ 4.6 times the cosines."""
        return math.log(self.context.logit_scale)

    # text side ---------------------------------------------------------------------------------------------------------
    def begin_task(self, info: TaskInfo) -> None:
        """utils/inc_net.py Engine.update_task (freeze the last adapters, append new ones) and the texts of the seen
        classes: template 0 and every template un-normalised, the pairwise descriptions among the seen classes."""
        if info.templates is None or info.template_norms is None:
            raise InputError("engine: the feature store has no per-template text features with their norms "
                             "(text/templates.npy, text/template_norms.npy); run `spacil extract` on the store again")
        if info.pairwise is None and (self.knobs.text_des > 0 or self.knobs.rerank > 0):
            raise InputError("engine: the feature store has no pairwise descriptions (text/pairwise.npy), which "
                             "engine.text_des and engine.rerank need; add them with `spacil extract --pairwise-descriptions "
                             "FILE` (or set engine.text_des=0 engine.rerank=0)")
        super().begin_task(info)
        device = self.context.device
        raw = (info.templates.float() * info.template_norms.float().unsqueeze(-1)).to(device)  # [n_new, K, d]
        self.templates = raw if self.templates is None else torch.cat([self.templates, raw])
        self.text0 = torch.cat([self.text0, raw[:, 0]])
        if info.pairwise is not None:
            self.pairwise = info.pairwise.float().to(device)
            self.pairwise_counts = info.pairwise_counts.to(device)
            empty = [name for name, count in zip(info.names, self.pairwise_counts[-len(info.names):].sum(dim=1).tolist())
                     if count == 0]
            if empty and self.knobs.text_des > 0:  # the official code stops at a KeyError there
                raise InputError(f"engine: class '{empty[0]}' has no pairwise description against any class seen so far "
                                 f"({len(empty)} such classes in task {info.task + 1}); complete the pairwise descriptions "
                                 f"file, or set engine.text_des=0")
        generator = task_generator(self.config, info.task, stream=_STREAM_ADAPTER_INIT)
        self.image_adapters.add(generator)
        self.text_adapters.add(generator)
        self._eval_text = None

    def _class_text(self) -> torch.Tensor:
        """[S, d] the classes' text at test time (models/engine.py _eval_cnn): each template through the text adapters,
        normalised, averaged over the templates, normalised."""
        if self._eval_text is None:
            with torch.no_grad():
                per_template = F.normalize(self.text_adapters(self.templates), dim=-1)
                self._eval_text = F.normalize(per_template.mean(dim=1), dim=-1)
        return self._eval_text

    # training ----------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        """models/engine.py Learner.train (see the module doc for the loss)."""
        knobs = self.knobs
        if knobs.engine_epochs == 0:
            return
        device = self.context.device
        params = self.image_adapters.parameters() + self.text_adapters.parameters()
        if knobs.engine_optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=knobs.engine_lr, momentum=knobs.engine_momentum,
                                        weight_decay=knobs.engine_weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=knobs.engine_lr, weight_decay=knobs.engine_weight_decay)
        column = self.columns_of_positions().to(device)
        task = data.take(np.arange(len(data)), with_patches=False)
        image = task.extra["global_pre"] @ self.proj  # f [n, d], before normalisation
        targets = column[task.targets]
        views = task.extra.get("views_global")  # [n, V, d]
        if knobs.image_aug > 0 and views is None:
            raise InputError("engine: engine.image_aug > 0 needs stored views of the training images "
                             "(train/views_global.npy): add them with `spacil extract --views 10 --view-transform "
                             "gaussian-noise` on the store, or set engine.image_aug=0")
        old = len(self.prototypes)
        batch_generator = task_generator(self.config, data.task, stream=_STREAM_BATCHES)
        replay_generator = task_generator(self.config, data.task, stream=_STREAM_REPLAY)
        description_generator = task_generator(self.config, data.task, stream=_STREAM_DESCRIPTIONS)
        size = knobs.engine_batch_size
        bar = step_bar(self.context, math.ceil(len(data) / size) * knobs.engine_epochs, data.task)
        for epoch in range(knobs.engine_epochs):
            for group in optimizer.param_groups:
                group["lr"] = cosine_epoch_lr(knobs.engine_lr, knobs.engine_min_lr, epoch, knobs.engine_epochs)
            view = None
            if views is not None and knobs.view_schedule == "per-epoch":
                view = epoch % views.shape[1]
            shuffle = torch.randperm(len(data), generator=batch_generator).to(device)
            for start in range(0, len(data), size):
                rows = shuffle[start:start + size]
                loss = self._loss(image[rows], targets[rows], old, replay_generator, description_generator,
                                  None if views is None else self._views_of(views, rows, view, batch_generator))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
        bar.close()
        self._eval_text = None

    def _views_of(self, views: torch.Tensor, rows: torch.Tensor, view: Optional[int],
                  generator: torch.Generator) -> torch.Tensor:
        """The frozen normalised feature of one stored view per row: view `view` (per-epoch schedule) or one drawn per
        row (per-batch)."""
        if view is None:
            pick = torch.randint(views.shape[1], (len(rows),), generator=generator).to(views.device)
        else:
            pick = torch.full((len(rows),), view, dtype=torch.long, device=views.device)
        return F.normalize(views[rows, pick], dim=-1)

    def _loss(self, image: torch.Tensor, labels: torch.Tensor, old: int, replay_generator: torch.Generator,
              description_generator: torch.Generator, views: Optional[torch.Tensor]) -> torch.Tensor:
        """image [B, d] f of the batch, labels [B] seen columns, views [B, d] (or None) -> the batch's loss."""
        knobs = self.knobs
        batch = len(image)
        if old > 0:
            if knobs.sample_num > 0:
                replayed = torch.randint(old, (knobs.sample_num,), generator=replay_generator)
            else:
                replayed = torch.arange(old)
            noise = torch.randn(len(replayed), image.shape[1], generator=replay_generator).to(image.device)
            pseudo = self.prototypes[replayed.to(image.device)] + noise * knobs.sample_noise
            image = torch.cat([image, pseudo])
            labels = torch.cat([labels, replayed.to(labels.device)])
        image_unit = F.normalize(self.image_adapters(image), dim=-1)
        text_unit = F.normalize(self.text_adapters(self.text0[labels]), dim=-1)
        loss = clip_loss(image_unit, text_unit, self.scale)
        if knobs.image_aug > 0:
            loss = loss + knobs.image_aug * contrastive_loss(image_unit[:batch] @ views.T)
        if knobs.text_des > 0:
            other, slot = draw_descriptions(self.pairwise_counts, labels.cpu(), description_generator)
            device = labels.device
            reference = F.normalize(self.pairwise[labels, other.to(device), slot.to(device)], dim=-1)
            loss = loss + knobs.text_des * contrastive_loss(text_unit @ reference.T)
        return loss

    @torch.no_grad()
    def end_task(self, data: TaskData) -> None:
        """utils/inc_net.py Engine.update_stat (GDA statistics of the new classes on the normalised z) and the prototypes
        of models/engine.py Learner.train's end (mean f of each new class)."""
        new_positions = self.seen_positions[len(self.prototypes):]
        slot = torch.full((max(new_positions) + 1,), -1, dtype=torch.long)
        slot[torch.tensor(new_positions)] = torch.arange(len(new_positions))
        task = data.take(np.arange(len(data)), with_patches=False)
        z = task.extra["global_pre"]
        classes = slot.to(z.device)[task.targets]
        self.gda.update(F.normalize(z, dim=-1), classes, len(new_positions))
        image = (z @ self.proj).double()
        sums = torch.zeros(len(new_positions), image.shape[1], dtype=torch.float64, device=image.device)
        sums.index_add_(0, classes, image)
        counts = torch.bincount(classes, minlength=len(new_positions)).clamp(min=1).double()
        self.prototypes = torch.cat([self.prototypes, (sums / counts.unsqueeze(1)).float()])

    # prediction --------------------------------------------------------------------------------------------------------
    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """models/engine.py _eval_cnn."""
        knobs = self.knobs
        z = batch.extra["global_pre"]
        image = z @ self.proj
        adapter = F.normalize(self.image_adapters(image), dim=-1) @ self._class_text().T
        gda = self.gda.logits(F.normalize(z, dim=-1))
        rerank = torch.zeros_like(adapter)
        if knobs.rerank > 0 and self.pairwise is not None:
            rows = batch.rows if batch.rows is not None else np.arange(len(z))
            keys = np.asarray(rows, dtype=np.int64) + np.int64(self.config.seed) * np.int64(1 << 32)
            rerank = rerank_logits(adapter, F.normalize(image, dim=-1), self.pairwise,
                                   self.pairwise_counts.cpu().numpy(), knobs.rerank_top, knobs.rerank_draws, keys)
        return fuse_predictions(adapter, gda, rerank, knobs.stat_weight, knobs.rerank)

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the pairwise descriptions: a checkpoint is taken between tasks, and the next begin_task hands
        over those of every seen class again (they are large: [S, S, M, d])."""
        return {**super().state_dict(), "image_adapters": self.image_adapters.state_dict(),
                "text_adapters": self.text_adapters.state_dict(), "text0": self.text0.cpu(),
                "templates": None if self.templates is None else self.templates.cpu(),
                "prototypes": self.prototypes.cpu(), "gda": self.gda.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.image_adapters.load_state_dict(state["image_adapters"])
        self.text_adapters.load_state_dict(state["text_adapters"])
        self.text0 = state["text0"].to(device)
        self.templates = None if state["templates"] is None else state["templates"].to(device)
        self.prototypes = state["prototypes"].to(device)
        self.gda.load_state_dict(state["gda"])
        self._eval_text = None
