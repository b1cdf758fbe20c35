"""Planning self-supervised pre-training: the encoder's width, its memory format, the NT-Xent temperature, the
batch and the side of the views a user left open, from a fingerprint of the images and the time budget.

Contrastive learning is slow to start: lightly's and the SimCLR paper's small-batch temperature, 0.5, is tuned for
hundreds of epochs, and a 10-minute CPU budget gives a handful. Passes count more than width there, so the width is
the widest whose measured training steps still give :data:`MIN_PASSES` passes over the images in the budget (CIFAR-10
at 10 minutes on 2 CPU cores: width 16, 6.9 passes, 53.5% test kNN; width 8, 11.5 passes, 55.9%), each width timed
in both memory formats and trained in the faster (narrow networks can run slower channels-last: ResNet-18 width 8 in
bf16, 0.19 s per step of 256 images channels-last, 0.12 s channels-first). A run planned for fewer than
:data:`SHORT_PASSES` passes gets the lower temperature that learned faster in the first passes, and batches of
:data:`SHORT_BATCH`: a step costs the same per image at 128 as at 256, so the smaller batch makes twice the updates.
Such a run also trains on views of :data:`SHORT_VIEW_SCALE` of the images' side (24x24 for CIFAR-10): a step of a
narrow network costs about its pixels (ResNet-18 width 8, bf16, 0.17 s per step of 128 images at 32x32, 0.10 s at
24x24), so the same minutes give 1.5-2x the passes (and the random-resized crops, which enlarge the objects, probably
show them nearer the scale of the whole test image; not measured apart).

Measured on CIFAR-10 (the JPEG copy in shared/data as ``benchmarks/prepare_cifar10.py`` unpacks it; 45,000 training
images, width 8, batch 256, 200 steps or 1.1 passes, ``train ssl`` defaults otherwise, bf16 on a 2-core AVX-512 CPU,
one seed), kNN accuracy on the 10,000 test images: temperature 0.5 38.8%, 0.2 42.2%, 0.1 36.4%; 0.2 with crops of
20-100% of the image instead of 8-100% 40.8%, so the crops are not planned. The kNN monitor evaluated every
epoch is a sample (:data:`MONITOR_VAL` validation images, :data:`MONITOR_BANK` bank images) so that its time goes to
training, and where the schedule ends at learning rate 0 the last epoch is kept rather than the monitor's pick.
Only settings left open are planned: no ``width`` in ``model_args``, a ``channels_last``, ``temperature``,
``batch_size``, ``view_scale``, ``monitor_images``, ``knn_bank`` or ``keep`` of None.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepscope.engine.plan import SETUP_SHARE, Budget, Plan
from deepscope.tasks.ssl.config import SSLConfig

WIDTHS = (8, 16, 32, 64)  # ResNet-18 widths tried, narrowest first (each about 2-4x the cost of the one before)
MIN_PASSES = 10  # passes a width must get in the budget (see WIDTH_EVIDENCE)
WIDTH_EVIDENCE = "CIFAR-10 at 10 min on 2 CPU cores: width 16 trained 6.9 passes, 53.5% test kNN; width 8 11.5, 55.9%"
SHORT_PASSES = 20  # a run planned for fewer passes than this gets the short-budget temperature, batch and views
SHORT_VIEW_SCALE = 0.75  # side of the views, as a fraction of the images', of a run of few passes
MIN_VIEW_SIDE = 16  # views are not made smaller than this
VIEW_EVIDENCE = (
    "CIFAR-10 on 2 CPU cores, width 8, batch 128, temperature 0.2, test kNN: at 10 min, 32x32 views 8 passes 53.1%, "
    "24x24 12 passes 56.6%, 16x16 25 passes 56.1%; at 4 min 32x32 46.6%, 24x24 51.6%, 20x20 51.9%, 16x16 51.4%"
)
SHORT_TEMPERATURE = 0.2
LONG_TEMPERATURE = 0.5  # lightly's and the SimCLR paper's small-batch value, for long runs
SHORT_BATCH, LONG_BATCH = 128, 256  # batch of a run of fewer than SHORT_PASSES passes, and of a longer one
MONITOR_VAL, MONITOR_BANK = 2000, 5000  # validation images and bank images of the kNN monitor, when left open
MONITOR_EVIDENCE = (
    "CIFAR-10 at 10 min on 2 CPU cores: a monitor of 5000 validation images and a bank of 10000 took 13.5 s of each "
    "99 s epoch"
)
EVAL_COST = 1 / 3  # an evaluation forward pass costs about a third of a training step on the same images
SHORT_EVIDENCE = "CIFAR-10 kNN after 1.1 passes at width 8: 42.2% at 0.2, 38.8% at 0.5 (tasks/ssl/plan.py)"
BATCH_EVIDENCE = "CIFAR-10, 10 min on 2 CPU cores, width 16: test kNN 54.0% at batch 128, 53.0% at 256"


@dataclass(frozen=True)
class Fingerprint:
    """What the plan needs to know of the training images."""

    images: int
    val_images: int
    bank_images: int  # labelled training images the kNN monitor's bank can draw from
    channels: int
    height: int
    width: int
    kind: str  # natural | microscopy
    labelled: bool

    def describe(self) -> str:
        return (
            f"data: {self.images} training images ({self.val_images} validation), {self.channels}x{self.height}x"
            f"{self.width} ({self.kind}), {'labelled: kNN monitor' if self.labelled else 'unlabelled'}"
        )


def fitting_batch(batch: int, images: int) -> int:
    """``batch``, or the largest power of two (at least 2) with which ``images`` make at least two batches."""
    return batch if 2 * batch <= images else max(2, 2 ** int(math.log2(max(2, images // 2))))


def timing_batch(cfg: SSLConfig, images: int) -> int:
    """The batch steps are timed at: the given one, else ``LONG_BATCH`` as far as ``images`` make two of them (the
    cost per image is the same at ``SHORT_BATCH``: ResNet-18 width 16 on CIFAR-10 in bf16, 0.42 s per step of 256
    images, 0.20 s of 128)."""
    return cfg.batch_size or fitting_batch(LONG_BATCH, images)


@dataclass(frozen=True)
class Monitor:
    """Images the monitor evaluates each epoch: a seeded sample of the validation images and of the bank."""

    val: int
    bank: int

    def evaluated(self) -> int:
        """Encoder passes of a validation: two views and the features of each validation image, then the bank's."""
        return 3 * self.val + self.bank


