"""Zero-shot CLIP: the image embedding g(x) against the template-averaged class prompts t_c. Nothing trains."""

from __future__ import annotations

import torch

from spacil.errors import InputError
from spacil.learner import FeatureBatch, Learner, TaskInfo


class ZeroShot(Learner):
    name = "zeroshot"

    def __init__(self, config, context):
        super().__init__(config, context)
        self.prompts = torch.zeros(0, context.dim, device=context.device)

    def begin_task(self, info: TaskInfo) -> None:
        if info.prompts is None:
            raise InputError("zeroshot needs class prompt embeddings: the store has no text/prompts.npy")
        super().begin_task(info)
        self.prompts = torch.cat([self.prompts, info.prompts.to(self.context.device)])

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return self.context.with_bias(self.context.logit_scale * batch.global_ @ self.prompts.to(batch.global_.device).T)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prompts": self.prompts}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prompts = state["prompts"].to(self.context.device)
