"""Self-configuring denoising: the method from what the data holds, the U-Net and patch size from the time budget.

The method follows the layout of the training (and validation) data: pairs of noisy acquisitions train Noise2Noise,
noisy images with clean ones (or clean images the config adds noise to) train noisy-to-clean, noisy images alone
train Noise2Void. The fingerprint adds the image count, sizes, channels, the data range and an estimate of the noise
level. The U-Net's width and depth and the patch size climb a ladder of candidates, each costlier than the one
before, timed on real batches of this data on this machine: the largest that still gets enough steps in the budget
is chosen (the BSD68 benchmark's best recipe, 1200 steps of 64 patches of 64x64 for a U-Net of depth 2 and 32
features, reached 28.7 dB with Noise2Noise in about 10 minutes on 2 CPU cores). An epoch is about a minute of
training, so validation and the choice of the best weights keep pace with the run on any machine; the engine then
fits the number of epochs to the budget. Only settings left open (None, or absent from ``model_args``) are planned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepscope.data.denoise.dataset import DenoiseItem
from deepscope.engine.plan import SETUP_SHARE, VALIDATION_SHARE, Budget, Plan
from deepscope.errors import DataError
from deepscope.inference.geometry import patch_shape_for
from deepscope.tasks.denoise.config import DenoiseConfig

# enough training for a planned U-Net: 1000 steps of 64 patches (the BSD68 recipe trained 1200 steps of 64 patches)
ENOUGH_PATCHES = 64_000
EPOCH_S = 60.0  # about one validation per minute of training...
MAX_VALIDATIONS = 30  # ...and at most this many in a long budget
NOISE_IMAGES = 8  # training images the noise level is estimated from
MAD_TO_SIGMA = 0.6745  # median absolute deviation of a standard normal


@dataclass(frozen=True)
class Candidate:
    """One U-Net and patch size the plan may choose."""

    features: int
    depth: int
    patch: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.features} features, depth {self.depth}, {'x'.join(map(str, self.patch))} patches"


# from cheapest to costliest per step; the plan climbs while a step still leaves enough steps in the budget
LADDER: dict[int, tuple[Candidate, ...]] = {
    2: (
        Candidate(16, 2, (64, 64)),
        Candidate(32, 2, (64, 64)),
        Candidate(32, 2, (96, 96)),
        Candidate(48, 2, (96, 96)),
        Candidate(48, 3, (128, 128)),
    ),
    3: (
        Candidate(16, 2, (16, 64, 64)),
        Candidate(32, 2, (16, 64, 64)),
        Candidate(32, 2, (32, 64, 64)),
        Candidate(48, 2, (32, 96, 96)),
    ),
}


RECIPE = LADDER[2][1]  # the BSD68 benchmark's U-Net and patch size


def receptive_field(depth: int) -> int:
    """Receptive field in pixels of the U-Net (two 3x3 convolutions per level on both sides) with ``depth`` poolings."""
    return 12 * 2**depth - 7


# ---- fingerprint ----------------------------------------------------------------------------------------------------


@dataclass
class Fingerprint:
    """What the plan knows of the training data."""

    images: int
    ndim: int
    channels: int
    smallest: tuple[int, ...]  # smallest extent of the training images per axis
    median: tuple[int, ...]  # median extent per axis
    low: float  # smallest and largest value of the noisy training inputs
    high: float
    data_range: float  # the range PSNR is scored in (given, the integer dtype's, or the observed one)
    range_source: str  # "given", the dtype's name, or "observed"
    noise: float | None  # estimated noise standard deviation of the noisy inputs, in data units

    def describe(self) -> str:
        size = "x".join(map(str, self.smallest))
        median = "x".join(map(str, self.median))
        text = (
            f"data: {self.images} training images, {self.ndim}D, {self.channels} channel(s), smallest {size}, "
            f"median {median}; values {self.low:g}..{self.high:g}, data range {self.data_range:g} ({self.range_source})"
        )
        if self.noise is not None:
            psnr = 20 * math.log10(self.data_range / self.noise) if self.noise > 0 else math.inf
            text += (
                f"; noise sigma about {self.noise:.3g} ({100 * self.noise / self.data_range:.1f}% of the range, "
                f"input PSNR about {psnr:.1f} dB; median absolute finest-scale wavelet coefficient of "
                f"{min(self.images, NOISE_IMAGES)} images)"
            )
        return text

    def values(self) -> dict[str, Any]:
        """JSON-able, for the plan's fingerprint."""
        return {
            "images": self.images,
            "ndim": self.ndim,
            "channels": self.channels,
            "smallest": list(self.smallest),
            "median": list(self.median),
            "value_range": [self.low, self.high],
            "data_range": self.data_range,
            "noise_sigma": self.noise,
        }


def noise_sigma(image: np.ndarray) -> float:
    """Standard deviation of white noise in a (C, *spatial) image from the finest diagonal Haar wavelet band of its
    last two axes (Donoho's median absolute deviation): the band holds noise at its full standard deviation and image
    structure only along edges, which the median ignores. Channels are averaged."""
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    x = image[..., :h, :w].astype(np.float64)
    band = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    per_channel = np.abs(band.reshape(len(image), -1))
    return float(np.mean(np.median(per_channel, axis=1))) / MAD_TO_SIGMA


