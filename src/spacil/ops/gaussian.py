"""The Gaussian bank of old classes (SPEC.md section 7): per-class mean and Cholesky factor, and sampling of pseudo-features.

Statistics are accumulated in float64 (sums and outer products), shrunk by `cov_shrink * I`, factorised once per class in
float64, and stored in float32. With `cov_type=diag` only the per-dimension standard deviation is kept.
Memory per class and branch: full d + d*d floats (d = 512: 1.05 MB), diag 2*d floats (4 KB). Statistics, factors and
sampling live on the run's device (`device`); sampling draws from a generator on that device.
"""

from __future__ import annotations

from typing import Optional

import torch


class MomentAccumulator:
    """Streaming first and second moments of the features of some classes, float64."""

    def __init__(self, num_classes: int, dim: int, full: bool, device: Optional[torch.device] = None):
        options = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(num_classes, **options)
        self.total = torch.zeros(num_classes, dim, **options)
        self.full = full
        self.outer = torch.zeros(num_classes, dim, dim, **options) if full else torch.zeros(num_classes, dim, **options)

    def add(self, column: int, features: torch.Tensor) -> None:
        """features [n, d] of the class in slot `column` (moved to the accumulator's device)."""
        x = features.detach().to(device=self.total.device, dtype=torch.float64)
        self.count[column] += x.shape[0]
        self.total[column] += x.sum(dim=0)
        self.outer[column] += x.T @ x if self.full else (x * x).sum(dim=0)

    def moments(self, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean [d], covariance [d, d] or variance [d]) with the unbiased normaliser (n - 1, at least 1)."""
        n = self.count[column].clamp(min=1)
        mean = self.total[column] / n
        denominator = (n - 1).clamp(min=1)
        if self.full:
            cov = (self.outer[column] - n * torch.outer(mean, mean)) / denominator
        else:
            cov = (self.outer[column] - n * mean * mean) / denominator
        return mean, cov


class GaussianBank:
    """Class-wise Gaussians of one feature branch (global or patch), indexed by class position."""

    def __init__(self, dim: int, cov_type: str = "full", cov_shrink: float = 1e-4, device: Optional[torch.device] = None):
        self.dim = dim
        self.cov_type = cov_type
        self.cov_shrink = cov_shrink
        self.device = torch.device(device if device is not None else "cpu")
        self.positions: list[int] = []
        self.means = torch.zeros(0, dim, device=self.device)
        self.factors = torch.zeros(0, dim, dim, device=self.device) if cov_type == "full" else torch.zeros(0, dim, device=self.device)
        self._position_tensor = torch.zeros(0, dtype=torch.long, device=self.device)  # `positions` on the device

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, position: int, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Store class `position` from its float64 mean [d] and covariance [d, d] (variance [d] for diag)."""
        mean, cov = mean.to(self.device), cov.to(self.device)
        if self.cov_type == "full":
            eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
            shrunk = cov + self.cov_shrink * eye
            factor, info = torch.linalg.cholesky_ex(shrunk)
            jitter = max(self.cov_shrink, 1e-8)
            while int(info) != 0:  # numerically indefinite: grow the ridge until it factorises
                jitter *= 10
                factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
            factor = factor.float().unsqueeze(0)
        else:
            factor = (cov.clamp(min=0) + self.cov_shrink).sqrt().float().unsqueeze(0)
        self.positions.append(int(position))
        self.means = torch.cat([self.means, mean.float().unsqueeze(0)])
        self.factors = torch.cat([self.factors, factor])
        self._position_tensor = torch.tensor(self.positions, dtype=torch.long, device=self.device)

    def covariance(self, slot: int) -> torch.Tensor:
        factor = self.factors[slot].double()
        return factor @ factor.T if self.cov_type == "full" else torch.diag(factor * factor)

    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `count` features of every stored class -> (features [C * count, d], positions [C * count]), on the bank's
        device; `generator` must live there too."""
        classes = len(self.positions)
        noise = torch.randn(classes, count, self.dim, generator=generator, device=self.means.device)
        if self.cov_type == "full":
            draws = self.means.unsqueeze(1) + noise @ self.factors.transpose(1, 2)
        else:
            draws = self.means.unsqueeze(1) + noise * self.factors.unsqueeze(1)
        if len(self._position_tensor) != classes:  # positions set from outside (checkpoint, benchmark)
            self._position_tensor = torch.tensor(self.positions, dtype=torch.long, device=self.means.device)
        positions = self._position_tensor.repeat_interleave(count)
        return draws.reshape(classes * count, self.dim), positions

    def sample_slots(self, slots: torch.Tensor, count: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw `count` features of the stored class in each slot of `slots` [P] (indices into `positions`, on the bank's
        device) -> features [P, count, d]. Only the chosen classes' factors are read: the cost follows P, not the classes."""
        noise = torch.randn(len(slots), count, self.dim, generator=generator, device=self.means.device)
        factors = self.factors[slots]
        if self.cov_type == "full":
            draws = torch.baddbmm(self.means[slots].unsqueeze(1), noise, factors.transpose(1, 2))
        else:
            draws = self.means[slots].unsqueeze(1) + noise * factors.unsqueeze(1)
        return draws

    def positions_of(self, slots: torch.Tensor) -> torch.Tensor:
        """slots [P] -> the class positions stored there [P] (on the slots' device)."""
        if len(self._position_tensor) != len(self.positions):  # positions set from outside (checkpoint, benchmark)
            self._position_tensor = torch.tensor(self.positions, dtype=torch.long, device=self.means.device)
        return self._position_tensor[slots]

    def state_dict(self) -> dict:
        return {"positions": list(self.positions), "means": self.means, "factors": self.factors}

    def load_state_dict(self, state: dict) -> None:
        self.positions = list(state["positions"])
        self.means = state["means"].to(self.device)
        self.factors = state["factors"].to(self.device)
        self._position_tensor = torch.tensor(self.positions, dtype=torch.long, device=self.device)
