"""Entropic optimal transport by log-domain Sinkhorn, batched over (image, class) pairs (SPEC.md section 4).

The solver runs a fixed number of iterations with no host synchronisation inside the loop (no convergence test that would
need a `.item()`), always in float32 or wider, and supports masked marginals: a -inf log-weight removes a row or column, so a
class with fewer descriptions is solved on its real descriptions only. The update order (column potential, then row potential)
matches POT's `ot.sinkhorn(..., method="sinkhorn_log")`, so after the same number of iterations the plans agree.
"""

from __future__ import annotations

import torch


def sinkhorn_log(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    epsilon: float = 0.1,
    iters: int = 100,
) -> torch.Tensor:
    """Entropic OT plans for a batch of problems.

    cost [..., n, m]; log_a [..., n] and log_b [..., m]: log marginal weights (-inf marks a masked row or column; each
    marginal sums to one over its unmasked entries). Returns the plan [..., n, m] in the dtype of the computation (float32 at
    least); rows or columns that are masked get zero mass, and a problem whose marginals are all masked gets a zero plan.
    Gradients flow through the iterations when the inputs require them (the `unroll` variant); wrap the call in
    `torch.no_grad()` for the `detach` variant.
    """
    work = torch.promote_types(cost.dtype, torch.float32)
    scaled = cost.to(work) / -epsilon  # log-kernel: -C / epsilon
    log_a = log_a.to(work)
    log_b = log_b.to(work)
    u = torch.zeros(log_a.shape, dtype=work, device=cost.device)
    v = torch.zeros(log_b.shape, dtype=work, device=cost.device)
    for _ in range(iters):
        v = log_b - torch.logsumexp(scaled + u.unsqueeze(-1), dim=-2)
        u = log_a - torch.logsumexp(scaled + v.unsqueeze(-2), dim=-1)
    plan = torch.exp(scaled + u.unsqueeze(-1) + v.unsqueeze(-2))
    # inf - inf in fully masked problems gives NaN: those carry no mass
    return torch.nan_to_num(plan, nan=0.0, posinf=0.0)


def uniform_log_weights(mask: torch.Tensor) -> torch.Tensor:
    """bool mask [..., n] -> log of the uniform distribution over its True entries (-inf elsewhere)."""
    count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.where(mask, -torch.log(count), torch.full_like(count, float("-inf")).expand(mask.shape))
