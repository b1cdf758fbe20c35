"""Object detection: boxes (and masks) from VOC, COCO, YOLO or instance-label files, detectors trained from scratch
or from a local file, COCO mAP on whole images.

Training images are decoded once into memory and augmented on the training device with their boxes; every detector
resizes, normalises and pads its batch itself (torchvision's transform), drawing the shorter side from
``config.train_sizes()`` for multi-scale training. Validation and test images are predicted whole (or tile by tile
when ``inference.tile`` is set) and scored with the COCO metric.

Settings left open (the detector, its backbone, the image size, the detection limit, the validation share) are
planned in :meth:`DetectTask.setup` from the boxes and image sizes and from training steps timed on the machine
(``plan.py``); the engine then plans the epochs for the time budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.data.detection.annotations import load_detection_data
from deepscope.data.detection.batches import DetBatches, DetSample
from deepscope.data.detection.types import DetData, DetItem
from deepscope.data.io.images import probe_image, read_image
from deepscope.data.io.splits import split_validation
from deepscope.engine.checkpoint import random_state_kept
from deepscope.engine.distributed import DistInfo, gather_objects
from deepscope.engine.plan import budget_of
from deepscope.engine.precision import Precision, resolve_precision
from deepscope.engine.probe import agreed_seconds_per_step
from deepscope.engine.task import ItemShard, Task
from deepscope.errors import DataError
from deepscope.metrics.detection import DetectionScorer
from deepscope.models.detection import build_detector, finishing_args, predicts_masks
from deepscope.tasks.detect.config import DetectConfig
from deepscope.tasks.detect.plan import (
    DetFingerprint,
    candidate_args,
    fingerprint,
    plan_backbone,
    plan_budget_size,
    plan_data,
)
from deepscope.tasks.detect.predict import Detector
from deepscope.tasks.detect.report import detect_report_sections, draw_worst

PICTURES = 8  # test images drawn in the report
TIMED_STEPS = 5  # training steps run per backbone candidate when planning (the first is warm-up)


def as_channels(image: np.ndarray, channels: int, name: str) -> np.ndarray:
    """(H, W, C) image with ``channels`` channels: grey images are repeated to RGB when the data set mixes both."""
    if image.shape[2] == channels:
        return image
    if image.shape[2] == 1:
        return np.repeat(image, channels, axis=2)
    raise DataError(f"{name}: has {image.shape[2]} channels but the model takes {channels}")


def detector_args(config: DetectConfig) -> dict[str, Any]:
    """``model_args`` with the sizes, the detection limit and the thresholds the task sets (the limit is
    ``inference.max_detections``, so that prediction and the metric agree; the model's own score threshold and NMS
    are the inference settings'); a ``model_args`` value of its own wins for the model."""
    return {
        **finishing_args(config.model, config.inference.score_threshold, config.inference.nms_iou),
        "min_size": config.train_sizes(),
        "max_size": config.sizes()[1],
        "max_detections": config.detection_limit(),
        **config.model_args,
    }


def truth_of(item: DetItem, masks: bool) -> dict[str, np.ndarray]:
    """The metric's ground truth of one image (crowd/difficult objects flagged, masks when the model predicts them)."""
    truth = {"boxes": item.boxes, "labels": item.labels, "iscrowd": item.crowd}
    if item.area is not None:
        truth["area"] = item.area
    if masks:
        truth["masks"] = (
            item.masks() if item.masks is not None else np.zeros((len(item.boxes), item.height, item.width), bool)
        )
    return truth


def load_split(data: DetData, split: str) -> list[DetItem]:
    items = data.splits.get(split, data.splits.get("all") if split == "test" and len(data.splits) == 1 else None)
    if items is None:
        raise DataError(f"the data has no {split} split (found {', '.join(sorted(data.splits))})")
    return items


def score_items(
    detector: Detector,
    items: Sequence[DetItem],
    channels: int,
    class_names: list[str],
    max_detections: int,
    masks: bool,
    curves: bool = False,
) -> tuple[dict[str, Any], list[tuple[DetItem, dict[str, np.ndarray]]]]:
    """COCO metrics of ``items`` (gathered over processes; with ``curves`` also precision-recall curves and the best-F1
    score thresholds) and this process's (item, prediction) pairs."""
    pairs = [(item, detector(as_channels(read_image(item.path), channels, item.name))) for item in items]
    records = [(pred, truth_of(item, masks)) for item, pred in pairs]
    scorer = DetectionScorer(class_names, max_detections=max_detections, masks=masks)
    for part in gather_objects(records):
        for pred, truth in part:
            scorer.update([pred], [truth])
    return scorer.compute(curves=curves), pairs


class DetectTask(Task):
    name = "detect"
    config: DetectConfig
    find_unused_parameters = True  # pyramid levels a head does not read, mask heads on batches without positives

    default_budget_minutes = 30.0

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        """Read the data, plan what the settings leave open (``plan.py``: from the boxes and image sizes, then the
        backbone from timed steps), and carve the validation images."""
        cfg = self.config
        started = time.time()
        self.device, self.dist = device, dist
        data = load_detection_data(cfg.data or None, cfg.images, cfg.annotations, cfg.class_names)
        splits = dict(data.splits)
        if "all" in splits:
            splits["train"] = splits.pop("all")
        if "train" not in splits or not splits["train"]:
            raise DataError(f"{cfg.data or cfg.images}: no training images")
        found = fingerprint(splits["train"], len(data.class_names))
        plan_data(cfg, found, device.type, self.plan, len(splits.get("val", [])), len(splits.get("test", [])))
        self.plan.apply(cfg)
        if "val" not in splits:
            assert cfg.val_fraction is not None  # planned above when open
            splits["train"], val = split_validation(splits["train"], cfg.val_fraction, cfg.seed)
            if val:
                splits["val"] = val
        self.splits, self.class_names = splits, data.class_names
        self.masks = predicts_masks(cfg.model)
        if self.masks and not all(item.has_masks for item in splits["train"]):
            raise DataError(
                f"model {cfg.model!r} learns masks, but the annotations give boxes only; use masks/ label images or COCO segmentations"
            )
        self.channels = max(probe_image(item.path)[2] for items in splits.values() for item in items)
        if "backbone" not in cfg.model_args or self.plan.settings.get("image_size"):
            self._plan_network(found, started)

    def _plan_network(self, found: DetFingerprint, started: float) -> None:
        """Time real training steps on a few training images in the run's precision: each backbone candidate at the
        planned size, keeping the one the budget affords (``plan.plan_backbone``), then that network at larger sizes
        (``plan.plan_budget_size``). The random state is restored afterwards, so the run's weights and batches are as
        if nothing had been timed."""
        cfg = self.config
        budget = budget_of(cfg, self.default_budget_minutes)
        precision = resolve_precision(cfg.amp, self.device)
        batch = max(1, cfg.batch_size // self.dist.world)
        train = self.splits["train"]
        order = np.random.default_rng(cfg.seed).choice(
            len(train), TIMED_STEPS * batch, replace=len(train) < TIMED_STEPS * batch
        )
        samples = self._samples([train[i] for i in order])
        pass_steps = max(1, -(-len(train) // cfg.batch_size))
        spent, validation = (lambda: time.time() - started), "val" in self.splits
        timings: dict[tuple[str, int], float] = {}

        def timed(backbone: str, size: int) -> float:
            if (backbone, size) not in timings:
                timings[backbone, size] = self._time_steps(backbone, size, samples, batch, precision)
            return timings[backbone, size]

        with random_state_kept():
            where = f"{self.device} in {precision.name}"
            size = cfg.image_size
            assert size is not None  # planned by plan_data when open
            plan_backbone(cfg, self.plan, budget, spent, pass_steps, validation, lambda n: timed(n, size), where)
            self.plan.apply(cfg)
            backbone = cfg.model_args["backbone"]
            timer = partial(timed, backbone)
            plan_budget_size(cfg, self.plan, found, self.device.type, budget, spent, pass_steps, validation, timer)
        self.plan.apply(cfg)

    def _time_steps(
        self, backbone: str, size: int, samples: list[DetSample], batch: int, precision: Precision
    ) -> float:
        """Seconds per training step of the planned detector with ``backbone`` on images resized to ``size`` (the
        slowest process's, so that every process plans the same)."""
        cfg = self.config
        at_size = dataclasses.replace(cfg, image_size=size, max_size=size) if size != cfg.image_size else cfg
        args = {**detector_args(at_size), **candidate_args(cfg, backbone)}
        model = build_detector(cfg.model, len(self.class_names), self.channels, **args).to(self.device)
        batches = DetBatches(samples, batch, self.device, seed=cfg.seed, augment=cfg.augment)
        return agreed_seconds_per_step(model, itertools.islice(batches, TIMED_STEPS), self.loss, precision, self.device)

    def build_model(self) -> nn.Module:
        cfg = self.config
        return build_detector(cfg.model, len(self.class_names), self.channels, **detector_args(cfg))

    def _samples(self, items: Sequence[DetItem]) -> list[DetSample]:
        """Decoded images and their training targets. Crowd/difficult objects are left out of training: the metric
        counts them neither as hits nor as misses, and torchvision's detectors have no way to ignore a region."""
        samples = []
        for item in items:
            keep = ~item.crowd
            target = {"boxes": item.boxes[keep], "labels": item.labels[keep]}
            masks = (lambda item=item, keep=keep: item.masks()[keep]) if self.masks else None
            samples.append(DetSample(as_channels(read_image(item.path), self.channels, item.name), target, masks))
        return samples

    def train_batches(self) -> DetBatches:
        cfg, world = self.config, self.dist.world
        if cfg.batch_size % world:
            raise DataError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
        self.train = DetBatches(
            self._samples(self.splits["train"]),
            cfg.batch_size // world,
            self.device,
            self.dist.rank,
            world,
            cfg.seed,
            cfg.augment,
        )
        return self.train

    def schedule(self, total_steps: int) -> None:
        self.train.close_mosaic(total_steps)

    def val_batches(self) -> ItemShard | None:
        return ItemShard(self.splits["val"], self.dist.rank, self.dist.world) if "val" in self.splits else None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, targets = batch
        losses = model(images, targets)
        return sum(losses.values())

    def detector(self, model: nn.Module) -> Detector:
        return Detector(
            model, self.config.inference, self.device, masks=self.masks, batch_size=self.config.eval_batch_size
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        metrics, _ = score_items(
            self.detector(model),
            list(batches),
            self.channels,
            self.class_names,
            self.config.detection_limit(),
            self.masks,
        )
        return metrics

    def inference_state(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "channels": self.channels, "masks": self.masks}

    def display_images(self, batch: Any) -> torch.Tensor:
        images = [image[:3] if image.shape[0] >= 3 else image[:1] for image in batch[0][:4]]
        size = min(min(i.shape[-2] for i in images), 256), min(min(i.shape[-1] for i in images), 256)
        return (
            torch.stack([i[:, : size[0], : size[1]].float() for i in images]).clamp(0, 1)
            if len({i.shape[0] for i in images}) == 1
            else torch.empty(0)
        )

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        shown = "test" if "test" in self.splits else "val" if "val" in self.splits else None
        if shown is None:
            return {}
        items = ItemShard(self.splits[shown], self.dist.rank, self.dist.world)
        with torch.no_grad():
            metrics, pairs = score_items(
                self.detector(model),
                list(items),
                self.channels,
                self.class_names,
                self.config.detection_limit(),
                self.masks,
                curves=True,
            )
        result: dict[str, Any] = {"shown_split": shown}
        if shown == "test":
            result["test"] = metrics
            result.update({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
        result["final_metrics"] = metrics
        if self.dist.is_main:
            draw_worst(pairs, self.class_names, metrics, run_dir / "detections.png", PICTURES)
        return result

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        from deepscope.engine.report import write_report

        split = "test" if metrics.get("test") else "validation"
        sections = detect_report_sections(
            metrics.get("final_metrics") or metrics.get("val") or {}, split, self.class_names, run_dir
        )
        write_report(
            run_dir,
            f"deepscope detect: {self.config.model} on {self.config.data or self.config.images}",
            metrics,
            history,
            sections,
        )
