"""Entropic optimal transport by log-domain Sinkhorn, batched over (image, class) pairs (SPEC.md section 4).

The iterates are those of the log-domain Sinkhorn, in the order of POT's `ot.sinkhorn(..., method="sinkhorn_log")`
(column potential, then row potential), so after the same number of iterations the plans agree:

    g <- log b - LSE_i(-C_ij / eps + f_i)        f <- log a - LSE_j(-C_ij / eps + g_j)

Computing every iteration with log-sum-exp costs two exponentials per cost entry per iteration, which dominates on CPU. The
solver therefore runs the same iterates in the log-stabilised form (Schmitzer, 2019): every `absorb_every` iterations one exact
log-domain step sets the potentials and the stabilised kernel K~_ij = exp(-C_ij/eps + f_i + g_j) (the current plan); in
between, the updates are the equivalent multiplicative ones on K~ (u <- a / K~v, v <- b / K~'u), and their log is absorbed back
into f and g. Same iterates, one exponential pass per block instead of two per iteration. Problems are processed in chunks
sized for the device they run on (`chunk_problems`): cache-sized on a CPU; on a GPU the whole batch at once unless its
working memory would pass a fixed bound (one launch per operation over every problem instead of one per chunk).

Fixed iteration count, no host synchronisation inside the loop, float32 at least whatever the input dtype, and masked
marginals: a -inf log-weight removes a row or a column (a class with fewer descriptions is solved on its real ones only).
"""

from __future__ import annotations

import torch

_TINY = 1e-30  # floor of the multiplicative denominators: a column with (numerically) no mass must not divide by zero
CHUNK_PROBLEMS = 8192  # problems solved together on a CPU: [n, m, chunk] float32 blocks stay cache-friendly for small n, m
DEVICE_CHUNK_BYTES = 4 << 30  # on a GPU: the most working memory (about 8 [n, m] float32 blocks per problem) of one chunk
ABSORB_EVERY = 20


def chunk_problems(device: torch.device, n: int, m: int, problems: int) -> int:
    """How many problems of size n x m one block solves on `device` (at least one)."""
    if device.type == "cpu":
        return CHUNK_PROBLEMS
    per_problem = 8 * n * m * 4
    return max(1, min(problems, DEVICE_CHUNK_BYTES // max(1, per_problem)))


# Inside a block, problems are the last (contiguous) dimension: scaled [n, m, P], f [n, P], g [m, P]. Every reduction then
# runs over an outer dimension, vectorised across problems, instead of over a tiny inner one.


def _log_step(scaled: torch.Tensor, f: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = log_b - torch.logsumexp(scaled + f.unsqueeze(1), dim=0)
    f = log_a - torch.logsumexp(scaled + g.unsqueeze(0), dim=1)
    return f, g


def _scaling_steps(kernel: torch.Tensor, a: torch.Tensor, b: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`steps` multiplicative Sinkhorn updates on the stabilised kernel [n, m, P] -> scalings (u [n, P], v [m, P])."""
    u = torch.ones_like(a)
    if torch.is_grad_enabled() and kernel.requires_grad:  # the `unroll` variant: out-of-place, so autograd can record it
        for _ in range(steps):
            v = b / (kernel * u.unsqueeze(1)).sum(dim=0).clamp_min(_TINY)
            u = a / (kernel * v.unsqueeze(0)).sum(dim=1).clamp_min(_TINY)
        return u, v
    # no gradient needed: reuse buffers
    v = torch.empty_like(b)
    product = torch.empty_like(kernel)
    column_sums, row_sums = torch.empty_like(b), torch.empty_like(a)
    for _ in range(steps):
        torch.sum(torch.mul(kernel, u.unsqueeze(1), out=product), dim=0, out=column_sums)
        torch.div(b, column_sums.clamp_min_(_TINY), out=v)
        torch.sum(torch.mul(kernel, v.unsqueeze(0), out=product), dim=1, out=row_sums)
        torch.div(a, row_sums.clamp_min_(_TINY), out=u)
    return u, v


def _solve_block(scaled: torch.Tensor, f: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, iters: int,
                 absorb_every: int) -> torch.Tensor:
    """scaled [P, n, m], f [P, n] (initial row potential), log_a [P, n], log_b [P, m] -> plans [P, n, m]."""
    scaled = scaled.permute(1, 2, 0).contiguous()
    f, log_a, log_b = f.T.contiguous(), log_a.T.contiguous(), log_b.T.contiguous()
    g = torch.zeros_like(log_b)
    a, b = log_a.exp(), log_b.exp()
    done = 0
    while done < iters:
        f, g = _log_step(scaled, f, log_a, log_b)
        done += 1
        steps = min(absorb_every - 1, iters - done)
        if steps <= 0:
            continue
        kernel = torch.exp(scaled + f.unsqueeze(1) + g.unsqueeze(0))  # the current plan: rows sum to a
        u, v = _scaling_steps(kernel, a, b, steps)
        done += steps
        f = f + torch.log(u)
        g = g + torch.log(v)
    return torch.exp(scaled + f.unsqueeze(1) + g.unsqueeze(0)).permute(2, 0, 1)


def sinkhorn_log(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    epsilon: float = 0.1,
    iters: int = 100,
    absorb_every: int = ABSORB_EVERY,
) -> torch.Tensor:
    """Entropic OT plans for a batch of problems.

    cost [..., n, m]; log_a [..., n], log_b [..., m]: log marginal weights, each marginal summing to one over its unmasked
    entries (-inf masks an entry). Returns the plan [..., n, m] (float32 at least). Masked rows and columns get zero mass; a
    problem with a fully masked marginal gets a zero plan. Gradients flow through the iterations when the inputs require them
    (the `unroll` variant); call it under `torch.no_grad()` for the `detach` variant. `absorb_every=1` runs every iteration
    in log-sum-exp form.
    """
    work = torch.promote_types(cost.dtype, torch.float32)
    batch_shape = cost.shape[:-2]
    n, m = cost.shape[-2:]
    scaled = cost.to(work).reshape(-1, n, m) / -epsilon
    # Re-centre the log-kernel so that every row and column peaks at 0, and move the row shift into the initial row
    # potential: the iterates (and so the plan) are exactly those of the uncentred problem, but -C/eps + f + g never adds
    # large cancelling terms in float32. (A column shift is absorbed by the first column update, which comes first.)
    row_shift = scaled.amax(dim=-1, keepdim=True)
    scaled = scaled - row_shift
    scaled = scaled - scaled.amax(dim=-2, keepdim=True)
    initial_f = row_shift.squeeze(-1)
    log_a = log_a.to(work).expand(*batch_shape, n).reshape(-1, n)
    log_b = log_b.to(work).expand(*batch_shape, m).reshape(-1, m)
    chunk = chunk_problems(scaled.device, n, m, scaled.shape[0])
    plans = [
        _solve_block(scaled[s:s + chunk], initial_f[s:s + chunk], log_a[s:s + chunk], log_b[s:s + chunk], iters,
                     max(1, absorb_every))
        for s in range(0, scaled.shape[0], chunk)
    ]
    plan = (plans[0] if len(plans) == 1 else torch.cat(plans)) if plans else scaled.exp()
    # inf - inf in fully masked problems gives NaN: those carry no mass
    return torch.nan_to_num(plan, nan=0.0, posinf=0.0).reshape(*batch_shape, n, m)


def uniform_log_weights(mask: torch.Tensor) -> torch.Tensor:
    """bool mask [..., n] -> log of the uniform distribution over its True entries (-inf elsewhere)."""
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.where(mask, -torch.log(count), torch.full_like(count, float("-inf")).expand(mask.shape))
