"""Self-configuring detection: the settings a user leaves open are planned from the data and the time budget.

The fingerprint reads what the annotation files already hold (every image's size, from its header, and every box),
so it costs no image decoding: image sides, object sides (square root of the box area) in pixels and relative to the
image, objects per image and classes. From it and the budget the plan chooses

* the scale: images resized so their longer side is a size (``image_size`` = ``max_size``, the best recipe of the
  Penn-Fudan benchmark: FCOS, tiny backbone, 320 px on a CPU), large enough that the small objects (p10) keep
  ``MIN_OBJECT_PX`` pixels, or native scale (``image_size`` 0) where that size would enlarge the typical image or
  pass what the device can train (small objects in large images: microscopy tiles);
* the detector: CenterNet (stride 4, one peak per object) for crowds of small objects, as DSB2018's nuclei, else FCOS;
* ``inference.max_detections`` above the most objects in a training image (COCO's 100 would cap recall);
* the validation share: 10% of the images, at least ``MIN_VAL_IMAGES`` and at most ``MAX_VAL_IMAGES``, none for a
  set too small to spare them, nor for a small set (``FEW_IMAGES_WITH_TEST``) whose own test split scores the run;
* the network: real training steps of each candidate are timed on the machine, and the largest one that still trains
  ``MIN_PASSES`` passes over the training set in the budget is taken. For FCOS the cheapest candidate is a
  YOLOv8n-sized network (CSP trunk, 64-channel pyramid P3-P5, two-conv head towers), then FCOS with its own head on
  ResNet-18 and ResNet-34; for the other detectors tiny, resnet18, resnet34;
* a larger size where the budget has passes to spare: the chosen network is timed at sizes ``SIZE_GROWTH`` px
  apart above the planned one (up to the median image's longer side), and the largest that still trains
  ``MIN_PASSES`` passes is taken (Penn-Fudan on a CPU: 416 px at 30 minutes, 320 px at 10);
* mosaics, with a last phase without them, for resized images: of what from-scratch YOLO training does, a
  change that measured better on Penn-Fudan (benchmarks/RESULTS.md, section detect_ablation; a moving average of the
  weights, the CIoU box loss and IoU-aware scores did not, and are left as options).

The engine then plans the epochs from the chosen model's measured steps (``engine/plan.py``). Each choice is recorded
with its reason in the task's :class:`~deepscope.engine.plan.Plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from deepscope.data.detection.types import DetItem
from deepscope.engine.plan import SETUP_SHARE, VALIDATION_SHARE, Budget, Plan
from deepscope.tasks.detect.config import DEFAULT_MAX_DETECTIONS, DetectConfig

SIZE_STEP = 32  # planned sizes are multiples of the detectors' largest stride
MIN_OBJECT_PX = 16  # the p10 object keeps at least this many pixels (its side) at the planned size
CPU_SIZE, CUDA_SIZE = 320, 512  # longer side planned on each device when objects allow it
CPU_MAX_SIZE, CUDA_MAX_SIZE = 640, 1024  # the largest resize planned; objects needing more keep their native scale
DENSE_OBJECTS = 50  # objects in the most crowded tenth of the images (p90) from which images count as crowded ...
SMALL_OBJECT_PX = 32  # ... when the median object is at most this side at the training scale: CenterNet then
DETECTION_MARGIN = 1.5  # max_detections: this times the most objects in a training image, rounded up to 50
VAL_SHARE = 0.1  # share of the training images validated each epoch ...
MIN_VAL_IMAGES, MAX_VAL_IMAGES = 3, 20  # ... at least and at most this many images (each is predicted every epoch)
MIN_IMAGES_FOR_VAL = 20  # fewer training images than this: no validation carved
# fewer training images than this, and the data has its own test split: no validation carved, the test split scores
# the last epoch (Penn-Fudan's 100 training images: a 10-image carve-out scores no better, and costs a tenth of them)
FEW_IMAGES_WITH_TEST = 200
BACKBONES = ("tiny", "resnet18", "resnet34")  # candidates, cheapest first ...
FCOS_BACKBONES = ("csp", "resnet18", "resnet34")  # ... and FCOS's
# what FCOS takes with the CSP trunk where the user left it open: YOLOv8n's neck and head sizes (64 channels, two
# convolutions per tower, strides 8-32), a third of the step time of FCOS's own head (128 channels, four, P3-P7)
LIGHT_HEAD = {"fpn_channels": 64, "head_convs": 2, "extra_p6p7": False}
DFL_BINS = 16  # FCOS's box sides as distributions over 0..15 strides (YOLOv8's reg_max)
MIN_PASSES = 200  # passes over the training set a larger candidate must still get in the budget to be chosen
MOSAIC, CLOSE_MOSAIC = 0.5, 0.2  # share of training images made mosaics; share of the steps, at the end, without
Candidate = TypeVar("Candidate", str, int)  # a backbone's name or an image size, timed by the plan
SIZE_GROWTH = 96  # a budget with passes to spare tries sizes this much larger than the planned one (3 x stride 32)


def _percentiles(values: np.ndarray) -> tuple[float, float, float]:
    if not values.size:
        return (0.0, 0.0, 0.0)
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return (float(p10), float(p50), float(p90))


def _round_up(value: float, step: int = SIZE_STEP) -> int:
    return int(math.ceil(value / step) * step)


@dataclass
class DetFingerprint:
    """What the plan needs to know of the training images and their boxes."""

    images: int
    classes: int
    short: tuple[float, float, float]  # image shorter side p10/p50/p90, pixels
    long: tuple[float, float, float]  # image longer side p10/p50/p90, pixels
    sides: tuple[float, float, float]  # object side (sqrt of the box area) p10/p50/p90, pixels
    relative: tuple[float, float, float]  # object side / its image's longer side, p10/p50/p90
    objects: tuple[float, float, float]  # objects per image p10/p50/p90
    objects_mean: float
    objects_max: int
    largest_side: int  # the longest image side of the set
    aspect: float  # median ratio of an image's longer to its shorter side
    # per object: its side and its image's shorter and longer sides (for the object sizes at a planned scale)
    object_sides: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    object_shorts: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    object_longs: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def sides_at(self, image_size: int, max_size: int) -> np.ndarray:
        """Object sides in pixels as the detector sees them: each image's shorter side scaled to ``image_size``,
        its longer side capped at ``max_size`` (torchvision's resize); unchanged at native scale (0)."""
        if not image_size:
            return self.object_sides
        scale = np.minimum(image_size / self.object_shorts, max_size / self.object_longs)
        return self.object_sides * scale

    def describe(self) -> str:
        s, lg, sd, rel, obj = self.short, self.long, self.sides, self.relative, self.objects
        return (
            f"data: {self.images} training images, {self.classes} class(es); image sides p10/p50/p90 "
            f"{s[0]:.0f}/{s[1]:.0f}/{s[2]:.0f} px (shorter), {lg[0]:.0f}/{lg[1]:.0f}/{lg[2]:.0f} px (longer); "
            f"object side (sqrt of box area) p10/p50/p90 {sd[0]:.0f}/{sd[1]:.0f}/{sd[2]:.0f} px, "
            f"{rel[0]:.1%}/{rel[1]:.1%}/{rel[2]:.1%} of the image's longer side; objects per image mean "
            f"{self.objects_mean:.1f}, p10/p50/p90 {obj[0]:.0f}/{obj[1]:.0f}/{obj[2]:.0f}, most {self.objects_max}"
        )

    def values(self) -> dict[str, Any]:
        """The fingerprint as JSON-able values (for ``Plan.observe``)."""
        return {
            "images": self.images,
            "classes": self.classes,
            "image_short_px": [round(v, 1) for v in self.short],
            "image_long_px": [round(v, 1) for v in self.long],
            "object_side_px": [round(v, 1) for v in self.sides],
            "object_side_relative": [round(v, 4) for v in self.relative],
            "objects_per_image": [round(v, 1) for v in self.objects],
            "objects_per_image_mean": round(self.objects_mean, 2),
            "objects_per_image_max": self.objects_max,
        }


def fingerprint(items: Sequence[DetItem], classes: int) -> DetFingerprint:
    """The fingerprint of ``items`` from their sizes and boxes alone (read from the annotation files and the image
    headers; no image is decoded). Crowd/difficult boxes, which are not trained, are not counted."""
    shorts = np.array([min(item.width, item.height) for item in items], np.float64)
    longs = np.array([max(item.width, item.height) for item in items], np.float64)
    sides, counts, object_shorts, object_longs = [], [], [], []
    for item, short, long in zip(items, shorts, longs):
        boxes = np.asarray(item.boxes, np.float64)[~np.asarray(item.crowd, bool)]
        side = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
        sides.append(side)
        counts.append(len(side))
        object_shorts.append(np.full(len(side), short))
        object_longs.append(np.full(len(side), long))
    every = np.concatenate(sides) if sides else np.zeros(0)
    per_long = np.concatenate(object_longs) if object_longs else np.zeros(0)
    count = np.asarray(counts, np.float64)
    return DetFingerprint(
        images=len(items),
        classes=classes,
        short=_percentiles(shorts),
        long=_percentiles(longs),
        sides=_percentiles(every),
        relative=_percentiles(every / per_long if every.size else every),
        objects=_percentiles(count),
        objects_mean=float(count.mean()) if count.size else 0.0,
        objects_max=int(count.max()) if count.size else 0,
        largest_side=int(longs.max()) if longs.size else 0,
        aspect=float(np.median(longs / np.maximum(shorts, 1))) if longs.size else 1.0,
        object_sides=every,
        object_shorts=np.concatenate(object_shorts) if object_shorts else np.zeros(0),
        object_longs=per_long,
    )


def no_validation_reason(fp: DetFingerprint, test: int) -> str | None:
    """Why no validation is carved from the training images (``test``: images of the data's own test split), or
    None where it is."""
    if fp.images < MIN_IMAGES_FOR_VAL:
        after = (
            f"the test split ({test} images) scores them at the end"
            if test
            else "no score is computed (give a val/ or test/ split to have one)"
        )
        return (
            f"only {fp.images} training images, fewer than {MIN_IMAGES_FOR_VAL}: {MIN_VAL_IMAGES} validation images "
            f"would be too few to tell epochs apart and too many to take from training, so all {fp.images} are "
            f"trained on, without validation; best.pt holds the last epoch's weights and {after}"
        )
    if test and fp.images < FEW_IMAGES_WITH_TEST:
        return (
            f"{fp.images} training images, fewer than {FEW_IMAGES_WITH_TEST}, and the data has its own test split "
            f"({test} images): a validation of a few images cannot tell late epochs apart, and the planned "
            "schedule ends at learning rate 0, so the last epoch is the one to keep (on Penn-Fudan, CPU, FCOS "
            "with a 10-image carve-out scored 0.551 and 0.637 mAP at 10 and 30 min, without it 0.551 and "
            "0.639-0.682); so all are trained on, without validation: best.pt holds the last epoch's weights "
            "and the test split scores them at the end (--set val_fraction=0.1 validates each epoch)"
        )
    return None


def plan_validation(cfg: DetectConfig, fp: DetFingerprint, plan: Plan, given_val: int, test: int) -> None:
    """The share of the training images carved for validation (``given_val``: images of the data's own val split,
    ``test``: of its test split)."""
    if cfg.val_fraction is not None:
        return
    if given_val:
        plan.choose("val_fraction", 0.0, f"the data has its own val split ({given_val} images): nothing is carved")
        return
    why = no_validation_reason(fp, test)
    if why is not None:
        plan.choose("val_fraction", 0.0, why, shown="0 (no validation)")
        return
    count = int(np.clip(round(VAL_SHARE * fp.images), MIN_VAL_IMAGES, MAX_VAL_IMAGES))
    plan.choose(
        "val_fraction",
        count / fp.images,
        f"{count} of the {fp.images} training images validated each epoch ({VAL_SHARE:.0%}, at least "
        f"{MIN_VAL_IMAGES} and at most {MAX_VAL_IMAGES}: each is predicted whole every epoch)",
        shown=f"{count / fp.images:.4g} ({count} images)",
    )


def plan_scale(cfg: DetectConfig, fp: DetFingerprint, device: str, plan: Plan) -> tuple[int, int]:
    """``image_size`` and ``max_size``: the longer side scaled to a planned size, or native scale."""
    image_size, max_size = cfg.image_size, cfg.max_size
    if image_size is None:
        base, cap = (CUDA_SIZE, CUDA_MAX_SIZE) if device == "cuda" else (CPU_SIZE, CPU_MAX_SIZE)
        rel10, long50 = fp.relative[0], fp.long[1]
        need = _round_up(MIN_OBJECT_PX / rel10) if rel10 > 0 else base
        size = max(base, need) if max_size is None else min(max(base, need), max_size)
        if size >= long50:
            image_size = 0
            why = (
                f"the median image is {long50:.0f} px on its longer side, no larger than the {size} px a resize "
                f"would take (where the p10 object, {rel10:.1%} of the longer side, keeps {MIN_OBJECT_PX} px): "
                f"images are used as they are, objects at their pixel size ({fp.sides[0]:.0f}/{fp.sides[1]:.0f} "
                f"px p10/p50)"
            )
        elif need > cap:
            image_size = 0
            why = (
                f"small objects in large images: the p10 object is {rel10:.1%} of the image's longer side, "
                f"{MIN_OBJECT_PX} px only at {need} px, beyond the {cap} px planned on a {device}; images keep "
                f"their native scale (objects {fp.sides[0]:.0f}/{fp.sides[1]:.0f} px p10/p50) and large images "
                f"can be predicted in tiles (--tile)"
            )
        else:
            image_size = size
            why = (
                f"images resized so their longer side is {size} px (the median image is {long50:.0f} px): the "
                f"p10 object, {rel10:.1%} of the longer side, keeps {rel10 * size:.0f} px (at least "
                f"{MIN_OBJECT_PX}); {base} px is the {device} size (Penn-Fudan from scratch on 2 CPU cores: FCOS "
                f"tiny at 320 px, 0.355 mAP in 10 min, against 0.155 at 512 px in 30 min)"
            )
        plan.choose("image_size", image_size, why, shown="0 (native scale)" if image_size == 0 else None)
    if max_size is None:
        if image_size == 0:
            max_size = max(SIZE_STEP, _round_up(fp.largest_side))
            why = f"unused at native scale (no resizing); the longest image side, {fp.largest_side} px"
        elif cfg.image_size is None:
            max_size = image_size
            why = "equal to image_size: the longer side of every image is scaled to it"
        else:
            max_size = max(image_size, _round_up(image_size * fp.aspect))
            why = f"the given shorter side {image_size} px times the median aspect ratio {fp.aspect:.2f}"
        plan.choose("max_size", max_size, why)
    return image_size, max_size


def plan_detector(cfg: DetectConfig, fp: DetFingerprint, image_size: int, max_size: int, plan: Plan) -> str:
    """The detector: CenterNet for crowds of small objects, FCOS otherwise."""
    if cfg.model:
        return cfg.model
    at_scale = fp.sides_at(image_size, max_size)
    median = float(np.median(at_scale)) if at_scale.size else 0.0
    crowded = fp.objects[2] >= DENSE_OBJECTS
    if crowded and median <= SMALL_OBJECT_PX:
        model = "centernet"
        why = (
            f"crowds of small objects: the most crowded tenth of the images hold {fp.objects[2]:.0f}+ objects "
            f"(most {fp.objects_max}), the median object is {median:.0f} px at the training scale; CenterNet finds "
            f"one peak per object on a stride-4 map (DSB2018 nuclei as detection, CPU: 0.145 mAP in 10 min)"
        )
    else:
        model = "fcos"
        why = (
            f"{fp.objects[2]:.0f} objects in the most crowded tenth of the images (crowded from {DENSE_OBJECTS}), "
            f"median object {median:.0f} px at the training scale: FCOS, the best from scratch on Penn-Fudan "
            f"(0.355 mAP against CenterNet's 0.227 in 10 min on a CPU)"
        )
    plan.choose("model", model, why)
    return model


def plan_box_sides(cfg: DetectConfig, model: str, plan: Plan) -> None:
    """FCOS's box sides as distributions (``model_args.dfl_bins``), where left open."""
    if model != "fcos" or "dfl_bins" in cfg.model_args:
        return
    why = (
        f"each box side a distribution over {DFL_BINS} distances (0-{DFL_BINS - 1} strides) trained by the "
        "distribution focal loss, as GFL and YOLOv8 regress boxes: on Penn-Fudan (CPU, 10 min) box mAP 0.642 against "
        "0.543 and mAP@0.75 0.801 against 0.624 with one number per side (benchmarks/RESULTS.md, detect_ablation)"
    )
    plan.choose("model_args.dfl_bins", DFL_BINS, why)


def plan_detections(cfg: DetectConfig, fp: DetFingerprint, plan: Plan) -> None:
    """``inference.max_detections``: above the most objects in a training image, at least COCO's 100."""
    if cfg.inference.max_detections is not None:
        return
    wanted = _round_up(DETECTION_MARGIN * fp.objects_max, 50)
    limit = max(DEFAULT_MAX_DETECTIONS, wanted)
    why = (
        f"the most objects in a training image is {fp.objects_max}; {DETECTION_MARGIN:g}x that, rounded up to 50, "
        f"is {wanted}"
    )
    why += f", below COCO's {DEFAULT_MAX_DETECTIONS}, which is kept" if limit == DEFAULT_MAX_DETECTIONS else ""
    plan.choose("inference.max_detections", limit, why)


def plan_mosaic(cfg: DetectConfig, image_size: int, plan: Plan) -> None:
    """``augment.mosaic`` and ``augment.close_mosaic``: mosaics for resized images, not at native scale."""
    if cfg.augment.mosaic is None:
        if image_size:
            plan.choose(
                "augment.mosaic",
                MOSAIC,
                f"{MOSAIC:.0%} of the training images replaced by a 2x2 mosaic of four, so each step sees more "
                f"objects, scales, cut objects and backgrounds (YOLO's mosaic): on Penn-Fudan (CPU, 10 min) box mAP "
                f"0.440 against 0.371 without (benchmarks/RESULTS.md, detect_ablation)",
            )
        else:
            plan.choose(
                "augment.mosaic",
                0.0,
                "none at native scale: a mosaic rescales its four images to fit its quadrants, so objects would "
                "leave the pixel size they are predicted at",
            )
    if cfg.augment.close_mosaic is None and plan.settings.get("augment.mosaic", cfg.augment.mosaic):
        plan.choose(
            "augment.close_mosaic",
            CLOSE_MOSAIC,
            f"the last {CLOSE_MOSAIC:.0%} of the steps without mosaics, on whole images as they are predicted (YOLO's "
            f"close_mosaic)",
        )


def plan_data(cfg: DetectConfig, fp: DetFingerprint, device: str, plan: Plan, given_val: int, test: int) -> None:
    """Every open setting that the data alone decides: validation share, scale, detector and its box regression,
    mosaics, detection limit."""
    plan.observe(fp.describe(), **fp.values())
    plan_validation(cfg, fp, plan, given_val, test)
    image_size, max_size = plan_scale(cfg, fp, device, plan)
    plan_box_sides(cfg, plan_detector(cfg, fp, image_size, max_size, plan), plan)
    plan_mosaic(cfg, image_size, plan)
    plan_detections(cfg, fp, plan)


def candidate_args(cfg: DetectConfig, name: str) -> dict[str, Any]:
    """The ``model_args`` a backbone candidate is timed and trained with: the backbone, and for FCOS on the CSP trunk
    the light head's settings the user left open."""
    args: dict[str, Any] = {"backbone": name}
    if cfg.model == "fcos" and name == "csp":
        args.update({key: value for key, value in LIGHT_HEAD.items() if key not in cfg.model_args})
    return args


def passes_in(budget: Budget, spent: float, pass_steps: int, validation: bool, step_s: float) -> float:
    """Passes over the training set (``pass_steps`` steps of ``step_s`` seconds each) in what is left of ``budget``
    after ``spent`` seconds, less the engine's set-up share and the validations' share."""
    train_s = max(budget.seconds - spent, 0.0) * SETUP_SHARE * ((1 - VALIDATION_SHARE) if validation else 1.0)
    return train_s / (pass_steps * step_s)


def timed_until_short(
    candidates: Iterable[Candidate], timer: Callable[[Candidate], float], passes: Callable[[float], float]
) -> list[tuple[Candidate, float, float]]:
    """``(candidate, seconds per step, passes in the budget)`` of each candidate, cheapest first, up to and with the
    first that falls short of ``MIN_PASSES`` (``passes(step_s)``): the ones after it are slower still, so untimed."""
    timed = []
    for candidate in candidates:
        step_s = timer(candidate)
        timed.append((candidate, step_s, passes(step_s)))
        if timed[-1][2] < MIN_PASSES:
            break
    return timed


def plan_backbone(
    cfg: DetectConfig,
    plan: Plan,
    budget: Budget,
    spent: Callable[[], float],
    pass_steps: int,
    validation: bool,
    timer: Callable[[str], float],
    where: str,
) -> str | None:
    """The backbone: candidates timed cheapest first (``timer(name)``: measured seconds per training step of the
    detector with :func:`candidate_args`); the largest that still gets ``MIN_PASSES`` passes of ``pass_steps`` steps
    over the training set in what is left of ``budget`` (``spent()``: seconds used so far), the cheapest when none
    does, with the head settings that go with it. None when the user gave one."""
    if "backbone" in cfg.model_args:
        return None
    timed = timed_until_short(
        FCOS_BACKBONES if cfg.model == "fcos" else BACKBONES,
        timer,
        lambda step_s: passes_in(budget, spent(), pass_steps, validation, step_s),
    )
    fits = [t for t in timed if t[2] >= MIN_PASSES]
    name = (fits[-1] if fits else timed[0])[0]
    measured = ", ".join(f"{n} {s:.3f} s/step ({p:.{0 if p >= 10 else 1}f} passes)" for n, s, p in timed)
    if fits:
        why = f"the largest backbone that trains {MIN_PASSES}+ passes over the training set ({pass_steps} steps)"
    else:
        why = f"the cheapest backbone: none gets {MIN_PASSES} passes over the training set ({pass_steps} steps)"
    plan.choose(
        "model_args.backbone",
        name,
        f"{why} in the {budget.describe()} on {where}; measured: {measured}. From scratch, passes count more than "
        f"width: on Penn-Fudan (CPU, 10 min) FCOS on the CSP trunk with a light head reached 0.543 mAP in 67 passes, "
        f"on ResNet-18 0.440 in 30 (benchmarks/RESULTS.md, detect_ablation), and YOLOv8n rose from 0.551 at 114 "
        f"passes to 0.666 at 343",
    )
    for key, value in candidate_args(cfg, name).items():
        if key != "backbone":
            plan.choose(
                f"model_args.{key}",
                value,
                "FCOS on the CSP trunk takes YOLOv8n's neck and head sizes: a 64-channel pyramid at strides 8-32 and "
                "two 3x3 convolutions per head tower",
            )
    return name


def larger_sizes(image_size: int, fp: DetFingerprint, device: str) -> list[int]:
    """Sizes above the planned ``image_size``, ``SIZE_GROWTH`` apart, up to the median image's longer side (a
    budget never buys enlarging the typical image) and the device's largest resize."""
    cap = min(fp.long[1], CUDA_MAX_SIZE if device == "cuda" else CPU_MAX_SIZE)
    return list(range(image_size + SIZE_GROWTH, int(cap) + 1, SIZE_GROWTH))


def plan_budget_size(
    cfg: DetectConfig,
    plan: Plan,
    fp: DetFingerprint,
    device: str,
    budget: Budget,
    spent: Callable[[], float],
    pass_steps: int,
    validation: bool,
    timer: Callable[[int], float],
) -> None:
    """A larger ``image_size`` (and ``max_size``) where the budget buys more than ``MIN_PASSES`` passes with the
    planned network: each larger size (:func:`larger_sizes`) is timed (``timer(size)``: measured seconds per
    training step at that size) and the largest that still trains ``MIN_PASSES`` passes is taken, the planned size
    when none does. Only a size the plan chose by resizing is grown; a given size and native scale stay."""
    planned = plan.settings.get("image_size")
    if not planned or cfg.image_size != planned or plan.settings.get("max_size") != planned:
        return
    counted = timed_until_short(
        [planned, *larger_sizes(planned, fp, device)],
        timer,
        lambda step_s: passes_in(budget, spent(), pass_steps, validation, step_s),
    )
    size = max((size for size, _, passes in counted if passes >= MIN_PASSES), default=planned)
    if size == planned:
        return
    measured = ", ".join(f"{n} px {s:.3f} s/step ({p:.0f} passes)" for n, s, p in counted)
    plan.revise(
        "image_size",
        size,
        f"images resized so their longer side is {size} px, more than the {planned} px planned from the objects: "
        f"the largest size (up to the median image's {fp.long[1]:.0f} px) at which the network still trains "
        f"{MIN_PASSES}+ passes over the training set ({pass_steps} steps) in the {budget.describe()}; measured: "
        f"{measured}. Once the passes are there, pixels pay: on Penn-Fudan (CPU, 30 min) FCOS at 416 px scored "
        f"0.692 box mAP (mAP@0.75 0.816) against 0.665 (0.775) at 320 px, both predicted at NMS IoU 0.7 "
        f"(benchmarks/RESULTS.md, detect_ablation; one run each, and runs of one command spread by up to 0.05)",
    )
    plan.revise("max_size", size, "equal to image_size: the longer side of every image is scaled to it")
