"""RanPAC's components against direct computations (numpy.linalg.solve, the ridge choice by hand), and a run whose head is
recomputed from the store's z."""

import json

import numpy as np
import pytest
import torch

from conftest import make_random_store
from spacil.cli import main
from spacil.config import build_config
from spacil.data import class_order, task_boundaries, task_sizes
from spacil.learner import task_generator
from spacil.methods.ranpac import _STREAM_PROJECTION, _STREAM_SPLIT, choose_ridge, random_projection, ridge_candidates, ridge_solve


def _problem(seed=0, fit=30, hold=12, features=20, classes=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, features))
    labels = rng.integers(0, classes, size=fit + hold)
    H = np.maximum(centres[labels] + rng.normal(size=(fit + hold, features)), 0)
    Y = np.eye(classes)[labels]
    return H[:fit], Y[:fit], H[fit:], Y[fit:]


def test_ridge_solve_is_numpys_solve():
    H, Y, _, _ = _problem()
    G, Q = H.T @ H, H.T @ Y
    for ridge in (1e-3, 1.0, 100.0):
        expected = np.linalg.solve(G + ridge * np.eye(len(G)), Q)
        np.testing.assert_allclose(ridge_solve(torch.tensor(G), torch.tensor(Q), ridge).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ridge_choice_is_the_least_held_out_error_computed_by_hand():
    H_fit, Y_fit, H_hold, Y_hold = _problem(seed=1)
    G, Q = H_fit.T @ H_fit, H_fit.T @ Y_fit
    ridges = ridge_candidates(-8, 8)
    assert ridges == [10.0 ** e for e in range(-8, 9)]
    by_hand = []
    for ridge in ridges:
        W = np.linalg.solve(G + ridge * np.eye(len(G)), Q)
        by_hand.append(float(np.mean((H_hold @ W - Y_hold) ** 2)))  # the official F.mse_loss
    expected = ridges[int(np.argmin(by_hand))]
    for solver in ("solve", "eigh"):
        chosen, losses = choose_ridge(*(torch.tensor(a) for a in (G, Q, H_hold, Y_hold)), ridges, solver)
        assert chosen == expected, solver
        # sums of squares = the official means times the number of entries
        np.testing.assert_allclose(np.array(losses) / Y_hold.size, by_hand, rtol=1e-6)
    assert 1e-8 < expected < 1e8  # the problem is one where the choice matters


def test_the_head_after_a_run_is_the_ridge_solution_of_every_tasks_z(tmp_path):
    """G and Q rebuilt with numpy from the store's z and W_rand, the ridge of the last task chosen by hand on its 80/20
    split: the run's head is (G + ridge I)^-1 Q and its choice is the hand's."""
    store = make_random_store(tmp_path / "store", width=24, train=10)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "ranpac", "--init-cls", "6",
                 "--increment", "6", "--set", "ranpac.M=40", "--quiet"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    config = build_config({"method": "ranpac", "ranpac": {"M": 40}})
    W_rand = random_projection(24, 40, task_generator(config, 0, _STREAM_PROJECTION)).double().numpy()
    z = np.load(store / "train" / "global_pre.npy").astype(np.float32).astype(np.float64)
    labels = np.load(store / "train" / "labels.npy")
    order = class_order(12, 1993)
    position = np.argsort(order)
    H = np.maximum(z @ W_rand, 0)
    Y = np.eye(12)[position[labels]]
    G, Q = H.T @ H, H.T @ Y
    np.testing.assert_allclose(state["G"].numpy(), G, rtol=1e-5)
    np.testing.assert_allclose(state["Q"].numpy(), Q, rtol=1e-5)
    # the last task: its rows in store order (the runner's order), split by the task's generator
    start, end = task_boundaries(task_sizes(12, 6, 6))[1]
    rows = np.flatnonzero((position[labels] >= start) & (position[labels] < end))
    permutation = torch.randperm(len(rows), generator=task_generator(config, 1, _STREAM_SPLIT)).numpy()
    fit, hold = rows[permutation[:int(len(rows) * 0.8)]], rows[permutation[int(len(rows) * 0.8):]]
    Yt = Y[:, start:end]
    losses = []
    for ridge in ridge_candidates(-8, 8):
        W = np.linalg.solve(H[fit].T @ H[fit] + ridge * np.eye(40), H[fit].T @ Yt[fit])
        losses.append(np.mean((H[hold] @ W - Yt[hold]) ** 2))
    ridge = ridge_candidates(-8, 8)[int(np.argmin(losses))]
    assert state["ridges"][1] == ridge
    np.testing.assert_allclose(state["W"].numpy(), np.linalg.solve(G + ridge * np.eye(40), Q), rtol=1e-3, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ranpac" and len(summary["curve"]) == 2


def test_m_zero_uses_z_itself(tmp_path):
    store = make_random_store(tmp_path / "store", width=24)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "ranpac", "--init-cls", "6",
                 "--increment", "6", "--set", "M=0", "--set", "ridge_solver=solve", "--quiet"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    z = np.load(store / "train" / "global_pre.npy").astype(np.float64)
    np.testing.assert_allclose(state["G"].numpy(), z.T @ z, rtol=1e-5)


@pytest.mark.parametrize("method", ["ranpac", "bofa"])
def test_a_store_without_z_is_one_line_naming_how_to_add_it(random_store, tmp_path, capsys, method):
    assert main(["run", "--features", str(random_store), "--out", str(tmp_path / "run"), "--method", method, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "global_pre" in err and "spacil extract" in err and method in err
    assert not (tmp_path / "run").exists()
