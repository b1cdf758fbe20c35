"""Settings of the denoise task: the method, where the noisy data comes from, the blind spot and whole-image prediction."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.denoise.blind_spot import BlindSpotConfig
from deepscope.data.denoise.noise import NoiseConfig
from deepscope.errors import DeepscopeError
from deepscope.inference.tiling import BLENDS

METHODS = ("n2v", "n2n", "supervised")
DEFAULT_PATCH = {2: (64, 64), 3: (16, 64, 64)}
# CAREamics' N2V U-Net size, with a residual output; a run plans depth and features (plan.py) unless model_args has them
DEFAULT_MODEL = {"depth": 2, "features": 32, "residual": True}


@dataclass
class DenoiseInference:
    """Whole-image prediction (validation, test, ``deepscope predict``)."""

    tile: list[int] | None = None  # None: 256 x 256 (2D) or 32 x 128 x 128 (3D); smaller images take one window
    halo: list[int] | None = None  # None: 32 pixels (16 along a pooled-once z axis)
    blend: str = "gaussian"
    # average over the 8 flips and rotations (16 in 3D: flips of all axes, with and without a swap of H, W)
    tta: bool = False


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=2e-3, weight_decay=0.0, schedule="cosine", warmup_fraction=0.02)


@dataclass
class DenoiseConfig(TrainConfig):
    task: str = "denoise"
    model: str = "unet"
    # n2v (single noisy images) | n2n (pairs of noisy images) | supervised (noisy -> clean); None: planned from what the
    # data holds (plan.py)
    method: str | None = None
    key: str | None = None  # array inside NPZ/HDF5/zarr files
    ndim: int | None = None  # 2 or 3; None: 2 for (H, W) and (H, W, C<=4), 3 for other 3-axis arrays
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    blind_spot: BlindSpotConfig = field(default_factory=BlindSpotConfig)
    data_range: float | None = None  # for PSNR/SSIM and noise.clip; None: the clean images' integer dtype range
    patch_shape: list[int] | None = None  # None: planned from the budget and measured step times (plan.py)
    patches_per_epoch: int | None = None  # None: planned, about one minute of training per epoch
    augment: bool = True  # random flips and 90-degree rotations of every training patch
    val_fraction: float = 0.05  # of the training images, when there is no val/ split
    val_patches: int = 256  # fixed validation patches for the validation loss
    batch_size: int = 64
    eval_batch_size: int = 4
    monitor: str = "auto"  # auto: psnr when validation images have clean references, else the validation loss
    channels_last: bool = True  # 2D only (about 1.3x faster on CPU); volumes stay channels-first
    optim: OptimConfig = field(default_factory=_default_optim)
    inference: DenoiseInference = field(default_factory=DenoiseInference)

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise DeepscopeError(f"unknown denoising method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model != "unet":
            raise DeepscopeError(f"denoise trains a U-Net (model: unet), got model {self.model!r}")
        if self.ndim not in (None, 2, 3):
            raise DeepscopeError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.inference.blend not in BLENDS:
            raise DeepscopeError(f"unknown blend {self.inference.blend!r}; choose one of {', '.join(BLENDS)}")
        if self.data_range is not None and self.data_range <= 0:
            raise DeepscopeError(f"data_range must be positive, got {self.data_range}")
        if self.patches_per_epoch is not None and self.patches_per_epoch < self.batch_size:
            raise DeepscopeError(
                f"patches_per_epoch ({self.patches_per_epoch}) must be at least one batch ({self.batch_size})"
            )

    def model_settings(self) -> dict:
        """The U-Net's settings: the defaults above, overridden by ``model_args``."""
        return {**DEFAULT_MODEL, **self.model_args}
