"""Box-aware augmentation of one detection sample on the training device.

Every geometric change goes through torchvision's ``transforms.v2`` functional ops, which dispatch on the
``tv_tensors`` type: the image is resampled, ``BoundingBoxes`` are moved arithmetically and ``Mask`` is resampled by
nearest neighbour, so boxes, masks and pixels cannot drift apart. Two rules are ours, since no library op has them:

* after a crop, a box keeping less than ``min_visible`` of its area is dropped (with its label, mask and crowd flag),
  the others are clipped; a last clamp + sanitize pass guarantees every returned box has x1 < x2, y1 < y2 and lies
  inside the image, whatever the floating-point history;
* geometry never turns a landscape image (W >= H) into a portrait one or back, so batches grouped by orientation
  stay grouped: crops and rescales are nudged by a pixel when needed, and quarter turns of non-square images are
  limited to 0 or 180 degrees.

Randomness comes only from the ``torch.Generator`` passed in (one draw of a fixed number of uniforms per sample, a
single device sync), so an epoch replays exactly on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms.v2 import functional as F

from deepscope.errors import DeepscopeError

MIN_BOX_SIDE = 1e-2  # pixels; thinner boxes are dropped (detectors reject boxes of zero width or height)
Sample = tuple[Tensor, dict[str, Tensor]]


@dataclass
class DetAugmentConfig:
    """Detection augmentation; probabilities and strengths of 0 (and ``scale_jitter`` [1, 1]) switch a step off."""

    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip (microscopy has no "up")
    rot90: bool = False  # random quarter turns (only 0/180 degrees on non-square images, to keep the orientation)
    scale_jitter: list[float] = field(default_factory=lambda: [0.5, 1.5])  # range of the random rescale factor
    crop: float = 0.5  # probability of a random crop
    crop_min: float = 0.5  # smallest crop side, as a fraction of the image side
    min_visible: float = 0.3  # boxes keeping less of their area after a crop are dropped, the others clipped
    brightness: float = 0.2  # factor in [1 - b, 1 + b]
    contrast: float = 0.2  # factor in [1 - c, 1 + c]
    saturation: float = 0.2  # factor in [1 - s, 1 + s], 3-channel images only
    hue: float = 0.02  # shift in [-h, h] turns of the colour wheel, 3-channel images only
    # probability of replacing a training image by a 2x2 mosaic of it and three others; None: planned by the detect
    # task (tasks/detect/plan.py), off where nothing plans it
    mosaic: float | None = None
    # share of the training steps, at the end, without mosaic (YOLO's close_mosaic): the last steps see whole images,
    # as they are predicted, so the detector is not left tuned to mosaics' scales and cut objects; None: planned
    close_mosaic: float | None = None

    def __post_init__(self) -> None:
        if self.close_mosaic is not None and not 0 <= self.close_mosaic < 1:
            raise DeepscopeError(
                f"augmentation close_mosaic is a share of the steps in [0, 1), got {self.close_mosaic}"
            )
        for name in ("hflip", "vflip", "crop", "min_visible", "mosaic"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 1:
                raise DeepscopeError(
                    f"augmentation {name} is a probability or fraction in [0, 1], got {getattr(self, name)}"
                )
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise DeepscopeError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.hue > 0.5:
            raise DeepscopeError(
                f"augmentation hue must be at most 0.5 (half a turn of the colour wheel), got {self.hue}"
            )
        if not 0 < self.crop_min <= 1:
            raise DeepscopeError(f"augmentation crop_min must be in (0, 1], got {self.crop_min}")
        jitter = list(self.scale_jitter)
        if len(jitter) != 2 or not 0 < jitter[0] <= jitter[1]:
            raise DeepscopeError(
                f"augmentation scale_jitter must be [low, high] with 0 < low <= high, got {self.scale_jitter}"
            )
        self.scale_jitter = [float(v) for v in jitter]


@dataclass
class _Scene:
    """An image (C, H, W) with its objects as plain tensors; ``apply`` runs one v2 op on all of them.

    Boxes and masks are wrapped as ``tv_tensors`` only for the op, with the image's current size as canvas, so the
    canvas can never disagree with the image.
    """

    image: Tensor
    boxes: Tensor  # (N, 4) float xyxy
    objects: dict[str, Tensor]  # per-object values that follow their boxes: labels, iscrowd, masks (N, H, W) uint8
    rest: dict[str, Any] = field(default_factory=dict)  # per-image values (image_id, ...), passed through

    @classmethod
    def of(cls, image: Tensor, target: dict[str, Any]) -> _Scene:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=image.device).reshape(-1, 4)
        n = len(boxes)
        objects = {
            "labels": torch.as_tensor(target["labels"], dtype=torch.int64, device=image.device).reshape(-1),
            "iscrowd": torch.as_tensor(target.get("iscrowd", torch.zeros(n)), device=image.device).reshape(-1).bool(),
        }
        if target.get("masks") is not None:
            objects["masks"] = torch.as_tensor(target["masks"], device=image.device).to(torch.uint8)
            if objects["masks"].shape != (n, *image.shape[-2:]):
                raise DeepscopeError(
                    f"masks of shape {tuple(objects['masks'].shape)} do not match {n} boxes on an image "
                    f"of size {tuple(image.shape[-2:])}"
                )
        for key, value in objects.items():
            if len(value) != n:
                raise DeepscopeError(f"target has {n} boxes but {len(value)} {key}")
        rest = {k: v for k, v in target.items() if k not in ("boxes", *objects)}
        return cls(image, boxes, objects, rest)

    def apply(self, op: Callable[..., Tensor], *args: Any, **kwargs: Any) -> None:
        canvas = (int(self.image.shape[-2]), int(self.image.shape[-1]))
        boxes = tv_tensors.BoundingBoxes(self.boxes, format="XYXY", canvas_size=canvas)
        self.boxes = op(boxes, *args, **kwargs).as_subclass(Tensor)
        if "masks" in self.objects:
            self.objects["masks"] = op(tv_tensors.Mask(self.objects["masks"]), *args, **kwargs).as_subclass(Tensor)
        self.image = op(self.image, *args, **kwargs)

    def keep(self, valid: Tensor) -> None:
        self.boxes = self.boxes[valid]
        self.objects = {key: value[valid] for key, value in self.objects.items()}

    def crop(self, top: int, left: int, height: int, width: int, min_visible: float) -> None:
        """Crop, clip the boxes to the window and drop those keeping less than ``min_visible`` of their area."""
        before = box_area(self.boxes)
        self.apply(F.crop, top, left, height, width)
        self.keep(box_area(self.boxes) >= min_visible * before)

    def sanitize(self) -> None:
        """Clip every box into the image and drop degenerate ones, so no invalid box ever reaches a model."""
        canvas = (int(self.image.shape[-2]), int(self.image.shape[-1]))
        boxes = F.clamp_bounding_boxes(tv_tensors.BoundingBoxes(self.boxes, format="XYXY", canvas_size=canvas))
        self.boxes = boxes.as_subclass(Tensor)
        _, valid = F.sanitize_bounding_boxes(boxes, min_size=MIN_BOX_SIDE, min_area=0.0)
        self.keep(valid)

    def target(self) -> dict[str, Any]:
        return {"boxes": self.boxes, **self.objects, **self.rest}


def _uniforms(generator: torch.Generator, n: int) -> list[float]:
    """``n`` uniforms in [0, 1) as Python floats: one draw and one device sync for all of a sample's decisions."""
    return torch.rand(n, generator=generator, device=generator.device).tolist()


