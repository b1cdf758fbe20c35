"""Accuracy, top-k, per-class precision/recall and the confusion matrix for a classifier."""

from __future__ import annotations

from typing import Any

import torch


class ClassificationMetrics:
    """Accumulates logits and labels batch by batch; ``compute`` returns plain Python numbers.

    torchmetrics sums its states over processes in ``compute``, so with DDP each rank can
    evaluate its own shard of the data and every rank gets the metrics of the whole set. It is imported on first use:
    importing torchmetrics imports torchvision, seconds of start-up that commands of other tasks need not pay.
    """

    def __init__(self, class_names: list[str], device: torch.device, top_k: int = 5) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassPrecision,
            MulticlassRecall,
        )

        n = len(class_names)
        self.class_names = class_names
        self.top_k = top_k if n > top_k else None
        metrics: dict[str, Any] = {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "balanced_accuracy": MulticlassAccuracy(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        }
        if self.top_k:
            metrics[f"top{self.top_k}_accuracy"] = MulticlassAccuracy(n, top_k=self.top_k, average="micro")
        self.collection = MetricCollection(metrics).to(device)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: torch.Tensor) -> None:
        self.collection.update(logits.float(), target)
        self.loss_sum += loss_sum.detach().double()
        self.count += len(target)

    def compute(self) -> dict[str, Any]:
        values = self.collection.compute()
        loss_sum, count = self.loss_sum.clone(), self.count.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(count)
        result: dict[str, Any] = {
            "loss": float(loss_sum / count.clamp(min=1)),
            "accuracy": float(values["accuracy"]),
            "balanced_accuracy": float(values["balanced_accuracy"]),
        }
        if self.top_k:
            result[f"top{self.top_k}_accuracy"] = float(values[f"top{self.top_k}_accuracy"])
        result["per_class"] = {
            name: {"precision": float(p), "recall": float(r)}
            for name, p, r in zip(self.class_names, values["precision"], values["recall"])
        }
        result["confusion_matrix"] = values["confusion"].long().tolist()
        result["num_samples"] = int(count)
        return result
