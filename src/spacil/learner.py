"""The learner interface every method implements, and the pieces methods share.

The runner calls, for each task t: `begin_task(TaskInfo)` (the new classes' names and text features), `fit_task(TaskData)`
(the task's training features, nothing else), `end_task(TaskData)`, then `predict(FeatureBatch)` on test batches of all classes
seen so far. A learner never sees the store: what it gets is exactly what the protocol allows it to see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from spacil.config import Config, TrainConfig
from spacil.features import rows_as_tensor


@dataclass(frozen=True)
class LearnerContext:
    """What every learner may know from the start: shapes and the frozen backbone's constants, never data."""

    dim: int
    num_patches: int
    logit_scale: float
    device: torch.device
    progress: bool = False  # show a progress bar over training steps


@dataclass(frozen=True)
class TaskInfo:
    """The new classes of task `task` and their text features (positions are indices in the class order).

    prompts [n_new, d]; descriptions [n_new, M, d] with mask [n_new, M] (None when the store has none);
    templates [n_new, K, d] (per-template prompt tokens, None when the store has none).
    """

    task: int
    positions: list[int]
    names: list[str]
    prompts: Optional[torch.Tensor]
    descriptions: Optional[torch.Tensor]
    description_mask: Optional[torch.Tensor]
    templates: Optional[torch.Tensor]


@dataclass
class FeatureBatch:
    """global_ [B, d] float32, patches [B, N, d] float32 (None for global-only methods), targets [B] class positions."""

    global_: torch.Tensor
    patches: Optional[torch.Tensor]
    targets: Optional[torch.Tensor] = None
    rows: Optional[np.ndarray] = None  # row numbers inside the task, for per-image deterministic choices


class TaskData:
    """The training features of one task, memory-mapped; `batches` yields float32 tensors."""

    def __init__(self, task: int, global_: np.ndarray, patches: Optional[np.ndarray], targets: np.ndarray, device: torch.device):
        self.task = task
        self._global = global_
        self._patches = patches
        self.targets = targets
        self.device = device

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def has_patches(self) -> bool:
        return self._patches is not None

    def take(self, rows: np.ndarray, with_patches: bool = True) -> FeatureBatch:
        rows = np.sort(rows)  # sequential reads from the memory map
        global_ = rows_as_tensor(self._global, rows, self.device)
        patches = None
        if with_patches and self._patches is not None:
            patches = rows_as_tensor(self._patches, rows, self.device)
        targets = torch.from_numpy(self.targets[rows]).to(self.device)
        return FeatureBatch(global_, patches, targets, rows)

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None, with_patches: bool = True) -> Iterator[FeatureBatch]:
        """Shuffled batches when a generator is given, in order otherwise."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
        for start in range(0, n, batch_size):
            yield self.take(order[start:start + batch_size], with_patches)


class Learner:
    """Base class of a class-incremental method. Subclasses set `name` and override the hooks they need."""

    name = "base"
    needs_patches = False  # whether the runner must read patch tokens for this method

    def __init__(self, config: Config, context: LearnerContext):
        self.config = config
        self.context = context
        self.seen_positions: list[int] = []
        self.seen_names: list[str] = []

    @property
    def label(self) -> str:
        """How this run is named in tables and plots."""
        return self.name

    # hooks -------------------------------------------------------------------------------------------------------------
    def begin_task(self, info: TaskInfo) -> None:
        self.seen_positions.extend(info.positions)
        self.seen_names.extend(info.names)

    def fit_task(self, data: TaskData) -> None:
        """Train on the current task (default: nothing to train)."""

    def end_task(self, data: TaskData) -> None:
        """Whatever must be kept after the task (statistics, prototypes)."""

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        """[B, seen classes] scores, columns in the order of `seen_positions`."""
        raise NotImplementedError

    def columns_of_positions(self) -> torch.Tensor:
        """[max seen position + 1] -> the logit column of each seen class position (-1 for unseen), to turn targets into
        cross-entropy labels."""
        column = torch.full((max(self.seen_positions) + 1,), -1, dtype=torch.long)
        column[torch.tensor(self.seen_positions)] = torch.arange(len(self.seen_positions))
        return column

    @torch.no_grad()
    def predict(self, batch: FeatureBatch) -> torch.Tensor:
        """[B] predicted class positions."""
        columns = torch.as_tensor(self.seen_positions, device=batch.global_.device)
        return columns[self.logits(batch).argmax(dim=1)]

    # checkpointing -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seen_positions": list(self.seen_positions), "seen_names": list(self.seen_names)}

    def load_state_dict(self, state: dict) -> None:
        self.seen_positions = list(state["seen_positions"])
        self.seen_names = list(state["seen_names"])


def task_generator(config: Config, task: int, stream: int = 0) -> torch.Generator:
    """The one source of randomness of a task: derived from the config's seed, the task and a stream number, so a resumed
    run draws exactly what an uninterrupted one draws."""
    generator = torch.Generator()
    generator.manual_seed(config.seed * 1_000_003 + task * 101 + stream)
    return generator


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig, total_steps: int):
    """The SPEC.md defaults: SGD with momentum, weight decay, cosine schedule over the task's steps."""
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.schedule == "cosine":
        scale = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))  # noqa: E731
    else:
        scale = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def steps_per_task(num_samples: int, train: TrainConfig) -> int:
    return math.ceil(num_samples / train.batch_size) * train.epochs


def step_bar(context: LearnerContext, total: int, task: int):
    """A progress bar over the training steps of one task (silent unless the context asks for it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"task {task + 1} training", unit="step", leave=False, disable=not context.progress)
