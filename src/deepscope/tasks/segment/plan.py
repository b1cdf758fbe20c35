"""Self-configuring defaults: the settings a user leaves open are planned from the data and the time budget.

As nnU-Net plans from a data fingerprint, the plan reads the training images (count, sizes, channels, appearance
groups) and labels (object diameters), and the budget (``--max-minutes``, the device and the precision the hardware
runs), then chooses the patch shape, the U-Net's width and depth, the batch size, epochs and patches per epoch, the
validation share, inversion, group balancing and augmentation. Unlike nnU-Net, whose schedule is a fixed 1000
epochs, the number of steps here is measured: a few real training steps are timed on the machine, so the cosine
schedule ends when the budget does instead of being cut at its peak. Only settings left at None are planned; every
choice is listed with its reason (``Plan.reasons``) in the run log, config.yaml and the report.
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
from deepscope.tasks.segment.config import DEFAULT_PATCH, SegmentConfig

DEFAULT_BUDGET_MINUTES = 60.0  # planned for when no --max-minutes is given (training is then not stopped by the clock)
FINGERPRINT_IMAGES = 64  # label images read for object sizes
VAL_IMAGES = 32  # the most validation images carved from the training set (each is predicted every epoch)
SETUP_SHARE = 0.93  # of the remaining budget planned for training and validation; the rest absorbs estimation error
VALIDATION_SHARE = 0.15  # at most this share of the budget goes to per-epoch validation
SECONDS_PER_VALIDATION = 150  # about one validation per this much training
POSTPROCESS_S = 0.5  # rough seconds to turn one validation image into instances and score it


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


@dataclass
class Plan:
    settings: dict[str, Any] = field(default_factory=dict)  # dotted setting -> planned value
    reasons: list[str] = field(default_factory=list)

    def choose(self, key: str, value: Any, reason: str, shown: str | None = None) -> None:
        self.settings[key] = value
        self.reasons.append(f"{key} = {value if shown is None else shown}: {reason}")


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


def plan_schedule(
    cfg: SegmentConfig, batch: int, budget_s: float, step_s: float, val_s: float, plan: Plan, budgeted: bool
) -> None:
    """Epochs (validations) and patches per epoch that fill the budget with measured step and validation times."""
    if cfg.epochs is not None and (cfg.patches_per_epoch is not None or not budgeted):
        return  # given epochs without a budget: patches_per_epoch stays None, enough patches to cover the images once
    available = max(budget_s, 60.0) * SETUP_SHARE
    source = "--max-minutes" if budgeted else f"no --max-minutes: planned for {DEFAULT_BUDGET_MINUTES:g} minutes"
    if cfg.epochs is None:
        epochs = int(np.clip(round(available / SECONDS_PER_VALIDATION), 3, 12))
        while epochs > 2 and epochs * val_s > VALIDATION_SHARE * available:
            epochs -= 1
        plan.choose(
            "epochs",
            epochs,
            f"one validation ({val_s:.0f} s measured) per ~{available / epochs / 60:.1f} min of the "
            f"{available / 60:.1f} min budget ({source})",
        )
    else:
        epochs = cfg.epochs
    if cfg.patches_per_epoch is None:
        steps = max(1, int((available - epochs * val_s) / epochs / step_s))
        plan.choose(
            "patches_per_epoch",
            steps * batch,
            f"{steps} steps of {step_s:.2f} s (measured) per epoch fill the budget "
            f"({epochs * steps} steps in all; the cosine schedule ends with it)",
        )


def make_plan(
    cfg: SegmentConfig,
    fp: Fingerprint,
    hw: Hardware,
    spent_s: float,
    timer: Callable[[list[int], dict[str, Any], int], tuple[float, float]],
    train_pixels: float,
) -> Plan:
    """The plan for every setting left open. ``timer(patch, model_args, batch)`` measures (seconds per training step,
    seconds per predicted pixel); ``train_pixels`` is the size of the
    training images, of which the validation share is carved; ``spent_s`` the time already used."""
    plan = Plan()
    plan.reasons.append(f"data: {fp.describe()}")
    budgeted = cfg.max_minutes is not None
    minutes = cfg.max_minutes if cfg.max_minutes is not None else DEFAULT_BUDGET_MINUTES
    plan.reasons.append(
        f"budget: {minutes:g} min on {hw.device} in {hw.precision}" + ("" if budgeted else " (assumed)")
    )
    patch, args, batch = plan_architecture(cfg, fp, hw, plan)
    plan_data(cfg, fp, plan)
    if cfg.epochs is None or (cfg.patches_per_epoch is None and budgeted):
        step_s, pixel_s = timer(patch, args, batch)
        fraction = cfg.val_fraction if cfg.val_fraction is not None else plan.settings["val_fraction"]
        val_s = fraction * (train_pixels * pixel_s + fp.images * POSTPROCESS_S)
        plan_schedule(cfg, batch, 60 * minutes - spent_s, step_s, val_s, plan, budgeted)
    return plan


SEMANTIC_DEFAULTS = {
    "epochs": 10,
    "batch_size": 8,
    "val_fraction": 0.1,
    "invert": "never",
    "balance": "none",
    "dist_scale": 1.0,
}


def semantic_plan(cfg: SegmentConfig) -> Plan:
    """Class maps have no objects to size a plan by: open settings get the fixed defaults of a semantic U-Net."""
    plan = Plan()
    for key, value in SEMANTIC_DEFAULTS.items():
        if getattr(cfg, key) is None:
            plan.choose(key, value, "fixed default of the semantic target")
    if cfg.augment is None:
        plan.choose("augment", SegAugmentConfig(), "fixed default of the semantic target (flips and rot90)")
    return plan
