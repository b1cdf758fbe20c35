"""Semantic and instance segmentation, 2D and 3D: image/label pairs in, a U-Net, instances and scores out.

Training draws random patches, augments them on the device and turns the (augmented) label patches into the
target there; validation and test predict whole images tile by tile, post-process them to instances and score
them as the field does (matching at IoU 0.5..0.9, VOI, adapted Rand) plus pixel IoU/Dice.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.segmentation import find_boundaries
from torch import nn

from deepscope.config import OptimConfig, TrainConfig, from_dict
from deepscope.data.loaders import epoch_generator
from deepscope.data.seg_augment import SegAugmentConfig, augment_pair
from deepscope.blockio import Output, open_input, output_paths
from deepscope.data.seg_dataset import (
    ChannelsFirst,
    Normalized,
    PatchDataset,
    PatchLoader,
    SegItem,
    common_channels,
    find_items,
    load_items,
    percentiles,
)
from deepscope.data.targets import TARGETS, batch_class_map, batch_target
from deepscope.engine.distributed import DistInfo, gather_objects
from deepscope.engine.report import image_grid, plot_lines, table, write_report
from deepscope.engine.task import Task
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference import load_trained_model
from deepscope.losses.segmentation import build_loss
from deepscope.metrics.instance import image_scores, summarize
from deepscope.metrics.semantic import confusion, confusion_scores
from deepscope.models import build_unet
from deepscope.postprocess import SEEDS, watershed_from_seeds
from deepscope.tiling import BLENDS, predict_tiled

CHANNELS = {"foreground": 1, "boundaries": 1, "foreground_boundaries": 2, "distance": 1}
DEFAULT_PATCH = {2: (256, 256), 3: (32, 128, 128)}
SHOWN = 6  # images drawn in the report
MAX_COLOURS = 4  # a 2D image's last axis up to this long is read as colour channels, longer as a third axis


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


# ---- geometry defaults -------------------------------------------------------------------------------------------


def patch_shape_for(requested: Sequence[int] | None, items: Sequence[SegItem], ndim: int, divisor: Sequence[int]) -> tuple[int, ...]:
    """The requested patch shape (checked), or the default capped by the smallest image and rounded down to ``divisor``."""
    smallest = np.min([item.labels.shape for item in items], axis=0)
    if requested is not None:
        shape = tuple(int(s) for s in requested)
        if len(shape) != ndim:
            raise DataError(f"patch_shape {list(shape)} has {len(shape)} sizes but the labels are {ndim}D")
        bad = [s for s, d in zip(shape, divisor) if s % d]
        if bad:
            raise DataError(f"patch_shape {list(shape)} must be divisible by {list(divisor)} (the U-Net's pooling)")
        return shape
    shape = tuple(max(d, min(p, int(s)) // d * d) for p, s, d in zip(DEFAULT_PATCH[ndim], smallest, divisor))
    if any(p > s for p, s in zip(shape, smallest)):
        raise DataError(f"the smallest image {tuple(int(s) for s in smallest)} is smaller than one U-Net input {shape}; use a shallower model (model_args.depth)")
    return shape


def halo_for(tile: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """About an eighth of the tile, rounded up so that ``tile + 2 * halo`` stays divisible by ``divisor``."""
    return tuple(math.ceil(t / 8 / max(1, d // 2)) * max(1, d // 2) if d > 1 else math.ceil(t / 8) for t, d in zip(tile, divisor))


def _split_val(items: list[SegItem], fraction: float, seed: int) -> tuple[list[SegItem], list[SegItem]]:
    """A seeded random ``fraction`` of the images (at least one, never all) for validation."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


# ---- prediction and scoring of whole images ---------------------------------------------------------------------


