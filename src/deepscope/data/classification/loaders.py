"""Batch iterators for training and evaluation.

:class:`DeviceLoader` is the fast path: the whole data set lives on the training device
as one integer tensor, and each step slices a batch, converts and augments it there.
:func:`torch_loader` is the classic ``DataLoader`` with per-image torchvision transforms,
for data sets that do not fit in memory and as the baseline the fast path is measured against.
Both shard data across data-parallel ranks and reshuffle per epoch from the seed alone, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deepscope.data.classification.augment import AugmentConfig, BatchAugment, torchvision_pipeline
from deepscope.data.classification.dataset import AnyImageSet, ImageSet
from deepscope.data.epochs import epoch_generator, epoch_seed
from deepscope.errors import DeepscopeError


@dataclass(frozen=True)
class BatchSpec:
    """How batches are drawn, the same for both loaders.

    ``batch_size`` is the global batch; with ``world`` > 1 each rank yields its share of it.
    ``shuffle`` marks training batches: reshuffled per epoch, augmented, incomplete last batch dropped.
    """

    batch_size: int
    mean: list[float]
    std: list[float]
    shuffle: bool = False
    augment: AugmentConfig | None = None
    seed: int = 0
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.batch_size % self.world:
            raise DeepscopeError(
                f"batch size {self.batch_size} must be divisible by the number of processes ({self.world})"
            )


class DeviceLoader:
    """Iterate over (x, y) batches of an :class:`ImageSet` held on ``device``, as ``spec`` says."""

    def __init__(self, data: ImageSet, spec: BatchSpec, device: torch.device, channels_last: bool = True) -> None:
        self.device = device
        # kept NHWC as read (on the CPU this shares the numpy array's memory); batches are permuted after slicing
        self.images = torch.from_numpy(
            data.images.astype(np.int32) if data.images.dtype == np.uint16 else data.images
        ).to(device)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.scale = data.scale
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        self.spec = spec
        self.batch_size = spec.batch_size if spec.shuffle else min(spec.batch_size, len(data))
        self.augment = BatchAugment(spec.augment) if spec.augment is not None and spec.shuffle else None
        self.channels_last = channels_last
        self.epoch = 0
        if spec.shuffle and len(data) < spec.batch_size:
            raise DeepscopeError(
                f"{len(data)} training images are fewer than one batch of {spec.batch_size}; lower --batch-size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> tuple[int, int]:
        """Evaluation: this rank's contiguous range of images; metrics are summed across ranks afterwards."""
        n, spec = len(self.labels), self.spec
        return n * spec.rank // spec.world, n * (spec.rank + 1) // spec.world

    def __len__(self) -> int:
        if self.spec.shuffle:
            return len(self.labels) // self.batch_size
        lo, hi = self._shard()
        return -(-(hi - lo) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec, bs = self.spec, self.batch_size
        if not spec.shuffle:
            lo, hi = self._shard()
            for start in range(lo, hi, bs):
                yield self._prepare(torch.arange(start, min(start + bs, hi), device=self.device))
            return
        order = torch.randperm(len(self.labels), generator=epoch_generator(spec.seed, self.epoch, torch.device("cpu")))
        order = order.to(self.device)
        generator = epoch_generator(spec.seed + 1, self.epoch, self.device)
        share = bs // spec.world
        rows = slice(spec.rank * share, (spec.rank + 1) * share)
        for b in range(len(self)):
            yield self._prepare(order[b * bs : (b + 1) * bs][rows], generator, bs, rows)

    def _prepare(
        self, index: torch.Tensor, generator: torch.Generator | None = None, n: int = 0, rows: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice, scale, normalize and (training only: ``self.augment`` is set for shuffled loaders) augment a batch."""
        x = self.images[index].permute(0, 3, 1, 2).contiguous().float().div_(self.scale)
        if self.augment is not None:
            assert generator is not None  # only shuffled loaders augment, and they pass their generator
            x = self.augment.photometric(x, generator, n, rows)
        x = (x - self.mean) / self.std
        if self.augment is not None:
            assert generator is not None  # as above
            x = self.augment.geometric(x, generator, n, rows)
        if self.channels_last:  # last: the augmentation's gathers are faster on contiguous tensors
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]


class TransformDataset(Dataset):
    """Images (in memory or read from disk) that go through a torchvision transform one at a time."""

    def __init__(self, data: AnyImageSet, transform: torch.nn.Module) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.data.image(i)
        if image.dtype == np.uint16:  # torch has few uint16 kernels: scale to [0, 1] here
            tensor = torch.from_numpy(image.astype(np.float32) / 65535.0).permute(2, 0, 1)
        else:
            tensor = torch.from_numpy(image).permute(2, 0, 1)
        return self.transform(tensor), int(self.data.labels[i])


def torch_loader(data: AnyImageSet, spec: BatchSpec, num_workers: int = 0, pin_memory: bool = False) -> EpochDataLoader:
    """A standard ``DataLoader`` with per-image transforms; ``set_epoch`` reseeds its shuffling.

    ``pin_memory`` (for a CUDA device) lets :class:`ToDevice` copy batches asynchronously.
    """
    size = data.shape[:2]
    dataset = TransformDataset(
        data, torchvision_pipeline(spec.augment if spec.shuffle else None, spec.mean, spec.std, size)
    )
    sampler: DistributedSampler[int] | None = (
        DistributedSampler(dataset, spec.world, spec.rank, shuffle=spec.shuffle, seed=spec.seed, drop_last=spec.shuffle)
        if spec.world > 1
        else None
    )
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size // spec.world,
        shuffle=spec.shuffle and sampler is None,
        sampler=sampler,
        drop_last=spec.shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(spec.seed),
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
    return EpochDataLoader(loader, spec.seed)


class EpochDataLoader:
    """Wraps a DataLoader so ``set_epoch`` makes shuffling a function of (seed, epoch)."""

    def __init__(self, loader: DataLoader, seed: int) -> None:
        self.loader, self.seed = loader, seed

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)
        self.loader.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)


class ToDevice:
    """Moves DataLoader batches to the training device (non-blocking from pinned memory)."""

    def __init__(self, loader: EpochDataLoader, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True, memory_format=fmt), y.to(self.device, non_blocking=True)
