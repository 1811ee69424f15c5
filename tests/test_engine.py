"""ENGINE's components against direct computations (methods/engine.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from spacil.methods.engine import (AdapterStack, SharedCovarianceGDA, clip_loss, contrastive_loss, fuse_predictions,
                                   hashed_choice, rerank_logits)


def test_adapter_stack_sums_and_freezes():
    generator = torch.Generator().manual_seed(0)
    stack = AdapterStack(4, torch.device("cpu"))
    stack.add(generator)
    first_w, first_b = (p.detach().clone() for p in stack.current)
    x = torch.randn(3, 4)
    assert torch.allclose(stack(x), x @ first_w.T + first_b, atol=1e-6)
    stack.add(generator)  # freezes the first
    assert len(stack) == 2 and len(stack.frozen_weights) == 1 and len(stack.parameters()) == 2
    second_w, second_b = stack.current
    expected = x @ first_w.T + first_b + x @ second_w.detach().T + second_b.detach()
    assert torch.allclose(stack(x), expected, atol=1e-6)
    stack(x).sum().backward()
    assert second_w.grad is not None and not stack.frozen_weights.requires_grad
    assert torch.equal(stack.frozen_weights[0], first_w)
    bound = 1 / 2  # 1/sqrt(d), PyTorch's Linear default
    assert float(second_w.detach().abs().max()) <= bound and float(second_b.detach().abs().max()) <= bound
    state = stack.state_dict()
    again = AdapterStack(4, torch.device("cpu"))
    again.load_state_dict(state)
    assert torch.allclose(again(x), stack(x).detach(), atol=1e-6) and again.current is None


def test_losses_match_cross_entropy():
    image = F.normalize(torch.randn(5, 3), dim=-1)
    text = F.normalize(torch.randn(5, 3), dim=-1)
    logits = 4.6 * image @ text.T
    manual = -(logits.log_softmax(1).diagonal().mean() + logits.T.log_softmax(1).diagonal().mean()) / 2
    assert torch.allclose(clip_loss(image, text, 4.6), manual, atol=1e-6)
    assert torch.allclose(contrastive_loss(image @ text.T), -(image @ text.T).log_softmax(1).diagonal().mean(), atol=1e-6)


def _gda_direct(z, classes, num):
    mu = np.stack([z[classes == c].mean(0) for c in range(num)])
    centred = z - mu[classes]
    n, w = centred.shape
    sigma = np.cov(centred.T)  # unbiased, the rows' mean is 0
    precision = w * np.linalg.pinv((n - 1) * sigma + np.trace(sigma) * np.eye(w))
    return mu, precision


def test_gda_shared_shrunk_covariance_and_merge():
    rng = np.random.default_rng(0)
    w = 6
    z1 = rng.normal(size=(40, w)); c1 = np.repeat(np.arange(2), 20)
    z2 = rng.normal(size=(30, w)) + 1; c2 = np.repeat(np.arange(3), 10)
    gda = SharedCovarianceGDA(torch.device("cpu"))
    gda.update(torch.from_numpy(z1), torch.from_numpy(c1), 2)
    mu1, p1 = _gda_direct(z1, c1, 2)
    assert np.allclose(gda.precision.numpy(), p1, atol=1e-8)
    gda.update(torch.from_numpy(z2), torch.from_numpy(c2), 3)
    mu2, p2 = _gda_direct(z2, c2, 3)
    gap = (mu1.mean(0) - mu2.mean(0))[:, None]
    merged = 2 / 5 * p1 + 3 / 5 * p2 + (2 / 5) * 3 / 25 * gap @ gap.T
    assert np.allclose(gda.precision.numpy(), merged, atol=1e-8)
    mu = np.concatenate([mu1, mu2])
    query = rng.normal(size=(4, w))
    expected = np.stack([[q @ merged @ m - m @ merged @ m / 2 + np.log(1 / 5) for m in mu] for q in query])
    assert np.allclose(gda.logits(torch.from_numpy(query)).numpy(), expected, atol=1e-4)


def test_rerank_on_a_hand_made_top_five():
    rng = np.random.default_rng(1)
    classes, m, d = 7, 3, 4
    pairwise = torch.from_numpy(rng.normal(size=(classes, classes, m, d))).float()
    counts = np.full((classes, classes), m)
    counts[2, 4] = 1  # a pair with a single description
    outputs = torch.tensor([[0.1, 0.9, 0.8, 0.0, 0.7, 0.6, 0.5]])  # top five: 1, 2, 4, 5, 6
    image = F.normalize(torch.randn(1, d), dim=-1)
    keys = np.array([11])
    scores = rerank_logits(outputs, image, pairwise, counts, top=5, draws=3, keys=keys)
    top = [1, 2, 4, 5, 6]
    assert torch.all(scores[0, [0, 3]] == 0)
    for a in top:
        total = 0.0
        for draw in range(3):
            rows = []
            for b in top:
                if b == a:
                    continue
                pick = int(hashed_choice(np.array(counts[a, b]), keys[0], draw, a, b))
                assert 0 <= pick < counts[a, b]
                rows.append(pairwise[a, b, pick])
            mean = F.normalize(torch.stack(rows).mean(0), dim=-1)
            total += float(image[0] @ mean)
        assert abs(float(scores[0, a]) - total / 3) < 1e-5
    assert int(hashed_choice(np.array(1), 5, 0, 2, 4)) == 0
    # the draws depend on the key, not on the batch the image sits in
    twice = rerank_logits(outputs.repeat(2, 1), image.repeat(2, 1), pairwise, counts, 5, 3, np.array([11, 11]))
    assert torch.allclose(twice[1], scores[0])


def test_fusion_formula():
    adapter, gda, rerank = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    fused = fuse_predictions(adapter, gda, rerank, stat=0.8, rerank_weight=0.5)
    gda_unit = gda / gda.norm(dim=1, keepdim=True)
    assert torch.allclose(fused, 0.8 * gda_unit + 0.2 * (0.5 * rerank + 0.5 * adapter), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The learner on a store (resume and no-leak: tests/test_runner.py runs every registered method)


def test_engine_runs_and_says_what_a_store_lacks(tmp_path, capsys):
    import json

    from conftest import make_random_store
    from spacil.cli import main

    run = ["run", "--method", "engine", "--init-cls", "4", "--increment", "4", "--quiet", "--set", "engine_epochs=3",
           "--set", "engine_batch_size=8"]
    full = make_random_store(tmp_path / "full", templates=2, width=20, pairwise=2, views=2)
    assert main([*run, "--features", str(full), "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["complete"] and summary["avg_acc"] > 100 / 12 * 1.5  # well above chance
    no_views = make_random_store(tmp_path / "no_views", templates=2, width=20, pairwise=2)
    capsys.readouterr()
    assert main([*run, "--features", str(no_views), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--views" in err and "engine.image_aug=0" in err
    assert main([*run, "--features", str(no_views), "--out", str(tmp_path / "c"), "--set", "engine.image_aug=0"]) == 0
    no_pairwise = make_random_store(tmp_path / "no_pairwise", templates=2, width=20, views=2)
    capsys.readouterr()
    assert main([*run, "--features", str(no_pairwise), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pairwise-descriptions" in err
    no_z = make_random_store(tmp_path / "no_z", templates=2, pairwise=2, views=2)
    assert main([*run, "--features", str(no_z), "--out", str(tmp_path / "e")]) == 2
    assert "global_pre" in capsys.readouterr().err
