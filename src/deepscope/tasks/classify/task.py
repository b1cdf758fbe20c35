"""Image classification: class folders or .npz arrays in, a trained classifier and its report out."""

from __future__ import annotations

import html
import itertools
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepscope.data.classification.dataset import (
    AnyImageSet,
    ClassificationData,
    ImageSet,
    channel_stats,
    load_classification,
    stratified_split,
)
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader, ToDevice, torch_loader
from deepscope.engine.checkpoint import random_state_kept
from deepscope.engine.distributed import DistInfo
from deepscope.engine.plan import budget_of
from deepscope.engine.precision import Precision, resolve_precision
from deepscope.engine.probe import agreed_seconds_per_step
from deepscope.engine.report import image_grid, plot_confusion, table, write_report
from deepscope.engine.task import Batches, Task
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.loading import batched_logits
from deepscope.metrics.classification import ClassificationMetrics
from deepscope.models import build_model, eval_mode
from deepscope.tasks.classify.config import ClassifyConfig, resize_of
from deepscope.tasks.classify.plan import Timer, fingerprint, make_plan

WORST_SHOWN = 24
PROBE_STEPS = 3  # training steps timed per candidate width (the first is warm-up)


def choose_splits(data: ClassificationData, val_fraction: float, seed: int) -> dict[str, AnyImageSet]:
    """train/val/test from what is on disk; a missing val split is carved from train."""
    splits = dict(data.splits)
    if "all" in splits:
        splits["train"] = splits.pop("all")
    if "val" not in splits and val_fraction > 0:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    return splits


LAZY = {"memory": False, "dataloader": True, "auto": None}  # loader setting -> lazy reading of folders


def fits_on_device(data: AnyImageSet, device: torch.device) -> bool:
    if not isinstance(data, ImageSet):
        return False
    if device.type != "cuda":
        return True  # already in RAM as one array; the device loader wraps it without copying
    free, _ = torch.cuda.mem_get_info(device)
    return data.images.nbytes < 0.5 * free


def make_batches(
    data: AnyImageSet,
    spec: BatchSpec,
    device: torch.device,
    loader: str = "auto",
    channels_last: bool = True,
    num_workers: int = 0,
) -> Batches:
    """The device loader for in-memory data that fits on the device, else a DataLoader."""
    if isinstance(data, ImageSet) and (loader == "memory" or (loader == "auto" and fits_on_device(data, device))):
        return DeviceLoader(data, spec, device, channels_last)
    return ToDevice(torch_loader(data, spec, num_workers, pin_memory=device.type == "cuda"), device, channels_last)


