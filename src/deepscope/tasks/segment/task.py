"""Semantic and instance segmentation, 2D and 3D: image/label pairs in, a U-Net, instances and scores out.

Training draws random patches, augments them on the device and turns the (augmented) label patches into the
target there; validation and test predict whole images tile by tile, post-process them to instances and score
them as the field does (matching at IoU 0.5..0.9, VOI, adapted Rand) plus pixel IoU/Dice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deepscope.config import save_yaml
from deepscope.data.epochs import epoch_generator
from deepscope.data.io.splits import split_validation
from deepscope.data.io.views import Normalized
from deepscope.data.segmentation.augment import SegAugmentConfig, augment_pair
from deepscope.data.segmentation.dataset import (
    PatchDataset,
    PatchLoader,
    SegItem,
    balanced_weights,
    common_channels,
    find_items,
    image_groups,
    load_items,
)
from deepscope.data.segmentation.flows import batch_flow_target
from deepscope.data.segmentation.label_checks import label_warnings
from deepscope.data.segmentation.star import batch_star_target, non_star_convex_fraction
from deepscope.data.segmentation.targets import batch_class_map, batch_target
from deepscope.engine.checkpoint import load_checkpoint, save_checkpoint
from deepscope.engine.distributed import DistInfo, gather_objects
from deepscope.engine.logging import preview_images
from deepscope.engine.plan import budget_of
from deepscope.engine.precision import resolve_precision
from deepscope.engine.probe import seconds_per_forward, seconds_per_step
from deepscope.engine.report import table, write_report
from deepscope.engine.task import ItemShard, Task
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.geometry import halo_for, patch_shape_for
from deepscope.losses.segmentation import build_loss
from deepscope.models import build_unet
from deepscope.tasks.segment.config import DEFAULT_PATCH, SegmentConfig, output_channels
from deepscope.tasks.segment.plan import Hardware, fingerprint, given_steps, make_plan, plan_target, semantic_plan
from deepscope.tasks.segment.predict import Predictor, score_image, summarize_records
from deepscope.tasks.segment.report import SHOWN, draw_overlays, overlay_caption, report_sections, worst_names
from deepscope.tasks.segment.tune import tune_post, tuned_validation

if TYPE_CHECKING:
    from deepscope.models.unet import UNet

WARNINGS_SHOWN = 5  # label warnings written to the log one by one; the rest are counted


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
            image, labels, mask = augment_pair(image, labels, cfg.augment or SegAugmentConfig(), generator)
            yield image, *training_target(cfg, labels, mask)


def segment_loss(cfg: SegmentConfig) -> Any:
    """The configured loss; stardist's distance term is weighted 0.2 per pixel of error as in StarDist, which is
    0.2 * dist_scale per unit of the scaled distances the network predicts."""
    if cfg.loss == "stardist":
        return build_loss(cfg.loss, dist_weight=0.2 * (cfg.dist_scale or 1.0))
    return build_loss(cfg.loss)


def training_target(cfg: SegmentConfig, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, loss mask) of a batch of (augmented) label patches for the configured target."""
    if cfg.target == "semantic":
        target = batch_class_map(labels, cfg.class_values, cfg.ignore_label)
        return target.clamp(min=0), mask * (target >= 0).unsqueeze(1)
    if cfg.target == "stardist":
        target = batch_star_target(labels, cfg.n_rays)
        return torch.cat([target[:, :1], target[:, 1:] / (cfg.dist_scale or 1.0)], dim=1), mask
    if cfg.target == "flows":
        return batch_flow_target(labels), mask
    return batch_target(cfg.target_name, labels), mask