def fingerprint(items: Sequence[DenoiseItem], data_range: float | None, seed: int = 0) -> Fingerprint:
    """Sizes, channels and values of the training images; the noise level from a seeded sample of a few of them."""
    shapes = np.array([item.spatial for item in items])
    noisy = [item.images["noisy"] for item in items]
    low, high = float(min(x.min() for x in noisy)), float(max(x.max() for x in noisy))
    dtype = items[0].dtype
    if data_range is not None:
        width, source = float(data_range), "given"
    elif np.issubdtype(dtype, np.integer):
        width, source = float(np.iinfo(dtype).max - np.iinfo(dtype).min), str(dtype)
    else:
        width, source = high - low, "observed"
    sample = np.random.default_rng(seed).permutation(len(items))[:NOISE_IMAGES]
    noise = float(np.median([noise_sigma(noisy[i]) for i in sample])) if min(shapes.min(0)[-2:]) >= 2 else None
    return Fingerprint(
        images=len(items),
        ndim=shapes.shape[1],
        channels=int(noisy[0].shape[0]),
        smallest=tuple(int(s) for s in shapes.min(0)),
        median=tuple(int(s) for s in np.median(shapes, axis=0)),
        low=low,
        high=high,
        data_range=width,
        range_source=source,
        noise=noise,
    )


# ---- method -----------------------------------------------------------------------------------------------------


def plan_method(cfg: DenoiseConfig, roles: Mapping[str, set[str]], plan: Plan) -> str:
    """The method: the user's, or the one the layout supports. ``roles`` holds the folders (noisy, noisy2, clean)
    of the splits trained or validated on (train, val); a method needs its roles in all of them."""
    shared = set.intersection(*roles.values())
    where = "the training and validation images" if len(roles) > 1 else "the training images"
    fresh = cfg.noise.fresh
    if cfg.method is not None:
        method = cfg.method
    elif cfg.noise.synthetic:
        method = "supervised"
        plan.choose(
            "method",
            method,
            f"noise.kind {cfg.noise.kind} makes the noisy inputs from clean images, so the clean image is the target "
            "(BSD68 benchmark: noisy to clean 28.7 dB, Noise2Noise 28.7, Noise2Void 26.8)",
        )
    elif "noisy" not in shared:
        raise DataError(
            f"{cfg.data}: no noisy/ images; add them, or set noise.kind (gaussian, poisson, mixed) to make them from clean/"
        )
    elif "clean" in shared:
        method = "supervised"
        plan.choose("method", method, f"{where} are noisy/ images with clean/ references: noisy to clean")
    elif "noisy2" in shared:
        method = "n2n"
        plan.choose(
            "method",
            method,
            f"{where} are pairs of noisy acquisitions (noisy/, noisy2/): Noise2Noise, one predicts the other",
        )
    else:
        method = "n2v"
        plan.choose(
            "method",
            method,
            f"{where} are single noisy images (noisy/ alone): Noise2Void, each pixel predicted from its neighbours",
        )
    if fresh is None and cfg.noise.synthetic:
        fresh = method != "n2v"
        plan.choose(
            "noise.fresh",
            fresh,
            "synthetic noise is unlimited: new noise for every patch, so no noisy pixel is seen twice"
            if fresh
            else "Noise2Void trains on one fixed noisy copy of each image, all that real noisy data would give it",
        )
    return method


# ---- U-Net and patch size -----------------------------------------------------------------------------------------


def candidates(cfg: DenoiseConfig, ndim: int, smallest: Sequence[int]) -> list[Candidate]:
    """The ladder with the user's settings in place of the planned ones, patches within the smallest training image
    and divisible by the U-Net's pooling, repeats dropped (in order, cheapest first)."""
    args = cfg.model_args
    pool = tuple(args.get("pool") or (2,) * ndim)
    found: list[Candidate] = []
    for rung in LADDER[ndim]:
        features, depth = int(args.get("features", rung.features)), int(args.get("depth", rung.depth))
        divisor = tuple(p**depth for p in pool)
        try:
            patch = patch_shape_for(cfg.patch_shape, [smallest], rung.patch, divisor)
        except DataError:
            if cfg.patch_shape is not None:
                raise  # the user's patch shape does not fit the given U-Net: say so
            continue  # this depth needs larger images
        candidate = Candidate(features, depth, tuple(patch))
        if candidate not in found:
            found.append(candidate)
    if not found:
        raise DataError(
            f"the smallest training image {tuple(smallest)} is too small for a U-Net of depth "
            f"{args.get('depth', LADDER[ndim][0].depth)}; use a shallower model (model_args.depth)"
        )
    return found


def training_seconds(budget: Budget, spent_s: float) -> float:
    """What the budget leaves for training steps: the engine's share for training and validation, less the most that
    validation may take."""
    return max(budget.seconds - spent_s, 0.0) * SETUP_SHARE * (1 - VALIDATION_SHARE)