class ClassifyTask(Task):
    name = "classify"
    config: ClassifyConfig

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        cfg = self.config
        started = time.time()
        self.device, self.dist = device, dist
        if cfg.loader not in LAZY:
            raise DeepscopeError(f"unknown loader {cfg.loader!r}; choose auto, memory or dataloader")
        data = load_classification(cfg.data, resize_of(cfg), LAZY[cfg.loader])
        self.splits = choose_splits(data, cfg.val_fraction, cfg.seed)
        self.class_names = data.class_names
        self.in_shape = data.image_shape
        self.mean, self.std = channel_stats(self.splits["train"], seed=cfg.seed)
        missing = sorted(set(range(len(self.class_names))) - set(np.unique(self.splits["train"].labels).tolist()))
        if missing:
            raise DataError(
                f"{cfg.data}: class(es) {', '.join(self.class_names[i] for i in missing)} have no training images"
            )
        precision = resolve_precision(cfg.amp, device)
        fp = fingerprint(
            self.splits["train"].labels, len(self.splits.get("val", ())), self.in_shape, len(self.class_names)
        )
        budget = budget_of(cfg, self.default_budget_minutes)
        timer = self.step_timer(precision)
        make_plan(cfg, fp, budget, time.time() - started, timer, self.plan, f"{device.type} in {precision.name}")
        self.plan.apply(cfg)

    def step_timer(self, precision: Precision) -> Timer:
        """Seconds per training step of a model (with ``model_args`` over the given ones) at a batch size, measured
        on the training images as they will be trained (the planned augmentation, this device and precision), the
        same on every process; the random state is left as it was, so planning does not change the run."""
        cfg = self.config

        def timer(model: str, args: dict[str, Any], batch: int) -> float:
            with random_state_kept():
                net = build_model(model, self.in_shape, len(self.class_names), **{**cfg.model_args, **args})
                net.to(self.device)
                if cfg.channels_last:
                    net.to(memory_format=torch.channels_last)
                augment = self.plan.settings.get("augment", cfg.augment)
                spec = BatchSpec(batch, self.mean, self.std, True, augment, cfg.seed, self.dist.rank, self.dist.world)
                loader = make_batches(
                    self.splits["train"], spec, self.device, cfg.loader, cfg.channels_last, cfg.num_workers
                )
                steps = itertools.islice(loader, min(PROBE_STEPS, len(loader)))
                return agreed_seconds_per_step(net, steps, self.loss, precision, self.device)

        return timer

    def batches(self, data: AnyImageSet, train: bool, world: int | None = None, rank: int | None = None) -> Batches:
        cfg = self.config
        world = self.dist.world if world is None else world
        rank = self.dist.rank if rank is None else rank
        assert cfg.batch_size is not None  # planned in setup
        spec = BatchSpec(
            cfg.batch_size if train else cfg.eval_batch_size,
            self.mean,
            self.std,
            shuffle=train,
            augment=cfg.augment if train else None,
            seed=cfg.seed,
            rank=rank,
            world=world,
        )
        return make_batches(data, spec, self.device, cfg.loader, cfg.channels_last, cfg.num_workers)

    def build_model(self) -> nn.Module:
        return build_model(self.config.model, self.in_shape, len(self.class_names), **self.config.model_args)

    def train_batches(self) -> Batches:
        return self.batches(self.splits["train"], train=True)

    def val_batches(self) -> Batches | None:
        return self.batches(self.splits["val"], train=False) if "val" in self.splits else None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=self.config.optim.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        return evaluate_batches(model, batches, self.class_names, self.device)

    def inference_state(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "mean": self.mean, "std": self.std, "in_shape": list(self.in_shape)}

    def display_images(self, batch: Any) -> torch.Tensor:
        x = batch[0][:16].float()
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if "test" in self.splits:
            result["test"] = self.evaluate(model, self.batches(self.splits["test"], train=False))
        shown = "test" if "test" in self.splits else "val" if "val" in self.splits else "train"
        if self.dist.is_main:
            loader = self.batches(self.splits[shown], train=False, world=1, rank=0)
            result["worst_split"] = shown
            result["worst"] = worst_predictions(model, loader, self.splits[shown], self.class_names, run_dir)
        if "test" in result:
            result["test_accuracy"] = result["test"]["accuracy"]
        return result

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        final = metrics.get("test") or metrics.get("val") or {}
        split = "test" if metrics.get("test") else "validation"
        sections = []
        if final:
            scalars = [{"metric": k, "value": v} for k, v in final.items() if isinstance(v, (int, float))]
            sections.append((f"{split.capitalize()} metrics", table(scalars)))
            plot_confusion(np.array(final["confusion_matrix"]), self.class_names, run_dir / "confusion.png")
            per_class = [{"class": k, **v} for k, v in final["per_class"].items()]
            sections.append(
                (f"Confusion matrix ({split})", '<img src="confusion.png" alt="confusion matrix">' + table(per_class))
            )
        if metrics.get("worst"):
            caption = html.escape(
                f"Misclassified {metrics['worst_split']} images with the highest loss: true → predicted (probability)"
            )
            sections.append(("Worst misclassified", f"<p>{caption}</p><img src='worst.png' alt='worst misclassified'>"))
        write_report(
            run_dir, f"deepscope classify: {self.config.model} on {self.config.data}", metrics, history, sections
        )


def evaluate_batches(
    model: nn.Module, batches: Iterable[Any], class_names: list[str], device: torch.device
) -> dict[str, Any]:
    """Classification metrics of ``model`` over ``batches`` (synchronised under DDP)."""
    metrics = ClassificationMetrics(class_names, device)
    with torch.no_grad(), eval_mode(model):
        for x, y in batches:
            logits = model(x)
            metrics.update(logits, y, F.cross_entropy(logits.float(), y, reduction="sum"))
    return metrics.compute()


def worst_predictions(
    model: nn.Module, loader: Batches, data: AnyImageSet, class_names: list[str], run_dir: Path
) -> list[dict[str, Any]]:
    """Find the misclassified images with the highest loss and save them as ``worst.png``."""
    model.eval()
    logits, targets = batched_logits(model, loader)
    losses = F.cross_entropy(logits, targets, reduction="none")
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    wrong = (pred != targets).nonzero().flatten()
    order = wrong[losses[wrong].argsort(descending=True)][:WORST_SHOWN].tolist()
    rows = [
        {
            "source": data.sources[i],
            "true": class_names[int(targets[i])],
            "predicted": class_names[int(pred[i])],
            "probability": float(probs[i, pred[i]]),
        }
        for i in order
    ]
    if order:
        images = np.stack([data.image(i) for i in order]).astype(np.float32) / data.scale
        captions = [f"{r['true']} → {r['predicted']} ({r['probability']:.2f})" for r in rows]
        image_grid(images, captions, run_dir / "worst.png")
    return rows