def _oriented(height: int, width: int, portrait: bool) -> tuple[int, int]:
    """A new (height, width) nudged to keep the source's orientation (square counts as landscape, as in torchvision's
    aspect-ratio grouping). For a crop of a landscape image the larger side never exceeds the image (height <= H <= W);
    for a portrait one width + 1 <= W + 1 <= H, so nudged crops still fit."""
    return (max(height, width + 1), width) if portrait else (height, max(width, height))


def _factor(strength: float, u: float) -> float:
    return max(0.0, 1 + strength * (2 * u - 1))


def _any_channels(adjust: Callable[[Tensor, float], Tensor], image: Tensor, factor: float) -> Tensor:
    """A torchvision colour op, which takes only grey or RGB images, on any channel count (each channel as a grey
    image otherwise: contrast then blends each channel with its own mean)."""
    if image.shape[-3] in (1, 3):
        return adjust(image, factor)
    return adjust(image.unsqueeze(-3), factor).squeeze(-3)


def _jitter_colour(image: Tensor, config: DetAugmentConfig, draws: list[float]) -> Tensor:
    brightness, contrast, saturation, hue = draws
    if config.brightness:
        image = _any_channels(F.adjust_brightness, image, _factor(config.brightness, brightness))
    if config.contrast:
        image = _any_channels(F.adjust_contrast, image, _factor(config.contrast, contrast))
    if image.shape[-3] == 3:
        if config.saturation:
            image = F.adjust_saturation(image, _factor(config.saturation, saturation))
        if config.hue:
            image = F.adjust_hue(image, config.hue * (2 * hue - 1))
    return image


def as_target(image: Tensor, target: dict[str, Any]) -> dict[str, Any]:
    """A target in the models' convention on the image's device, as ``augment_sample`` returns it, unaugmented."""
    return _Scene.of(image, target).target()