def plan_architecture(
    cfg: DenoiseConfig, fp: Fingerprint, budget: Budget, spent_s: float, timer: Callable[[Candidate], float], plan: Plan
) -> tuple[Candidate, float | None]:
    """The U-Net's width and depth and the patch shape, and the measured seconds per step of that choice (None when
    nothing needed timing). ``timer`` measures one candidate's training step; candidates are timed cheapest first and
    the climb stops at the first that leaves fewer than ``ENOUGH_PATCHES`` patches in the budget."""
    ladder = candidates(cfg, fp.ndim, fp.smallest)
    open_keys = [k for k in ("features", "depth") if k not in cfg.model_args] + (
        ["patch"] if cfg.patch_shape is None else []
    )
    if len(ladder) == 1 and cfg.patches_per_epoch is not None:
        return ladder[0], None  # nothing to choose and nothing to time
    if cfg.epochs is not None and cfg.patches_per_epoch is not None and not budget.given:
        # the number of steps is given and no clock stops the run: the budget decides nothing, the recipe is trained
        epoch = cfg.steps_per_epoch or cfg.patches_per_epoch // cfg.batch_size
        recipe = next((c for c in ladder if (c.features, c.depth) == (RECIPE.features, RECIPE.depth)), ladder[0])
        why = f"the schedule is given ({cfg.epochs} epochs of {epoch} steps) and no --max-minutes: the BSD68 recipe"
        for key, value in (("features", recipe.features), ("depth", recipe.depth)):
            if key not in cfg.model_args:
                plan.choose(f"model_args.{key}", value, why)
        if cfg.patch_shape is None:
            plan.choose("patch_shape", list(recipe.patch), f"{why}, within the smallest training image")
        return recipe, None
    batch = cfg.batch_size
    train_s = training_seconds(budget, spent_s)
    enough = math.ceil(ENOUGH_PATCHES / batch)
    measured: list[tuple[Candidate, float, int]] = []
    for candidate in ladder:
        step_s = timer(candidate)
        steps = int(train_s / max(step_s, 1e-9))
        measured.append((candidate, step_s, steps))
        if steps < enough:
            break
    fits = [m for m in measured if m[2] >= enough]
    chosen, step_s, steps = fits[-1] if fits else measured[0]
    plan.observe(
        "timing: "
        + "; ".join(f"{c.describe()}: {s:.3f} s per step, about {n} steps in the budget" for c, s, n in measured)
        + f" ({train_s / 60:.1f} min of training in the {budget.describe()}; measured)",
        candidates=[
            {"features": c.features, "depth": c.depth, "patch": list(c.patch), "step_s": s, "steps": n}
            for c, s, n in measured
        ],
    )
    if not open_keys:
        return chosen, step_s
    if fits:
        why = (
            f"the largest candidate that still trains at least {enough} steps of {batch} patches "
            f"({steps} steps of {step_s:.3f} s)"
        )
        if len(fits) < len(measured):
            nxt = measured[len(fits)]
            why += f"; the next, {nxt[0].describe()}, would get only {nxt[2]}"
        elif len(measured) == len(ladder) and len(ladder) > 1:
            why += "; the largest on the ladder"
        why += (
            ". The BSD68 recipe (32 features, depth 2, 64x64, 1200 steps of 64) reached 28.7 dB in about 10 min "
            "on 2 CPU cores"
        )
    else:
        why = (
            f"the smallest candidate, and it gets only about {steps} steps of {batch} patches in the budget "
            f"(enough would be {enough}); a longer --max-minutes, or a GPU, trains a better model"
        )
    if "features" not in cfg.model_args:
        plan.choose("model_args.features", chosen.features, why)
        why = "with the width above"
    if "depth" not in cfg.model_args:
        plan.choose("model_args.depth", chosen.depth, f"receptive field {receptive_field(chosen.depth)} px; {why}")
        why = "with the U-Net above"
    if cfg.patch_shape is None:
        size = "x".join(map(str, fp.smallest))
        plan.choose("patch_shape", list(chosen.patch), f"{why} (within the smallest training image, {size})")
    return chosen, step_s


def plan_epoch(cfg: DenoiseConfig, step_s: float, budget: Budget, spent_s: float, plan: Plan) -> None:
    """Patches per epoch (when open): about a minute of steps, so there is a validation and a chance to keep the best
    weights about every minute, at most ``MAX_VALIDATIONS`` in a long budget and at least 3 in a short one."""
    if cfg.patches_per_epoch is not None:
        return
    available = max(budget.seconds - spent_s, 0.0) * SETUP_SHARE
    epoch_s = max(min(max(EPOCH_S, available / MAX_VALIDATIONS), available / 3), step_s)
    steps = max(1, round(epoch_s / step_s))
    plan.choose(
        "patches_per_epoch",
        steps * cfg.batch_size,
        f"{steps} steps of {cfg.batch_size} patches, {step_s:.3f} s each (measured): about one validation every "
        f"{steps * step_s / 60:.1f} min, so the best weights are picked from about {max(1, round(available / epoch_s))} "
        "checkpoints whatever the machine's speed (the number of epochs is fitted to the budget after this)",
    )
