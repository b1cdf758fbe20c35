"""Planning image classification: the model, its width, the batch size, the optimizer and the augmentation a user
left open, from a fingerprint of the data and the time budget.

The plan aims at the best recipe this project has measured (``benchmarks/recipes``, ``benchmarks/RESULTS.md``
"CIFAR-10 classification on CPU"): for small images (up to 64 px) the ResNet-9-style ``fastnet`` trained by SGD with
Nesterov momentum, a one-cycle schedule and label smoothing 0.2 on batches of 512, flips and 2-pixel translations;
``fastnet`` (64-128-256) reached 87.96% on CIFAR-10 in 10 epochs, ``fastnet80`` (32-64-128) 84.27% in 6 epochs on
2 CPU cores. Which width fits is measured, not guessed: a few real training steps of each candidate width are timed
on the machine, in the run's precision, and the widest one that trains at least :data:`MIN_PASSES` passes over the
training images in the budget is taken (the recipes train 6 to 10 epochs). Larger images get a ResNet-18 whose width
is chosen the same way; fewer than :data:`TINY_IMAGES` training images get the narrowest width. Only settings left
open are planned: an empty model name, no width in ``model_args``, a batch size or augmentation of None, and no
optimizer setting given (:class:`~deepscope.tasks.classify.config.DefaultOptim`).

The widths are timed when the run starts: on a machine that other work slows down later, the planned epochs take
longer than measured and the clock may stop the run before its learning-rate schedule ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepscope.config import OptimConfig
from deepscope.data.classification.augment import AugmentConfig
from deepscope.engine.plan import SETUP_SHARE, Budget, Plan
from deepscope.errors import DeepscopeError
from deepscope.tasks.classify.config import ClassifyConfig, optim_left_open

SMALL_IMAGE = 64  # images up to this side get fastnet (and ResNet-18's CIFAR stem); larger ones a ResNet-18
MIN_PASSES = 6  # passes over the training images a width must get in the budget: the recipes train 6 (fastnet80) to 10
TINY_IMAGES = 2000  # fewer training images than this get the narrowest width, unmeasured
MIN_STEPS_PER_PASS = 8  # the planned batch leaves at least this many steps in one pass over the training images
EVAL_COST = 1 / 3  # an evaluation forward pass costs about a third of a training step on the same images


@dataclass(frozen=True)
class Recipe:
    """Batch size and optimizer of a model family, as measured (or as published, said in ``source``)."""

    batch_size: int
    optim: OptimConfig | None  # None: the defaults
    source: str


FASTNET_OPTIM = OptimConfig(
    name="sgd",
    lr=0.2,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="onecycle",
    warmup_fraction=0.2,
    label_smoothing=0.2,
)
ADAMW_OPTIM = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, schedule="onecycle", warmup_fraction=0.1)
RECIPES = {
    "fastnet": Recipe(512, FASTNET_OPTIM, "benchmarks/recipes/fastnet.yaml and fastnet80.yaml"),
    "cnn": Recipe(256, dataclasses.replace(FASTNET_OPTIM, lr=0.1, label_smoothing=0.1), "benchmarks/recipes/cnn.yaml"),
    "mlp": Recipe(256, ADAMW_OPTIM, "benchmarks/recipes/mlp.yaml"),
    "logreg": Recipe(256, ADAMW_OPTIM, "benchmarks/recipes/logreg.yaml"),
    # no ResNet-18 recipe here: the batch and the default optimizer of its supervised rows in RESULTS.md
    "resnet18": Recipe(128, None, "the supervised ResNet-18 rows of benchmarks/RESULTS.md"),
}


@dataclass(frozen=True)
class Candidate:
    """One width of a model, widest first in :data:`CANDIDATES`."""

    model: str
    args: dict[str, Any]
    note: str  # what is known of it


CANDIDATES = {
    "fastnet": (
        Candidate(
            "fastnet", {"widths": [64, 128, 256], "stem": 32}, "the fastnet recipe: 87.96% on CIFAR-10 in 10 epochs"
        ),
        Candidate(
            "fastnet", {"widths": [32, 64, 128], "stem": 24}, "the fastnet80 recipe: 84.27% on CIFAR-10 in 6 epochs"
        ),
        Candidate("fastnet", {"widths": [16, 32, 64], "stem": 16}, "half the fastnet80 widths"),
    ),
    "resnet18": (
        Candidate("resnet18", {"width": 64}, "the standard ResNet-18"),
        Candidate("resnet18", {"width": 32}, "ResNet-18 at half width"),
        Candidate("resnet18", {"width": 16}, "ResNet-18 at quarter width"),
    ),
}
WIDTH_KEYS = {"fastnet": ("widths", "stem"), "resnet18": ("width",)}  # model_args that set a candidate's width


@dataclass(frozen=True)
class Fingerprint:
    """What the plan needs to know of the training data."""

    images: int  # training images (after a validation share is carved)
    val_images: int
    height: int
    width: int
    channels: int
    classes: int
    per_class_min: int
    per_class_max: int

    @property
    def side(self) -> int:
        return min(self.height, self.width)

    def describe(self) -> str:
        return (
            f"data: {self.images} training images ({self.val_images} validation), {self.height}x{self.width}, "
            f"{self.channels} channel(s), {self.classes} classes of {self.per_class_min}-{self.per_class_max} "
            "training images each"
        )

    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fingerprint(train_labels: np.ndarray, val_images: int, in_shape: Sequence[int], classes: int) -> Fingerprint:
    """The fingerprint of a training split's labels and the images' (C, H, W)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=classes)
    c, h, w = (int(s) for s in in_shape)
    return Fingerprint(len(train_labels), int(val_images), h, w, c, int(classes), int(counts.min()), int(counts.max()))


