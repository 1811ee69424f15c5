"""BOFA's components against direct computations: its low-rank directions against numpy.linalg.eigh, its fusion, its lambda
grid, its GDA; and runs on a store with z."""

import json

import numpy as np
import torch

from conftest import make_random_store
from spacil.cli import main
from spacil.data import class_order, task_boundaries, task_sizes
from spacil.methods.bofa import (cosine_factor, gda_precision, gda_scores, low_rank_directions, merge_precision,
                                 search_lambda, uncentred_covariance)


def _spd(width, seed):
    a = np.random.default_rng(seed).normal(size=(width, 3 * width))
    return a @ a.T / (3 * width)


def test_low_rank_directions_are_numpys_smallest_eigenvectors_of_the_old_tasks_mean():
    covariances = np.stack([_spd(8, s) for s in range(3)])
    A = low_rank_directions(torch.tensor(covariances), 3).numpy()
    values, vectors = np.linalg.eigh(covariances.mean(axis=0))
    expected = vectors[:, :3]
    # the same subspace (eigenvectors are defined up to sign), the three smallest eigenvalues
    np.testing.assert_allclose(A @ A.T, expected @ expected.T, atol=1e-10)
    np.testing.assert_allclose(np.diag(A.T @ covariances.mean(axis=0) @ A), values[:3], atol=1e-10)


def test_uncentred_covariance_and_gda_against_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6)) + 2.0
    cov = uncentred_covariance(torch.tensor(z.T @ z), 40, 1e-4).numpy()
    np.testing.assert_allclose(cov, z.T @ z / 39 + 1e-4 * np.eye(6))
    labels = np.repeat(np.arange(4), 10)
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(4)])
    centred = x - means[labels]
    scatter = centred.T @ centred
    precision = gda_precision(torch.tensor(scatter), 40).numpy()
    # update_stat: D * pinv((N - 1) * cov + trace(cov) * I), cov = np.cov of the centred rows
    c = np.cov(centred.T)
    np.testing.assert_allclose(precision, 6 * np.linalg.pinv(39 * c + np.trace(c) * np.eye(6)), rtol=1e-8)
    scores = gda_scores(torch.tensor(x), torch.tensor(means), torch.tensor(precision)).numpy()
    expected = x @ precision.T @ means.T + np.log(1 / 4) - np.einsum("nd,dc,nc->n", means, precision, means) / 2
    np.testing.assert_allclose(scores, expected, rtol=1e-8)
    old_means, new_means = means[:3], means[3:]
    merged = merge_precision(torch.tensor(precision), torch.tensor(2 * precision), torch.tensor(old_means),
                             torch.tensor(new_means)).numpy()
    d = (old_means.mean(axis=0) - new_means.mean(axis=0))[:, None]
    np.testing.assert_allclose(merged, 0.75 * precision + 0.25 * 2 * precision + 0.75 * 0.25 / 4 * d @ d.T, rtol=1e-8)


def test_lambda_grid_is_the_first_best_of_21_mixes():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(5, 4))
    text = rng.normal(size=(5, 4))
    labels = rng.integers(0, 5, size=60)
    feats = image[labels] / np.linalg.norm(image[labels], axis=1, keepdims=True) + 0.9 * rng.normal(size=(60, 4))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    best, best_lam = -1, None
    for lam in np.linspace(0, 1, 21).astype(np.float32):
        accuracy = np.mean((feats @ ((1 - lam) * unit(image) + lam * unit(text)).T).argmax(1) == labels)
        if accuracy > best:
            best, best_lam = accuracy, float(lam)
    found = search_lambda(torch.tensor(feats, dtype=torch.float32), torch.tensor(labels), torch.tensor(image, dtype=torch.float32),
                          torch.tensor(text, dtype=torch.float32), 21)
    assert found == best_lam
    # every mix equally good: the first (0) wins
    assert search_lambda(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(2, 4), torch.ones(2, 4), 21) == 0.0


def test_cosine_schedule_is_torchs_per_epoch_schedule_past_t_max():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=15, eta_min=0.001)
    for epoch in range(17):
        assert abs(optimizer.param_groups[0]["lr"] - 0.05 * cosine_factor(epoch, 15, 0.05, 0.001)) < 1e-12
        optimizer.step()
        scheduler.step()


