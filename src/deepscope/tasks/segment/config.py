"""Settings of the segment task: what to train, how to predict whole images and how to turn them into instances."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.seg_augment import SegAugmentConfig
from deepscope.data.targets import TARGETS
from deepscope.errors import DeepscopeError
from deepscope.postprocess.watershed import SEEDS
from deepscope.tiling import BLENDS

CHANNELS = {"foreground": 1, "boundaries": 1, "foreground_boundaries": 2, "distance": 1}
DEFAULT_PATCH = {2: (256, 256), 3: (32, 128, 128)}


@dataclass
class InferenceConfig:
    """Tiled prediction of whole images (validation, test, ``deepscope predict``)."""

    tile: list[int] | None = None  # per spatial axis; None: the training patch shape
    halo: list[int] | None = None  # None: about tile / 8, rounded so that tile + 2 * halo suits the U-Net
    blend: str = "gaussian"  # gaussian | linear | none
    flip_tta: bool = False


@dataclass
class PostConfig:
    """From probabilities to instances (see ``deepscope.postprocess.watershed_from_seeds``)."""

    threshold: float = 0.5
    seeds: str = "components"  # components (of foreground minus boundaries) | maxima (of the distance transform)
    min_size: int = 0  # objects smaller than this many pixels/voxels are removed
    min_distance: int = 3  # between distance maxima, with seeds=maxima


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_fraction=0.05)


@dataclass
class SegmentConfig(TrainConfig):
    task: str = "segment"
    model: str = "unet"
    target: str = "foreground_boundaries"  # foreground | boundaries | foreground_boundaries | distance | semantic
    loss: str = "auto"  # dice | bce | dice_bce | ce; auto: dice_bce for instance targets, ce for semantic
    raw_key: str = "raw"  # image array in NPZ/HDF5/zarr containers
    label_key: str = "label"  # label array in NPZ/HDF5/zarr containers
    class_values: list[int] | None = None  # semantic: label value of each class, e.g. [0, 255]; None: labels are 0..K-1
    num_classes: int | None = None  # semantic without class_values; None: the largest training label + 1
    ignore_label: int | None = None  # semantic: label value excluded from loss and metrics
    patch_shape: list[int] | None = None  # None: 256x256 (2D) or 32x128x128 (3D), capped by the smallest image
    patches_per_epoch: int | None = None  # None: enough patches to cover the training voxels once
    min_foreground: float = 0.0  # fraction of labelled pixels a training patch must have (redrawn otherwise)
    normalize: list[float] = field(default_factory=lambda: [1.0, 99.8])  # percentiles mapped to 0 and 1 per image
    val_fraction: float = 0.1  # of the training images, when there is no val/ split
    batch_size: int = 8
    eval_batch_size: int = 4  # tiles per forward pass in tiled prediction
    monitor: str = "auto"  # auto: mean_score for instance targets, mean_iou for semantic
    channels_last: bool = False
    optim: OptimConfig = field(default_factory=_default_optim)
    augment: SegAugmentConfig = field(default_factory=SegAugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    post: PostConfig = field(default_factory=PostConfig)

    def __post_init__(self) -> None:
        if self.target not in CHANNELS and self.target != "semantic":
            raise DeepscopeError(f"unknown target {self.target!r}; choose one of {', '.join([*TARGETS, 'semantic'])}")
        semantic = self.target == "semantic"
        if self.monitor == "auto":
            self.monitor = "mean_iou" if semantic else "mean_score"
        if self.loss == "auto":
            self.loss = "ce" if semantic else "dice_bce"
        if semantic != (self.loss == "ce"):
            raise DeepscopeError(f"loss {self.loss!r} does not fit target {self.target!r}: semantic takes ce, the others dice, bce or dice_bce")
        if self.inference.blend not in BLENDS:
            raise DeepscopeError(f"unknown blend {self.inference.blend!r}; choose one of {', '.join(BLENDS)}")
        if self.post.seeds not in SEEDS:
            raise DeepscopeError(f"unknown seeds {self.post.seeds!r}; choose one of {', '.join(SEEDS)}")
        if len(self.normalize) != 2 or not 0 <= self.normalize[0] < self.normalize[1] <= 100:
            raise DeepscopeError(f"normalize must be two percentiles low < high in [0, 100], got {self.normalize}")
