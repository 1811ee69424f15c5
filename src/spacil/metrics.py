"""The metrics of PROTOCOL.md: A_b, average and last accuracy, the accuracy matrix grouped by task, forgetting, old/new/harmonic.

All accuracies are sample-averaged top-1 in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class TaskEvaluation:
    """The evaluation after task b (0-based `task`) on the test images of all classes seen so far."""

    task: int
    top1: float  # A_b
    per_task: list[float]  # accuracy on the test images of task j's classes, j = 0..task
    old: Optional[float]  # classes of tasks before b (None after the first task)
    new: float  # classes of task b
    harmonic: Optional[float]
    num_seen_classes: int
    num_test_images: int

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "top1": self.top1,
            "per_task": self.per_task,
            "old": self.old,
            "new": self.new,
            "harmonic": self.harmonic,
            "num_seen_classes": self.num_seen_classes,
            "num_test_images": self.num_test_images,
        }


def _percent(correct: np.ndarray) -> float:
    return float(100.0 * correct.mean()) if len(correct) else float("nan")


def evaluate_task(task: int, predictions: np.ndarray, targets: np.ndarray, label_task: np.ndarray, num_seen_classes: int) -> TaskEvaluation:
    """predictions, targets: [n] class positions in the class order; label_task: [n] the task each target belongs to."""
    correct = predictions == targets
    per_task = [_percent(correct[label_task == j]) for j in range(task + 1)]
    old = _percent(correct[label_task < task]) if task > 0 else None
    new = _percent(correct[label_task == task])
    harmonic = None
    if old is not None:
        harmonic = 0.0 if old + new == 0 else 2 * old * new / (old + new)
    return TaskEvaluation(
        task=task, top1=_percent(correct), per_task=per_task, old=old, new=new, harmonic=harmonic,
        num_seen_classes=num_seen_classes, num_test_images=int(len(targets)),
    )


def accuracy_matrix(evaluations: Sequence[TaskEvaluation]) -> np.ndarray:
    """[B, B]: entry (b, j) = accuracy after task b on task j's classes; NaN where j > b."""
    size = len(evaluations)
    matrix = np.full((size, size), np.nan)
    for b, ev in enumerate(evaluations):
        matrix[b, : len(ev.per_task)] = ev.per_task
    return matrix


def forgetting(matrix: np.ndarray) -> float:
    """F_B = mean over j < B of (max_{l in j..B-1} acc(l, j) - acc(B, j)); 0 for a single task."""
    last = matrix.shape[0] - 1
    if last < 1:
        return 0.0
    drops = [np.nanmax(matrix[j:last, j]) - matrix[last, j] for j in range(last)]
    return float(np.mean(drops))


def summarise(method: str, evaluations: Sequence[TaskEvaluation]) -> dict:
    curve = [ev.top1 for ev in evaluations]
    matrix = accuracy_matrix(evaluations)
    return {
        "method": method,
        "avg_acc": float(np.mean(curve)) if curve else float("nan"),
        "last_acc": curve[-1] if curve else float("nan"),
        "curve": curve,
        "forgetting": forgetting(matrix),
        "old_acc": [ev.old for ev in evaluations],
        "new_acc": [ev.new for ev in evaluations],
        "harmonic_acc": [ev.harmonic for ev in evaluations],
        "num_tasks": len(evaluations),
    }