def test_fusion_averages_the_task_weights_and_later_updates_stay_in_the_old_tasks_least_used_directions(tmp_path):
    """After two tasks: W_fusion = (W_task of task 1 + W0 + B A^T) / 2, with A the Kt eigenvectors of task 1's uncentred
    covariance of z (numpy) with the smallest eigenvalues: 2 W_fusion - W_task1 - W0 vanishes outside span(A)."""
    store = make_random_store(tmp_path / "store", width=24, train=10, templates=2)
    args = ["run", "--features", str(store), "--method", "bofa", "--init-cls", "6", "--increment", "6",
            "--set", "stage1_epochs=2", "--set", "stage2_epochs=2", "--set", "Kt=5", "--set", "bofa_batch_size=16", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "two")]) == 0
    first = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)["learner"]
    proj = np.load(store / "backbone" / "visual_proj.npy").astype(np.float64)
    z = np.load(store / "train" / "global_pre.npy").astype(np.float64)
    labels = np.load(store / "train" / "labels.npy")
    position = np.argsort(class_order(12, 1993))
    start, end = task_boundaries(task_sizes(12, 6, 6))[0]
    task1 = z[(position[labels] >= start) & (position[labels] < end)]
    covariance = task1.T @ task1 / (len(task1) - 1) + 1e-4 * np.eye(24)
    np.testing.assert_allclose(first["covariances"][0].numpy(), covariance, rtol=1e-6)
    A = np.linalg.eigh(covariance)[1][:, :5]
    from spacil.methods import METHODS

    W0 = proj.T
    fused = first["W_fusion"].numpy().astype(np.float64)
    assert first["tasks_done"] == 2
    sum_of_weights = first["W_sum"].numpy().astype(np.float64)
    np.testing.assert_allclose(fused, sum_of_weights / 2, rtol=1e-6)
    # the stage-1 weight after task 2 moved in every direction; the fused task-2 weight only inside span(A)
    one = _weights_after_task_1(tmp_path, args, METHODS["bofa"])
    later = sum_of_weights - one - W0  # B A^T
    np.testing.assert_allclose(later @ (np.eye(24) - A @ A.T), 0, atol=1e-5)
    assert np.abs(later).max() > 1e-4
    assert np.abs((first["W_task"].numpy() - W0) @ (np.eye(24) - A @ A.T)).max() > 1e-3


def _weights_after_task_1(tmp_path, args, learner_class):
    """W_task after the first task: the checkpoint of a run stopped when task 2 starts training."""
    original = learner_class.fit_task

    def stop_at_task_2(self, data):
        if data.task == 1:
            raise KeyboardInterrupt
        return original(self, data)

    learner_class.fit_task = stop_at_task_2
    try:
        assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    finally:
        learner_class.fit_task = original
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["learner"]
    np.testing.assert_allclose(state["W_fusion"].numpy(), state["W_task"].numpy())  # one task: its own weight
    return state["W_task"].numpy().astype(np.float64)


def test_a_run_predicts_better_than_chance_and_searches_lambda_once(tmp_path):
    store = make_random_store(tmp_path / "store", width=24, train=10, templates=2)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "bofa", "--init-cls", "4",
                 "--increment", "4", "--set", "stage1_epochs=2", "--set", "stage2_epochs=1", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "bofa" and len(summary["curve"]) == 3
    assert summary["last_acc"] > 100 / 12 * 2
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    assert 0 <= state["lam"] <= 1 and state["covariances"].shape == (3, 24, 24)


def test_prediction_is_the_gda_and_prototype_mix_computed_by_hand(tmp_path):
    """Logits of a finished run's learner on test z = stat * GDA + (1 - stat) * cosine to lam * image + (1 - lam) * text
    prototypes, with numpy from the checkpoint's statistics."""
    from spacil.config import build_config
    from spacil.learner import FeatureBatch, LearnerContext
    from spacil.methods import create_learner

    store = make_random_store(tmp_path / "store", width=24, train=10, templates=2)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "bofa", "--init-cls", "6",
                 "--increment", "6", "--set", "stage1_epochs=1", "--set", "stage2_epochs=1", "--quiet"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    proj = np.load(store / "backbone" / "visual_proj.npy")
    config = build_config({"method": "bofa", "bofa": {"stage1_epochs": 1, "stage2_epochs": 1}})
    learner = create_learner(config, LearnerContext(16, 9, 50.0, torch.device("cpu"), width=24,
                                                    visual_proj=torch.from_numpy(proj)))
    learner.load_state_dict(state)
    z = np.load(store / "test" / "global_pre.npy").astype(np.float32)[:20]
    logits = learner.logits(FeatureBatch(torch.zeros(20, 16), None, extra={"global_pre": torch.from_numpy(z)})).numpy()
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    means, means_n, precision = (state[k].numpy() for k in ("means", "means_normalised", "precision"))
    zn = unit(z.astype(np.float64))
    gda = zn @ precision.T @ means_n.T + np.log(1 / len(means)) - np.einsum("nd,dc,nc->n", means_n, precision, means_n) / 2
    lam = state["lam"]
    prototypes = lam * unit(means @ proj) + (1 - lam) * unit(state["test_text"].numpy())
    cosine = unit(z @ state["W_fusion"].numpy().T) @ prototypes.T
    np.testing.assert_allclose(logits, 0.1 * gda + 0.9 * cosine, rtol=1e-4, atol=1e-4)