def plan_monitor(cfg: SSLConfig, fp: Fingerprint, plan: Plan) -> Monitor:
    """The validation images (``monitor_images``) and bank images (``knn_bank``) the monitor evaluates each epoch,
    where left open: at most ``MONITOR_VAL`` and ``MONITOR_BANK``. The monitor draws the curves and, with ``keep``
    best, picks the epoch kept; every image more is time taken from training, while the final kNN and linear probes
    are judged on all images whatever the monitor's size."""
    bank_images = fp.bank_images if fp.labelled else 0
    val = fp.val_images if cfg.monitor_images == 0 else min(fp.val_images, cfg.monitor_images or MONITOR_VAL)
    bank = bank_images if cfg.knn_bank == 0 else min(bank_images, cfg.knn_bank or MONITOR_BANK)
    if cfg.monitor_images is None and fp.val_images:
        sampled = f"a seeded sample of {val} of the {fp.val_images}" if val < fp.val_images else f"all {val}"
        plan.choose(
            "monitor_images",
            val,
            f"{sampled} validation images each epoch: about 1 point of standard error on a kNN accuracy near 50%, "
            f"and each image more is time taken from training ({MONITOR_EVIDENCE})",
        )
    if cfg.knn_bank is None and bank_images:
        sampled = f"a seeded sample of {bank} of the {bank_images}" if bank < bank_images else f"all {bank}"
        plan.choose("knn_bank", bank, f"{sampled} labelled training images as the monitor's kNN bank")
    return Monitor(val, bank)


def plan_keep(cfg: SSLConfig, plan: Plan) -> None:
    """Keep the last epoch where the schedule ends at learning rate 0, else the epoch the monitor scored best."""
    if cfg.keep is not None:
        return
    if cfg.optim.schedule in ("cosine", "onecycle"):
        why = (
            f"the {cfg.optim.schedule} schedule ends at learning rate 0 with the last epoch, and contrastive features "
            "improve to its end (each epoch of the 10-minute CIFAR-10 run scored a higher validation kNN than the one "
            "before); the monitor would pick by its noise"
        )
        plan.choose("keep", "last", why)
    else:
        plan.choose("keep", "best", f"the {cfg.optim.schedule} schedule does not end at learning rate 0")


