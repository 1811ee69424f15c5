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


# issue 26: the dual form, and the cost said before a run -----------------------------------------------------------------
def test_the_dual_solve_and_search_are_the_primal_ones():
    from spacil.methods.ranpac import choose_ridge_dual, ridge_solve_dual

    H_fit, Y_fit, H_hold, Y_hold = _problem(seed=2, fit=12, hold=5, features=40)  # fewer rows than features
    tensors = [torch.tensor(a) for a in (H_fit, Y_fit, H_hold, Y_hold)]
    G, Q = tensors[0].T @ tensors[0], tensors[0].T @ tensors[1]
    for ridge in (1e-3, 1.0, 100.0):
        torch.testing.assert_close(ridge_solve_dual(tensors[0], tensors[1], ridge), ridge_solve(G, Q, ridge), rtol=1e-8,
                                   atol=1e-12)
    ridges = ridge_candidates(-8, 8)
    for solver in ("solve", "eigh"):
        primal, primal_losses = choose_ridge(G, Q, tensors[2], tensors[3], ridges, solver)
        dual, dual_losses = choose_ridge_dual(*tensors, ridges, solver)
        assert dual == primal == 1.0, solver
        # the primal matrix G + ridge I is nearly singular at the smallest ridges (rank 12 of 40): its rounding, not the
        # dual's, sets the tolerance there (relative 1e-6 at 1e-8)
        np.testing.assert_allclose(dual_losses, primal_losses, rtol=1e-6)
        np.testing.assert_allclose(dual_losses[8:], primal_losses[8:], rtol=1e-12)


@pytest.mark.parametrize("per_class, M, forms", [(3, 40, "dual"), (3, 20, "dual then primal")])
def test_a_run_with_fewer_rows_than_m_is_the_primal_solution(tmp_path, capsys, per_class, M, forms):
    """12 classes x 3 rows: with M = 40 every task is solved in the dual form; with M = 20 the first task's head is dual
    and the second's primal (36 rows > 20), its search dual (14 fit rows). Either way the head and the ridge choices are
    the primal computation's, done by hand with numpy."""
    store = make_random_store(tmp_path / "store", width=24, train=per_class)
    out = tmp_path / "run"
    assert main(["run", "--features", str(store), "--out", str(out), "--method", "ranpac", "--init-cls", "6",
                 "--increment", "6", "--set", f"ranpac.M={M}", "--quiet"]) == 0
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and note.startswith(f"ranpac: ridge search and solves at M={M} ({M} features), 12 classes")
    assert "--set ranpac.M=N" in note and "dual search" in note
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["learner"]
    config = build_config({"method": "ranpac", "ranpac": {"M": M}})
    W_rand = random_projection(24, M, task_generator(config, 0, _STREAM_PROJECTION)).double().numpy()
    z = np.load(store / "train" / "global_pre.npy").astype(np.float32).astype(np.float64)
    position = np.argsort(class_order(12, 1993))[np.load(store / "train" / "labels.npy")]
    H, Y = np.maximum(z @ W_rand, 0), np.eye(12)[position]
    G = H.T @ H
    if forms == "dual":
        assert state["G"].shape == (0, 0) and state["H"].shape == (36, M)
        np.testing.assert_allclose(state["H"].numpy().T @ state["H"].numpy(), G, rtol=1e-5)
    else:
        assert state["H"].shape == (0, M)
        np.testing.assert_allclose(state["G"].numpy(), G, rtol=1e-5)
    for task, (start, end) in enumerate(task_boundaries(task_sizes(12, 6, 6))):
        rows = np.flatnonzero((position >= start) & (position < end))
        permutation = torch.randperm(len(rows), generator=task_generator(config, task, _STREAM_SPLIT)).numpy()
        fit, hold = rows[permutation[:int(len(rows) * 0.8)]], rows[permutation[int(len(rows) * 0.8):]]
        losses = [np.sum((H[hold] @ np.linalg.solve(H[fit].T @ H[fit] + ridge * np.eye(M), H[fit].T @ Y[fit, start:end])
                          - Y[hold, start:end]) ** 2) for ridge in ridge_candidates(-8, 8)]
        assert state["ridges"][task] == ridge_candidates(-8, 8)[int(np.argmin(losses))]
    ridge = state["ridges"][-1]
    np.testing.assert_allclose(state["W"].numpy(), np.linalg.solve(G + ridge * np.eye(M), H.T @ Y), rtol=1e-4, atol=1e-6)


def test_the_cost_estimate_follows_the_forms_and_the_cube_laws():
    from spacil.methods.ranpac import ridge_cost

    rates = {"matmul": 1e-11, "solve": 2e-10, "eigh": 5e-10}
    # CIFAR-100 B0 Inc10 at the official M: 4,000 fit rows per task < 10,000, so the searches are dual; the head is dual
    # until 10,000 rows are seen, primal after
    seconds, peak, forms = ridge_cost(10000, 0, [5000] * 10, [10] * 10, 0.8, "solve", 17, rates)
    assert forms == "dual head, dual search, primal head" and peak == 8.0 * 4 * 10000 ** 2
    primal, primal_peak, primal_forms = ridge_cost(2000, None, [5000] * 10, [10] * 10, 0.8, "solve", 17, rates)
    assert primal_forms == "primal head, primal search" and primal_peak == 8.0 * (5 * 2000 ** 2 + 1000 * 2000)
    # 17 solves and one head solve per task dominate: 10 x 18 x 2e-10 x 2000^3
    assert 0.9 < primal / (10 * 18 * 2e-10 * 2000 ** 3) < 1.2