def augment_sample(
    image: Tensor, target: dict[str, Any], config: DetAugmentConfig, generator: torch.Generator
) -> tuple[Tensor, dict[str, Any]]:
    """One randomly augmented copy of an image (C, H, W) float in [0, 1] and its target, on the image's device.

    Order: rescale, crop, flips, quarter turns, colour. The target comes back with ``boxes`` float32, ``labels``
    int64, ``iscrowd`` bool (all False when not given) and ``masks`` uint8 when given, filtered together; other keys
    (per-image values such as ``image_id``) pass through unchanged. An image may end with no objects.
    """
    (scale, crop, crop_h, crop_w, crop_top, crop_left, hflip, vflip, turns, *colour) = _uniforms(generator, 13)
    scene = _Scene.of(image, target)
    height, width = image.shape[-2:]
    portrait = height > width
    low, high = config.scale_jitter
    if high > low or low != 1:
        factor = low + scale * (high - low)
        size = _oriented(max(1, round(height * factor)), max(1, round(width * factor)), portrait)
        scene.apply(F.resize, list(size), antialias=True)
        height, width = size
    if crop < config.crop:
        fraction = 1 - config.crop_min
        size_h, size_w = _oriented(
            max(1, round(height * (config.crop_min + crop_h * fraction))),
            max(1, round(width * (config.crop_min + crop_w * fraction))),
            portrait,
        )
        top, left = int(crop_top * (height - size_h + 1)), int(crop_left * (width - size_w + 1))
        scene.crop(top, left, size_h, size_w, config.min_visible)
    if hflip < config.hflip:
        scene.apply(F.horizontal_flip)
    if vflip < config.vflip:
        scene.apply(F.vertical_flip)
    if config.rot90:
        quarter_turns = int(turns * 4)
        if scene.image.shape[-2] != scene.image.shape[-1]:
            quarter_turns = quarter_turns // 2 * 2
        if quarter_turns:
            scene.apply(F.rotate, 90.0 * quarter_turns, expand=True)
    scene.image = _jitter_colour(scene.image, config, colour)
    scene.sanitize()
    return scene.image, scene.target()


def mosaic(
    samples: list[Sample], out_size: tuple[int, int], generator: torch.Generator, min_visible: float = 0.3
) -> tuple[Tensor, dict[str, Any]]:
    """Four samples tiled 2x2 around a random centre into one image of ``out_size`` (h, w), in reading order.

    Each image is rescaled (aspect kept) just enough to cover its quadrant, and a random window of the quadrant's
    size is cut from it, with the crop's box rule (``min_visible``). Masks are kept when all four have them.
    """
    if len(samples) != 4:
        raise DeepscopeError(f"a mosaic takes 4 images, got {len(samples)}")
    height, width = out_size
    if height < 2 or width < 2:
        raise DeepscopeError(f"a mosaic needs at least 2 x 2 pixels, got {height} x {width}")
    channels = sorted({int(image.shape[-3]) for image, _ in samples})
    if len(channels) > 1:
        raise DeepscopeError(f"mosaic images differ in channel count: {channels}")
    with_masks = [t.get("masks") is not None for _, t in samples]
    if any(with_masks) and not all(with_masks):
        raise DeepscopeError("a mosaic needs masks on all four images or on none")
    centre_y, centre_x, *offsets = _uniforms(generator, 10)
    cy = min(height - 1, max(1, round(height * (0.25 + 0.5 * centre_y))))
    cx = min(width - 1, max(1, round(width * (0.25 + 0.5 * centre_x))))
    quadrants = [(0, 0, cy, cx), (0, cx, cy, width - cx), (cy, 0, height - cy, cx), (cy, cx, height - cy, width - cx)]
    pieces = []
    for k, ((image, target), (top, left, q_h, q_w)) in enumerate(zip(samples, quadrants)):
        scene = _Scene.of(image, target)
        h, w = image.shape[-2:]
        cover = max(q_h / h, q_w / w)
        size = [max(q_h, math.ceil(h * cover - 1e-6)), max(q_w, math.ceil(w * cover - 1e-6))]
        scene.apply(F.resize, size, antialias=True)
        u, v = offsets[2 * k : 2 * k + 2]
        scene.crop(int(u * (size[0] - q_h + 1)), int(v * (size[1] - q_w + 1)), q_h, q_w, min_visible)
        scene.apply(F.pad, [left, top, width - left - q_w, height - top - q_h])
        pieces.append(scene)
    objects = {key: torch.cat([p.objects[key] for p in pieces]) for key in pieces[0].objects}
    combined = _Scene(torch.stack([p.image for p in pieces]).sum(0), torch.cat([p.boxes for p in pieces]), objects)
    combined.sanitize()
    return combined.image, combined.target()
