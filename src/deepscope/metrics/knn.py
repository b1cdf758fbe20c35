"""Weighted k-nearest-neighbour classification of frozen features: the kNN monitor of self-supervised learning.

The protocol is the one the SSL literature reports (Wu et al. 2018, "Unsupervised feature learning via non-parametric
instance discrimination", and the kNN evaluation of solo-learn and the lightly benchmarks): features are L2-normalised,
each query takes its k = 200 most cosine-similar bank features, each neighbour votes for its class with weight
exp(similarity / T), T = 0.1, and the class with the largest summed vote wins.

It is written here rather than taken from scikit-learn because ``KNeighborsClassifier`` offers only uniform or inverse-
distance weights, not this exponential similarity weighting (so its numbers are not comparable with published ones), and
it works on CPU arrays while the features already sit on the GPU, where one matrix product and ``torch.topk`` per chunk
of queries is far faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deepscope.errors import DataError


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Predicted class (int64, on the queries' device) of each query by the weighted vote of its ``k`` nearest bank features.

    Bank entries labelled -1 (no label) do not vote. Queries are taken ``chunk`` at a time so memory stays at
    ``chunk x len(bank)`` similarities whatever the number of queries. Before the exponential the largest similarity of
    each row is subtracted: the per-row factor does not change the vote, and small temperatures no longer overflow.
    """
    device = queries.device
    labelled = bank_labels >= 0
    bank, bank_labels = bank[labelled.to(bank.device)].to(device), bank_labels[labelled].to(device)
    if len(bank) == 0:
        raise DataError("kNN: no labelled features in the bank (all labels are -1)")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    predictions = []
    with torch.autocast(device.type, enabled=False):  # float32 similarities under a run's bf16 autocast: ties and votes
        for start in range(0, len(queries), chunk):
            q = F.normalize(queries[start : start + chunk].float(), dim=1)
            sims, idx = (q @ bank.T).topk(k, dim=1)
            weights = ((sims - sims[:, :1]) / temperature).exp()
            votes = torch.zeros(len(q), num_classes, device=device).scatter_add_(1, bank_labels[idx], weights)
            predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64, device=device)


def knn_accuracy(
    queries: Tensor,
    query_labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Fraction of the labelled queries (label >= 0) that :func:`knn_predict` classifies correctly."""
    labelled = query_labels >= 0
    if not bool(labelled.any()):
        raise DataError("kNN: no labelled query features (all labels are -1)")
    predicted = knn_predict(queries[labelled.to(queries.device)], bank, bank_labels, num_classes, k, temperature)
    # exact: a ratio of counts
    return int((predicted == query_labels[labelled].to(predicted.device)).sum()) / len(predicted)
