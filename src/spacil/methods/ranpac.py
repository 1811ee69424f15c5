"""RanPAC: random projections and pre-trained models for continual learning (McDonnell et al., NeurIPS 2023), on stored z.

Official code: github.com/RanPAC/RanPAC (RanPAC.py: `setup_RP`, `replace_fc`, `optimise_ridge_parameter`; inc_net.py
`CosineLinear.forward`). Its CLIP runs (args/*_publish.csv, convnet `vit_base_patch32_224_clip_laion2b`, model `ncm`) train
nothing: the features are timm's CLIP image features without the head, i.e. z, the CLS token after ln_post and before
visual.proj. Written anew for spacil's learner interface. For z [B, width]:
  h = relu(z W_rand)            W_rand [width, M] fixed Gaussian (M = 0: h = z)
  G += h^T h, Q += h^T y        accumulated task after task (float64 here), y one-hot over the seen classes
  W = (G + lambda I)^-1 Q       lambda chosen per task on an 80/20 split of the task's own rows, among 10^-8 .. 10^8
  logits = h W                  [B, seen classes]
The official first-task adaptation (an adapter or SSF inside the backbone, `model_name` adapter/ssf) needs the images and
cannot run on stored features; its CLIP rows do not use it either. Every difference: docs/method.md, "RanPAC".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spacil.devices import LARGE_WORK_ELEMENTS
from spacil.learner import FeatureBatch, Learner, TaskData, task_generator

# Streams of task_generator used by RanPAC (one seed drives everything).
_STREAM_PROJECTION = 11  # W_rand, drawn once (task 0)
_STREAM_SPLIT = 12  # each task's 80/20 split

_HOLD_CHUNK = 4096  # held-out rows scored at a time in the ridge search


def random_projection(width: int, M: int, generator: torch.Generator) -> torch.Tensor:
    """[width, M] float32 standard Gaussian entries. Follows RanPAC.py `setup_RP` (`torch.randn(in_features, M)`), drawn
    here from spacil's CPU generator so that every device gets the same matrix."""
    return torch.randn(width, M, generator=generator)


def ridge_candidates(min_exponent: int, max_exponent: int) -> list[float]:
    """10^min .. 10^max, one per integer exponent: `optimise_ridge_parameter`'s `10.0 ** np.arange(-8, 9)`."""
    return [float(10.0 ** e) for e in range(min_exponent, max_exponent + 1)]