def pass_seconds(step_s: float, fp: Fingerprint, batch: int, monitor: Monitor) -> float:
    """One pass over the training images (two views each) and one validation by ``monitor``."""
    steps = max(1, fp.images // batch)
    return steps * step_s + monitor.evaluated() / (2 * batch) * step_s * EVAL_COST


# model_args over the given ones, channels-last or not, the views' scale -> measured seconds per training step
Timer = Callable[[dict[str, Any], bool, float], float]


def view_side(side: int, scale: float) -> int:
    """An image side ``side`` scaled by ``scale`` for the views (at least 1 pixel)."""
    return max(1, round(side * scale))


@dataclass(frozen=True)
class Timed:
    """Measured seconds per training step of one encoder in the memory format it will train in."""

    step_s: float
    channels_last: bool
    measured: str  # both formats' times where both were measured, for the log


def timed(cfg: SSLConfig, args: dict[str, Any], timer: Timer, scale: float) -> Timed:
    """The encoder with ``args`` timed on views at ``scale`` in the given memory format, or in both when
    ``channels_last`` is open."""
    if cfg.channels_last is not None:
        return Timed(timer(args, cfg.channels_last, scale), cfg.channels_last, "")
    last, first = timer(args, True, scale), timer(args, False, scale)
    both = f"channels-last {last:.3f} s, channels-first {first:.3f} s"
    return Timed(last, True, both) if last <= first else Timed(first, False, both)


def plan_format(cfg: SSLConfig, chosen: Timed, plan: Plan) -> None:
    """Train in the memory format measured faster, where left open."""
    if cfg.channels_last is None:
        fmt = "channels-last" if chosen.channels_last else "channels-first"
        plan.choose("channels_last", chosen.channels_last, f"{fmt} measured faster ({chosen.measured} per step)")


def plan_width(
    cfg: SSLConfig, fp: Fingerprint, monitor: Monitor, available_s: float, timer: Timer, plan: Plan
) -> Timed | None:
    """The widest ResNet-18 width whose measured steps give ``MIN_PASSES`` passes in ``available_s``, each width in
    its faster memory format where that is open; how the width chosen was timed (None when the width was given and
    nothing was measured)."""
    if cfg.model != "resnet18" or "width" in cfg.model_args or cfg.init_from:
        return None
    measured: list[str] = []
    chosen: tuple[int, Timed, float] | None = None  # width, its timing, its passes
    for width in WIDTHS:  # narrowest first: a wider one costs more, so the first too slow ends the search
        step = timed(cfg, {"width": width}, timer, cfg.view_scale or 1.0)
        fits = available_s / pass_seconds(step.step_s, fp, timing_batch(cfg, fp.images), monitor)
        fmt = f" ({step.measured})" if step.measured else ""
        measured.append(f"width {width} {step.step_s:.3f} s/step{fmt}, {fits:.1f} passes")
        if chosen is None or fits >= MIN_PASSES:  # the narrowest is taken whatever it fits
            chosen = (width, step, fits)
        if fits < MIN_PASSES:
            break
    assert chosen is not None
    width, step, passes = chosen
    plan.observe(
        f"width timing: {'; '.join(measured)} (batch {timing_batch(cfg, fp.images)}, measured; {available_s / 60:.1f} min for "
        "training)",
        width_timing=measured,
    )
    why = (
        f"the widest that trains {passes:.1f} >= {MIN_PASSES} passes in the budget ({WIDTH_EVIDENCE})"
        if passes >= MIN_PASSES
        else f"the narrowest tried; it trains only {passes:.1f} passes in the budget (give more --max-minutes)"
    )
    plan.choose("model_args.width", width, why)
    plan_format(cfg, step, plan)
    return step


def planned_passes(
    cfg: SSLConfig, fp: Fingerprint, monitor: Monitor, available_s: float, step_s: float | None
) -> float | None:
    """Passes over the training images the run will train: from given epochs (and steps per epoch), else from the
    budget and ``step_s``; None when that needs a step time not measured."""
    steps = max(1, fp.images // timing_batch(cfg, fp.images))
    if cfg.epochs is not None and cfg.max_minutes is None:
        return cfg.epochs * (cfg.steps_per_epoch or steps) / steps
    if cfg.epochs is not None and cfg.steps_per_epoch is not None:
        return cfg.epochs * cfg.steps_per_epoch / steps
    return None if step_s is None else available_s / pass_seconds(step_s, fp, timing_batch(cfg, fp.images), monitor)


def plan_temperature(cfg: SSLConfig, passes: float, plan: Plan) -> None:
    """The NT-Xent temperature by the number of passes the run will train."""
    if cfg.temperature is not None or cfg.method != "simclr":
        return
    short = passes < SHORT_PASSES
    length = f"{passes:.1f} passes planned, {'fewer' if short else 'not fewer'} than {SHORT_PASSES}"
    if short:
        why = f"{length}: a lower temperature learns faster in the first passes ({SHORT_EVIDENCE})"
        plan.choose("temperature", SHORT_TEMPERATURE, why)
    else:
        plan.choose("temperature", LONG_TEMPERATURE, f"{length}: lightly's and SimCLR's small-batch value")


def plan_batch(cfg: SSLConfig, fp: Fingerprint, passes: float | None, plan: Plan) -> None:
    """The batch by the number of passes the run will train: a short run takes ``SHORT_BATCH``, twice the updates
    in the same passes, a long one ``LONG_BATCH``; halved until the training images make two batches."""
    if cfg.batch_size is not None:
        return
    if passes is not None and passes < SHORT_PASSES and cfg.steps_per_epoch is None:
        batch = SHORT_BATCH
        why = (
            f"{passes:.1f} passes planned, fewer than {SHORT_PASSES}: twice the updates of batch {LONG_BATCH} in the "
            f"same passes, at the same cost per image ({BATCH_EVIDENCE})"
        )
    else:
        batch = LONG_BATCH
        why = "lightly's and the SimCLR paper's small-batch CIFAR-10 value" + (
            f", for {passes:.1f} passes" if passes is not None else ""
        )
    if fitting_batch(batch, fp.images) != batch:
        batch = fitting_batch(batch, fp.images)
        why = f"{why}, halved to {batch} so that the {fp.images} training images make at least two batches"
    plan.choose("batch_size", batch, why)


def fixed_views(cfg: SSLConfig, fp: Fingerprint) -> str | None:
    """Why the views keep the images' own size whatever the budget; None when the passes decide."""
    if cfg.model != "resnet18":
        return f"the {cfg.model} encoder's features keep their scale"
    if cfg.method != "simclr":
        return f"smaller views were measured for SimCLR, not {cfg.method}"
    if cfg.epochs is not None:
        return "the epochs are given, so smaller views buy no passes"
    if min(view_side(fp.height, SHORT_VIEW_SCALE), view_side(fp.width, SHORT_VIEW_SCALE)) < MIN_VIEW_SIDE:
        return f"{fp.height}x{fp.width} would make views under {MIN_VIEW_SIDE} px"
    return None


def plan_view_scale(cfg: SSLConfig, fp: Fingerprint, passes: float | None, plan: Plan) -> None:
    """The side of the training views, where left open: ``SHORT_VIEW_SCALE`` of the images' for a run that the budget
    gives fewer than ``SHORT_PASSES`` passes at the images' own size (``passes``), else their own size (a long run,
    or any reason of :func:`fixed_views`)."""
    if cfg.view_scale is not None:
        return
    fixed = fixed_views(cfg, fp)
    if fixed is not None:
        plan.choose("view_scale", 1.0, f"the images' own size: {fixed}")
        return
    assert passes is not None  # make_plan times a step whenever the passes decide the views
    length = f"{passes:.1f} passes planned at the images' own size"
    if passes >= SHORT_PASSES:
        plan.choose("view_scale", 1.0, f"the images' own size: {length}, not fewer than {SHORT_PASSES}")
        return
    h, w = view_side(fp.height, SHORT_VIEW_SCALE), view_side(fp.width, SHORT_VIEW_SCALE)
    why = (
        f"views of {h}x{w} px, {SHORT_VIEW_SCALE:g} of the images' {fp.height}x{fp.width}: {length}, fewer than "
        f"{SHORT_PASSES}; smaller views cost less and train more passes ({VIEW_EVIDENCE})"
    )
    plan.choose("view_scale", SHORT_VIEW_SCALE, why)


def make_plan(cfg: SSLConfig, fp: Fingerprint, budget: Budget, spent_s: float, timer: Timer, plan: Plan) -> None:
    """Plan every setting of ``cfg`` left open into ``plan``; ``timer`` measures training steps."""
    plan.observe(fp.describe(), **vars(fp))
    monitor = plan_monitor(cfg, fp, plan)
    plan_keep(cfg, plan)
    available = max(budget.seconds - spent_s, 0.0) * SETUP_SHARE
    scale = cfg.view_scale or 1.0
    step = plan_width(cfg, fp, monitor, available, timer, plan)
    if step is None and cfg.channels_last is None:
        step = timed(cfg, {}, timer, scale)
        plan_format(cfg, step, plan)
    passes = planned_passes(cfg, fp, monitor, available, None if step is None else step.step_s)
    views_open = cfg.view_scale is None and fixed_views(cfg, fp) is None
    if passes is None and cfg.method == "simclr" and (cfg.temperature is None or views_open):
        step = timed(cfg, {}, timer, scale)
        plan.observe(
            f"timing: {step.step_s:.3f} s per training step (batch {timing_batch(cfg, fp.images)}, measured)",
            step_s=step.step_s,
        )
        passes = planned_passes(cfg, fp, monitor, available, step.step_s)
    if passes is not None:
        plan_temperature(cfg, passes, plan)
    plan_batch(cfg, fp, passes, plan)
    plan_view_scale(cfg, fp, passes, plan)
