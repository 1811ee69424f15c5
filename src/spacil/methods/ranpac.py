"""RanPAC: random projections and pre-trained models for continual learning (McDonnell et al., NeurIPS 2023), on stored z.

Official code: github.com/RanPAC/RanPAC (RanPAC.py: `setup_RP`, `replace_fc`, `optimise_ridge_parameter`; inc_net.py
`CosineLinear.forward`). Its CLIP runs (args/*_publish.csv, convnet `vit_base_patch32_224_clip_laion2b`, model `ncm`) train
nothing: the features are timm's CLIP image features without the head, i.e. z, the CLS token after ln_post and before
visual.proj. Written anew for spacil's learner interface. For z [B, width]:
  h = relu(z W_rand)            W_rand [width, M] fixed Gaussian (M = 0: h = z)
  G += h^T h, Q += h^T y        accumulated task after task (float64 here), y one-hot over the seen classes
  W = (G + lambda I)^-1 Q       lambda chosen per task on an 80/20 split of the task's own rows, among 10^-8 .. 10^8
  logits = h W                  [B, seen classes]
Where fewer rows than M take part (a small data set, the first tasks), the same W comes from the dual form
W = H^T (H H^T + lambda I)^-1 Y (H [N, M] the rows' h, Y their one-hot targets): an N x N problem instead of M x M, equal
in exact arithmetic (the push-through identity) and to float rounding here, the ridge choice included (tests/test_ranpac.py).
An implementation choice, not a difference in result (docs/method.md, "RanPAC").
The official first-task adaptation (an adapter or SSF inside the backbone, `model_name` adapter/ssf) needs the images and
cannot run on stored features; its CLIP rows do not use it either. Every difference: docs/method.md, "RanPAC".
"""

from __future__ import annotations

import time
from typing import Optional

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


