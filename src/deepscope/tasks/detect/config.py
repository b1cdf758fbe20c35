"""Settings of the detect task: data layout, image size, augmentation, inference and the metric's detection limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from deepscope.config import OptimConfig, TrainConfig
from deepscope.data.detection.augment import DetAugmentConfig
from deepscope.errors import DeepscopeError
from deepscope.tasks.detect.predict import DetInferenceConfig


def _default_optim() -> OptimConfig:
    """AdamW with warm-up, cosine decay and clipping: from-scratch detectors diverge early without the last two."""
    return OptimConfig(
        name="adamw", lr=1e-3, weight_decay=5e-2, schedule="cosine", warmup_fraction=0.05, grad_clip=10.0
    )


@dataclass
class DetectConfig(TrainConfig):
    task: str = "detect"
    model: str = "fcos"  # fasterrcnn | retinanet | fcos | maskrcnn | centernet | detr
    images: str | None = None  # any layout: a folder of images ...
    annotations: str | None = None  # ... and a COCO JSON file or a folder of VOC XML, YOLO txt or instance-label images
    class_names: list[str] | None = None  # fixes the class order; names in the files outside it are errors
    image_size: int = 512  # shorter side the model resizes images to (multi-scale training around it, see scale_range);
    # 0: native scale, no resizing (microscopy, tiled prediction of large images; augment.scale_jitter then varies scale)
    max_size: int = 853  # longer side cap
    # training sizes: image_size times this range
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.25])
    val_fraction: float = 0.1
    batch_size: int = 4
    eval_batch_size: int = 4  # tiles per forward pass in tiled prediction
    epochs: int = 24
    monitor: str = "map"
    monitor_mode: str = "max"
    channels_last: bool = False
    optim: OptimConfig = field(default_factory=_default_optim)
    augment: DetAugmentConfig = field(default_factory=DetAugmentConfig)
    inference: DetInferenceConfig = field(default_factory=DetInferenceConfig)

    def __post_init__(self) -> None:
        if self.image_size and (self.image_size < 32 or self.max_size < self.image_size):
            raise DeepscopeError(
                f"image_size must be 0 (native scale) or at least 32, and max_size at least image_size, "
                f"got {self.image_size}, {self.max_size}"
            )
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise DeepscopeError(f"scale_range must be two factors 0 < low <= high, got {self.scale_range}")
        if self.inference.max_detections <= 10:
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
        if not self.image_size:
            return [0]
        low, high = (round(self.image_size * f / 32) * 32 for f in self.scale_range)
        sizes = [s for s in range(max(32, low), min(high, self.max_size) + 1, 32) if s != self.image_size]
        return [*sizes, self.image_size]