def floor_pow2(n: float) -> int:
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


def planned_passes(step_s: float, fp: Fingerprint, batch: int, available_s: float) -> float:
    """Passes over the training images (each with one validation) that fit ``available_s`` at ``step_s`` a step."""
    per_pass = max(1, fp.images // batch) * step_s + fp.val_images / batch * step_s * EVAL_COST
    return available_s / per_pass


Timer = Callable[[str, dict[str, Any], int], float]  # (model, model_args, batch size) -> measured s per step


def plan_model(cfg: ClassifyConfig, fp: Fingerprint, plan: Plan) -> str:
    """The model: fastnet for small images, ResNet-18 for larger ones; a given one stays."""
    if cfg.model:
        return cfg.model
    if cfg.init_from:
        raise DeepscopeError("--init-from needs --model: the architecture of the weights to load")
    if fp.side <= SMALL_IMAGE:
        model = "fastnet"
        why = (
            f"images of {fp.height}x{fp.width} (up to {SMALL_IMAGE} px): the ResNet-9-style net of the project's best "
            "CIFAR-10 recipes (benchmarks/RESULTS.md)"
        )
    else:
        model = "resnet18"
        why = f"images of {fp.height}x{fp.width} (over {SMALL_IMAGE} px): a ResNet-18, whose stem shrinks them 4x"
    plan.choose("model", model, why)
    return model


def plan_batch(cfg: ClassifyConfig, fp: Fingerprint, model: str, plan: Plan) -> int:
    """The recipe's batch, fewer images for large ones, and at most 1/``MIN_STEPS_PER_PASS`` of the training set."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    recipe = RECIPES.get(model)
    batch = recipe.batch_size if recipe else 128
    why = [f"the batch of {recipe.source}" if recipe else f"a default (no recipe for {model})"]
    if fp.side > SMALL_IMAGE:
        by_pixels = max(16, floor_pow2(batch * 32 * 32 / (fp.height * fp.width)))
        if by_pixels < batch:
            batch = by_pixels
            why.append(f"{batch} for {fp.height}x{fp.width} images (as many pixels as the recipe's 32x32 batches)")
    by_count = max(min(8, floor_pow2(fp.images)), floor_pow2(fp.images / MIN_STEPS_PER_PASS))
    if by_count < batch:
        batch = by_count
        why.append(f"{batch} so that {fp.images} training images make at least {MIN_STEPS_PER_PASS} steps a pass")
    plan.choose("batch_size", batch, "; ".join(why))
    return batch


def plan_width(
    cfg: ClassifyConfig,
    fp: Fingerprint,
    model: str,
    batch: int,
    budget: Budget,
    spent_s: float,
    timer: Timer,
    plan: Plan,
) -> None:
    """The widest candidate width of ``model`` whose measured steps give ``MIN_PASSES`` passes in the budget (timed
    from the narrowest up, so a slow machine times only the cheap ones), else the narrowest."""
    candidates = CANDIDATES.get(model)
    if candidates is None or any(k in cfg.model_args for k in WIDTH_KEYS[model]):
        return
    if cfg.init_from:
        return  # the weights to load fix the width (the model's defaults, or what model_args say)
    chosen = candidates[-1]
    if fp.images < TINY_IMAGES:
        why = f"the narrowest width ({chosen.note}): only {fp.images} training images, fewer than {TINY_IMAGES}"
    else:
        available = max(budget.seconds - spent_s, 0.0) * SETUP_SHARE
        measured, passes = [], 0.0
        for candidate in reversed(candidates):  # narrowest first: a wider one costs more, the first too slow ends it
            step_s = timer(model, candidate.args, batch)
            fits = planned_passes(step_s, fp, batch, available)
            measured.append(f"{shown_args(candidate.args)} {step_s:.3f} s/step, {fits:.1f} passes")
            if fits < MIN_PASSES and measured[1:]:
                break
            chosen, passes = candidate, fits
            if fits < MIN_PASSES:
                break
        plan.observe(
            f"width timing: {'; '.join(measured)} (batch {batch}, measured; "
            f"{available / 60:.1f} min of the {budget.describe()} for training)",
            width_timing=measured,
        )
        if passes >= MIN_PASSES:
            why = (
                f"the widest that trains {passes:.1f} >= {MIN_PASSES} passes in the budget (the recipes train 6 to "
                f"10 epochs); {chosen.note}"
            )
        else:
            why = f"the narrowest ({chosen.note}); no width gets {MIN_PASSES} passes, give more --max-minutes"
    for key, value in chosen.args.items():
        plan.choose(f"model_args.{key}", value, why)
        why = "with the width above"


def shown_args(args: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in args.items()).replace(" ", "")


def plan_optim(cfg: ClassifyConfig, model: str, batch: int, plan: Plan) -> None:
    """The model's recipe optimizer, its learning rate scaled to the batch, when no optimizer setting was given."""
    recipe = RECIPES.get(model)
    if recipe is None or recipe.optim is None or not optim_left_open(cfg):
        return
    optim = dataclasses.replace(recipe.optim)
    why = f"the optimizer of {recipe.source} (no optimizer setting was given)"
    if batch != recipe.batch_size:
        optim.lr = float(f"{recipe.optim.lr * batch / recipe.batch_size:.3g}")
        why += f"; lr {recipe.optim.lr:g} per {recipe.batch_size} images scaled to the batch of {batch} (linear rule)"
    changed = {k: v for k, v in dataclasses.asdict(optim).items() if v != getattr(OptimConfig(), k)}
    plan.choose("optim", optim, why, shown=str(changed))


def plan_augment(cfg: ClassifyConfig, fp: Fingerprint, plan: Plan) -> None:
    """Translations of about 1/16 of the image side and horizontal flips, as the CIFAR-10 recipes (2 px at 32 px);
    no flip for small grey images, which may be glyphs (digits, letters) whose mirror image is another class."""
    if cfg.augment is not None:
        return
    pad = int(np.clip(round(fp.side / 16), 1, 8))
    flip = fp.side > SMALL_IMAGE or fp.channels >= 3
    augment = AugmentConfig(crop_padding=pad, flip=flip, color_jitter=0.0, cutout=0)
    why = f"random translations by up to {pad} px (about 1/16 of the {fp.side} px side, as the recipes' 2 px at 32)"
    why += (
        "; horizontal flips"
        if flip
        else "; no flips: small grey images may be glyphs (digits, letters) whose mirror image is another class"
    )
    plan.choose("augment", augment, why, shown=str(dataclasses.asdict(augment)))


def make_plan(
    cfg: ClassifyConfig, fp: Fingerprint, budget: Budget, spent_s: float, timer: Timer, plan: Plan, machine: str
) -> None:
    """Plan every setting of ``cfg`` left open into ``plan``; ``timer`` measures candidate widths, ``machine`` (the
    device and precision) is recorded with the fingerprint."""
    plan.observe(fp.describe(), **fp.values())
    plan.observe(f"machine: {machine}", machine=machine)
    model = plan_model(cfg, fp, plan)
    batch = plan_batch(cfg, fp, model, plan)
    plan_augment(cfg, fp, plan)  # before the width: the candidates are timed on augmented batches
    plan_width(cfg, fp, model, batch, budget, spent_s, timer, plan)
    plan_optim(cfg, model, batch, plan)
