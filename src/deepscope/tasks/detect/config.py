"""Settings of the detect task: data layout, image size, augmentation, inference and the metric's detection limit.

Settings left at None (and an empty model name) are planned from the data and the time budget when training starts
(``tasks/detect/plan.py``): the detector, its backbone (``model_args.backbone``), the image size, the detection limit,
the validation share and, by the engine, the epochs. A value a user gives is kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.detection.augment import DetAugmentConfig
from deepscope.errors import DeepscopeError
from deepscope.tasks.detect.predict import DetInferenceConfig

DEFAULT_MAX_DETECTIONS = 100  # COCO's detection limit, for a config whose limit was left open and not yet planned


def _default_optim() -> OptimConfig:
    """AdamW with warm-up, cosine decay and clipping: from-scratch detectors diverge early without the last two."""
    return OptimConfig(
        name="adamw", lr=1e-3, weight_decay=5e-2, schedule="cosine", warmup_fraction=0.05, grad_clip=10.0
    )


@dataclass
class DetectConfig(TrainConfig):
    task: str = "detect"
    # fasterrcnn | retinanet | fcos | maskrcnn | centernet | detr; empty: planned (centernet for crowds of small
    # objects, else fcos). model_args.backbone (csp | tiny | resnet18 | resnet34 | resnet50) absent: planned by step time
    model: str = ""
    images: str | None = None  # any layout: a folder of images ...
    annotations: str | None = None  # ... and a COCO JSON file or a folder of VOC XML, YOLO txt or instance-label images
    class_names: list[str] | None = None  # fixes the class order; names in the files outside it are errors
    # shorter side the model resizes images to (multi-scale training around it, see scale_range); 0: native scale, no
    # resizing (microscopy, tiled prediction of large images; augment.scale_jitter then varies scale); None: planned
    image_size: int | None = None
    max_size: int | None = None  # longer side cap; None: planned
    # training sizes: image_size times this range
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    val_fraction: float | None = None  # share of the training images validated each epoch; None: planned
    batch_size: int = 4
    eval_batch_size: int = 4  # tiles per forward pass in tiled prediction
    epochs: int | None = None  # None: planned from the time budget by the engine
    monitor: str = "map"
    monitor_mode: str = "max"
    channels_last: bool = False
    optim: OptimConfig = field(default_factory=_default_optim)
    augment: DetAugmentConfig = field(default_factory=DetAugmentConfig)
    inference: DetInferenceConfig = field(default_factory=DetInferenceConfig)

    def __post_init__(self) -> None:
        if self.image_size and (
            self.image_size < 32 or (self.max_size is not None and self.max_size < self.image_size)
        ):
            raise DeepscopeError(
                f"image_size must be 0 (native scale) or at least 32, and max_size at least image_size, "
                f"got {self.image_size}, {self.max_size}"
            )
        if self.max_size is not None and self.max_size < 32:
            raise DeepscopeError(f"max_size must be at least 32, got {self.max_size}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise DeepscopeError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise DeepscopeError(f"scale_range must be two factors 0 < low <= high, got {self.scale_range}")
        if self.inference.max_detections is not None and self.inference.max_detections <= 10:
            raise DeepscopeError(
                f"inference.max_detections must be above 10 (COCO's metric counts 1, 10 and this many), "
                f"got {self.inference.max_detections}"
            )
        if self.data and self.images:
            raise DeepscopeError("give either data (a folder) or images + annotations, not both")

    def train_sizes(self) -> list[int]:
        """Shorter sides drawn per training image: multiples of 32 in ``scale_range`` (multi-scale training, the scale
        jitter from-scratch detectors need), capped by ``max_size``. ``image_size`` comes last because torchvision's
        transform, which every detector here resizes with, predicts at the last size of the list. [0]: native scale."""
        image_size, max_size = self.sizes()
        if not image_size:
            return [0]
        low, high = (round(image_size * f / 32) * 32 for f in self.scale_range)
        sizes = [s for s in range(max(32, low), min(high, max_size) + 1, 32) if s != image_size]
        return [*sizes, image_size]

    def sizes(self) -> tuple[int, int]:
        """``image_size`` and ``max_size``, which the plan sets when the user left them open."""
        if self.image_size is None or self.max_size is None:
            raise DeepscopeError("image_size and max_size are not set: they are planned when training starts")
        return self.image_size, self.max_size

    def detection_limit(self) -> int:
        """``inference.max_detections``, which the plan sets when the user left it open (COCO's 100 until then)."""
        limit = self.inference.max_detections
        return DEFAULT_MAX_DETECTIONS if limit is None else limit