def ridge_solve_dual(H: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    """H [N, M], Y [N, C] -> W [M, C] = H^T (H H^T + ridge I)^-1 Y: ridge_solve's (H^T H + ridge I)^-1 H^T Y through the
    push-through identity, an N x N solve (cheaper when N < M)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H.T @ torch.linalg.solve(H @ H.T + ridge * eye, Y)


def choose_ridge_dual(H_fit: torch.Tensor, Y_fit: torch.Tensor, H_hold: torch.Tensor, Y_hold: torch.Tensor,
                      ridges: list[float], solver: str = "solve") -> tuple[float, list[float]]:
    """choose_ridge in the dual form, for fewer fit rows than features: H_fit [f, M], Y_fit [f, C] instead of their Gram
    statistics. The held-out predictions H_hold W(ridge) = (H_hold H_fit^T) (K + ridge I)^-1 Y_fit with K = H_fit H_fit^T
    [f, f]: one solve per candidate (`solve`, as `optimise_ridge_parameter` solves per candidate) or one eigendecomposition
    of K for all (`eigh`). The same errors as choose_ridge to float rounding, hence the same choice."""
    K = H_fit @ H_fit.T
    cross = H_hold @ H_fit.T  # [n, f]
    losses = []
    if solver == "solve":
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        for ridge in ridges:
            losses.append(float(((cross @ torch.linalg.solve(K + ridge * eye, Y_fit) - Y_hold) ** 2).sum()))
    elif solver == "eigh":
        eigenvalues, U = torch.linalg.eigh(K)
        A, B = cross @ U, U.T @ Y_fit
        losses = [float((((A / (eigenvalues + ridge)) @ B - Y_hold) ** 2).sum()) for ridge in ridges]
    else:
        raise ValueError(f"solver {solver!r}: expected 'eigh' or 'solve'")
    return ridges[int(np.argmin(np.array(losses)))], losses


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
        self.features = M if M > 0 else width
        # The statistics of every task so far, in one of two forms (float64). Primal: G = sum of h^T h [M, M]. Dual, while
        # fewer rows than M have been seen: the rows themselves, H [N, M] with their columns `targets` [N] (G = H^T H is
        # never formed: N x M is smaller than M x M then). H empty and G [M, M] once primal; G [0, 0] while dual.
        self.G = torch.zeros(0, 0, dtype=torch.float64, device=device)
        self.H = torch.zeros(0, self.features, dtype=torch.float64, device=device)
        self.targets = torch.zeros(0, dtype=torch.int64, device=device)
        self.Q = torch.zeros(self.features, 0, dtype=torch.float64, device=device)  # sum of h^T y, one column per seen class
        self.W = torch.zeros(self.features, 0, device=device)  # [features, seen] float32, the head
        self.ridges: list[float] = []  # the strength chosen at each task

    @property
    def dual(self) -> bool:
        return self.G.shape[0] == 0

    def cpu_work_elements(self) -> int:
        """G [M, M] and the ridge solves are matrix products of M x M: from M = 2048 (G 32 MB) large work, as SPA's steps at
        ViT-B/16 shapes (spacil.devices.LARGE_WORK_ELEMENTS); the demo's M = 1250 stays on one thread."""
        return LARGE_WORK_ELEMENTS if self.knobs.M >= 2048 else max(self.knobs.M, int(self.context.width or 0))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, width] -> h [B, M]: `CosineLinear.forward` with use_RP (relu(z @ W_rand); z itself when M = 0)."""
        return F.relu(z @ self.W_rand) if self.W_rand is not None else z

    def cost_note(self, train_rows: list[int], task_sizes: list[int]) -> Optional[str]:
        """The estimated time and peak memory of the ridge searches and solves of the remaining tasks (ridge_cost)."""
        seconds, peak, forms = ridge_cost(self.features, len(self.H) if self.dual else None, train_rows, task_sizes,
                                          self.knobs.ridge_fit_fraction, self.knobs.ridge_solver,
                                          len(ridge_candidates(self.knobs.ridge_min_exponent, self.knobs.ridge_max_exponent)),
                                          measured_rates(self.context.device, self.knobs.ridge_solver))
        return (f"ranpac: ridge search and solves at M={self.knobs.M} ({self.features} features), "
                f"{sum(task_sizes)} classes in {len(task_sizes)} tasks, {sum(train_rows)} training rows: about "
                f"{_duration(seconds)} and {_size(peak)} at the peak on {self.context.device} ({forms}); "
                f"to change it: --set ranpac.M=N (the official CLIP runs use 10000; docs/method.md, RanPAC)")

    def fit_task(self, data: TaskData) -> None:
        """Follows `replace_fc` with `optimise_ridge_parameter`: one pass over the task's rows accumulates the whole task's
        statistics and the fit part's; the held-out part's h is kept to score the candidates. With fewer fit rows than
        features the search is solved in its dual form (choose_ridge_dual), and while fewer rows than features have been
        seen in all, so is the head (ridge_solve_dual)."""
        device = self.context.device
        self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], len(self.seen_positions) - self.Q.shape[1])], dim=1)
        n = len(data)
        order = torch.randperm(n, generator=task_generator(self.config, data.task, _STREAM_SPLIT)).numpy()
        fit_count = int(n * self.knobs.ridge_fit_fraction)
        dual_search = fit_count < self.features
        held_out = np.zeros(n, dtype=bool)
        held_out[order[fit_count:]] = True
        held_out_rows = torch.from_numpy(held_out).to(device)
        column = self.columns_of_positions().to(device)
        new_columns = slice(self.W.shape[1], len(self.seen_positions))  # this task's classes
        classes = new_columns.stop - new_columns.start
        G_fit = None if dual_search else torch.zeros(self.features, self.features, dtype=torch.float64, device=device)
        Q_fit = torch.zeros(self.features, classes, dtype=torch.float64, device=device)
        H_fit, Y_fit, H_hold, Y_hold, T_fit, T_hold = [], [], [], [], [], []
        for batch in data.batches(self.config.train.eval_batch_size, with_patches=False):
            h = self.project(batch.extra["global_pre"]).double()
            target = column[batch.targets]
            y = F.one_hot(target - new_columns.start, classes).double()
            hold = held_out_rows[torch.from_numpy(batch.rows).to(device)]
            fit = ~hold
            if dual_search:
                H_fit.append(h[fit])
                Y_fit.append(y[fit])
                T_fit.append(target[fit])
            else:
                G_fit += h[fit].T @ h[fit]
            Q_fit += h[fit].T @ y[fit]
            H_hold.append(h[hold])
            Y_hold.append(y[hold])
            T_hold.append(target[hold])
        H_hold, Y_hold = torch.cat(H_hold), torch.cat(Y_hold)
        ridges = ridge_candidates(self.knobs.ridge_min_exponent, self.knobs.ridge_max_exponent)
        if dual_search:
            H_fit, Y_fit = torch.cat(H_fit), torch.cat(Y_fit)
            ridge, _ = choose_ridge_dual(H_fit, Y_fit, H_hold, Y_hold, ridges, self.knobs.ridge_solver)
        else:
            ridge, _ = choose_ridge(G_fit, Q_fit, H_hold, Y_hold, ridges, self.knobs.ridge_solver)
        self.ridges.append(ridge)
        # the whole task joins the statistics: its fit part plus its held-out part (no second pass over the rows)
        self.Q[:, new_columns] += Q_fit + H_hold.T @ Y_hold
        if self.dual and dual_search and len(self.H) + n < self.features:  # still fewer rows than features: stay dual
            self.H = torch.cat([self.H, H_fit, H_hold])
            self.targets = torch.cat([self.targets, *T_fit, *T_hold])
            Y = F.one_hot(self.targets, self.Q.shape[1]).double()
            self.W = ridge_solve_dual(self.H, Y, ridge).float()
            return
        if self.dual:  # the rows outnumber the features from now on: the primal form, G formed once from the rows kept
            self.G = self.H.T @ self.H
            self.H, self.targets = self.H[:0], self.targets[:0]
        self.G += (H_fit.T @ H_fit if dual_search else G_fit) + H_hold.T @ H_hold
        del G_fit, H_fit, H_hold
        self.W = ridge_solve(self.G, self.Q, ridge).float()

    def logits(self, batch: FeatureBatch) -> torch.Tensor:
        return self.project(batch.extra["global_pre"]) @ self.W

    def state_dict(self) -> dict:
        # W_rand is drawn again from the seed; G (M x M float64: 800 MB at M = 10,000), or the rows H while dual, is what
        # a resume needs
        return {**super().state_dict(), "G": self.G, "H": self.H, "targets": self.targets, "Q": self.Q, "W": self.W,
                "ridges": list(self.ridges)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.context.device
        G, H, targets, Q, W = (state[key].to(device) for key in ("G", "H", "targets", "Q", "W"))
        features = self.features
        if (G.shape not in ((0, 0), (features, features)) or H.shape[1:] != (features,) or Q.shape[0] != features
                or W.shape != Q.shape or G.dtype != torch.float64 or len(targets) != len(H)):
            raise ValueError(f"RanPAC state of {Q.shape[0]} features, this config projects to {features}")
        self.G, self.H, self.targets, self.Q, self.W = G, H, targets, Q, W
        self.ridges = [float(r) for r in state["ridges"]]


# ----------------------------------------------------------------------------------------------------------------------
# What the ridge search costs, said before a run starts

_PROBE = 512  # the size of the products timed to measure the device's float64 rates


def measured_rates(device: torch.device, solver: str = "solve") -> dict[str, float]:
    """Seconds per n^3 of a float64 product and solve (and eigendecomposition, for the `eigh` solver) on `device`, each
    timed at n = _PROBE, the best of three: about 0.1 s on an idle 2-core CPU (without `eigh`). A busy machine measures
    slower rates, and its estimate is longer: it says what this machine does now."""
    generator = torch.Generator().manual_seed(0)
    A = torch.randn(_PROBE, _PROBE, generator=generator, dtype=torch.float64).to(device)
    S = A @ A.T + _PROBE * torch.eye(_PROBE, dtype=torch.float64, device=device)
    operations = {"matmul": lambda: A @ A, "solve": lambda: torch.linalg.solve(S, A)}
    if solver == "eigh":
        operations["eigh"] = lambda: torch.linalg.eigh(S)
    rates = {"eigh": float("nan")}
    for name, operation in operations.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            operation()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        rates[name] = best / _PROBE ** 3
    return rates


def ridge_cost(features: int, dual_rows: Optional[int], train_rows: list[int], task_sizes: list[int], fit_fraction: float,
               solver: str, candidates: int, rates: dict[str, float]) -> tuple[float, float, str]:
    """(seconds, peak bytes, the forms used) of RanPAC's ridge searches and head solves over tasks of `train_rows` rows
    and `task_sizes` classes, from operation counts (float64 products, solves, eigendecompositions: their cube laws) and
    `rates` (seconds per n^3 of each, measured_rates). `dual_rows`: the rows a dual-form state already holds (None when
    the state is primal). A rough figure: the cube law from a small probe misses cache effects (within a factor of a few)."""
    M = features
    seconds, peak, forms = 0.0, 0.0, set()
    held = 0 if dual_rows is None else dual_rows
    primal = dual_rows is None
    seen = 0
    for rows, classes in zip(train_rows, task_sizes):
        seen += classes
        fit = int(rows * fit_fraction)
        hold = rows - fit
        if fit < M:  # dual search
            forms.add("dual search")
            seconds += rates["matmul"] * (fit * fit * M + hold * fit * M)
            seconds += (candidates * rates["solve"] * fit ** 3 if solver == "solve" else rates["eigh"] * fit ** 3)
            seconds += rates["matmul"] * candidates * hold * fit * classes
            peak = max(peak, 8.0 * (held * M + 2 * rows * M + 3 * fit * fit))
        else:
            forms.add("primal search")
            seconds += rates["matmul"] * fit * M * M
            if solver == "solve":
                seconds += candidates * (rates["solve"] * M ** 3 + rates["matmul"] * hold * M * classes)
            else:
                seconds += rates["eigh"] * M ** 3 + rates["matmul"] * (hold * M * M + candidates * hold * M * classes)
            peak = max(peak, 8.0 * (5 * M * M + hold * M))
        if not primal and fit < M and held + rows < M:  # dual head
            forms.add("dual head")
            held += rows
            seconds += rates["matmul"] * (held * held * M + held * M * seen) + rates["solve"] * held ** 3
            peak = max(peak, 8.0 * (held * M + 3 * held * held))
        else:
            forms.add("primal head")
            primal = True
            seconds += rates["matmul"] * (rows * M * M) + rates["solve"] * M ** 3
            peak = max(peak, 8.0 * (4 * M * M))
    return seconds, peak, ", ".join(sorted(forms))


def _size(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
