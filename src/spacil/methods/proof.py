"""PROOF (Zhou et al., "Learning without Forgetting for Vision-Language Models") on a frozen CLIP's stored features.

Per task t the learner adds a projection for each modality (one Linear(d, d); a feature's projection is the sum over tasks),
`context_prompt_length_per_task` context prompts, and the visual prototypes of the new classes (mean of their g(x)). An image
is scored against the seen classes through a one-head self-attention over [image, class texts, prototypes, context prompts]:

  training   loss = CE(f_img . f_text) + CE(f_img . f_proto) + CLIP contrastive loss(img, text of its label)
  prediction z = f_img . f_text + f_img . f_proto + img . text            (the three-way ensemble)

with img/text the projected features and f_* the fused ones. PROOF keeps exemplars: after each task, herding picks rows of
each new class's stored g(x) (normalised) and the later tasks train on them together with the new data. It is the one method
in spacil that keeps anything of old data, which its label says.

Written anew from the official code (github.com/zhoudw-zdw/PROOF: models/proof.py, utils/inc_net.py Proof_Net,
convs/projections.py, utils/toolkit.py ClipLoss, models/base.py memory); where spacil differs, docs/method.md ("PROOF")
says where and why.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spacil.errors import InputError
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, class_sums, step_bar, task_generator


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _dropout(x: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverted dropout drawn from `generator` (None: evaluation, nothing dropped), so one seed decides every mask."""
    if generator is None or p == 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1 - p)


class TaskProjections(nn.Module):
    """The sum over tasks of one Linear(d, d) per task: [..., d] -> [..., d].

    Follows Proof_Net.extend_task / encode_image / encode_text / encode_prototpyes (utils/inc_net.py) with
    Proj_Pure_MLP (convs/projections.py): each task appends a Linear with PyTorch's default initialisation
    (weight and bias uniform in +-1/sqrt(d)); the output is the sum of all tasks' outputs, computed here as one matrix
    x (sum_t W_t)^T + sum_t b_t, which is the same function with the same gradient for each W_t.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    def __len__(self) -> int:
        return len(self.weights)

    def add_task(self, generator: torch.Generator, device: torch.device) -> None:
        bound = 1 / math.sqrt(self.dim)
        self.weights.append(nn.Parameter(_uniform((self.dim, self.dim), bound, generator).to(device)))
        self.biases.append(nn.Parameter(_uniform((self.dim,), bound, generator).to(device)))

    def set_trainable(self, last_only: bool) -> None:
        for t, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            on = not last_only or t == len(self.weights) - 1
            weight.requires_grad_(on)
            bias.requires_grad_(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack(list(self.weights)).sum(dim=0)
        bias = torch.stack(list(self.biases)).sum(dim=0)
        return x @ weight.T + bias

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weights [T, d, d], biases [T, d]) on the CPU, for checkpoints."""
        if not len(self):
            return torch.zeros(0, self.dim, self.dim), torch.zeros(0, self.dim)
        return torch.stack([w.detach().cpu() for w in self.weights]), torch.stack([b.detach().cpu() for b in self.biases])

    def load_stacked(self, weights: torch.Tensor, biases: torch.Tensor, device: torch.device) -> None:
        self.weights = nn.ParameterList([nn.Parameter(w.to(device), requires_grad=False) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b.to(device), requires_grad=False) for b in biases])


