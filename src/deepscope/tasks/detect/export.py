"""A detection checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the detector up to its candidate
boxes (``models/detection/candidates.py``), for images resized as the detector resizes them, checked on a real image
of the run's data. Score threshold, NMS and the detection limit stay outside the file, as in ultralytics' exports;
``deepscope predict`` on the file applies them as the checkpoint does. The BioImage Model Zoo's format has no
convention for boxes, so no package is written."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from deepscope.config import to_dict
from deepscope.data.detection.annotations import load_detection_data
from deepscope.data.io.images import read_image
from deepscope.errors import DataError, DeepscopeError
from deepscope.export.exportable import EXAMPLE_SPLITS, Exportable
from deepscope.models.detection.candidates import ROW, candidates_of
from deepscope.tasks.detect.apply import load_detector
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.predict import image_tensor
from deepscope.tasks.detect.task import as_channels

# candidates scoring this much above the threshold must be found in both outputs (those nearer it may cross it)
SCORE_MARGIN = 1e-3
MATCH_CHUNK = 256  # candidates matched at once (their distances to every other candidate are held in memory)


def example_path(cfg: DetectConfig, checkpoint: str | Path) -> Path:
    """The first image of the run's data, test split first."""
    try:
        data = load_detection_data(cfg.data or None, cfg.images, cfg.annotations, cfg.class_names)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    split = next(data.splits[s] for s in EXAMPLE_SPLITS if data.splits.get(s))
    return split[0].path


def matched_difference(threshold: float) -> Any:
    """The difference of two candidate outputs (N, M, 6) as sets: every candidate scoring above ``threshold`` (plus
    a margin) in one output is matched with the nearest of the other's, by the largest difference of its box
    (relative to the largest coordinate), score and label. Sets, not rows: near-equal scores may sort in another order
    in another runtime."""

    def one_way(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
        sure = expected[expected[:, 4] > threshold + SCORE_MARGIN]
        near = got[got[:, 4] > threshold - SCORE_MARGIN]  # a sure row's twin scores about as much
        if not len(sure):
            return 0.0, 0.0
        if not len(near):
            return float("inf"), float("inf")
        scale = max(1.0, float(sure[:, :4].abs().max()))
        worst, relative = 0.0, 0.0
        for rows in sure.split(
            MATCH_CHUNK
        ):  # the pairs of a chunk at a time: thousands of candidates on crowded images
            gap = (rows[:, None] - near[None]).abs()
            distance = torch.maximum(gap[..., :4].amax(-1) / scale, gap[..., 4:].amax(-1))
            nearest = distance.argmin(1)
            worst = max(worst, float(gap[torch.arange(len(rows)), nearest].amax()))
            relative = max(relative, float(distance.amin(1).max()))
        return worst, relative

    def difference(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
        if got.shape[0] != expected.shape[0] or got.shape[-1] != ROW:
            return float("inf"), float("inf")
        pairs = [one_way(e, g) for e, g in zip(expected, got)] + [one_way(g, e) for e, g in zip(expected, got)]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)

    return difference


def exportable(checkpoint: str | Path, sample: str | None = None) -> Exportable:
    cpu = torch.device("cpu")
    detector, cfg, info = load_detector(checkpoint, cpu)
    model = detector.model.eval()  # the transform resizes to the prediction size only in eval mode
    try:
        candidates, finish = candidates_of(model)
    except ValueError as exc:
        raise DeepscopeError(f"{checkpoint}: a {cfg.model} detector cannot be exported ({exc})") from None
    path = Path(sample) if sample else example_path(cfg, checkpoint)
    image = image_tensor(as_channels(read_image(path), info["channels"], str(path)), cpu)
    resized = cast(GeneralizedRCNNTransform, model.transform).resize(image)[0]
    # two images of one size, unlike each other, so that a batch axis frozen by the trace is caught
    example = torch.stack([resized, resized.flip(-1)])
    state = {
        "config": to_dict(cfg),
        "task_state": {**info, "finish": asdict(finish), "min_side": candidates.min_side()},
    }
    size, longest = cfg.sizes()
    resize = (
        "at their own scale (native scale)"
        if not size
        else f"resized so that the shorter side is {size} pixels and the longer at most {longest}"
    )
    notes = [
        f"inputs: (N, {info['channels']}, H, W) images scaled to 0..1 (integers divided by their type's maximum), "
        f"{resize}, each side at least {candidates.min_side()}; normalised and padded inside",
        f"outputs: (N, M, 6) candidates x1 y1 x2 y2 score label in input pixels, label 1..{len(info['class_names'])} "
        f"for {info['class_names']}; each pyramid level's best first",
        f"finish them as deepscope does: score above {finish.score_threshold}, class-wise NMS at IoU "
        f"{finish.nms_iou}, the best {finish.max_detections}, then scale boxes back to the original image",
        "the BioImage Model Zoo's format has no convention for detections, so no package is written for detectors",
        f"example: {path}",
    ]
    return Exportable(
        "detect",
        candidates,
        example,
        (1, 1),
        state,
        str(checkpoint),
        notes,
        min_side=candidates.min_side(),
        difference=matched_difference(finish.score_threshold),
    )
