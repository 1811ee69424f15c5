import pytest
import torch

from spacil.ops.gaussian import GaussianBank, MomentAccumulator
from spacil.ops.projectors import ProjectorStack


@pytest.mark.parametrize("cov_type", ["full", "diag"])
def test_samples_reproduce_the_stored_mean_and_covariance(cov_type):
    g = torch.Generator().manual_seed(0)
    dim = 6
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    data = torch.randn(4000, dim, generator=g, dtype=torch.float64) @ mix.T + torch.arange(dim, dtype=torch.float64)
    moments = MomentAccumulator(1, dim, full=cov_type == "full")
    for chunk in data.split(700):
        moments.add(0, chunk)
    mean, cov = moments.moments(0)
    torch.testing.assert_close(mean, data.mean(0))
    expected = torch.cov(data.T)
    torch.testing.assert_close(cov, expected if cov_type == "full" else expected.diagonal())
    bank = GaussianBank(dim, cov_type, cov_shrink=1e-4)
    bank.add(7, mean, cov)
    samples, positions = bank.sample(200_000, torch.Generator().manual_seed(1))
    assert positions.unique().tolist() == [7]
    shrunk = expected + 1e-4 * torch.eye(dim, dtype=torch.float64)
    target = shrunk if cov_type == "full" else torch.diag(shrunk.diagonal())
    torch.testing.assert_close(samples.double().mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(samples.double().T), target, atol=0.08 * target.abs().max().item(), rtol=0)
    torch.testing.assert_close(bank.covariance(0), target, atol=1e-4, rtol=1e-4)


def test_rank_deficient_covariance_factorises_with_shrinkage():
    dim = 32
    few = torch.randn(5, dim, dtype=torch.float64)  # 5 samples in 32 dimensions: singular covariance
    moments = MomentAccumulator(1, dim, full=True)
    moments.add(0, few)
    bank = GaussianBank(dim, "full", 1e-4)
    bank.add(0, *moments.moments(0))
    assert torch.isfinite(bank.factors).all()


def test_projectors_start_at_identity_and_freeze_old_tasks():
    g = torch.Generator().manual_seed(0)
    for kind in ("linear", "mlp"):
        stack = ProjectorStack(8, kind)
        x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        torch.testing.assert_close(stack(x), x)
        stack.add_task(g)
        torch.testing.assert_close(stack(x), x)  # zero-initialised
        first = stack.trainable()
        assert first and all(p.requires_grad for p in first)
        with torch.no_grad():
            for p in first:
                p.add_(0.1)
        stack.add_task(g)
        assert not any(p.requires_grad for p in first)
        assert len(stack.trainable()) == len(first)
    linear = ProjectorStack(4, "linear")
    linear.add_task(g)
    linear.add_task(g)
    with torch.no_grad():
        for layer in linear.layers:
            layer.weight.normal_(generator=g)
            layer.bias.normal_(generator=g)
    x = torch.randn(2, 4)
    by_layer = x + sum(layer(x) for layer in linear.layers)
    torch.testing.assert_close(linear(x), torch.nn.functional.normalize(by_layer, dim=-1))
