"""BOFA: bridge-layer orthogonal fusion for CLIP class-incremental learning (AAAI 2026), on stored z.

No official repository; the reference is C3Box (github.com/LAMDA-CL/C3Box): models/bofa.py `Learner`, utils/inc_net.py
`BofaAdapter`, backbone/linears.py `OLF`, exps/bofa.json. Only CLIP's bridge layer visual.proj trains; everything reads z,
the CLS token after ln_post and before visual.proj. Written anew for spacil's learner interface. Per task t:
  statistics  class means of z and of normalise(z); a GDA classifier on normalise(z) (shared precision matrix, merged
              task by task); the task's uncentred covariance of z
  lambda      (while it is 0, i.e. at the first task) the image/text prototype mix chosen by accuracy on the task's rows
  stage 1     SGD on the task weight W_task [d, width] (starts at visual.proj^T, carried over from task to task):
              cross-entropy of ln(logit scale) * <normalise(z W_task^T), hybrid prototypes>
  stage 2     (t > 0) W = W0 + B A^T, A [width, Kt] the eigenvectors of the old tasks' mean covariance with the smallest
              eigenvalues (the directions their z barely use), B [d, Kt] starts at (W_task - W0) A and trains
  fusion      W_fusion = mean of the task weights (W_task after task 1, W0 + B A^T after the others)
Prediction: stat * GDA(normalise(z)) + (1 - stat) * <normalise(z W_fusion^T), hybrid prototypes>.
Every difference from C3Box: docs/method.md, "BOFA".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from spacil.errors import InputError
from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, step_bar, task_generator

_STREAM_BATCHES = 13  # the shuffle of each epoch's batches


def low_rank_directions(old_covariances: torch.Tensor, rank: int) -> torch.Tensor:
    """old_covariances [T, width, width] (one per old task) -> A [width, rank]: the eigenvectors of their mean with the
    smallest eigenvalues, ascending. Follows OLF.prepare_for_stage2 (`torch.linalg.eigh(mean(cov_matrices[:-1]))`,
    `eigenvectors[:, :rank]`)."""
    _, vectors = torch.linalg.eigh(old_covariances.mean(dim=0))
    return vectors[:, :rank]


def uncentred_covariance(sum_outer: torch.Tensor, count: int, ridge: float) -> torch.Tensor:
    """sum of z z^T over a task's `count` rows [width, width] -> z^T z / (count - 1) + ridge I. Follows
    OLF.update_old_features, which computes a centred copy of the features and then uses the uncentred ones."""
    eye = torch.eye(sum_outer.shape[0], dtype=sum_outer.dtype, device=sum_outer.device)
    return sum_outer / max(count - 1, 1) + ridge * eye


def gda_precision(scatter: torch.Tensor, count: int) -> torch.Tensor:
    """The within-class scatter of a task's normalised z [width, width] (sum of (x - mu_c)(x - mu_c)^T) over `count` rows ->
    the precision matrix width * pinv(scatter + trace(scatter / (count - 1)) I). Follows BofaAdapter.update_stat
    (`D * pinv((N - 1) * cov + cov.trace() * I)` with cov = torch.cov of the class-centred vectors)."""
    width = scatter.shape[0]
    eye = torch.eye(width, dtype=scatter.dtype, device=scatter.device)
    return width * torch.linalg.pinv(scatter + torch.trace(scatter) / max(count - 1, 1) * eye)


def merge_precision(old: torch.Tensor, new: torch.Tensor, old_means: torch.Tensor, new_means: torch.Tensor) -> torch.Tensor:
    """The precision matrices of the k old and the n new classes (with their class means [k, width], [n, width]) -> one,
    weighted by class counts plus the outer product of the difference of the mean class means. Follows the `else` branch
    of BofaAdapter.update_stat (it mixes precision matrices, not covariances, as written there)."""
    k, total = len(old_means), len(old_means) + len(new_means)
    diff = (old_means.mean(dim=0) - new_means.mean(dim=0)).unsqueeze(1)
    return (k / total) * old + ((total - k) / total) * new + (k / total) * ((total - k) / total ** 2) * (diff @ diff.T)


def gda_scores(z_normalised: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """[B, width] -> [B, C]: x P^T mu_c^T + log(1 / C) - mu_c P mu_c^T / 2 (BofaAdapter.update_stat's W and b, models/bofa.py
    `gda_pred`)."""
    W = (means @ precision).T
    b = math.log(1.0 / len(means)) - torch.einsum("nd,dc,nc->n", means, precision, means) / 2
    return z_normalised @ W + b


def hybrid_prototypes(image: torch.Tensor, text: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * normalise(image) + (1 - lam) * normalise(text), [C, d]: the prototypes models/bofa.py trains and predicts with
    (`center_type` "mix")."""
    return lam * F.normalize(image, dim=-1) + (1 - lam) * F.normalize(text, dim=-1)


