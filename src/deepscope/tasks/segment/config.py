"""Settings of the segment task: what to train, how to predict whole images and how to turn them into instances."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.segmentation.augment import SegAugmentConfig
from deepscope.errors import DeepscopeError
from deepscope.inference.tiling import BLENDS
from deepscope.postprocess.watershed import SEEDS

CHANNELS = {"foreground": 1, "boundaries": 1, "foreground_boundaries": 2, "distance": 1}
# probability plus distances or flow vectors, whose channels are not all sigmoid maps
VECTOR_TARGETS = ("stardist", "flows")
INSTANCE_TARGETS = (*CHANNELS, *VECTOR_TARGETS)
DEFAULT_PATCH = {2: (256, 256), 3: (32, 128, 128)}
INVERT = ("never", "always", "auto")


def output_channels(target: str, ndim: int, n_rays: int) -> int:
    """Network output channels of an instance target: one probability, plus n_rays distances or ndim flow components."""
    if target == "stardist":
        return 1 + n_rays
    if target == "flows":
        return 1 + ndim
    return CHANNELS[target]


@dataclass
class InferenceConfig:
    """Tiled prediction of whole images (validation, test, ``deepscope predict``)."""

    tile: list[int] | None = None  # per spatial axis; None: the training patch shape
    halo: list[int] | None = None  # None: about tile / 8, rounded so that tile + 2 * halo suits the U-Net
    blend: str = "gaussian"  # gaussian | linear | none
    flip_tta: bool = False
    # predict --instances: images larger than this per axis are post-processed block by block
    instance_block: int = 2048


@dataclass
class PostConfig:
    """From network outputs to instances: a watershed for the map targets (``postprocess.watershed``), polygon
    non-maximum suppression for stardist (``postprocess.star``), flow following for flows (``postprocess.flows``)."""

    threshold: float = 0.5  # probability of foreground (watershed), of an object centre (stardist), of a cell (flows)
    seeds: str = "components"  # components (of foreground minus boundaries) | maxima (of the distance transform)
    min_size: int = 0  # objects smaller than this many pixels/voxels are removed
    min_distance: int = 3  # between distance maxima, with seeds=maxima
    nms_threshold: float = 0.4  # stardist: a candidate overlapping a kept polygon by more IoU than this is dropped
    flow_steps: int = 200  # flows: Euler steps every pixel takes along the predicted flows
    # flows: masks whose own flows differ from the predicted ones by more (MSE) are dropped
    flow_threshold: float | None = 0.4
    tune: bool = True  # after training, choose threshold (and nms/flow threshold) on the validation images


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_fraction=0.05)


@dataclass
class SegmentConfig(TrainConfig):
    task: str = "segment"
    model: str = "unet"
    # foreground | boundaries | foreground_boundaries | distance | stardist | flows | semantic; None: planned (flows for
    # instance labels, see plan.plan_target), as every setting left at None
    target: str | None = None
    n_rays: int = 32  # stardist: rays of the star-convex polygons
    dist_scale: float | None = None  # stardist: the network predicts distances / dist_scale (pixels); None: planned
    loss: str = "auto"  # dice | bce | dice_bce | ce | stardist | flows; auto: the target's own (dice_bce for the maps, ce for semantic)
    raw_key: str = "raw"  # image array in NPZ/HDF5/zarr containers
    label_key: str = "label"  # label array in NPZ/HDF5/zarr containers
    # label folder beside images/ (masks, labels, ...); None: the one there (--labels chooses)
    labels: str | None = None
    class_values: list[int] | None = None  # semantic: label value of each class, e.g. [0, 255]; None: labels are 0..K-1
    num_classes: int | None = None  # semantic without class_values; None: the largest training label + 1
    ignore_label: int | None = None  # semantic: label value excluded from loss and metrics
    # Settings left at None are planned from the data and the budget (``tasks/segment/plan.py``); the plan and its
    # reasons go to the log, config.yaml and the report. Any value given in YAML or by --set is kept as given.
    # epochs (TrainConfig's, None) too: planned by the task for instance targets, by the engine for semantic
    patch_shape: list[int] | None = None  # planned from object sizes, capped by the smallest image
    # None: steps_per_epoch, planned from the measured step time and the budget, or (given epochs, no budget) one
    # pass: as many patches as cover the training images' pixels
    patches_per_epoch: int | None = None
    min_foreground: float = 0.0  # fraction of labelled pixels a training patch must have (redrawn otherwise)
    normalize: list[float] = field(default_factory=lambda: [1.0, 99.8])  # percentiles mapped to 0 and 1 per image
    val_fraction: float | None = None  # of the training images, when there is no val/ split
    # never | always | auto (bright-background images inverted, so nuclei are bright in every modality)
    invert: str | None = None
    balance: str | None = None  # none | auto (by appearance) | a column of index.csv: image groups drawn alike
    balance_power: float = 0.5  # groups drawn in proportion to their size ** power (0: all groups alike, 1: by size)
    batch_size: int | None = None  # type: ignore[assignment]  # None: planned, as epochs
    eval_batch_size: int = 4  # tiles per forward pass in tiled prediction
    monitor: str = "auto"  # auto: mean_score for instance targets, mean_iou for semantic
    channels_last: bool = False
    optim: OptimConfig = field(default_factory=_default_optim)
    augment: SegAugmentConfig | None = None  # None: planned; an augment section replaces the plan's as a whole
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    post: PostConfig = field(default_factory=PostConfig)

    def __post_init__(self) -> None:
        if self.target is not None:  # a planned target is checked once the plan has set it (SegmentTask.setup)
            self.check_target()
        if self.monitor == "auto":  # no target yet means instance labels: semantic is only ever asked for
            self.monitor = "mean_iou" if self.target == "semantic" else "mean_score"
        if self.invert is not None and self.invert not in INVERT:
            raise DeepscopeError(f"unknown invert {self.invert!r}; choose one of {', '.join(INVERT)}")
        if self.inference.blend not in BLENDS:
            raise DeepscopeError(f"unknown blend {self.inference.blend!r}; choose one of {', '.join(BLENDS)}")
        if self.post.seeds not in SEEDS:
            raise DeepscopeError(f"unknown seeds {self.post.seeds!r}; choose one of {', '.join(SEEDS)}")
        if len(self.normalize) != 2 or not 0 <= self.normalize[0] < self.normalize[1] <= 100:
            raise DeepscopeError(f"normalize must be two percentiles low < high in [0, 100], got {self.normalize}")

    @property
    def target_name(self) -> str:
        """The target, once given or planned (``SegmentTask.setup`` plans it before anything reads it)."""
        if self.target is None:
            raise DeepscopeError("segment: no target yet; SegmentTask.setup plans the target left open")
        return self.target

    def check_target(self) -> None:
        """The target's own loss (``loss: auto``) and the settings that must fit the target."""
        if self.target not in INSTANCE_TARGETS and self.target != "semantic":
            raise DeepscopeError(
                f"unknown target {self.target!r}; choose one of {', '.join([*INSTANCE_TARGETS, 'semantic'])}"
            )
        semantic = self.target == "semantic"
        own = "ce" if semantic else self.target if self.target in VECTOR_TARGETS else None
        if self.loss == "auto":
            self.loss = own or "dice_bce"
        if (own is not None and self.loss != own) or (own is None and self.loss not in ("dice", "bce", "dice_bce")):
            raise DeepscopeError(
                f"loss {self.loss!r} does not fit target {self.target!r}: semantic takes ce, stardist and flows "
                "their own loss, the other targets dice, bce or dice_bce"
            )
        if self.target in VECTOR_TARGETS and self.inference.flip_tta:
            raise DeepscopeError(
                f"flip_tta does not apply to target {self.target!r}: flipping would also have to turn its vectors"
            )
        if self.target == "stardist" and self.n_rays < 3:
            raise DeepscopeError(f"n_rays must be at least 3, got {self.n_rays}")
