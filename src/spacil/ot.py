"""Entropic optimal transport by log-domain Sinkhorn, batched over (image, class) pairs (SPEC.md section 4).

The iterates are those of the log-domain Sinkhorn, in the order of POT's `ot.sinkhorn(..., method="sinkhorn_log")`
(column potential, then row potential), so after the same number of iterations the plans agree:

    g <- log b - LSE_i(-C_ij / eps + f_i)        f <- log a - LSE_j(-C_ij / eps + g_j)

Computing every iteration with log-sum-exp costs two exponentials per cost entry per iteration, which dominates on CPU. The
solver therefore runs the same iterates in the log-stabilised form (Schmitzer, 2019): every `absorb_every` iterations one exact
log-domain step sets the potentials and the stabilised kernel K~_ij = exp(-C_ij/eps + f_i + g_j) (the current plan); in
between, the updates are the equivalent multiplicative ones on K~ (u <- a / K~v, v <- b / K~'u), and their log is absorbed back
into f and g. Same iterates, one exponential pass per block instead of two per iteration. Problems are processed in chunks
that fit in cache.

Fixed iteration count, no host synchronisation inside the loop, float32 at least whatever the input dtype, and masked
marginals: a -inf log-weight removes a row or a column (a class with fewer descriptions is solved on its real ones only).
"""

from __future__ import annotations

import torch

_TINY = 1e-30  # floor of the multiplicative denominators: a column with (numerically) no mass must not divide by zero
CHUNK_PROBLEMS = 4096  # problems solved together: [chunk, n, m] float32 blocks stay in cache for small n, m
ABSORB_EVERY = 20


def _log_step(scaled: torch.Tensor, f: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = log_b - torch.logsumexp(scaled + f.unsqueeze(-1), dim=-2)
    f = log_a - torch.logsumexp(scaled + g.unsqueeze(-2), dim=-1)
    return f, g


def _solve_block(scaled: torch.Tensor, f: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, iters: int,
                 absorb_every: int) -> torch.Tensor:
    g = torch.zeros_like(log_b)
    a, b = log_a.exp(), log_b.exp()
    done = 0
    while done < iters:
        f, g = _log_step(scaled, f, log_a, log_b)
        done += 1
        steps = min(absorb_every - 1, iters - done)
        if steps <= 0:
            continue
        kernel = torch.exp(scaled + f.unsqueeze(-1) + g.unsqueeze(-2))  # [P, n, m]; rows sum to a
        u = torch.ones_like(a)
        v = torch.ones_like(b)
        for _ in range(steps):
            v = b / torch.bmm(u.unsqueeze(-2), kernel).squeeze(-2).clamp_min(_TINY)
            u = a / torch.bmm(kernel, v.unsqueeze(-1)).squeeze(-1).clamp_min(_TINY)
        done += steps
        f = f + torch.log(u)
        g = g + torch.log(v)
    return torch.exp(scaled + f.unsqueeze(-1) + g.unsqueeze(-2))


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
    plans = [
        _solve_block(scaled[s:s + CHUNK_PROBLEMS], initial_f[s:s + CHUNK_PROBLEMS], log_a[s:s + CHUNK_PROBLEMS],
                     log_b[s:s + CHUNK_PROBLEMS], iters, max(1, absorb_every))
        for s in range(0, scaled.shape[0], CHUNK_PROBLEMS)
    ]
    plan = torch.cat(plans) if plans else scaled.exp()
    # inf - inf in fully masked problems gives NaN: those carry no mass
    return torch.nan_to_num(plan, nan=0.0, posinf=0.0).reshape(*batch_shape, n, m)


def uniform_log_weights(mask: torch.Tensor) -> torch.Tensor:
    """bool mask [..., n] -> log of the uniform distribution over its True entries (-inf elsewhere)."""
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.where(mask, -torch.log(count), torch.full_like(count, float("-inf")).expand(mask.shape))
