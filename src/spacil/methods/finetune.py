"""Fine-tune: a linear head on g(x), trained task after task on the current task's data only, with no replay.

The forgetting lower bound: each task's training pushes the head towards its own classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spacil.learner import FeatureBatch, Learner, TaskData, TaskInfo, make_optimizer, step_bar, steps_per_task, task_generator


class FineTune(Learner):
    name = "finetune"

    def __init__(self, config, context):
        super().__init__(config, context)
        self.weight = torch.zeros(0, context.dim, device=context.device)
        self.bias = torch.zeros(0, device=context.device)

    def begin_task(self, info: TaskInfo) -> None:
        super().begin_task(info)
        generator = task_generator(self.config, info.task, stream=7)
        # drawn on the CPU, then moved: the same initial head on every device
        new_weight = torch.randn(len(info.positions), self.context.dim, generator=generator) * self.context.dim ** -0.5
        self.weight = torch.cat([self.weight, new_weight.to(self.weight.device)])
        self.bias = torch.cat([self.bias, torch.zeros(len(info.positions), device=self.bias.device)])

    def fit_task(self, data: TaskData) -> None:
        train = self.config.train
        weight = torch.nn.Parameter(self.weight.clone())
        bias = torch.nn.Parameter(self.bias.clone())
        optimizer, schedule = make_optimizer([weight, bias], train, steps_per_task(len(data), train))
        column = self.columns_of_positions().to(self.context.device)
        generator = task_generator(self.config, data.task, stream=1)
        bar = step_bar(self.context, steps_per_task(len(data), train), data.task)
        for _ in range(train.epochs):
            for batch in data.batches(train.batch_size, generator, with_patches=False):
                logits = self.context.logit_scale * (batch.global_ @ weight.T) + bias
                loss = F.cross_entropy(logits, column[batch.targets.to(column.device)])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
        bar.close()
        self.weight, self.bias = weight.detach(), bias.detach()

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return batch.global_ @ self.weight.T.to(batch.global_.device) * self.context.logit_scale + self.bias

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.weight, self.bias = state["weight"].to(self.context.device), state["bias"].to(self.context.device)
