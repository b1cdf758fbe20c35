"""Accuracy, top-k, per-class precision/recall and the confusion matrix for a classifier.

Every score is a ratio of integer counts, taken in Python at the end: the confusion matrix and the top-k hits are
summed as int64 tensors on the device (and over processes under DDP), then divided exactly. Written here rather than
with torchmetrics' accuracy classes, which divide in float32 and reported an accuracy of 1.0000001192092896 for a
run that classified every image right.
"""

from __future__ import annotations

from typing import Any

import torch


def _all_reduce(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes of a distributed run, in place (nothing to do in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def ratio(part: int, whole: int) -> float:
    """``part / whole`` of two counts (0.0 when ``whole`` is 0): exact to the float, never above 1 when part <= whole."""
    return part / whole if whole else 0.0


class ClassificationMetrics:
    """Accumulates the confusion matrix, top-k hits and loss batch by batch; ``compute`` returns plain Python numbers.

    With DDP each rank evaluates its own shard of the data; ``compute`` sums the counts over the processes, so every
    rank gets the metrics of the whole set.
    """

    def __init__(self, class_names: list[str], device: torch.device, top_k: int = 5) -> None:
        n = len(class_names)
        self.class_names = class_names
        self.top_k = top_k if n > top_k else None
        self.matrix = torch.zeros(n * n, dtype=torch.int64, device=device)  # row-major (truth, prediction)
        self.top_hits = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        n = len(self.class_names)
        self.matrix += torch.bincount(target.long() * n + logits.argmax(1), minlength=n * n)
        if self.top_k:
            self.top_hits += (logits.topk(self.top_k, dim=1).indices == target[:, None]).any(1).sum()
        self.loss_sum += loss_sum.detach().double()

    def compute(self) -> dict[str, Any]:
        matrix, top_hits, loss_sum = self.matrix.clone(), self.top_hits.clone(), self.loss_sum.clone()
        _all_reduce(matrix, top_hits, loss_sum)
        n = len(self.class_names)
        counts = matrix.view(n, n).tolist()
        correct = [counts[i][i] for i in range(n)]
        support = [sum(row) for row in counts]
        predicted = [sum(counts[t][p] for t in range(n)) for p in range(n)]
        total = sum(support)
        present = [i for i in range(n) if support[i]]
        result: dict[str, Any] = {
            "loss": float(loss_sum) / max(1, total),
            "accuracy": ratio(sum(correct), total),
            # the mean recall over the classes the data holds (scikit-learn's definition)
            "balanced_accuracy": sum(ratio(correct[i], support[i]) for i in present) / len(present) if present else 0.0,
        }
        if self.top_k:
            result[f"top{self.top_k}_accuracy"] = ratio(int(top_hits), total)
        result["per_class"] = {
            name: {"precision": ratio(correct[i], predicted[i]), "recall": ratio(correct[i], support[i])}
            for i, name in enumerate(self.class_names)
        }
        result["confusion_matrix"] = counts
        result["num_samples"] = total
        return result
