"""Self-configuring defaults: the settings a user leaves open are planned from the data and the time budget.

As nnU-Net plans from a data fingerprint, the plan reads the training images (count, sizes, channels, appearance
groups) and labels (object diameters), and the budget (``--max-minutes``, the device and the precision the hardware
runs), then chooses the target, the patch shape, the U-Net's width and depth, the batch size, the validation share,
inversion, group balancing and augmentation, and for instance targets the schedule: epochs (validations) and steps
per epoch. Unlike nnU-Net, whose schedule is a fixed 1000 epochs, the number of steps is measured: a few real
training steps are timed on the machine, and the engine's :func:`~deepscope.engine.plan.fit_schedule` fits the
schedule into the budget, so the cosine schedule ends when the budget does instead of being cut at its peak (the
semantic target leaves its schedule to the engine's planner). Only settings left at None are planned; every choice is
written with its reason into the task's :class:`~deepscope.engine.plan.Plan`, which the engine puts in the run log,
config.yaml, metrics.json and the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepscope.data.segmentation.augment import SegAugmentConfig
from deepscope.data.segmentation.dataset import SegItem
from deepscope.engine.plan import SETUP_SHARE, VALIDATION_SHARE, Budget, Plan, fit_schedule
from deepscope.tasks.segment.config import DEFAULT_PATCH, VECTOR_TARGETS, SegmentConfig
from deepscope.tasks.segment.tune import validation_postprocessing

FINGERPRINT_IMAGES = 64  # label images read for object sizes
VAL_IMAGES = 32  # the most validation images carved from the training set (each is predicted every epoch)
SECONDS_PER_VALIDATION = 150  # about one validation per this much training
# rough seconds to turn one pixel of network output into instances and score them, measured on DSB2018 images with
# one CPU thread (flows 0.3-0.5 s, stardist 0.05-0.09 s, the watershed 0.01-0.04 s per 114,000-pixel image) and
# rounded up; flows and stardist run on the device, so a GPU is faster
POSTPROCESS_S_PER_PIXEL = {"flows": 4e-6, "stardist": 1e-6}
WATERSHED_S_PER_PIXEL = 4e-7
TARGET_REASON = (
    "on DSB2018 nuclei flows beat boundaries at 20 and 60 CPU-minutes (score@0.5 0.492 vs 0.310 and 0.583 vs 0.386, "
    "benchmarks/RESULTS.md), and follow objects of any shape"
)


@dataclass
class Fingerprint:
    """What the plan needs to know of the training data."""

    images: int
    ndim: int
    channels: int
    smallest: tuple[int, ...]  # smallest extent of the images per axis
    diameters: tuple[float, float, float]  # 10th, 50th, 90th percentile of the objects' equivalent diameters (pixels)
    objects_per_image: float
    groups: dict[str, int] = field(default_factory=dict)  # appearance group -> images

    def describe(self) -> str:
        p10, p50, p90 = self.diameters
        groups = ", ".join(f"{k} {v}" for k, v in sorted(self.groups.items())) or "one group"
        return (
            f"{self.images} training images, {self.ndim}D, {self.channels} channel(s), smallest {'x'.join(map(str, self.smallest))}; "
            f"object diameter p10/p50/p90 {p10:.0f}/{p50:.0f}/{p90:.0f} px, {self.objects_per_image:.0f} objects per image; "
            f"appearance: {groups}"
        )


def object_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent diameters (of a disc or ball of the same area or volume) of every object in a label image."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0].astype(np.float64)
    if labels.ndim == 2:
        return 2 * np.sqrt(areas / math.pi)
    return 2 * np.cbrt(3 * areas / (4 * math.pi))


def fingerprint(
    items: Sequence[SegItem], ndim: int, channels: int, groups: Sequence[str], seed: int = 0
) -> Fingerprint:
    """Sizes and appearance of every image; object sizes from a seeded sample of at most ``FINGERPRINT_IMAGES`` labels."""
    shapes = np.array([item.labels.shape for item in items])
    order = np.random.default_rng(seed).permutation(len(items))[:FINGERPRINT_IMAGES]
    diameters, counts = [], []
    for i in order:
        d = object_diameters(np.asarray(items[i].labels[...]))
        diameters.append(d)
        counts.append(len(d))
    every = np.concatenate(diameters) if diameters else np.zeros(0)
    p10, p50, p90 = np.percentile(every, [10, 50, 90]) if every.size else (0.0, 0.0, 0.0)
    names, sizes = np.unique(np.asarray(groups), return_counts=True)
    return Fingerprint(
        len(items),
        ndim,
        channels,
        tuple(int(s) for s in shapes.min(0)),
        (float(p10), float(p50), float(p90)),
        float(np.mean(counts)) if counts else 0.0,
        {str(n): int(c) for n, c in zip(names, sizes)},
    )


@dataclass
class Hardware:
    device: str  # cpu | cuda
    precision: str  # what --amp resolved to: float32, bf16, fp16


def receptive_field(depth: int) -> int:
    """Receptive field in pixels of the U-Net (two 3x3 convolutions per level on both sides) with ``depth`` poolings."""
    return 12 * 2**depth - 7


def plan_architecture(
    cfg: SegmentConfig, fp: Fingerprint, hw: Hardware, plan: Plan
) -> tuple[list[int], dict[str, Any], int]:
    """Patch shape, U-Net width and depth, batch size: from object sizes, image sizes and the device."""
    p90 = max(fp.diameters[2], 1.0)
    args = dict(cfg.model_args)
    if "depth" not in args:
        depth = next((d for d in (3, 4, 5) if receptive_field(d) >= 3 * p90), 5)
        plan.choose(
            "model_args.depth",
            depth,
            f"receptive field {receptive_field(depth)} px covers 3x the p90 object diameter {p90:.0f} px",
        )
        args["depth"] = depth
    divisor = 2 ** int(args.get("depth", 4))
    if cfg.patch_shape is None:
        if fp.ndim == 2:
            side = min(256, max(64, 2 ** math.ceil(math.log2(8 * p90))))
            patch = [max(divisor, min(side, s) // divisor * divisor) for s in fp.smallest]
            why = f"about 8 object diameters ({8 * p90:.0f} px), at most 256, within the smallest image {fp.smallest}"
        else:
            patch = [max(divisor, min(p, s) // divisor * divisor) for p, s in zip(DEFAULT_PATCH[3], fp.smallest)]
            why = f"the 3D default within the smallest volume {fp.smallest}"
        plan.choose("patch_shape", patch, why)
    else:
        patch = list(cfg.patch_shape)
    if "features" not in args:
        features = 32 if hw.device == "cuda" else 16
        plan.choose(
            "model_args.features",
            features,
            "32 on a GPU; 16 on a CPU, where a 4x cheaper step buys more steps in the budget than width gains",
        )
        args["features"] = features
    if "norm" not in args:
        plan.choose("model_args.norm", "batch", "batch norm trains fastest at these batch sizes")
        args["norm"] = "batch"
    batch = cfg.batch_size
    if batch is None:
        batch = 16 if hw.device == "cuda" else 8
        plan.choose(
            "batch_size",
            batch,
            f"{'a GPU' if hw.device == 'cuda' else 'a CPU'} default for {'x'.join(map(str, patch))} patches",
        )
    return patch, args, batch


def plan_data(cfg: SegmentConfig, fp: Fingerprint, plan: Plan) -> None:
    """Validation share, inversion, group balancing and augmentation from the appearance mix and object sizes."""
    if cfg.val_fraction is None:
        fraction = round(min(0.1, VAL_IMAGES / max(fp.images, 1)), 4)
        plan.choose(
            "val_fraction", fraction, f"10% of the images, at most {VAL_IMAGES} (each is predicted whole every epoch)"
        )
    bright = any(g.endswith("bright") for g in fp.groups)
    dark = any(g.endswith("dark") for g in fp.groups)
    if cfg.invert is None:
        invert = "auto" if bright and dark else "never"
        plan.choose(
            "invert",
            invert,
            "dark- and bright-background images are mixed: bright ones are inverted so objects are bright in all"
            if invert == "auto"
            else "one kind of background",
        )
    if cfg.balance is None:
        rare = min(fp.groups.values()) / fp.images if len(fp.groups) > 1 else 1.0
        balance = "auto" if rare < 0.2 else "none"
        plan.choose(
            "balance",
            balance,
            f"the rarest appearance group has {rare:.0%} of the images; groups drawn by size ** {cfg.balance_power}"
            if balance == "auto"
            else "no rare appearance group",
        )
    if cfg.dist_scale is None:
        scale = float(max(1, round(fp.diameters[1] / 2)))
        plan.choose(
            "dist_scale",
            scale,
            "the median object radius: distances are predicted in its units, so the output starts near "
            "its target instead of needing many steps to grow to tens of pixels",
        )
    if cfg.augment is None:
        p10, _, p90 = fp.diameters
        colour = any(g.startswith("colour") for g in fp.groups)
        stain = colour and plan.settings.get("invert", cfg.invert) in (None, "never")  # HED assumes transmitted light
        augment = SegAugmentConfig(
            flip=True,
            rot90=True,
            gamma=0.3,
            noise_std=0.02,
            affine_scale=0.2 if p90 > 2 * max(p10, 1.0) else 0.0,
            hed_jitter=0.05 if stain else 0.0,
            colour_jitter=0.1 if colour else 0.0,
        )
        why = ["flips, rot90, gamma 0.3, noise 0.02"]
        why += ["scale jitter 0.2 (object diameters vary over 2x)"] if augment.affine_scale else []
        why += ["colour jitter 0.1 (colour images)"] if colour else []
        why += ["stain (HED) jitter 0.05 (colour images, not inverted)"] if stain else []
        changed = {k: v for k, v in dataclasses.asdict(augment).items() if v != getattr(SegAugmentConfig(), k)}
        plan.choose("augment", augment, "; ".join(why), shown=str(changed))


def plan_target(cfg: SegmentConfig, plan: Plan, ndim: int) -> None:
    """The target, when left open. Labels are instances unless the user asks for ``semantic`` (class maps are only
    trained when asked), and 2D instances are learnt as flows, unless another setting given rules them out. Volumes
    keep foreground and boundaries: flows were measured better in 2D only, and building a 3D flow target costs
    0.9-5.2 s per batch of 2 on a CPU (8x32x32 to 32x128x128) against 0.02 s for the boundaries."""
    if cfg.target is not None:
        return
    if cfg.loss in ("dice", "bce", "dice_bce"):
        plan.choose("target", "foreground_boundaries", f"loss {cfg.loss} is given, which trains probability maps")
    elif cfg.loss in VECTOR_TARGETS:
        plan.choose("target", cfg.loss, f"loss {cfg.loss} is given, that target's own")
    elif cfg.inference.flip_tta:
        plan.choose("target", "foreground_boundaries", "inference.flip_tta is given, which flows' vectors cannot take")
    elif ndim == 3:
        plan.choose(
            "target",
            "foreground_boundaries",
            "instance labels in 3D: flows were measured better only in 2D, and their 3D target costs some 50x more "
            "per batch to build on a CPU",
        )
    else:
        plan.choose("target", "flows", f"instance labels: {TARGET_REASON}")


def validation_seconds(
    cfg: SegmentConfig, fp: Fingerprint, fraction: float, train_pixels: float, pixel_s: float
) -> float:
    """Estimated seconds of one validation: the share ``fraction`` of the training images predicted (``pixel_s``
    measured), post-processed and scored, with the threshold tuning of ``tune.validation_postprocessing``."""
    rate = POSTPROCESS_S_PER_PIXEL.get(str(cfg.target), WATERSHED_S_PER_PIXEL)
    passes = validation_postprocessing(fraction * fp.images, cfg.post.tune)
    return fraction * train_pixels * (pixel_s + rate * passes)


def plan_schedule(
    cfg: SegmentConfig, batch: int, budget: Budget, spent_s: float, step_s: float, val_s: float, plan: Plan
) -> None:
    """Epochs (validations, 3 to 12, about one per ``SECONDS_PER_VALIDATION``) and steps per epoch that fill what is
    left of the budget with measured step and estimated validation times (``engine.plan.fit_schedule``, which
    refuses a budget too short for the smallest schedule)."""
    steps = given_steps(cfg, batch)
    if cfg.epochs is not None and (steps is not None or not budget.given):
        return  # given epochs without a budget: steps_per_epoch stays None, enough patches to cover the images once
    epochs = cfg.epochs
    if epochs is None:
        available = max(budget.seconds - spent_s, 0.0) * SETUP_SHARE  # as fit_schedule counts it
        epochs = int(np.clip(round(available / SECONDS_PER_VALIDATION), 3, 12))
        while epochs > 2 and epochs * val_s > VALIDATION_SHARE * available:
            epochs -= 1
        plan.choose(
            "epochs",
            epochs,
            f"one validation ({val_s:.0f} s estimated) per ~{available / epochs / 60:.1f} min of the "
            f"{available / 60:.1f} min left for training of the {budget.describe()}",
        )
    fit_schedule(
        plan,
        budget=budget,
        spent_s=spent_s,
        step_s=step_s,
        val_s=val_s,
        pass_steps=None,
        epochs=epochs,
        steps_per_epoch=steps,
    )


def given_steps(cfg: SegmentConfig, batch: int) -> int | None:
    """Steps per epoch the user gave: ``steps_per_epoch``, or ``patches_per_epoch`` in batches; None when open."""
    if cfg.steps_per_epoch is not None:
        return cfg.steps_per_epoch
    if cfg.patches_per_epoch is not None:
        return max(1, math.ceil(cfg.patches_per_epoch / batch))
    return None


def make_plan(
    cfg: SegmentConfig,
    fp: Fingerprint,
    hw: Hardware,
    budget: Budget,
    spent_s: float,
    timer: Callable[[list[int], dict[str, Any], int], tuple[float, float]],
    train_pixels: float,
    plan: Plan,
) -> None:
    """Plan every setting of an instance target left open into ``plan``. ``timer(patch, model_args, batch)``
    measures (seconds per training step, seconds per predicted pixel); ``train_pixels`` is the size of the
    training images, of which the validation share is carved; ``spent_s`` the time already used."""
    plan.observe(f"data: {fp.describe()}", **dataclasses.asdict(fp))
    plan.observe(f"budget: {budget.describe()} on {hw.device} in {hw.precision}", budget_minutes=budget.minutes)
    patch, args, batch = plan_architecture(cfg, fp, hw, plan)
    plan_data(cfg, fp, plan)
    if cfg.epochs is None or (given_steps(cfg, batch) is None and budget.given):
        step_s, pixel_s = timer(patch, args, batch)
        fraction = cfg.val_fraction if cfg.val_fraction is not None else plan.settings["val_fraction"]
        val_s = validation_seconds(cfg, fp, fraction, train_pixels, pixel_s)
        plan.observe(
            f"timing: {step_s:.3f} s per training step (measured), {val_s:.1f} s per validation (estimated from a "
            "measured forward pass)",
            step_s=step_s,
            validation_s=val_s,
        )
        plan_schedule(cfg, batch, budget, spent_s, step_s, val_s, plan)


SEMANTIC_DEFAULTS = {"batch_size": 8, "val_fraction": 0.1, "invert": "never", "balance": "none", "dist_scale": 1.0}


def semantic_plan(cfg: SegmentConfig, plan: Plan) -> None:
    """Class maps have no objects to size a plan by: open settings get the fixed defaults of a semantic U-Net (the
    engine plans epochs and steps from the budget)."""
    for key, value in SEMANTIC_DEFAULTS.items():
        if getattr(cfg, key) is None:
            plan.choose(key, value, "fixed default of the semantic target")
    if cfg.augment is None:
        plan.choose("augment", SegAugmentConfig(), "fixed default of the semantic target", shown="flips and rot90")
