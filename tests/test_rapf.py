"""RAPF's components against direct computations, and a short full run with its resume."""

import json

import numpy as np
import pytest
import torch

from spacil.cli import main
from spacil.config import build_config, load_config
from spacil.learner import LearnerContext, TaskData, TaskInfo
from spacil.methods import METHODS
from spacil.methods.rapf import (RAPF, draw_features, edge_hinge_loss, edge_samples, fuse_adapter, hard_class_pairs,
                                 rapf_covariance, replay_classes, step_lr)


def _orthogonal(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def test_fusion_keeps_the_old_singular_directions_where_the_mask_says_so():
    dim = 6
    u, v = _orthogonal(dim, 0), _orthogonal(dim, 1)
    singular = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    old = u @ np.diag(singular) @ v.T
    change = np.zeros((dim, dim))
    change[0, 1] = 0.8  # the largest change: mask 1 there
    change[0, 3] = -0.2  # a quarter of it: mask 0.25 + mix_bias
    change[2, 0] = 0.4  # half of it
    new = old + u @ change  # in the old left singular basis, only rows 0 and 2 move
    for mix_bias in (0.0, 0.3):
        fused, mask = fuse_adapter(torch.tensor(new), torch.tensor(old), mix_bias)
        fused = fused.numpy()
        # direct: numpy's SVD (its signs may differ from torch's; the fusion does not depend on them)
        u_np, s_np, vh_np = np.linalg.svd(old)
        p_new, p_old = u_np.T @ new, np.diag(s_np) @ vh_np
        direct_mask = np.minimum(np.abs(p_new - p_old) / np.abs(p_new - p_old).max() + mix_bias, 1)
        np.testing.assert_allclose(mask.numpy(), direct_mask, atol=1e-9)
        np.testing.assert_allclose(fused, u_np @ (direct_mask * p_new + (1 - direct_mask) * p_old), atol=1e-9)
        # the rows of the old singular basis that did not change keep the old adapter: fused^T u_i = s_i v_i
        for i in (1, 3, 4, 5):
            np.testing.assert_allclose(fused.T @ u[:, i], singular[i] * v[:, i], atol=1e-9)
        # the entry that changed most keeps the new value; the others move by mask * change
        expected = np.diag(singular) @ v.T + np.clip(np.abs(change) / 0.8 + mix_bias, None, 1) * change
        np.testing.assert_allclose(u.T @ fused, expected, atol=1e-9)
    # mix_bias 1: the mask is 1 everywhere, the new adapter is kept as it is
    fused, _ = fuse_adapter(torch.tensor(new), torch.tensor(old), 1.0)
    np.testing.assert_allclose(fused.numpy(), new, atol=1e-9)


def test_covariance_ridge_and_shrinkage_as_rapf_computes_them():
    rng = np.random.default_rng(2)
    dim = 5
    a = rng.normal(size=(dim, dim))
    cov = a @ a.T
    cov[0, 3] = cov[3, 0] = 0.0  # zero off-diagonal entries are left out of the off-diagonal mean
    ridge = 1e-4
    plain = rapf_covariance(torch.tensor(cov), ridge, shrinkage=False).numpy()
    np.testing.assert_allclose(plain, cov + ridge * np.eye(dim))
    shrunk = rapf_covariance(torch.tensor(cov), ridge, shrinkage=True).numpy()
    c = cov + ridge * np.eye(dim)
    diagonal_mean = sum(c[i, i] for i in range(dim)) / dim
    off = [c[i, j] for i in range(dim) for j in range(dim) if i != j and c[i, j] != 0]
    off_mean = sum(off) / len(off)
    assert len(off) == dim * dim - dim - 2
    expected = np.array([[c[i, j] + (diagonal_mean if i == j else off_mean) for j in range(dim)] for i in range(dim)])
    np.testing.assert_allclose(shrunk, expected, rtol=1e-12)


@pytest.mark.parametrize("shrinkage", [False, True])
def test_stored_gaussians_are_the_class_statistics(shrinkage):
    """end_task stores per new class the mean and (through its Cholesky factor) the RAPF covariance of its features."""
    dim, per = 4, 30
    config = build_config({"method": "rapf", "rapf": {"shrinkage": shrinkage, "cov_ridge": 1e-3}})
    learner = RAPF(config, LearnerContext(dim, 0, 10.0, torch.device("cpu")))
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2 * per, dim)).astype(np.float32) + np.repeat([[0, 0, 0, 0], [3, 0, 0, 0]], per, 0)
    targets = np.repeat([0, 1], per)
    learner.begin_task(TaskInfo(0, [0, 1], ["a", "b"], torch.eye(dim)[:2], None, None, None))
    learner.end_task(TaskData(0, features, None, targets, torch.device("cpu")))
    for position in (0, 1):
        x = torch.tensor(features[targets == position], dtype=torch.float64)
        expected = rapf_covariance(torch.cov(x.T), 1e-3, shrinkage)
        torch.testing.assert_close(learner.bank.means[position].double(), x.mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(learner.bank.covariance(position), expected, atol=1e-5, rtol=1e-5)


def test_hard_pairs_are_the_text_features_closer_than_the_threshold():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(1, 8))
    text = base + 0.45 * rng.normal(size=(7, 8))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    old, new = text[:4], text[4:]
    distances = sorted(np.linalg.norm(o - n) for o in old for n in new)
    threshold = float(np.median(distances))
    expected = [[i, j] for i in range(4) for j in range(3) if np.linalg.norm(old[i] - new[j]) < threshold]
    assert 0 < len(expected) < 12
    pairs = hard_class_pairs(torch.tensor(old), torch.tensor(new), threshold)
    assert pairs.tolist() == expected
    # in the learner: pairs hold logit columns, the new class's counted after all old ones
    learner = RAPF(build_config({"method": "rapf", "rapf": {"threshold": threshold}}), LearnerContext(8, 0, 10.0, torch.device("cpu")))
    learner.begin_task(TaskInfo(0, [0, 1, 2, 3], list("abcd"), torch.tensor(old, dtype=torch.float32), None, None, None))
    assert len(learner.hard_pairs) == 0 and learner.old_weight is None
    learner.begin_task(TaskInfo(1, [4, 5, 6], list("efg"), torch.tensor(new, dtype=torch.float32), None, None, None))
    assert learner.hard_pairs.tolist() == [[i, j + 4] for i, j in expected]
    torch.testing.assert_close(learner.old_weight, learner.weight)