@dataclass
class Predictor:
    """Everything needed to turn an image into probabilities, instances or classes, as saved in a checkpoint."""

    model: nn.Module
    target: str
    channels: int
    out_channels: int
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    inference: InferenceConfig
    post: PostConfig
    device: torch.device
    batch_size: int = 4

    def probabilities(self, image: Any, out: Any = None) -> Any:
        """(out_channels, *spatial) float32 probabilities of a (C, *spatial) image or view, written into ``out``."""
        activation = nn.Softmax(dim=1) if self.target == "semantic" else nn.Sigmoid()
        return predict_tiled(
            nn.Sequential(self.model, activation), image, self.tile, self.halo, self.out_channels, out=out,
            blend=self.inference.blend, batch_size=self.batch_size, device=self.device,
            flip_tta=self.inference.flip_tta, model_divisor=self.divisor,
        )

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Instances (int32, 1..n) for instance targets, the class index map for semantic models."""
        probs = np.asarray(probs)
        if self.target == "semantic":
            return probs.argmax(0).astype(np.int32)
        post = self.post
        if self.target == "boundaries":
            foreground, boundary = np.ones_like(probs[0]), probs[0]
        else:
            foreground, boundary = probs[0], probs[1] if self.target == "foreground_boundaries" else None
        seeds = "maxima" if self.target == "distance" else post.seeds
        return watershed_from_seeds(foreground, boundary, post.threshold, seeds, post.min_distance, post.min_size)


def score_image(predictor: Predictor, item: SegItem, class_values: list[int] | None, ignore_label: int | None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(record, probabilities, predicted labels) of one image; the record holds instance scores and a pixel confusion."""
    was_training = predictor.model.training
    probs = predictor.probabilities(item.channels_first(predictor.channels))
    predictor.model.train(was_training)
    pred = predictor.labels(probs)
    truth = np.asarray(item.labels[...])
    if predictor.target == "semantic":
        classes = batch_class_map(torch.from_numpy(truth.astype(np.int64))[None], class_values, ignore_label)[0].numpy()
        return {"name": item.name, "confusion": confusion(classes, pred, predictor.out_channels).tolist()}, probs, pred
    record = image_scores(item.name, truth, pred)
    record["confusion"] = confusion(truth > 0, pred > 0, 2).tolist()
    return record, probs, pred


def summarize_records(records: Sequence[dict[str, Any]], target: str, class_names: list[str] | None = None) -> dict[str, Any]:
    """Data-set metrics: summed pixel confusion (IoU, Dice) and, for instance targets, the instance report."""
    matrix = np.sum([np.array(r["confusion"]) for r in records], axis=0)
    if target == "semantic":
        pixel = confusion_scores(matrix, class_names)
        return {**pixel, "confusion": matrix.tolist(), "images": len(records)}
    fg = confusion_scores(matrix)["per_class"]["1"]
    instances = summarize([{k: v for k, v in r.items() if k != "confusion"} for r in records])
    at = instances["thresholds"]
    flat = {"score_0.5": at["0.5"]["score"], "f1_0.5": at["0.5"]["f1"], "precision_0.5": at["0.5"]["precision"],
            "recall_0.5": at["0.5"]["recall"], "score_0.75": at["0.75"]["score"]}
    return {"mean_score": instances["mean_score"], **flat, "voi_split": instances["voi_split"], "voi_merge": instances["voi_merge"],
            "arand": instances["arand"], "iou": fg["iou"], "dice": fg["dice"], "images": len(records),
            "thresholds": instances["thresholds"], "per_image": instances["per_image"]}