def ridge_solve(G: torch.Tensor, Q: torch.Tensor, ridge: float) -> torch.Tensor:
    """G [M, M], Q [M, C] -> W [M, C] = (G + ridge I)^-1 Q, by a linear solve (not an inverse), as `replace_fc` does
    (`torch.linalg.solve(G + ridge * eye, Q)`; the official code keeps W transposed)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, Q)


def choose_ridge(G_fit: torch.Tensor, Q_fit: torch.Tensor, H_hold: torch.Tensor, Y_hold: torch.Tensor, ridges: list[float],
                 solver: str = "solve") -> tuple[float, list[float]]:
    """The ridge strength with the least squared error on held-out rows, and the error of every candidate.

    G_fit [M, M], Q_fit [M, C] from the fit rows; H_hold [n, M], Y_hold [n, C] the held-out rows (float64). Follows
    `optimise_ridge_parameter`: fit on the first 80 % of the task's shuffled rows, score the mean squared error of
    H_hold W(ridge) against the one-hot targets on the rest, first minimum wins (np.argmin). The official code solves
    once per candidate (`solver="solve"`); `solver="eigh"` decomposes G_fit = V diag(e) V^T once and gets every
    W(ridge) = V diag(1 / (e + ridge)) V^T Q_fit from it. Errors are sums over the held-out entries (the official mean over
    n x classes divides them all by the same number); columns of classes without held-out or fit rows add nothing.
    """
    losses = []
    if solver == "solve":
        for ridge in ridges:
            W = ridge_solve(G_fit, Q_fit, ridge)
            losses.append(float(((H_hold @ W - Y_hold) ** 2).sum()))
    elif solver == "eigh":
        eigenvalues, V = torch.linalg.eigh(G_fit)
        R = V.T @ Q_fit  # [M, C]
        sums = torch.zeros(len(ridges), dtype=G_fit.dtype, device=G_fit.device)
        for start in range(0, len(H_hold), _HOLD_CHUNK):
            P = H_hold[start:start + _HOLD_CHUNK] @ V  # [n, M]
            Y = Y_hold[start:start + _HOLD_CHUNK]
            for i, ridge in enumerate(ridges):
                sums[i] += (((P / (eigenvalues + ridge)) @ R - Y) ** 2).sum()
        losses = [float(v) for v in sums.cpu()]
    else:
        raise ValueError(f"solver {solver!r}: expected 'eigh' or 'solve'")
    return ridges[int(np.argmin(np.array(losses)))], losses


class RanPAC(Learner):
    name = "ranpac"
    train_arrays = ("global_pre",)
    eval_arrays = ("global_pre",)

    def __init__(self, config, context):
        super().__init__(config, context)
        self.knobs = config.ranpac
        device = context.device
        width = int(context.width or 0)
        M = self.knobs.M
        self.W_rand = random_projection(width, M, task_generator(config, 0, _STREAM_PROJECTION)).to(device) if M > 0 else None
        features = M if M > 0 else width
        self.G = torch.zeros(features, features, dtype=torch.float64, device=device)  # sum of h^T h over every task
        self.Q = torch.zeros(features, 0, dtype=torch.float64, device=device)  # sum of h^T y, one column per seen class
        self.W = torch.zeros(features, 0, device=device)  # [features, seen] float32, the head
        self.ridges: list[float] = []  # the strength chosen at each task

    def cpu_work_elements(self) -> int:
        """G [M, M] and the ridge solves are matrix products of M x M: from M = 2048 (G 32 MB) large work, as SPA's steps at
        ViT-B/16 shapes (spacil.devices.LARGE_WORK_ELEMENTS); the demo's M = 1250 stays on one thread."""
        return LARGE_WORK_ELEMENTS if self.knobs.M >= 2048 else max(self.knobs.M, int(self.context.width or 0))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, width] -> h [B, M]: `CosineLinear.forward` with use_RP (relu(z @ W_rand); z itself when M = 0)."""
        return F.relu(z @ self.W_rand) if self.W_rand is not None else z

    def fit_task(self, data: TaskData) -> None:
        """Follows `replace_fc` with `optimise_ridge_parameter`: one pass over the task's rows accumulates G and Q (the
        whole task) and the fit-part statistics; the held-out part's h is kept to score the candidates."""
        device = self.context.device
        self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], len(self.seen_positions) - self.Q.shape[1])], dim=1)
        n = len(data)
        order = torch.randperm(n, generator=task_generator(self.config, data.task, _STREAM_SPLIT)).numpy()
        fit_count = int(n * self.knobs.ridge_fit_fraction)
        held_out = np.zeros(n, dtype=bool)
        held_out[order[fit_count:]] = True
        held_out_rows = torch.from_numpy(held_out).to(device)
        column = self.columns_of_positions().to(device)
        new_columns = slice(self.W.shape[1], len(self.seen_positions))  # this task's classes
        G_fit = torch.zeros_like(self.G)
        Q_fit = torch.zeros(self.G.shape[0], new_columns.stop - new_columns.start, dtype=torch.float64, device=device)
        H_hold, Y_hold = [], []
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
            h = self.project(batch.extra["global_pre"]).double()
            y = F.one_hot(column[batch.targets] - new_columns.start, Q_fit.shape[1]).double()
            hold = held_out_rows[torch.from_numpy(batch.rows).to(device)]
            fit = ~hold
            G_fit += h[fit].T @ h[fit]
            Q_fit += h[fit].T @ y[fit]
            H_hold.append(h[hold])
            Y_hold.append(y[hold])
        H_hold, Y_hold = torch.cat(H_hold), torch.cat(Y_hold)
        ridge, _ = choose_ridge(G_fit, Q_fit, H_hold, Y_hold,
                                ridge_candidates(self.knobs.ridge_min_exponent, self.knobs.ridge_max_exponent),
                                self.knobs.ridge_solver)
        # the whole task joins G and Q: its fit part plus its held-out part (one product each, not a second pass)
        self.G += G_fit + H_hold.T @ H_hold
        self.Q[:, new_columns] += Q_fit + H_hold.T @ Y_hold
        del G_fit, H_hold
        self.ridges.append(ridge)
        self.W = ridge_solve(self.G, self.Q, ridge).float()

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return self.project(batch.extra["global_pre"]) @ self.W

    def state_dict(self) -> dict:
        # W_rand is drawn again from the seed; G (M x M float64: 800 MB at M = 10,000) is what a resume needs
        return {**super().state_dict(), "G": self.G, "Q": self.Q, "W": self.W, "ridges": list(self.ridges)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        G, Q, W = (state[key].to(device) for key in ("G", "Q", "W"))
        if G.shape != self.G.shape or Q.shape[0] != G.shape[0] or W.shape != Q.shape or G.dtype != torch.float64:
            raise ValueError(f"RanPAC state of {G.shape[0]} features, this config projects to {self.G.shape[0]}")
        self.G, self.Q, self.W = G, Q, W
        self.ridges = [float(r) for r in state["ridges"]]
