"""Training batches for detection: whole images of different sizes, as lists, augmented on the training device.

Detectors take a list of images rather than one stacked tensor, so a batch is ``(images, targets)`` of lists. The
images stay in memory as stored (uint8/uint16, a quarter or half of float32) and are converted, augmented and
batched per step on the device. Every epoch is a function of (seed, epoch) alone and every process's augmentation
of (seed, rank, epoch), so iterating an epoch again (a resumed run) yields exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deepscope.data.detection.augment import DetAugmentConfig, as_target, augment_sample, mosaic
from deepscope.errors import DeepscopeError


@dataclass
class DetSample:
    """One training image held as stored: (H, W, C) or (H, W), any unsigned integer type (scaled by its maximum) or
    float in [0, 1]; its target has ``boxes`` (N, 4) xyxy, ``labels`` (N,), optionally ``iscrowd`` (N,), ``masks``
    (N, H, W) and per-image values such as ``image_id``. ``masks`` loads instance masks on demand instead, since they
    take N times the image's memory."""

    image: np.ndarray | Tensor
    target: dict[str, Any]
    masks: Callable[[], Any] | None = None


def _seeded(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on ``device`` seeded from several integers at once, without the collisions of adding them."""
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    generator.manual_seed(int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0]))
    return generator


def _unit_float(image: Tensor, device: torch.device) -> Tensor:
    """Stored (H, W, C) -> float (C, H, W) in [0, 1] on ``device``; integers are moved first (fewer bytes to copy)."""
    if image.ndim == 2:
        image = image[:, :, None]
    image = image.to(device).permute(2, 0, 1)
    if image.is_floating_point():
        return image.float()
    return image.float().div_(torch.iinfo(image.dtype).max)


class DetBatches:
    """``(images, targets)`` training batches of ``batch_size`` images (per process) for process ``rank`` of ``world``.

    Each epoch the images are shuffled, split by orientation (landscape W >= H, portrait) when ``group_aspect`` is
    set, as torchvision's GroupedBatchSampler does, so padding a batch to its largest image wastes little, and cut
    into batches (a group's last batch may be smaller). The batch list is then dealt out to the processes, repeated
    from its start until every process has the same number of steps, as DDP needs. Without ``augment`` the images
    pass unchanged (as float in [0, 1]); normalisation is left to the models.
    """

    def __init__(
        self,
        samples: Sequence[DetSample],
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        augment: DetAugmentConfig | None = None,
        group_aspect: bool = True,
    ) -> None:
        if not samples:
            raise DeepscopeError("no training images")
        if batch_size < 1:
            raise DeepscopeError(f"batch size must be at least 1, got {batch_size}")
        self.samples = list(samples)
        self.images = [torch.as_tensor(s.image) for s in self.samples]  # numpy arrays are shared, not copied
        self.batch_size, self.device, self.rank, self.world = batch_size, device, rank, world
        self.seed, self.augment, self.epoch = seed, augment, 0
        self.mosaic_passes: int | None = None  # passes (epochs of these batches) with mosaic; None: all of them
        portrait = [int(image.shape[0] > image.shape[1]) for image in self.images]
        self.groups = portrait if group_aspect else [0] * len(portrait)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close_mosaic(self, total_steps: int) -> None:
        """Stop mosaics for the last ``augment.close_mosaic`` share of a schedule of ``total_steps`` steps (whole
        passes: from the pass in which that share begins, rounded to the nearest)."""
        if self.augment is not None and self.augment.mosaic and self.augment.close_mosaic:
            self.mosaic_passes = round((1 - self.augment.close_mosaic) * total_steps / len(self))

    def __len__(self) -> int:
        batches = sum(math.ceil(n / self.batch_size) for n in np.bincount(self.groups).tolist())
        return math.ceil(batches / self.world)

    def epoch_batches(self) -> list[list[int]]:
        """All processes' batches of this epoch as sample indices, process ``r`` taking every ``world``-th from ``r``.

        Batches are ordered by their first image's place in the shuffled order, so neither orientation comes first.
        """
        order = torch.randperm(
            len(self.samples), generator=_seeded(torch.device("cpu"), self.seed, self.epoch)
        ).tolist()
        batches = []
        for group in sorted(set(self.groups)):
            members = [i for i in order if self.groups[i] == group]
            batches += [members[start : start + self.batch_size] for start in range(0, len(members), self.batch_size)]
        place = {index: position for position, index in enumerate(order)}
        batches.sort(key=lambda batch: place[batch[0]])
        return [batches[i % len(batches)] for i in range(len(self) * self.world)]

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        sample = self.samples[index]
        image = _unit_float(self.images[index], self.device)
        target = dict(sample.target)
        if sample.masks is not None:
            target["masks"] = np.asarray(sample.masks())
        return image, as_target(image, target)

    def _prepare(self, index: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        """Load one image and its target on the device, replaced by a mosaic with its probability, then augmented."""
        image, target = self._load(index)
        if self.augment is None:
            return image, target
        if self.augment.mosaic and (self.mosaic_passes is None or self.epoch < self.mosaic_passes):
            draw, *others = torch.rand(4, generator=generator, device=generator.device).tolist()
            if draw < self.augment.mosaic:
                parts = [(image, target)] + [self._load(int(u * len(self.samples))) for u in others]
                image, target = mosaic(
                    parts, (int(image.shape[-2]), int(image.shape[-1])), generator, self.augment.min_visible
                )
        return augment_sample(image, target, self.augment, generator)

    def __iter__(self) -> Iterator[tuple[list[Tensor], list[dict[str, Any]]]]:
        generator = _seeded(self.device, self.seed, self.rank, self.epoch)
        for batch in self.epoch_batches()[self.rank :: self.world]:
            images, targets = zip(*(self._prepare(index, generator) for index in batch))
            yield list(images), list(targets)