def test_edge_samples_are_draws_of_the_hard_pairs_old_classes_and_the_hinge_is_rapfs():
    dim = 3
    means = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 5.0]])
    covariances = [torch.diag(torch.tensor(v)) for v in ([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], [0.5, 0.05, 0.01])]
    factors = torch.stack([torch.linalg.cholesky(c) for c in covariances])
    pairs = torch.tensor([[0, 3], [2, 4], [2, 3]])
    count = 20000
    features, own, new = edge_samples(means, factors, pairs, count, torch.Generator().manual_seed(0))
    assert features.shape == (3 * count, dim)
    assert own.tolist() == [0] * count + [2] * count + [2] * count
    assert new.tolist() == [3] * count + [4] * count + [3] * count
    for k, (old_class, _) in enumerate(pairs.tolist()):
        part = features[k * count:(k + 1) * count].double()
        torch.testing.assert_close(part.mean(0), means[old_class].double(), atol=0.03, rtol=0)
        torch.testing.assert_close(torch.cov(part.T), covariances[old_class].double(), atol=0.03, rtol=0)
    # the draws of replayed classes come the same way, class after class
    replay = draw_features(means, factors, [1, 1, 0], 5, torch.Generator().manual_seed(1))
    assert replay.shape == (15, dim)
    # the hinge, entry by entry
    text = torch.randn(5, dim, generator=torch.Generator().manual_seed(2))
    adapted = torch.randn(6, dim, generator=torch.Generator().manual_seed(3))
    own, new = torch.tensor([0, 0, 2, 2, 1, 1]), torch.tensor([3, 4, 3, 4, 3, 4])
    terms = []
    for e in range(6):
        f = adapted[e] / adapted[e].norm()
        t_own, t_new = text[own[e]] / text[own[e]].norm(), text[new[e]] / text[new[e]].norm()
        terms.append(max(0.0, float(-(f @ t_own) + f @ t_new + 0.1)))
    torch.testing.assert_close(edge_hinge_loss(adapted, text, own, new, 0.1), torch.tensor(sum(terms) / 6), atol=1e-6, rtol=0)