class ItemShard:
    """Whole images for evaluation: this process's share (every ``world``-th image from ``rank``)."""

    def __init__(self, items: Sequence[SegItem], rank: int = 0, world: int = 1) -> None:
        self.items = list(items)[rank::world]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SegItem]:
        return iter(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""


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
            splits["train"], val = _split_val(splits["train"], cfg.val_fraction, cfg.seed)
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
        self.patch_shape = patch_shape_for(cfg.patch_shape, splits["train"], self.ndim, self.divisor)
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


# ---- report pictures ---------------------------------------------------------------------------------------------


def report_sections(final: dict[str, Any], split: str, run_dir: Path) -> list[tuple[str, str]]:
    """Metric tables and the score-against-IoU-threshold curve."""
    if not final:
        return []
    scalars = [{"metric": k, "value": v} for k, v in final.items() if isinstance(v, (int, float))]
    sections = [(f"{split.capitalize()} metrics", table(scalars))]
    if "thresholds" in final:
        rows = [{"IoU threshold": t, **v} for t, v in final["thresholds"].items()]
        x = [float(t) for t in final["thresholds"]]
        plot_lines(x, {k: [final["thresholds"][t][k] for t in final["thresholds"]] for k in ("score", "f1", "precision", "recall")},
                   run_dir / "scores.png", "IoU threshold", "value")
        sections.append(("Instance matching", "<img src='scores.png' alt='scores against IoU threshold'>" + table(rows)))
    if "per_class" in final:
        sections.append(("Per class", table([{"class": k, **v} for k, v in final["per_class"].items()])))
    return sections


def _display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalized image as (H, W, 3) in [0, 1]."""
    rgb = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    return np.clip(np.moveaxis(rgb, 0, -1), 0, 1)


def _outline(rgb: np.ndarray, labels: np.ndarray, colour: tuple[float, float, float]) -> np.ndarray:
    out = rgb.copy()
    out[find_boundaries(labels, mode="inner")] = colour
    return out


def draw_overlays(predictor: Predictor, items: Sequence[SegItem], config: SegmentConfig, path: Path) -> None:
    """Image, truth and prediction outlines, and the first probability channel, one row per image (3D: middle slice)."""
    panels, captions = [], []
    for item in items:
        _, probs, pred = score_image(predictor, item, config.class_values, config.ignore_label)
        image = np.asarray(item.channels_first(predictor.channels)[(slice(None),) + tuple(slice(None) for _ in item.labels.shape)])
        truth = np.asarray(item.labels[...])
        if truth.ndim == 3:
            z = truth.shape[0] // 2
            image, truth, pred, probs = image[:, z], truth[z], pred[z], probs[:, z]
        rgb = _display(image)
        panels += [rgb, _outline(rgb, truth, (0, 1, 0)), _outline(rgb, pred, (1, 0, 1)), np.repeat(probs[-1 if config.target == "semantic" else 0][..., None], 3, -1)]
        captions += [html.unescape(item.name)[:28], f"truth: {len(np.unique(truth)) - 1}", f"prediction: {len(np.unique(pred)) - 1}", "probability"]
    if panels:
        image_grid(panels, captions, path, columns=4)


# ---- from a checkpoint -------------------------------------------------------------------------------------------


def _build_from_checkpoint(config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    return build_unet(info["channels"], info["out_channels"], info["ndim"], **config.get("model_args", {}))


def load_predictor(path: str | Path, device: torch.device, tile: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                   batch_size: int | None = None, **overrides: Any) -> tuple[Predictor, SegmentConfig]:
    """A Predictor from a segmentation checkpoint; ``overrides`` replace inference settings (blend, flip_tta)."""
    model, state = load_trained_model(path, "segment", device, _build_from_checkpoint)
    cfg = from_dict(SegmentConfig, state["config"], f"{path}: config")
    info = state["task_state"]
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.inference, key, value)
    ndim = info["ndim"]
    tile_t = tuple(int(t) for t in tile) if tile else tuple(info["tile"])
    if len(tile_t) == 1:
        tile_t = tile_t * ndim
    halo_t = tuple(int(h) for h in halo) if halo else (tuple(info["halo"]) if not tile else halo_for(tile_t, info["divisor"]))
    if len(halo_t) == 1:
        halo_t = halo_t * ndim
    predictor = Predictor(model, cfg.target, info["channels"], info["out_channels"], tile_t, halo_t, tuple(info["divisor"]),
                          cfg.inference, cfg.post, device, batch_size or cfg.eval_batch_size)
    return predictor, cfg


def evaluate_checkpoint(path: str | Path, data_path: str | Path, split: str, device: torch.device,
                        save_dir: str | Path | None = None) -> dict[str, Any]:
    """Scores of a segmentation checkpoint on one split of a data set; ``save_dir`` receives the predicted labels."""
    import tifffile

    predictor, cfg = load_predictor(path, device)
    found = find_items(data_path, cfg.raw_key, cfg.label_key)
    if split not in found:
        if "all" not in found:
            raise DataError(f"{data_path}: has no {split} split (found {', '.join(sorted(found))})")
        split_entries = found["all"]
    else:
        split_entries = found[split]
    items = load_items(split_entries, None, *cfg.normalize, require_objects=cfg.target != "semantic")
    for item in items:
        if item.labels.ndim != len(predictor.tile):
            raise DataError(f"{item.name}: labels are {item.labels.ndim}D but the model is {len(predictor.tile)}D")
    records = []
    out_dir = Path(save_dir) if save_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for item in items:
            record, _, pred = score_image(predictor, item, cfg.class_values, cfg.ignore_label)
            records.append(record)
            if out_dir:
                tifffile.imwrite(out_dir / f"{item.name}.tif", pred, compression="zlib")
    class_names = [str(v) for v in cfg.class_values] if cfg.class_values else None
    return {"checkpoint": str(path), "data": str(data_path), "split": split, **summarize_records(records, cfg.target, class_names)}


def _input_view(image: Any, predictor: Predictor, name: str, normalize: Sequence[float]) -> ChannelsFirst:
    """Check an input image against the model (2D/3D, channels) and wrap it normalized, channels first."""
    ndim, shape = len(predictor.tile), tuple(image.shape)
    if ndim == 2 and len(shape) == 3 and shape[-1] not in (1, predictor.channels):
        if shape[-1] <= MAX_COLOURS:
            raise DataError(f"{name}: image has {shape[-1]} channels but the model takes {predictor.channels}")
        raise DataError(f"{name}: 3D volume {shape} given to a 2D model (2D images are (H, W) or (H, W, {predictor.channels}))")
    if len(shape) not in (ndim, ndim + 1):
        layout = "(H, W) or (H, W, C)" if ndim == 2 else "(D, H, W) or (C, D, H, W)"
        raise DataError(f"{name}: image of shape {shape} does not fit a {ndim}D model; expected {layout}")
    low, high = percentiles(image, ndim, *normalize)
    try:
        return ChannelsFirst(Normalized(image, ndim, low, high), ndim, predictor.channels)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


def predict_files(path: str | Path, inputs: Sequence[Path], out: str | Path, device: torch.device, key: str | None = None,
                  instances: bool = False, tile: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                  blend: str | None = None, flip_tta: bool | None = None, batch_size: int | None = None) -> list[dict[str, Any]]:
    """Probabilities of every input written block by block (and instances or classes when asked), one record per input.

    Instance post-processing runs on one image's whole probability map, so it needs that map in memory.
    """
    predictor, cfg = load_predictor(path, device, tile, halo, batch_size, blend=blend, flip_tta=flip_tta)
    if blend is not None and blend not in BLENDS:
        raise DeepscopeError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    if instances and cfg.target == "semantic":
        raise DeepscopeError("--instances: this model predicts classes, not instances; use the class map it writes")
    labels_name = "classes" if cfg.target == "semantic" else "instances"
    records = []
    for source in inputs:
        image = open_input(source, key)
        view = _input_view(image, predictor, str(source), cfg.normalize)
        (prob_path, prob_key), (label_path, label_key) = output_paths(out, Path(source).stem, len(inputs) == 1, labels_name)
        probs = Output(prob_path, prob_key, (predictor.out_channels, *view.shape[1:]), np.float32, (1, *predictor.tile))
        predictor.probabilities(view, out=probs.array)
        record = {"input": str(source), "probabilities": f"{prob_path}" + (f":{prob_key}" if prob_key else ""), "shape": list(view.shape)}
        if instances or cfg.target == "semantic":
            result = predictor.labels(np.asarray(probs.array[...]))
            labels = Output(label_path, label_key, result.shape, np.int32, predictor.tile)
            labels.array[...] = result
            labels.close()
            record[labels_name] = f"{label_path}" + (f":{label_key}" if label_key else "")
            record["objects" if instances else "classes_found"] = int(result.max()) if instances else len(np.unique(result))
        probs.close()
        records.append(record)
    return records
