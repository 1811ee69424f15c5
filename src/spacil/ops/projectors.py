"""Task-specific projectors (SPEC.md section 5).

phi(v) = normalise(v + sum_{s<=t} A_s v) on the image side and psi(u) = normalise(u + sum_{s<=t} B_s u) on the text side.
Each projector starts at zero, so training starts from the frozen CLIP space; when a new task starts, the earlier ones freeze.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _zero_projector(dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        layer = nn.Linear(dim, dim)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer
    hidden, out = nn.Linear(dim, dim), nn.Linear(dim, dim)
    nn.init.zeros_(out.weight)  # the output layer at zero makes the residual start at zero
    nn.init.zeros_(out.bias)
    return nn.Sequential(hidden, nn.GELU(), out)


class ProjectorStack(nn.Module):
    """The residual sum of one projector per task. `kind` is `linear` or `mlp`."""

    def __init__(self, dim: int, kind: str = "linear"):
        super().__init__()
        self.dim = dim
        self.kind = kind
        self.layers = nn.ModuleList()

    def add_task(self, generator: torch.Generator) -> None:
        """Freeze the projectors so far and add a new one (zero at its output)."""
        for param in self.parameters():
            param.requires_grad_(False)
        layer = _zero_projector(self.dim, self.kind)
        if self.kind == "mlp":
            hidden = layer[0]
            bound = self.dim ** -0.5
            with torch.no_grad():
                hidden.weight.uniform_(-bound, bound, generator=generator)
                hidden.bias.uniform_(-bound, bound, generator=generator)
        self.layers.append(layer)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """sum_s A_s x, [..., d] -> [..., d]. Linear projectors are summed into one matrix first: one product per call."""
        if not self.layers:
            return torch.zeros_like(x)
        if self.kind == "linear":
            weight = torch.stack([layer.weight for layer in self.layers]).sum(dim=0)
            bias = torch.stack([layer.bias for layer in self.layers]).sum(dim=0)
            return F.linear(x, weight, bias)
        return torch.stack([layer(x) for layer in self.layers]).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.residual(x), dim=-1)