class SegmentTask(Task):
    name = "segment"
    config: SegmentConfig
    # planned for when no --max-minutes is given (training is then not stopped by the clock)
    default_budget_minutes = 60.0

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        cfg = self.config
        started = time.time()
        self.device, self.dist = device, dist
        semantic = cfg.target == "semantic"  # only when asked for: an open target means instance labels
        # instance targets plan their schedule here (from their own step timer); semantic leaves it to the engine
        self.plans_schedule = not semantic
        found = find_items(cfg.data, cfg.raw_key, cfg.label_key, cfg.labels)
        low, high = cfg.normalize  # SegmentConfig checks that it holds two percentiles
        splits = {s: load_items(entries, None, low, high, require_objects=not semantic) for s, entries in found.items()}
        if "all" in splits:
            splits["train"] = splits.pop("all")
        if "train" not in splits:
            raise DataError(f"{cfg.data}: no training images (expected train/ or images/ + masks/)")
        everything = [item for items in splits.values() for item in items]
        self.ndim = everything[0].labels.ndim
        for item in everything:
            if item.labels.ndim != self.ndim:
                raise DataError(f"{item.name}: labels are {item.labels.ndim}D but others are {self.ndim}D")
        plan_target(cfg, self.plan, self.ndim)
        self.plan.apply(cfg)
        cfg.check_target()
        self.channels = common_channels(everything, self.ndim)
        appearance = image_groups(splits["train"], "auto", None)
        if semantic:
            semantic_plan(cfg, self.plan)
        else:
            self._plan(splits["train"], appearance, started)
        self.plan.apply(cfg)
        assert cfg.batch_size is not None  # given, or planned just now
        if cfg.steps_per_epoch is None and cfg.patches_per_epoch is not None:
            # given patches are given steps: the engine's planner must not replace them (semantic)
            cfg.steps_per_epoch = given_steps(cfg, cfg.batch_size)
        if cfg.invert in ("always", "auto"):  # the percentiles are known; the training images' backgrounds too
            known = {id(item): group for item, group in zip(splits["train"], appearance)}
            for item in everything:
                bright = (known.get(id(item)) or image_groups([item], "auto", None)[0]).endswith("bright")
                item.image = Normalized(
                    item.stored, self.ndim, item.image.low, item.image.high, inverted=cfg.invert == "always" or bright
                )
        if not semantic:
            self._check_labels(splits["train"])
        self.groups = dict(
            zip(
                (i.name for i in splits["train"]),
                appearance
                if cfg.balance in (None, "none", "auto")
                else image_groups(splits["train"], cfg.balance, Path(cfg.data)),
            )
        )
        if "val" not in splits:
            splits["train"], val = split_validation(splits["train"], cfg.val_fraction or 0.0, cfg.seed)
            if val:
                splits["val"] = val
        self.splits = splits
        self.class_names = self._classes(splits["train"]) if semantic else None
        self.out_channels = (
            len(self.class_names) if self.class_names else output_channels(cfg.target_name, self.ndim, cfg.n_rays)
        )
        self.divisor = self.build_model().divisor
        self.patch_shape = patch_shape_for(
            cfg.patch_shape, [i.labels.shape for i in splits["train"]], DEFAULT_PATCH[self.ndim], self.divisor, "labels"
        )
        self.tile = tuple(cfg.inference.tile or self.patch_shape)
        self.halo = tuple(cfg.inference.halo) if cfg.inference.halo else halo_for(self.tile, self.divisor)

    def _plan(self, train: Sequence[SegItem], appearance: Sequence[str], started: float) -> None:
        """Plan every setting left at None into ``self.plan``, from the data and the budget (``plan.py``)."""
        cfg = self.config
        fp = fingerprint(train, self.ndim, self.channels, appearance, cfg.seed)
        hw = Hardware(self.device.type, resolve_precision(cfg.amp, self.device).name)
        train_pixels = float(sum(np.prod(i.labels.shape) for i in train))
        budget = budget_of(cfg, self.default_budget_minutes)
        make_plan(
            cfg, fp, hw, budget, time.time() - started, lambda *a: self._time_steps(train, *a), train_pixels, self.plan
        )

    def _time_steps(
        self, train: Sequence[SegItem], patch: list[int], model_args: dict[str, Any], batch: int
    ) -> tuple[float, float]:
        """(seconds per training step, seconds per predicted pixel) of a U-Net with ``model_args``: four steps on
        real patches through the training path (patches, augmentation, target, loss) and one tiled forward pass."""
        cfg = self.config
        model = build_unet(
            self.channels, output_channels(cfg.target_name, self.ndim, cfg.n_rays), self.ndim, **model_args
        ).to(self.device)
        precision = resolve_precision(cfg.amp, self.device)
        dataset = PatchDataset(train, patch, 4 * batch, self.channels, cfg.min_foreground, cfg.seed)
        batches = TrainBatches(PatchLoader(dataset, batch, self.device), cfg, self.dist.rank)
        step = seconds_per_step(model, batches, self.loss, precision, self.device)
        window = [p + 2 * h for p, h in zip(patch, halo_for(patch, model.divisor))]
        tiles = torch.zeros(cfg.eval_batch_size, self.channels, *window, device=self.device)
        return step, seconds_per_forward(model, tiles, precision, self.device) / (
            cfg.eval_batch_size * float(np.prod(patch))
        )

    def _check_labels(self, train: Sequence[SegItem]) -> None:
        """Warn about objects with holes or in pieces (naming the files) and, for stardist, about shapes a star-convex
        polygon cannot draw: both train silently into a worse model otherwise."""
        cfg = self.config
        warnings = [
            w for item in train for w in label_warnings(np.asarray(item.labels[...]), item.label_source or item.name)
        ]
        for warning in warnings[:WARNINGS_SHOWN]:
            self.notes.append(f"warning: {warning}")
        if len(warnings) > WARNINGS_SHOWN:
            self.notes.append(f"warning: {len(warnings) - WARNINGS_SHOWN} more label warnings of this kind")
        if cfg.target == "stardist":
            fraction, bad, total = non_star_convex_fraction([np.asarray(i.labels[...]) for i in train], cfg.n_rays)
            self.notes.append(
                f"{'warning: ' if fraction > 0.05 else ''}{bad} of {total} training objects ({fraction:.1%}) are not "
                f"star-convex: their {cfg.n_rays}-ray polygon covers them poorly"
                + ("; target flows suits such shapes better" if fraction > 0.05 else "")
            )

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

    def build_model(self) -> UNet:
        return build_unet(self.channels, self.out_channels, self.ndim, **self.config.model_args)

    def train_batches(self) -> TrainBatches:
        """``batch_size`` is the global batch: each of ``world`` processes draws its share of every batch."""
        cfg, train, world = self.config, self.splits["train"], self.dist.world
        assert cfg.batch_size is not None  # the plan of setup() sets it
        if cfg.batch_size % world:
            raise DeepscopeError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
        length = cfg.patches_per_epoch or max(
            len(train), math.ceil(sum(np.prod(i.labels.shape) for i in train) / np.prod(self.patch_shape))
        )
        length = max(cfg.batch_size, math.ceil(length / cfg.batch_size) * cfg.batch_size)
        weights = None
        if cfg.balance not in (None, "none"):
            weights = balanced_weights(train, [self.groups[i.name] for i in train], cfg.balance_power)
        dataset = PatchDataset(
            train, self.patch_shape, length, self.channels, cfg.min_foreground, cfg.seed, weights=weights
        )
        loader = PatchLoader(dataset, cfg.batch_size // world, self.device, self.dist.rank, world, cfg.num_workers)
        return TrainBatches(loader, cfg, self.dist.rank)

    def val_batches(self) -> ItemShard | None:
        return ItemShard(self.splits["val"], self.dist.rank, self.dist.world) if "val" in self.splits else None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        image, target, mask = batch
        return segment_loss(self.config)(model(image), target, mask)

    def predictor(self, model: nn.Module) -> Predictor:
        cfg = self.config
        return Predictor(
            model,
            cfg.target_name,
            self.channels,
            self.out_channels,
            self.tile,
            self.halo,
            self.divisor,
            cfg.inference,
            cfg.post,
            self.device,
            cfg.eval_batch_size,
            cfg.dist_scale or 1.0,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Validation metrics; an instance target's at the probability threshold tuned on the validation images
        (``tune.tuned_validation``, unless ``post.tune`` is off), which is reported as ``post_threshold``."""
        cfg = self.config
        if cfg.target == "semantic" or not cfg.post.tune:
            return self._scores(model, batches)
        records, tuning = tuned_validation(self.predictor(model), batches, self.dist.world)
        gathered = [r for part in gather_objects(records) for r in part]
        return {**summarize_records(gathered, cfg.target_name, self.class_names), **tuning}

    @torch.no_grad()
    def _scores(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Metrics of ``batches`` at the configured post-processing (test images, and validation without tuning)."""
        predictor, cfg = self.predictor(model), self.config
        records = [score_image(predictor, item, cfg.class_values, cfg.ignore_label)[0] for item in batches]
        gathered = [r for part in gather_objects(records) for r in part]
        return summarize_records(gathered, cfg.target_name, self.class_names)

    def inference_state(self) -> dict[str, Any]:
        return {
            "ndim": self.ndim,
            "channels": self.channels,
            "out_channels": self.out_channels,
            "class_names": self.class_names,
            "patch_shape": list(self.patch_shape),
            "tile": list(self.tile),
            "halo": list(self.halo),
            "divisor": list(self.divisor),
        }

    def display_images(self, batch: Any) -> torch.Tensor:
        return preview_images(batch[0]).clamp(0, 1)

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        cfg = self.config
        if cfg.target != "semantic" and cfg.post.tune and "val" in self.splits:
            # the threshold the best epoch was chosen at: the search starts there, and it wins the search's ties
            chosen = next(
                (h.get("val_post_threshold") for h in history if h["epoch"] == summary.get("best_epoch")), None
            )
            if chosen is not None:
                cfg.post = dataclasses.replace(cfg.post, threshold=chosen)
            with torch.no_grad():
                best, tried = tune_post(self.predictor(model), self.splits["val"])
            cfg.post = best
            result["post_tuning"] = tried
            if self.dist.is_main:
                self._store_post(run_dir)
        if "test" in self.splits:
            result["test"] = self._scores(model, ItemShard(self.splits["test"], self.dist.rank, self.dist.world))
            result.update({f"test_{k}": v for k, v in result["test"].items() if isinstance(v, float)})
        shown = "test" if "test" in self.splits else "val" if "val" in self.splits else "train"
        if self.dist.is_main:
            items = self.splits[shown]
            records = (
                {r["name"]: r for r in result["test"]["per_image"]}
                if shown == "test" and cfg.target != "semantic"
                else None
            )
            if records:
                order = worst_names(list(records.values()), SHOWN)
                items = sorted((i for i in items if i.name in order), key=lambda i: order.index(i.name))
            with torch.no_grad():
                draw_overlays(self.predictor(model), items[:SHOWN], cfg, run_dir / "overlays.png")
            result["shown_split"] = shown
        return result

    def _store_post(self, run_dir: Path) -> None:
        """The tuned post-processing into both checkpoints and config.yaml, so every later predict uses it."""
        post = dataclasses.asdict(self.config.post)
        for path in (run_dir / "best.pt", run_dir / "last.pt"):
            if path.exists():
                state = load_checkpoint(path)
                state["config"]["post"] = post
                save_checkpoint(state, path)
        save_yaml(self.config, run_dir / "config.yaml", header=self.plan.reasons)

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        final = metrics.get("test") or metrics.get("val") or {}
        split = "test" if metrics.get("test") else "validation"
        sections = report_sections(final, split, run_dir)
        if metrics.get("post_tuning"):
            sections.append(("Post-processing tuned on the validation images", table(metrics["post_tuning"])))
        if (run_dir / "overlays.png").exists():
            caption = overlay_caption(self.config.target_name) + (
                " (worst test images first)" if metrics.get("test") else ""
            )
            sections.append(
                (
                    f"Predictions ({metrics.get('shown_split')} images)",
                    f"<p>{caption}</p><img src='overlays.png' alt='overlays'>",
                )
            )
        write_report(
            run_dir, f"deepscope segment: {self.config.target} U-Net on {self.config.data}", metrics, history, sections
        )
