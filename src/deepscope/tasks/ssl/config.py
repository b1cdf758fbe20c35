"""Settings of the ssl task: method, encoder, views, data cutting, and the kNN monitor and probes that judge the features."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deepscope.config import OptimConfig, TrainConfig
from deepscope.errors import DeepscopeError

METHODS = ("simclr", "vicreg")
PROJECTORS = {"simclr": [512, 128], "vicreg": [1024, 1024, 1024]}  # SimCLR: 2-layer head; VICReg: 3-layer expander


def _default_optim(method: str = "simclr") -> OptimConfig:
    """SGD with a short warm-up and cosine decay (the SimCLR CIFAR-10 recipe), at a learning rate for short runs: lightly's
    0.06 per 256 images is tuned for hundreds of epochs; CPU budgets allow tens. VICReg's loss is some 25x larger and
    diverged at lr 0.16 on CIFAR-10 (batch 256, width 8), so it gets lr 0.1 with gradient clipping (its authors use LARS,
    whose per-layer trust ratio does the same job)."""
    if method == "vicreg":
        return OptimConfig(
            name="sgd",
            lr=0.1,
            weight_decay=5e-4,
            momentum=0.9,
            nesterov=False,
            schedule="cosine",
            warmup_fraction=0.05,
            grad_clip=3.0,
        )
    return OptimConfig(
        name="sgd", lr=0.3, weight_decay=5e-4, momentum=0.9, nesterov=False, schedule="cosine", warmup_fraction=0.05
    )


@dataclass
class SSLConfig(TrainConfig):
    task: str = "ssl"
    # encoder: resnet18 (model_args.width; none: planned by the budget) | unet (model_args as for train segment)
    model: str = "resnet18"
    method: str = "simclr"  # simclr (contrastive, NT-Xent) | vicreg (variance-invariance-covariance, no negatives)
    # NT-Xent temperature; None: planned by the length of the run (0.2 for short budgets, else 0.5 as lightly and
    # the SimCLR paper's small-batch runs)
    temperature: float | None = None
    vicreg_weights: list[float] = field(default_factory=lambda: [25.0, 25.0, 1.0])  # invariance, variance, covariance
    projector: list[int] | None = None  # head layer widths; None: 512-128 (simclr) or 1024-1024-1024 (vicreg)
    # natural | microscopy | auto (microscopy for percentile-normalised image folders, else natural)
    views: str = "auto"
    view_settings: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. {blur_p: 0.5}
    # side of the training views as a fraction of the images' (1: the images' own size); None: planned by the budget
    # (smaller views for a resnet18 trained few passes, else 1)
    view_scale: float | None = None
    patch_size: int | None = None  # cut images into patches of this side (needed when sizes differ); None: whole images
    crops: str = "grid"  # grid (patches covering each image) | objects (one patch per object of masks/ label images)
    # per-image percentiles mapped to 0..1 (microscopy); None: [1, 99.8] for images/ folders
    normalize: list[float] | None = None
    channels: int | None = None  # input channels (grey repeated); None: the most found
    max_patches: int | None = None  # cap on training patches (seeded sample)
    val_fraction: float = 0.1
    knn_k: int = 200
    knn_temperature: float = 0.1
    # images the monitor evaluates each epoch (seeded samples): validation images, and labelled training images in
    # the kNN bank; 0: all; None: planned (at most 2000 and 5000)
    monitor_images: int | None = None
    knn_bank: int | None = None
    # label fractions of the final linear probes
    probe_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    probe_random: bool = True  # also probe the same encoder at random initialisation, the baseline to beat
    # images per step; None: planned (128 for runs of few passes over the images, else 256)
    batch_size: int | None = None  # type: ignore[assignment]
    eval_batch_size: int = 512
    monitor: str = "auto"  # auto: knn_accuracy with labelled validation images, else the validation loss
    keep: str | None = None  # type: ignore[assignment]  # best | last; None: planned (last when the schedule ends at 0)
    optim: OptimConfig = field(default_factory=_default_optim)
    # the encoder's memory format; None: planned, the faster of the two measured for the encoder trained
    channels_last: bool | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DeepscopeError(f"unknown ssl method {self.method!r}; choose {' or '.join(METHODS)}")
        if self.optim == _default_optim():  # no optimizer setting given: the method's own defaults
            self.optim = _default_optim(self.method)
        if self.crops not in ("grid", "objects"):
            raise DeepscopeError(f"crops must be grid or objects, got {self.crops!r}")
        if (self.temperature is not None and self.temperature <= 0) or self.knn_temperature <= 0:
            raise DeepscopeError("temperature and knn_temperature must be positive")
        if self.view_scale is not None and not 0 < self.view_scale <= 1:
            raise DeepscopeError(
                f"view_scale must be in (0, 1] (a fraction of the images' side), got {self.view_scale}"
            )
        if self.keep not in (None, "best", "last"):
            raise DeepscopeError(f"keep must be best or last, got {self.keep!r}")
        if any(n is not None and n < 0 for n in (self.monitor_images, self.knn_bank)):
            raise DeepscopeError("monitor_images and knn_bank must be image counts (0: all), not negative")
        if not self.probe_fractions or not all(0 < f <= 1 for f in self.probe_fractions):
            raise DeepscopeError(f"probe_fractions must be label fractions in (0, 1], got {self.probe_fractions}")
        if self.normalize is not None and (
            len(self.normalize) != 2 or not 0 <= self.normalize[0] < self.normalize[1] <= 100
        ):
            raise DeepscopeError(f"normalize must be two percentiles low < high in [0, 100], got {self.normalize}")
        if len(self.vicreg_weights) != 3:
            raise DeepscopeError(
                f"vicreg_weights must be three numbers (invariance, variance, covariance), got {self.vicreg_weights}"
            )

    def projector_widths(self) -> list[int]:
        return list(self.projector) if self.projector else PROJECTORS[self.method]