class CrossModalFusion(nn.Module):
    """One-head self-attention over each image's token sequence [image, shared tokens], then dropout, residual and LayerNorm:
    image [B, d], shared [S, d] -> [B, 1 + S, d].

    Follows MultiHeadAttention and ScaledDotProductAttention (convs/projections.py) as Proof_Net builds it
    (n_head 1, d_k = d_v = d): query/key/value maps without bias drawn from N(0, 2 / (d + d)), the output map Xavier-normal
    with the default Linear bias, softmax(q k^T / sqrt(d)) over the keys, dropout on the attention weights and on the output
    (training only), LayerNorm(output + input). No token is masked: every token attends to every token.

    The shared tokens (class texts, prototypes, context prompts) are the same in every image's sequence, so their query, key
    and value maps and their block of scores are computed once; the output map is applied to the values before mixing
    ((A V) W_o^T = A (V W_o^T)). The result is the official per-sequence computation, in a different order of operations.
    """

    def __init__(self, dim: int, dropout: float, generator: torch.Generator):
        super().__init__()
        std = math.sqrt(2.0 / (dim + dim))
        self.dim = dim
        self.dropout = dropout
        self.query = nn.Parameter(torch.randn(dim, dim, generator=generator) * std)
        self.key = nn.Parameter(torch.randn(dim, dim, generator=generator) * std)
        self.value = nn.Parameter(torch.randn(dim, dim, generator=generator) * std)
        self.out_weight = nn.Parameter(torch.randn(dim, dim, generator=generator) * std)
        self.out_bias = nn.Parameter(_uniform((dim,), 1 / math.sqrt(dim), generator))
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, image: torch.Tensor, shared: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        batch, num_shared, dim = len(image), len(shared), self.dim
        q_image, k_image = image @ self.query.T, image @ self.key.T  # [B, d]
        q_shared, k_shared = shared @ self.query.T, shared @ self.key.T  # [S, d]
        v_image = (image @ self.value.T) @ self.out_weight.T  # values already through the output map, [B, d]
        v_shared = (shared @ self.value.T) @ self.out_weight.T  # [S, d]
        image_row = torch.cat([(q_image * k_image).sum(dim=1, keepdim=True), q_image @ k_shared.T], dim=1)  # [B, 1 + S]
        shared_rows = torch.cat([(k_image @ q_shared.T).unsqueeze(2),
                                 (q_shared @ k_shared.T).expand(batch, num_shared, num_shared)], dim=2)  # [B, S, 1 + S]
        scores = torch.cat([image_row.unsqueeze(1), shared_rows], dim=1) / math.sqrt(dim)  # [B, L, L], L = 1 + S
        weights = _dropout(torch.softmax(scores, dim=-1), self.dropout, generator)
        mixed = weights[..., :1] * v_image.unsqueeze(1) + (weights[..., 1:].reshape(-1, num_shared) @ v_shared).view(batch, -1, dim)
        out = _dropout(mixed + self.out_bias, self.dropout, generator)
        tokens = torch.cat([image.unsqueeze(1), shared.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        return F.layer_norm(out + tokens, (dim,), self.norm_weight, self.norm_bias)


def fuse(fusion: CrossModalFusion, image: torch.Tensor, text: torch.Tensor, prototypes: torch.Tensor, context: torch.Tensor,
         batch_mean: bool, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's sequence [image, C class texts, P prototypes, K context prompts] through the attention.

    image [B, d], text [C, d], prototypes [P, d], context [K, d] -> (fused image [B, d], fused texts, fused prototypes):
    [C, d] and [P, d] averaged over the batch when `batch_mean` (as Proof_Net.forward_transformer does, utils/inc_net.py),
    else [B, C, d] and [B, P, d], one set per image.
    """
    out = fusion(image, torch.cat([text, prototypes, context]), generator)
    classes, protos = len(text), len(prototypes)
    fused_text = out[:, 1:1 + classes]
    fused_prototypes = out[:, 1 + classes:1 + classes + protos]
    if batch_mean:
        fused_text, fused_prototypes = fused_text.mean(dim=0), fused_prototypes.mean(dim=0)
    return out[:, 0], fused_text, fused_prototypes


def match(image: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """image [B, d] against others [C, d] (shared) or [B, C, d] (per image) -> [B, C] dot products."""
    if others.dim() == 2:
        return image @ others.T
    return torch.einsum("bd,bcd->bc", image, others)


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [C, d], index [B] -> table[index] [B, d], as a one-hot matrix product: the same values (one term per row),
    but a backward pass that is a matrix product too, where the backward of indexing adds with atomics on CUDA (not the
    same bits from run to run)."""
    return F.one_hot(index, len(table)).to(table.dtype) @ table


def clip_contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The symmetric CLIP loss of matched rows, image [B, d] and text [B, d] (row i belongs with row i, even when two rows
    share a class), logits scale * image text^T. Follows ClipLoss (utils/toolkit.py) on one device."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ensemble_logits(image: torch.Tensor, text: torch.Tensor, fused_image: torch.Tensor, fused_text: torch.Tensor,
                    fused_prototypes: torch.Tensor) -> torch.Tensor:
    """PROOF's prediction: projected image . projected text + fused image . fused text + fused image . fused prototypes,
    -> [B, C]. image [B, d], text [C, d], fused as `fuse` returns them. Follows Learner._eval_cnn (models/proof.py)."""
    return image @ text.T + match(fused_image, fused_text) + match(fused_image, fused_prototypes)


def herding_selection(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """Herding on L2-normalised rows: vectors [n, d] -> indices [min(count, n)] in the order they are picked.

    Step k picks the remaining row that brings the mean of the k picked rows closest (Euclidean) to the mean of all rows;
    the first such row on ties. Follows BaseLearner._construct_exemplar (models/base.py), in float64.
    """
    v = vectors.double()
    v = v / (v.norm(dim=1, keepdim=True) + 1e-8)
    target = v.mean(dim=0)
    available = torch.ones(len(v), dtype=torch.bool, device=v.device)
    picked_sum = torch.zeros_like(target)
    picked = []
    for k in range(1, min(count, len(v)) + 1):
        distance = ((v + picked_sum) / k - target).norm(dim=1)
        distance[~available] = math.inf
        i = int(torch.argmin(distance))
        picked.append(i)
        picked_sum += v[i]
        available[i] = False
    return torch.tensor(picked, dtype=torch.long)


class Proof(Learner):
    name = "proof"
    needs_patches = False
    kept_on_host = ("memory_features", "memory_targets")  # exemplars: data, not model state; herding runs on the CPU

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.proof
        dim, device = context.dim, context.device
        self.fusion = CrossModalFusion(dim, self.knobs.attention_dropout, task_generator(config, 0, stream=13)).to(device)
        self.image_projections = TaskProjections(dim)
        self.text_projections = TaskProjections(dim)
        self.context_prompts = nn.ParameterList()
        # CLIP's learned logit scale (log), used by the contrastive loss only; it keeps training as in the official code.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(context.logit_scale), device=device))
        self.prototypes = torch.zeros(0, dim, device=device)  # [C, d] mean of the normalised g(x) of each seen class
        self.train_text = torch.zeros(0, dim, device=device)  # [C, d] the text feature of each class in training
        self.test_text: Optional[torch.Tensor] = None  # [C, K, d] the per-template text features for prediction
        self.memory_features = torch.zeros(0, dim)  # [M, d] exemplar rows of g(x), CPU
        self.memory_targets = torch.zeros(0, dtype=torch.long)  # [M] their class positions

    @property
    def label(self) -> str:
        if self.knobs.fixed_memory:
            return f"PROOF ({self.knobs.memory_per_class} exemplars/class)"
        return f"PROOF ({self.knobs.memory_size} exemplars in all)"

    # text side ---------------------------------------------------------------------------------------------------------
    def begin_task(self, info: TaskInfo) -> None:
        if self.knobs.text_features == "templates" and info.templates is not None:
            train_text, test_text = info.templates[:, 0], info.templates
        elif info.prompts is not None:
            train_text, test_text = info.prompts, info.prompts.unsqueeze(1)
        else:
            raise InputError("proof: the feature store has no class prompts (text/prompts.npy)")
        device = self.context.device
        if self.test_text is not None and self.test_text.shape[1] != test_text.shape[1]:
            raise InputError(f"proof: task {info.task + 1} has {test_text.shape[1]} templates per class, earlier tasks "
                             f"{self.test_text.shape[1]}")
        super().begin_task(info)
        self.train_text = torch.cat([self.train_text, train_text.to(device)])
        self.test_text = test_text.to(device) if self.test_text is None else torch.cat([self.test_text, test_text.to(device)])
        self.prototypes = torch.cat([self.prototypes, torch.zeros(len(info.positions), self.context.dim, device=device)])
        generator = task_generator(self.config, info.task, stream=11)
        self.image_projections.add_task(generator, device)
        self.text_projections.add_task(generator, device)
        prompts = torch.randn(self.knobs.context_prompt_length_per_task, self.context.dim, generator=generator)
        self.context_prompts.append(nn.Parameter(prompts.to(device)))

    def _context(self) -> torch.Tensor:
        return torch.cat(list(self.context_prompts))

    def _prediction_text(self) -> torch.Tensor:
        """[C, d]: each template's projected feature normalised, averaged over templates, normalised (_eval_cnn)."""
        per_template = F.normalize(self.text_projections(self.test_text), dim=-1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    # training ----------------------------------------------------------------------------------------------------------
    def _set_trainable(self) -> list[nn.Parameter]:
        """As Learner._train_proj and Proof_Net.freeze_projection_weight_new: the newest image projection, the text
        projections (all of them, officially), the attention, the newest context prompts and the logit scale train."""
        self.image_projections.set_trainable(last_only=True)
        self.text_projections.set_trainable(last_only=not self.knobs.train_old_text_projections)
        for t, prompts in enumerate(self.context_prompts):
            prompts.requires_grad_(t == len(self.context_prompts) - 1)
        for param in self.fusion.parameters():
            param.requires_grad_(True)
        self.log_logit_scale.requires_grad_(self.knobs.train_logit_scale)
        params = [*self.image_projections.parameters(), *self.text_projections.parameters(), *self.context_prompts,
                  *self.fusion.parameters(), self.log_logit_scale]
        return [p for p in params if p.requires_grad]

    def _decayed_frozen(self) -> list[nn.Parameter]:
        """The frozen parameters the official optimizer still decays (`decay_frozen`): the per-task parameters of earlier
        tasks that do not train now (old image projections and context prompts; old text projections too when they are
        frozen). The official code (models/proof.py Learner._train_proj) builds SGD or AdamW over all of the network's
        parameters and clears gradients with torch 1.11's `zero_grad()`, which zeroes a gradient instead of dropping it: a
        parameter frozen after its own task keeps a zero gradient, so weight decay (and SGD's momentum of it) shrinks it at
        every step of every later task. Those parameters get a zero gradient here, which nothing clears during the task."""
        if not self.knobs.decay_frozen:
            return []
        per_task = [*self.image_projections.parameters(), *self.text_projections.parameters(), *self.context_prompts]
        last = len(self.context_prompts) - 1
        newest = {id(p) for p in (self.image_projections.weights[last], self.image_projections.biases[last],
                                  self.text_projections.weights[last], self.text_projections.biases[last],
                                  self.context_prompts[last])}
        return [p for p in per_task if not p.requires_grad and id(p) not in newest]

    def _freeze(self) -> None:
        for module in (self.image_projections, self.text_projections, self.context_prompts, self.fusion):
            for param in module.parameters():
                param.requires_grad_(False)
        self.log_logit_scale.requires_grad_(False)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        knobs = self.knobs
        if knobs.tuned_optimizer == "sgd":
            return torch.optim.SGD(params, lr=knobs.init_lr, momentum=knobs.tuned_momentum, weight_decay=knobs.tuned_weight_decay)
        return torch.optim.AdamW(params, lr=knobs.init_lr, weight_decay=knobs.tuned_weight_decay)

    def _set_prototypes(self, global_: torch.Tensor, targets: torch.Tensor) -> None:
        """The new classes' prototypes: mean of their normalised g(x) (Learner.cal_prototype), before training."""
        features = F.normalize(global_, dim=-1)
        column = self.columns_of_positions().to(targets.device)[targets]
        sums, counts = class_sums(features, column, len(self.prototypes))  # deterministic on CUDA too
        present = counts > 0
        self.prototypes[present] = (sums[present] / counts[present].unsqueeze(1)).to(self.prototypes.dtype)

    def fit_task(self, data: TaskData) -> None:
        knobs, device = self.knobs, self.context.device
        current = data.take(np.arange(len(data)), with_patches=False)
        self._set_prototypes(current.global_, current.targets)
        if knobs.tuned_epoch == 0:
            return
        features = torch.cat([current.global_, self.memory_features.to(device)])
        labels = self.columns_of_positions().to(device)[torch.cat([current.targets, self.memory_targets.to(device)])]
        params = self._set_trainable()
        decayed = self._decayed_frozen()
        for param in decayed:
            param.grad = torch.zeros_like(param)
        optimizer = self._optimizer(params + decayed)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=knobs.tuned_epoch, eta_min=knobs.min_lr)
        order_generator = task_generator(self.config, data.task, stream=1)
        dropout_generator = torch.Generator(device=device)
        dropout_generator.manual_seed(int(torch.randint(2 ** 62, (1,), generator=task_generator(self.config, data.task, stream=12))))
        steps = math.ceil(len(features) / knobs.tuned_batch_size)
        bar = step_bar(self.context, steps * knobs.tuned_epoch, data.task)
        for _ in range(knobs.tuned_epoch):
            order = torch.randperm(len(features), generator=order_generator).to(device)
            for start in range(0, len(features), knobs.tuned_batch_size):
                rows = order[start:start + knobs.tuned_batch_size]
                loss = self._loss(features[rows], labels[rows], dropout_generator)
                for param in params:  # the trained ones only: the decayed frozen ones keep their zero gradient
                    param.grad = None
                loss.backward()
                optimizer.step()
                bar.update(1)
            schedule.step()
        bar.close()
        for param in decayed:
            param.grad = None
        self._freeze()

    def _loss(self, global_: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """global_ [B, d], labels [B] seen-class columns -> the sum of PROOF's three losses (Learner._train_proj)."""
        image = F.normalize(self.image_projections(global_), dim=-1)
        text = F.normalize(self.text_projections(self.train_text), dim=-1)
        prototypes = F.normalize(self.image_projections(self.prototypes), dim=-1)
        fused_image, fused_text, fused_prototypes = fuse(self.fusion, image, text, prototypes, self._context(),
                                                         self.knobs.fusion_batch_mean, generator)
        fused_loss = F.cross_entropy(match(fused_image, fused_text), labels)
        prototype_loss = F.cross_entropy(match(fused_image, fused_prototypes), labels)
        contrastive = clip_contrastive_loss(image, rows_of(text, labels), self.log_logit_scale.exp())
        return fused_loss + contrastive + prototype_loss

    # memory ------------------------------------------------------------------------------------------------------------
    def exemplars_per_class(self) -> int:
        """BaseLearner.samples_per_class: fixed, or the total memory shared by the classes seen so far."""
        if self.knobs.fixed_memory:
            return self.knobs.memory_per_class
        return self.knobs.memory_size // max(len(self.seen_positions), 1)

    @torch.no_grad()
    def end_task(self, data: TaskData) -> None:
        """Herding exemplars of the new classes from their stored g(x) (BaseLearner.build_rehearsal_memory); with a shared
        memory, old classes first keep only their first `per_class` exemplars (_reduce_exemplar)."""
        per_class = self.exemplars_per_class()
        if not self.knobs.fixed_memory:
            keep = torch.zeros(len(self.memory_targets), dtype=torch.bool)
            for position in self.memory_targets.unique().tolist():
                rows = (self.memory_targets == position).nonzero().squeeze(1)
                keep[rows[:per_class]] = True
            self.memory_features, self.memory_targets = self.memory_features[keep], self.memory_targets[keep]
        if per_class == 0:
            return
        current = data.take(np.arange(len(data)), with_patches=False)
        targets = current.targets.cpu()
        features, positions = [self.memory_features], [self.memory_targets]
        for position in sorted(targets.unique().tolist(), key=self.seen_positions.index):
            rows = (targets == position).nonzero().squeeze(1)
            chosen = rows[herding_selection(current.global_[rows.to(current.global_.device)].cpu(), per_class)]
            features.append(current.global_[chosen.to(current.global_.device)].cpu())
            positions.append(torch.full((len(chosen),), position, dtype=torch.long))
        self.memory_features, self.memory_targets = torch.cat(features), torch.cat(positions)

    # prediction --------------------------------------------------------------------------------------------------------
    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """[B, seen classes]. The batch is fused in chunks of `tuned_batch_size`, the official test loader's batches."""
        device = batch.global_.device
        text = self._prediction_text().to(device)
        prototypes = F.normalize(self.image_projections(self.prototypes), dim=-1)
        context = self._context()
        parts = []
        for start in range(0, len(batch.global_), self.knobs.tuned_batch_size):
            image = self.image_projections(batch.global_[start:start + self.knobs.tuned_batch_size])
            if self.knobs.normalize_eval_image:
                image = F.normalize(image, dim=-1)
            fused = fuse(self.fusion, image, text, prototypes, context, self.knobs.fusion_batch_mean)
            parts.append(ensemble_logits(image, text, *fused))
        return torch.cat(parts)

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        image_weights, image_biases = self.image_projections.stacked()
        text_weights, text_biases = self.text_projections.stacked()
        return {
            **super().state_dict(),
            "prototypes": self.prototypes.cpu(),
            "train_text": self.train_text.cpu(),
            "test_text": None if self.test_text is None else self.test_text.cpu(),
            "image_projection_weights": image_weights,
            "image_projection_biases": image_biases,
            "text_projection_weights": text_weights,
            "text_projection_biases": text_biases,
            "context_prompts": [p.detach().cpu() for p in self.context_prompts],
            "fusion": {k: v.detach().cpu() for k, v in self.fusion.state_dict().items()},
            "log_logit_scale": self.log_logit_scale.detach().cpu(),
            "memory_features": self.memory_features,
            "memory_targets": self.memory_targets,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        self.prototypes = state["prototypes"].to(device)
        self.train_text = state["train_text"].to(device)
        self.test_text = None if state["test_text"] is None else state["test_text"].to(device)
        self.image_projections.load_stacked(state["image_projection_weights"], state["image_projection_biases"], device)
        self.text_projections.load_stacked(state["text_projection_weights"], state["text_projection_biases"], device)
        self.context_prompts = nn.ParameterList([nn.Parameter(p.to(device), requires_grad=False) for p in state["context_prompts"]])
        self.fusion.load_state_dict(state["fusion"])
        with torch.no_grad():
            self.log_logit_scale.copy_(state["log_logit_scale"])
        self.memory_features, self.memory_targets = state["memory_features"].cpu(), state["memory_targets"].cpu()
        self._freeze()
