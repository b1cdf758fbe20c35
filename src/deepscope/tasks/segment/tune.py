"""Post-processing thresholds chosen on the validation images after training, as StarDist's ``optimize_thresholds``.

The network's output is predicted once per image; only the post-processing is repeated. The probability threshold
is searched first with the other setting at its default, then the second setting (the NMS overlap for stardist,
the flow-error threshold for flows) at the best threshold: a coordinate search of 6 + 2 settings instead of a grid of
18, which keeps the tuning to about a minute of CPU on 16 images. The objective is the mean matching score over IoU
0.5-0.9, the metric the run monitors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepscope.data.segmentation.dataset import SegItem
from deepscope.metrics.instance import image_scores, summarize
from deepscope.tasks.segment.config import PostConfig
from deepscope.tasks.segment.predict import Predictor

TUNE_IMAGES = 16  # validation images the thresholds are chosen on
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # low ones for maps that are not yet confident (short budgets)
SECOND = {"stardist": ("nms_threshold", (0.3, 0.4, 0.5)), "flows": ("flow_threshold", (0.4, 0.6, None))}


def _score(predictor: Predictor, outputs: Sequence[tuple[SegItem, np.ndarray]], post: PostConfig) -> float:
    records = [
        image_scores(item.name, np.asarray(item.labels[...]), predictor.instances(probs, post))
        for item, probs in outputs
    ]
    return float(summarize(records)["mean_score"])


def tune_post(predictor: Predictor, items: Sequence[SegItem]) -> tuple[PostConfig, list[dict[str, Any]]]:
    """The best post-processing settings on ``items`` (at most ``TUNE_IMAGES``) and every setting tried with its score."""
    outputs = [(item, predictor.probabilities(item.channels_first(predictor.channels))) for item in items[:TUNE_IMAGES]]
    tried: list[dict[str, Any]] = []
    best = predictor.post

    def attempt(post: PostConfig) -> None:
        nonlocal best
        score = _score(predictor, outputs, post)
        tried.append(
            {
                "threshold": post.threshold,
                "nms_threshold": post.nms_threshold,
                "flow_threshold": post.flow_threshold,
                "mean_score": score,
            }
        )
        if score > max((t["mean_score"] for t in tried[:-1]), default=-1.0):
            best = post

    attempt(predictor.post)  # first, so the given settings win every tie (an untrained model scores 0 everywhere)
    for threshold in THRESHOLDS:
        if threshold != predictor.post.threshold:
            attempt(dataclasses.replace(predictor.post, threshold=threshold))
    if predictor.target in SECOND:
        key, values = SECOND[predictor.target]
        for value in values:
            if value != getattr(best, key):
                change: dict[str, Any] = {key: value}  # a float field, or flow_threshold, which may be None
                attempt(dataclasses.replace(best, **change))
    return best, tried