def test_replayed_classes_and_learning_rate_follow_rapfs_schedule():
    order = torch.tensor([4, 0, 3, 1, 2])
    assert replay_classes(order, 0, 2).tolist() == [4, 0]
    assert replay_classes(order, 2, 2).tolist() == [2, 4]  # wraps around
    visited = {c for b in range(3) for c in replay_classes(order, b, 2).tolist()}
    assert visited == set(order.tolist())  # ceil(5 / 2) batches visit every old class
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=0.001)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [4, 10], gamma=0.1)
    for epoch in range(15):
        assert step_lr(0.001, epoch, [4, 10], 0.1) == pytest.approx(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()


def test_packaged_configs_carry_the_official_hyper_parameters():
    cifar = load_config("cifar224_b0", ["method=rapf"]).rapf
    assert (cifar.adapter_lr, cifar.adapter_epochs, cifar.adapter_batch_size, cifar.milestones) == (0.001, 15, 100, [4, 10])
    assert (cifar.beta, cifar.mix_bias, cifar.threshold, cifar.shrinkage, cifar.replay_classes_per_batch) == (2, 0.6, 0.55, False, 2)
    cub = load_config("cub_b0").rapf
    assert (cub.adapter_batch_size, cub.beta, cub.mix_bias, cub.threshold, cub.shrinkage, cub.replay_classes_per_batch) == (
        32, 1, 0.8, 0.65, True, 10)
    imagenetr = load_config("imagenetr_b100").rapf
    assert (imagenetr.adapter_batch_size, imagenetr.beta, imagenetr.mix_bias, imagenetr.threshold, imagenetr.shrinkage,
            imagenetr.replay_classes_per_batch) == (64, 1, 0.7, 0.65, True, 5)


RUN = ["--init-cls", "3", "--increment", "3", "--quiet", "--method", "rapf", "--set", "adapter_epochs=3",
       "--set", "threshold=1.4", "--set", "adapter_batch_size=8"]


def test_short_run_is_reproducible_and_resumes_to_the_same_summary(random_store, tmp_path, monkeypatch):
    def run(out, *extra):
        return main(["run", "--features", str(random_store), "--out", str(out), *RUN, *extra])

    assert run(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert whole["method"] == "rapf" and whole["complete"] and len(whole["curve"]) == 4
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    assert state["learner"]["weight"].shape == (16, 16) and len(state["learner"]["bank"]["positions"]) == 12

    original = RAPF.fit_task
    seen_edges = []

    def interrupted(self, data):
        seen_edges.append(len(self.hard_pairs))
        if data.task == 2:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(METHODS["rapf"], "fit_task", interrupted)
    assert run(tmp_path / "cut") == 130
    assert seen_edges[1] > 0  # the threshold makes hard pairs: the edge-sample hinge ran in task 2
    monkeypatch.setattr(METHODS["rapf"], "fit_task", original)
    assert run(tmp_path / "cut", "--resume") == 0
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == whole
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()


def test_replayed_pseudo_features_carry_their_own_classes_labels(random_store, monkeypatch):
    """In a later task every replayed block of draws is labelled with the class whose Gaussian it was drawn from."""
    import spacil.methods.rapf as rapf

    batches = []
    real_draw, real_cross_entropy = rapf.draw_features, rapf.F.cross_entropy

    def draw(means, factors, classes, count, generator):
        features = real_draw(means, factors, classes, count, generator)
        batches.append({"means": means.clone(), "classes": torch.as_tensor(classes).tolist(), "count": count,
                        "features": features.clone()})
        return features

    def cross_entropy(logits, targets, *args, **kwargs):
        if batches and "targets" not in batches[-1]:
            batches[-1]["targets"] = targets.clone()
        return real_cross_entropy(logits, targets, *args, **kwargs)

    monkeypatch.setattr(rapf, "draw_features", draw)
    monkeypatch.setattr(rapf.F, "cross_entropy", cross_entropy)
    assert main(["run", "--features", str(random_store), "--out", str(random_store.parent / "run"), *RUN]) == 0
    replays = [batch for batch in batches if "targets" in batch]  # the others are edge samples (drawn after the loss)
    assert replays
    for batch in replays:
        replayed = len(batch["classes"]) * batch["count"]
        labels = batch["targets"][-replayed:].view(len(batch["classes"]), batch["count"])
        blocks = batch["features"].view(len(batch["classes"]), batch["count"], -1).mean(dim=1)  # each block's mean
        nearest = torch.cdist(blocks, batch["means"]).argmin(dim=1)  # the stored class it was drawn from
        assert (labels == labels[:, :1]).all()
        assert labels[:, 0].tolist() == nearest.tolist() == batch["classes"]
