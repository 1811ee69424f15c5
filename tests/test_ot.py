import numpy as np
import ot
import pytest
import torch

from spacil.ops.ot import sinkhorn_log, uniform_log_weights


def _pot_plan(cost, cols, eps, iters):
    n = cost.shape[0]
    a = np.full(n, 1.0 / n)
    b = np.full(len(cols), 1.0 / len(cols))
    plan = ot.sinkhorn(a, b, cost[:, cols].astype(np.float64), eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0,
                       warn=False)
    full = np.zeros_like(cost, dtype=np.float64)
    full[:, cols] = plan
    return full


def _check(cost: torch.Tensor, mask: torch.Tensor, eps=0.1, iters=100):
    n = cost.shape[-2]
    log_a = torch.full(cost.shape[:-1], -np.log(n))
    plan = sinkhorn_log(cost, log_a, uniform_log_weights(mask), eps, iters)
    assert torch.isfinite(plan).all()
    assert plan.dtype == torch.float32
    worst = 0.0
    for p in range(cost.shape[0]):
        cols = mask[p].nonzero().squeeze(1).numpy()
        reference = _pot_plan(cost[p].double().numpy(), cols, eps, iters)
        worst = max(worst, float(np.abs(plan[p].double().numpy() - reference).max()))
        assert (plan[p][:, ~mask[p]] == 0).all()
    return worst


generator = torch.Generator().manual_seed(0)
MASK = torch.rand(24, 8, generator=generator) > 0.35
MASK[:, 0] = True


@pytest.mark.parametrize("name, cost, eps", [
    ("cosine costs", 1 - (torch.rand(24, 16, 8, generator=generator) * 2 - 1), 0.1),
    ("wide range, exp underflows", torch.rand(24, 16, 8, generator=generator) * 50, 0.1),
    ("all costs equal", torch.ones(24, 16, 8), 0.1),
    ("one row far away", torch.rand(24, 16, 8, generator=generator).index_fill_(1, torch.tensor([3]), 1e3), 0.1),
    ("small epsilon", torch.rand(24, 16, 8, generator=generator) * 2, 0.01),
    ("duplicate rows", torch.rand(24, 1, 8, generator=generator).expand(24, 16, 8).contiguous(), 0.1),
])
def test_plans_agree_with_pot(name, cost, eps):
    assert _check(cost, MASK, eps) < 1e-5, name


def test_agrees_with_pot_for_other_iteration_counts_and_without_absorption():
    cost = 1 - torch.rand(6, 5, 7, generator=generator)
    mask = torch.ones(6, 7, dtype=torch.bool)
    for iters in (1, 7, 23, 100):
        assert _check(cost, mask, 0.1, iters) < 1e-5
    log_a = torch.full((6, 5), -np.log(5))
    fast = sinkhorn_log(cost, log_a, uniform_log_weights(mask), 0.1, 60)
    plain = sinkhorn_log(cost, log_a, uniform_log_weights(mask), 0.1, 60, absorb_every=1)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


def test_batched_shapes_fp16_and_fully_masked():
    cost = (1 - torch.rand(3, 5, 6, 4, generator=generator)).half()
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[2] = False  # a class with no tokens at all
    log_a = torch.full((3, 5, 6), -np.log(6))
    plan = sinkhorn_log(cost, log_a, uniform_log_weights(mask).expand(3, 5, 4), 0.1, 50)
    assert plan.shape == (3, 5, 6, 4) and plan.dtype == torch.float32
    assert torch.isfinite(plan).all() and plan[:, 2].abs().max() == 0
    torch.testing.assert_close(plan[:, [0, 1, 3, 4]].sum(dim=(-1, -2)), torch.ones(3, 4), atol=1e-5, rtol=0)


def test_unrolled_gradients_flow_and_match_finite_differences():
    cost = (1 - torch.rand(2, 4, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    log_a = torch.full((2, 4), -np.log(4), dtype=torch.float64)
    log_b = torch.full((2, 3), -np.log(3), dtype=torch.float64)
    value = lambda c: (sinkhorn_log(c, log_a, log_b, 0.5, 30) * c).sum()  # noqa: E731
    assert torch.autograd.gradcheck(value, (cost,), eps=1e-6, atol=1e-5)


def test_problems_split_into_chunks_give_the_plans_of_one_block(monkeypatch):
    """Chunk boundaries (a last chunk shorter than the others included) change nothing: every problem is solved once, alone."""
    import spacil.ops.ot as ot_module

    rng = torch.Generator().manual_seed(3)
    cost = torch.rand(23, 5, 4, generator=rng)
    mask = torch.rand(23, 4, generator=rng) > 0.3
    mask[:, 0] = True
    log_a = torch.full((23, 5), -np.log(5))
    whole = sinkhorn_log(cost, log_a, uniform_log_weights(mask))
    monkeypatch.setattr(ot_module, "CHUNK_PROBLEMS", 7)
    assert ot_module.chunk_problems(torch.device("cpu"), 5, 4, 23) == 7
    chunked = sinkhorn_log(cost, log_a, uniform_log_weights(mask))
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)