def search_lambda(features: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                  steps: int) -> float:
    """features [n, d] (normalised), labels [n] (prototype rows), image/text prototypes [C, d] -> the lam of
    linspace(0, 1, steps) whose prototypes (1 - lam) image + lam text (both normalised) classify the rows best, the first
    of equals. Follows models/bofa.py `search_lambda_for_prompt` (which mixes the other way round from training and
    prediction: the learner uses its result as written there)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    best_accuracy, best = -1.0, 0.0
    for lam in torch.linspace(0, 1, steps=steps, dtype=torch.float32).tolist():
        accuracy = float((features @ ((1 - lam) * image + lam * text).T).argmax(dim=1).eq(labels).float().mean())
        if accuracy > best_accuracy:
            best_accuracy, best = accuracy, lam
    return best


def cosine_factor(epoch: int, epochs: int, base: float, minimum: float) -> float:
    """lr(epoch) / base of torch's CosineAnnealingLR(T_max=epochs, eta_min=minimum) stepped once per epoch, also past
    T_max (where it rises again, as the official schedule does in stage 2)."""
    if base <= 0:
        return 1.0
    return (minimum + (base - minimum) * (1 + math.cos(math.pi * epoch / max(epochs, 1))) / 2) / base


class BOFA(Learner):
    name = "bofa"
    train_arrays = ("global_pre",)
    eval_arrays = ("global_pre",)

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.bofa
        device = context.device
        # [d, width] visual.proj^T, frozen (the runner checks the store has it; none: a learner built only for its label)
        proj = context.visual_proj if context.visual_proj is not None else torch.zeros(int(context.width or 0), context.dim)
        self.W0 = proj.float().T.contiguous().to(device)
        d, width = self.W0.shape
        self.W_task = self.W0.clone()  # stage-1 weight, carried over from task to task (OLF.W_task)
        self.W_sum = torch.zeros_like(self.W0)  # sum of the finished tasks' weights (OLF.W_list)
        self.W_fusion = self.W0.clone()
        self.tasks_done = 0
        self.lam = 0.0  # the searched prototype mix (models/bofa.py t_lam)
        self.means = torch.zeros(0, width, dtype=torch.float64, device=device)  # [C, width] class means of z
        self.means_normalised = torch.zeros(0, width, dtype=torch.float64, device=device)  # of normalise(z)
        self.precision = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.covariances = torch.zeros(0, width, width, dtype=torch.float64, device=device)  # one per finished task
        self.train_text = torch.zeros(0, d, device=device)  # [C, d] template 0 (training)
        self.test_text = torch.zeros(0, d, device=device)  # [C, d] the template average (prediction)

    def begin_task(self, info: TaskInfo) -> None:
        super().begin_task(info)
        if info.prompts is None:
            raise InputError("bofa: the feature store has no class prompts (text/prompts.npy)")
        # training: the first template alone (`_data_to_prompt[0]`); prediction: every template, averaged
        train = info.templates[:, 0] if info.templates is not None else info.prompts
        self.train_text = torch.cat([self.train_text, train.float().to(self.context.device)])
        self.test_text = torch.cat([self.test_text, info.prompts.float().to(self.context.device)])

    # statistics --------------------------------------------------------------------------------------------------------
    def _update_statistics(self, data: TaskData) -> None:
        """Follows BofaAdapter.update_stat and OLF.update_old_features on the task's rows."""
        device = self.context.device
        width = self.W0.shape[1]
        first = len(self.means)
        new = len(self.seen_positions) - first
        column = self.columns_of_positions().to(device)
        sums = torch.zeros(new, width, dtype=torch.float64, device=device)
        sums_normalised = torch.zeros_like(sums)
        counts = torch.zeros(new, dtype=torch.float64, device=device)
        outer = torch.zeros(width, width, dtype=torch.float64, device=device)
        outer_normalised = torch.zeros_like(outer)
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
            z = batch.extra["global_pre"].double()
            zn = F.normalize(z, dim=-1)
            index = column[batch.targets] - first
            sums.index_add_(0, index, z)
            sums_normalised.index_add_(0, index, zn)
            counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64, device=device))
            outer += z.T @ z
            outer_normalised += zn.T @ zn
        rows = int(counts.sum())
        means = sums / counts.clamp(min=1).unsqueeze(1)
        means_normalised = sums_normalised / counts.clamp(min=1).unsqueeze(1)
        # within-class scatter of normalise(z): sum x x^T - sum_c n_c mu_c mu_c^T
        scatter = outer_normalised - (means_normalised * counts.unsqueeze(1)).T @ means_normalised
        precision = gda_precision(scatter, rows)
        if first == 0:
            self.precision = precision
        else:
            self.precision = merge_precision(self.precision, precision, self.means_normalised, means_normalised)
        self.means = torch.cat([self.means, means])
        self.means_normalised = torch.cat([self.means_normalised, means_normalised])
        covariance = uncentred_covariance(outer, rows, self.knobs.covariance_ridge)
        self.covariances = torch.cat([self.covariances, covariance.unsqueeze(0)])

    def _image_prototypes(self) -> torch.Tensor:
        """[C, d] the class means of z through the frozen visual.proj (BofaAdapter.get_cls_center)."""
        return self.means.float() @ self.W0.T

    def _prototypes(self, text: torch.Tensor, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        image = self._image_prototypes() if image is None else image
        if self.knobs.center_type == "img":
            return F.normalize(image, dim=-1)
        if self.knobs.center_type == "text":
            return F.normalize(text, dim=-1)
        return hybrid_prototypes(image, text, self.lam)

    # training ----------------------------------------------------------------------------------------------------------
    def fit_task(self, data: TaskData) -> None:
        """Follows models/bofa.py `incremental_train` (update_stat, init_accuracy's lambda search, `train`) with OLF's
        `prepare_for_new_task`, `prepare_for_stage2` and `end_task`."""
        device = self.context.device
        knobs = self.knobs
        if self.context.visual_proj is None:
            raise InputError("bofa: the feature store has no backbone/visual_proj.npy (the pre-projection extension)")
        self._update_statistics(data)
        column = self.columns_of_positions().to(device)
        if self.lam == 0:  # `if self.t_lam == 0`: searched until it is not 0
            features, labels = [], []
            for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
                features.append(F.normalize(batch.extra["global_pre"] @ self.W_fusion.T, dim=-1))
                labels.append(column[batch.targets])
            self.lam = search_lambda(torch.cat(features), torch.cat(labels), self._image_prototypes(), self.train_text,
                                     knobs.lambda_grid)
        prototypes = self._prototypes(self.train_text)
        scale = math.log(self.context.logit_scale)  # the official multiplies by open_clip's logit_scale parameter: its log
        W_task = torch.nn.Parameter(self.W_task.clone())
        rank = min(knobs.Kt, self.W0.shape[1])  # at most every direction of z (a width below Kt: tests, tiny models)
        B = torch.nn.Parameter(torch.zeros(self.W0.shape[0], rank, device=device))
        A = torch.zeros(self.W0.shape[1], rank, device=device)
        groups = [{"params": [W_task], "lr": knobs.stage1_lr, "weight_decay": knobs.stage1_weight_decay},
                  {"params": [B], "lr": knobs.stage2_lr, "weight_decay": knobs.stage2_weight_decay}]
        optimizer = torch.optim.SGD(groups, lr=knobs.stage1_lr, momentum=knobs.bofa_momentum)
        bases = [group["lr"] for group in groups]
        epochs = knobs.stage1_epochs + knobs.stage2_epochs
        generator = task_generator(self.config, data.task, _STREAM_BATCHES)
        steps_per_epoch = math.ceil(len(data) / knobs.bofa_batch_size)
        stage2 = False
        with step_bar(self.context, epochs * steps_per_epoch, data.task) as bar:
            for epoch in range(epochs):
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = base * cosine_factor(epoch, knobs.stage1_epochs, base, knobs.bofa_min_lr)
                if epoch == knobs.stage1_epochs and data.task > 0:  # OLF.prepare_for_stage2
                    stage2 = True
                    A = low_rank_directions(self.covariances[:-1], rank).float()
                    with torch.no_grad():
                        B.copy_((W_task - self.W0) @ A)
                for batch in data.batches(knobs.bofa_batch_size, generator, with_patches=False):
                    z = batch.extra["global_pre"]
                    weight = self.W0 + B @ A.T if stage2 else W_task
                    logits = scale * F.normalize(z @ weight.T, dim=-1) @ prototypes.T
                    loss = F.cross_entropy(logits, column[batch.targets])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
        with torch.no_grad():  # OLF.end_task
            self.W_task = W_task.detach().clone()
            finished = self.W_task if data.task == 0 or not stage2 else self.W0 + B.detach() @ A.T
            self.W_sum = self.W_sum + finished
            self.tasks_done += 1
            self.W_fusion = self.W_sum / self.tasks_done

    # prediction --------------------------------------------------------------------------------------------------------
    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """stat * GDA + (1 - stat) * cosine to the prototypes (models/bofa.py `_eval_cnn`, center_type "mix", use_up_cen
        false: image prototypes through the frozen visual.proj, text averaged over the templates)."""
        z = batch.extra["global_pre"]
        image = F.normalize(self.means.float() @ self.W_fusion.T, dim=-1) if self.knobs.center_type == "img" else None
        prototypes = self._prototypes(self.test_text, image)
        cosine = F.normalize(z @ self.W_fusion.T, dim=-1) @ prototypes.T
        gda = gda_scores(F.normalize(z.double(), dim=-1), self.means_normalised, self.precision).float()
        return self.knobs.stat * gda + (1 - self.knobs.stat) * cosine

    # checkpointing -----------------------------------------------------------------------------------------------------
    _TENSORS = ("W_task", "W_sum", "W_fusion", "means", "means_normalised", "precision", "covariances", "train_text",
                "test_text")

    def state_dict(self) -> dict:
        return {**super().state_dict(), **{key: getattr(self, key) for key in self._TENSORS},
                "lam": float(self.lam), "tasks_done": int(self.tasks_done)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in self._TENSORS:
            value = state[key]
            mine = getattr(self, key)
            if not isinstance(value, torch.Tensor) or value.dtype != mine.dtype or value.shape[1:] != mine.shape[1:]:
                raise ValueError(f"BOFA state '{key}': not a {mine.dtype} tensor of rows {list(mine.shape[1:])}")
            setattr(self, key, value.to(self.context.device))
        self.lam = float(state["lam"])
        self.tasks_done = int(state["tasks_done"])
