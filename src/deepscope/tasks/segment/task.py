"""Semantic and instance segmentation, 2D and 3D: image/label pairs in, a U-Net, instances and scores out.

Training draws random patches, augments them on the device and turns the (augmented) label patches into the
target there; validation and test predict whole images tile by tile, post-process them to instances and score
them as the field does (matching at IoU 0.5..0.9, VOI, adapted Rand) plus pixel IoU/Dice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.data.loaders import epoch_generator
from deepscope.data.seg_augment import augment_pair
from deepscope.data.seg_dataset import (
    PatchDataset,
    PatchLoader,
    SegItem,
    common_channels,
    find_items,
    load_items,
)
from deepscope.data.targets import batch_class_map, batch_target
from deepscope.engine.distributed import DistInfo, gather_objects
from deepscope.engine.report import write_report
from deepscope.data.readers import split_validation
from deepscope.engine.task import ItemShard, Task
from deepscope.errors import DataError, DeepscopeError
from deepscope.losses.segmentation import build_loss
from deepscope.models import build_unet
from deepscope.tasks.geometry import halo_for, patch_shape_for
from deepscope.tasks.segment.config import (
    CHANNELS,
    DEFAULT_PATCH,
    SegmentConfig,
)
from deepscope.tasks.segment.predict import Predictor, score_image, summarize_records
from deepscope.tasks.segment.report import SHOWN, draw_overlays, report_sections


class TrainBatches:
    """Patches augmented on the device and turned into (image, target, loss mask) there."""

    def __init__(self, loader: PatchLoader, config: SegmentConfig, rank: int) -> None:
        self.loader, self.config, self.rank, self.epoch = loader, config, rank, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        cfg = self.config
        generator = epoch_generator(cfg.seed * 7919 + self.rank, self.epoch, self.loader.device)
        for image, labels in self.loader:
            image, labels, mask = augment_pair(image, labels, cfg.augment, generator)
            if cfg.target == "semantic":
                target = batch_class_map(labels, cfg.class_values, cfg.ignore_label)
                mask = mask * (target >= 0).unsqueeze(1)
                target = target.clamp(min=0)
            else:
                target = batch_target(cfg.target, labels)
            yield image, target, mask


class SegmentTask(Task):
    name = "segment"
    config: SegmentConfig

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        cfg = self.config
        self.device, self.dist = device, dist
        semantic = cfg.target == "semantic"
        found = find_items(cfg.data, cfg.raw_key, cfg.label_key)
        splits = {s: load_items(entries, None, *cfg.normalize, require_objects=not semantic) for s, entries in found.items()}
        if "all" in splits:
            splits["train"] = splits.pop("all")
        if "train" not in splits:
            raise DataError(f"{cfg.data}: no training images (expected train/ or images/ + masks/)")
        if "val" not in splits:
            splits["train"], val = split_validation(splits["train"], cfg.val_fraction, cfg.seed)
            if val:
                splits["val"] = val
        self.splits = splits
        everything = [item for items in splits.values() for item in items]
        self.ndim = everything[0].labels.ndim
        for item in everything:
            if item.labels.ndim != self.ndim:
                raise DataError(f"{item.name}: labels are {item.labels.ndim}D but others are {self.ndim}D")
        self.channels = common_channels(everything, self.ndim)
        self.class_names = self._classes(splits["train"]) if semantic else None
        self.out_channels = len(self.class_names) if self.class_names else CHANNELS[cfg.target]
        self.divisor = self.build_model().divisor
        self.patch_shape = patch_shape_for(cfg.patch_shape, [i.labels.shape for i in splits["train"]], DEFAULT_PATCH[self.ndim],
                                           self.divisor, "labels")
        self.tile = tuple(cfg.inference.tile or self.patch_shape)
        self.halo = tuple(cfg.inference.halo) if cfg.inference.halo else halo_for(self.tile, self.divisor)

    def _classes(self, items: Sequence[SegItem]) -> list[str]:
        cfg = self.config
        if cfg.class_values:
            return [str(v) for v in cfg.class_values]
        if cfg.num_classes:
            return [str(i) for i in range(cfg.num_classes)]
        top = 0
        for item in items:
            labels = np.asarray(item.labels[...])
            top = max(top, int(labels[labels != cfg.ignore_label].max(initial=0)))
        return [str(i) for i in range(max(2, top + 1))]

    def build_model(self) -> nn.Module:
        return build_unet(self.channels, self.out_channels, self.ndim, **self.config.model_args)

    def train_batches(self) -> TrainBatches:
        """``batch_size`` is the global batch: each of ``world`` processes draws its share of every batch."""
        cfg, train, world = self.config, self.splits["train"], self.dist.world
        if cfg.batch_size % world:
            raise DeepscopeError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
        length = cfg.patches_per_epoch or max(len(train), math.ceil(sum(np.prod(i.labels.shape) for i in train) / np.prod(self.patch_shape)))
        length = max(cfg.batch_size, math.ceil(length / cfg.batch_size) * cfg.batch_size)
        dataset = PatchDataset(train, self.patch_shape, length, self.channels, cfg.min_foreground, cfg.seed)
        loader = PatchLoader(dataset, cfg.batch_size // world, self.device, self.dist.rank, world, cfg.num_workers)
        return TrainBatches(loader, cfg, self.dist.rank)

    def val_batches(self) -> ItemShard | None:
        return ItemShard(self.splits["val"], self.dist.rank, self.dist.world) if "val" in self.splits else None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        image, target, mask = batch
        return build_loss(self.config.loss)(model(image), target, mask)

    def predictor(self, model: nn.Module) -> Predictor:
        cfg = self.config
        return Predictor(model, cfg.target, self.channels, self.out_channels, self.tile, self.halo, self.divisor,
                         cfg.inference, cfg.post, self.device, cfg.eval_batch_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        predictor, cfg = self.predictor(model), self.config
        records = [score_image(predictor, item, cfg.class_values, cfg.ignore_label)[0] for item in batches]
        gathered = [r for part in gather_objects(records) for r in part]
        return summarize_records(gathered, cfg.target, self.class_names)

    def inference_state(self) -> dict[str, Any]:
        return {"ndim": self.ndim, "channels": self.channels, "out_channels": self.out_channels, "class_names": self.class_names,
                "patch_shape": list(self.patch_shape), "tile": list(self.tile), "halo": list(self.halo), "divisor": list(self.divisor)}

    def display_images(self, batch: Any) -> torch.Tensor:
        image = batch[0][:8].float()
        if image.ndim == 5:
            image = image[:, :, image.shape[2] // 2]
        image = image[:, :3] if image.shape[1] >= 3 else image[:, :1]
        return image.clamp(0, 1)

    def finish(self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if "test" in self.splits:
            result["test"] = self.evaluate(model, ItemShard(self.splits["test"], self.dist.rank, self.dist.world))
            result.update({f"test_{k}": v for k, v in result["test"].items() if isinstance(v, float)})
        shown = "test" if "test" in self.splits else "val" if "val" in self.splits else "train"
        if self.dist.is_main:
            with torch.no_grad():
                draw_overlays(self.predictor(model), self.splits[shown][:SHOWN], self.config, run_dir / "overlays.png")
            result["shown_split"] = shown
        return result

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        final = metrics.get("test") or metrics.get("val") or {}
        split = "test" if metrics.get("test") else "validation"
        sections = report_sections(final, split, run_dir)
        if (run_dir / "overlays.png").exists():
            caption = "image | truth (green outlines) | prediction (magenta outlines) | probability"
            sections.append((f"Predictions ({metrics.get('shown_split')} images)", f"<p>{caption}</p><img src='overlays.png' alt='overlays'>"))
        write_report(run_dir, f"deepscope segment: {self.config.target} U-Net on {self.config.data}", metrics, history, sections)


