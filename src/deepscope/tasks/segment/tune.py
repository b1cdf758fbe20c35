"""Post-processing thresholds chosen on the validation images after training, as StarDist's ``optimize_thresholds``.

The network's output is predicted once per image; only the post-processing is repeated. The probability threshold
is searched first with the other setting at its default, then the second setting (the NMS overlap for stardist,
the flow-error threshold for flows) at the best threshold: a coordinate search of 6 + 2 settings instead of a grid of
18, which keeps the tuning to about a minute of CPU on 16 images. The objective is the mean matching score over IoU
0.5-0.9, the metric the run monitors.

Every validation also tunes the probability threshold (:func:`tuned_validation`), so that choosing the best epoch
never keeps an early one because the untuned threshold scores a later, better model at 0: a model whose
probabilities have not yet reached 0.5 (StarDist's object probabilities, early in a short budget) has no object
above it (benchmarks/RESULTS.md: stardist kept epoch 4 because from epoch 5 none passed 0.5). Only post-processing
repeats, on the network outputs computed once. Measured on DSB2018 images (about 114,000 pixels each, one CPU
thread): the U-Net (16 features) predicts an image in 0.3-0.6 s, and one post-processing with scoring costs 0.01-0.04 s
for the watershed, 0.04-0.09 s for stardist and 0.25-0.5 s for flows. Trying the 6 thresholds on every validation
image would add 5 post-processings per image, 2-3x the time of a flows validation. The threshold is therefore
tuned on at most ``VAL_TUNE_IMAGES`` images and the others are post-processed once, at the chosen threshold: with
the plan's at most 32 validation images, 40 post-processings more than 32. Measured through ``SegmentTask.evaluate``
on 32 DSB2018 validation images (untrained U-Net, one thread, a shared machine), a validation took 1.02-1.09x as long
with the tuning for foreground_boundaries, 1.02-1.07x for stardist and 1.19-1.33x for flows, and the plan counts it
(``validation_postprocessing``). Monitoring the validation loss instead would choose epochs by a number that is not
the score the run reports and predicts with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deepscope.data.segmentation.dataset import SegItem
from deepscope.engine.distributed import gather_objects
from deepscope.metrics.instance import image_scores, summarize
from deepscope.tasks.segment.config import PostConfig
from deepscope.tasks.segment.predict import Predictor, score_output

TUNE_IMAGES = 16  # validation images the thresholds are chosen on
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # low ones for maps that are not yet confident (short budgets)
VAL_TUNE_IMAGES = 8  # validation images (over all processes) the threshold is tuned on at every validation
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


def validation_thresholds(given: float) -> tuple[float, ...]:
    """The thresholds every validation tries: the given one first (it wins every tie), then ``THRESHOLDS``."""
    return (given, *(t for t in THRESHOLDS if t != given))


def validation_postprocessing(images: float, tune: bool) -> float:
    """Post-processings per validation image, on average over ``images``: one, plus at most one per other threshold
    on the ``VAL_TUNE_IMAGES`` the threshold is tuned on (the plan's estimate of a validation's cost)."""
    if not tune or images <= 0:
        return 1.0
    return 1.0 + min(1.0, VAL_TUNE_IMAGES / images) * len(THRESHOLDS)


def tuned_validation(
    predictor: Predictor, items: Iterable[SegItem], world: int = 1
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records of ``items`` (this process's validation images) at the probability threshold that scores best on
    the first ``VAL_TUNE_IMAGES`` of them (``world`` processes share them; their choice is one and the same), and
    that threshold with the score of each tried (``post_threshold``, ``post_threshold_scores``).

    Every image's network output is computed once; the tuning images are post-processed at every threshold of
    :func:`validation_thresholds`, the others once, at the chosen one. See the module's docstring for the cost.
    """
    items = list(items)
    grid = validation_thresholds(predictor.post.threshold)
    posts = [dataclasses.replace(predictor.post, threshold=t) for t in grid]
    share = math.ceil(VAL_TUNE_IMAGES / world)
    tuning: list[list[dict[str, Any]]] = []  # per image of this process's share: its record at every threshold
    for item in items[:share]:
        probs = predictor.probabilities(item.channels_first(predictor.channels))
        tuning.append([score_output(predictor, item, probs, None, None, post)[0] for post in posts])
    every = [image for part in gather_objects(tuning) for image in part]
    scores = [
        float(summarize([{k: v for k, v in image[i].items() if k != "confusion"} for image in every])["mean_score"])
        if every
        else 0.0
        for i in range(len(grid))
    ]
    best = int(np.argmax(scores))  # the first of equal scores: the given threshold, then the lower ones
    records = [image[best] for image in tuning]
    for item in items[share:]:
        probs = predictor.probabilities(item.channels_first(predictor.channels))
        records.append(score_output(predictor, item, probs, None, None, posts[best])[0])
    scored = {f"{t:g}": s for t, s in zip(grid, scores)}
    return records, {"post_threshold": float(grid[best]), "post_threshold_scores": scored}
