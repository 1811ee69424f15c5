import numpy as np
import pytest

from spacil.metrics import accuracy_matrix, evaluate_task, forgetting, summarise


def test_accuracy_matrix_is_grouped_by_task_boundaries():
    # tasks of 3 and 2 classes (not fixed 10-class bins)
    targets = np.array([0, 1, 2, 3, 4, 0, 3])
    label_task = np.array([0, 0, 0, 1, 1, 0, 1])
    predictions = np.array([0, 1, 0, 3, 0, 0, 3])
    ev = evaluate_task(1, predictions, targets, label_task, 5)
    assert ev.per_task == pytest.approx([75.0, 200 / 3])
    assert ev.top1 == pytest.approx(100 * 5 / 7)
    assert ev.old == pytest.approx(75.0) and ev.new == pytest.approx(200 / 3)
    assert ev.harmonic == pytest.approx(2 * 75 * (200 / 3) / (75 + 200 / 3))


def test_forgetting_uses_the_best_earlier_accuracy():
    first = evaluate_task(0, np.array([0, 0]), np.array([0, 0]), np.array([0, 0]), 1)  # 100
    second = evaluate_task(1, np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), 2)  # 50, 100
    third = evaluate_task(2, np.array([1, 1, 2, 2, 2, 2]), np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2]), 3)  # 0, 0, 100
    matrix = accuracy_matrix([first, second, third])
    assert np.isnan(matrix[0, 1])
    # task 0: max(100, 50) - 0 = 100; task 1: 100 - 0 = 100
    assert forgetting(matrix) == pytest.approx(100.0)
    summary = summarise("x", [first, second, third])
    assert summary["avg_acc"] == pytest.approx(np.mean([100, 75, 100 / 3]))
    assert summary["last_acc"] == pytest.approx(100 / 3) and summary["old_acc"][0] is None
