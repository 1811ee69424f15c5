"""SimpleCIL: cosine similarity of g(x) to the class-mean prototypes of the frozen features of every seen class.

Prototypes are computed from each task's own training data when the task ends; nothing trains and nothing is forgotten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spacil.learner import FeatureBatch, Learner, TaskData, class_sums


class SimpleCIL(Learner):
    name = "simplecil"

    def __init__(self, config, context):
        super().__init__(config, context)
        self.prototypes = torch.zeros(0, context.dim, device=context.device)

    def end_task(self, data: TaskData) -> None:
        device = self.context.device
        new = self.seen_positions[len(self.prototypes):]
        sums = torch.zeros(len(new), self.context.dim, dtype=torch.float64, device=device)
        counts = torch.zeros(len(new), dtype=torch.float64, device=device)
        column = torch.full((max(new) + 1,), -1, dtype=torch.long)  # class position -> its row in `sums`
        column[torch.tensor(new)] = torch.arange(len(new))
        column = column.to(device)
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
            batch_sums, batch_counts = class_sums(batch.global_, column[batch.targets], len(new))  # deterministic on CUDA
            sums += batch_sums
            counts += batch_counts
        means = (sums / counts.clamp(min=1).unsqueeze(1)).float()
        self.prototypes = torch.cat([self.prototypes, F.normalize(means, dim=-1)])

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return F.normalize(batch.global_, dim=-1) @ self.prototypes.to(batch.global_.device).T

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prototypes": self.prototypes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prototypes = state["prototypes"].to(self.context.device)
