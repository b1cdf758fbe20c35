"""Denoising, 2D and 3D, grey or multi-channel: Noise2Void, Noise2Noise and a supervised noisy-to-clean baseline.

All three train the same residual U-Net on random patches cut on the device from images held there, standardised
with the training inputs' mean and std; only what the network sees and is compared with differs:
Noise2Void sees a patch with a few pixels hidden behind neighbours and is scored on those pixels against the noisy
patch itself; Noise2Noise sees one noisy acquisition and is scored against another; supervised is scored against the
clean image. Validation and test predict whole images tile by tile and report PSNR/SSIM wherever clean images exist.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from deepscope.data.denoise.blind_spot import mask_pixels
from deepscope.data.denoise.dataset import DenoiseItem, PatchBank, find_denoise_files
from deepscope.data.denoise.noise import add_noise
from deepscope.data.epochs import epoch_generator
from deepscope.data.io.splits import split_validation
from deepscope.data.segmentation.augment import SegAugmentConfig, augment_pair
from deepscope.engine.checkpoint import random_state_kept
from deepscope.engine.distributed import DistInfo, all_reduce_max, gather_objects
from deepscope.engine.logging import preview_images
from deepscope.engine.plan import budget_of
from deepscope.engine.precision import resolve_precision
from deepscope.engine.probe import agreed_seconds_per_step
from deepscope.engine.report import write_report
from deepscope.engine.task import ItemShard, Task
from deepscope.errors import DataError, DeepscopeError
from deepscope.inference.geometry import halo_for, patch_shape_for
from deepscope.losses.denoise import masked_mse
from deepscope.metrics.denoise import summarize
from deepscope.models import build_unet, eval_mode
from deepscope.tasks.denoise.config import DEFAULT_PATCH, DenoiseConfig
from deepscope.tasks.denoise.plan import Candidate, fingerprint, plan_architecture, plan_epoch, plan_method
from deepscope.tasks.denoise.predict import (
    ROLE_OF_METHOD,
    Denoiser,
    check_method_data,
    clip_range,
    load_denoise_split,
    score_item,
)
from deepscope.tasks.denoise.report import report_sections, save_crops

if TYPE_CHECKING:
    from deepscope.models.unet import UNet

DEFAULT_TILE = {2: (256, 256), 3: (32, 128, 128)}
PROBE_STEPS = 3  # training steps timed per planned candidate (the first is warm-up)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class DenoiseBatches:
    """(input, target, loss mask or None) batches of standardised patches for one process."""

    def __init__(self, task: DenoiseTask, bank: PatchBank, steps: int, batch: int) -> None:
        self.task, self.bank, self.steps, self.batch, self.epoch = task, bank, steps, batch, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.task.config
        generator = epoch_generator(cfg.seed * 7919 + self.task.dist.rank, self.epoch, self.task.device)
        fresh = bool(cfg.noise.fresh) and cfg.noise.synthetic
        for _ in range(self.steps):
            yield self.task.make_batch(self.bank.sample(self.batch, generator), generator, cfg.augment, fresh)


class DenoiseTask(Task):
    name = "denoise"
    config: DenoiseConfig

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        cfg = self.config
        started = time.time()
        self.device, self.dist = device, dist
        found = find_denoise_files(cfg.data, cfg.noise.synthetic)
        if "all" in found:
            found["train"] = found.pop("all")
        if "train" not in found:
            raise DataError(f"{cfg.data}: no training images (expected train/ or noisy/ / clean/ folders)")
        learned: dict[str, set[str]] = {split: set(found[split]) for split in ("train", "val") if split in found}
        self.method = cfg.method = plan_method(cfg, learned, self.plan)
        self.plan.apply(cfg)  # the method and noise.fresh decide what is loaded
        check_method_data(cfg, found["train"], "train")
        if "test" in found and "clean" not in found["test"] and not cfg.noise.synthetic:
            raise DataError(f"{cfg.data}: the test split needs clean/ images to be scored (or leave test/ out)")
        splits = {split: load_denoise_split(cfg, files, split) for split, files in found.items()}
        if "val" not in splits:
            splits["train"], val = split_validation(splits["train"], cfg.val_fraction, cfg.seed)
            if val:
                splits["val"] = val
        self.splits = splits
        everything = [item for items in splits.values() for item in items]
        shapes = {(item.images["noisy"].shape[0], len(item.spatial)) for item in everything}
        if len(shapes) > 1:
            raise DataError(
                f"{cfg.data}: images differ in channels or dimensionality ({sorted(shapes)} as (channels, ndim))"
            )
        self.channels, self.ndim = shapes.pop()
        cfg.channels_last = cfg.channels_last and self.ndim == 2
        noisy = [item.images["noisy"] for item in splits["train"]]
        self.mean = [float(np.mean([x[c].mean() for x in noisy])) for c in range(self.channels)]
        self.std = [float(np.sqrt(np.mean([((x[c] - m) ** 2).mean() for x in noisy]))) for c, m in enumerate(self.mean)]
        fresh = bool(cfg.noise.fresh) and cfg.noise.synthetic
        self.train_roles = ["clean"] if fresh else ["noisy", *ROLE_OF_METHOD[self.method]]
        self._plan_network(started)
        self.divisor = self.build_model().divisor
        self.patch_shape = patch_shape_for(
            cfg.patch_shape, [item.spatial for item in splits["train"]], DEFAULT_PATCH[self.ndim], self.divisor
        )
        self.tile = tuple(cfg.inference.tile or DEFAULT_TILE[self.ndim])
        self.halo = tuple(cfg.inference.halo) if cfg.inference.halo else halo_for(self.tile, self.divisor)
        if len(self.tile) != self.ndim or len(self.halo) != self.ndim:
            raise DeepscopeError(
                f"inference tile {list(self.tile)} and halo {list(self.halo)} must give {self.ndim} sizes"
            )
        self.val_set = self._validation_patches(splits.get("val", []))
        scored = splits.get("val", [])
        if cfg.monitor == "auto":
            with_clean = bool(scored) and all("clean" in item.images for item in scored)
            cfg.monitor, cfg.monitor_mode = ("psnr", "max") if with_clean else ("loss", "min")

    def _plan_network(self, started: float) -> None:
        """Fingerprint the training data, then plan the U-Net, the patch shape and the epoch length (``plan.py``)
        from step times measured on this machine, and write them into the config."""
        cfg = self.config
        fp = fingerprint(self.splits["train"], cfg.data_range, cfg.seed)
        counts = ", ".join(f"{len(items)} {split}" for split, items in self.splits.items())
        self.plan.observe(f"{fp.describe()} (images: {counts})", **fp.values())
        budget = budget_of(cfg, self.default_budget_minutes)

        def spent() -> float:  # the same on every process, so that all plan the same
            return all_reduce_max([time.time() - started], self.device)[0]

        with random_state_kept():  # timing builds models: the run's weights stay those of an unplanned run
            _chosen, step_s = plan_architecture(cfg, fp, budget, spent(), self._time_step, self.plan)
        if step_s is not None:
            plan_epoch(cfg, step_s, budget, spent(), self.plan)
        self.plan.apply(cfg)

    def _time_step(self, candidate: Candidate) -> float:
        """Seconds of one training step of ``candidate`` on real batches of the training data (the largest over the
        processes, so that every process plans the same)."""
        cfg = self.config
        settings = {**cfg.model_settings(), "features": candidate.features, "depth": candidate.depth}
        model = build_unet(self.channels, self.channels, self.ndim, **settings).to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        bank = PatchBank(self.splits["train"], self.train_roles, candidate.patch, self.device)
        generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(
            cfg.seed + 29
        )
        fresh = bool(cfg.noise.fresh) and cfg.noise.synthetic
        batch = max(1, cfg.batch_size // self.dist.world)
        batches = (
            self.make_batch(bank.sample(batch, generator), generator, cfg.augment, fresh) for _ in range(PROBE_STEPS)
        )
        precision = resolve_precision(cfg.amp, self.device)
        return agreed_seconds_per_step(model, batches, self.loss, precision, self.device)

    def _validation_patches(self, items: list[DenoiseItem]) -> list[Batch]:
        """Fixed patches (and blind-spot masks) for the validation loss, the same at every epoch."""
        if not items:
            return []
        roles = ["noisy", *ROLE_OF_METHOD[self.method]]
        missing = [r for r in roles if any(r not in item.images for item in items)]
        if missing:
            raise DataError(
                f"{self.config.data}: validation images lack {', '.join(missing)} images for the {self.config.method} loss"
            )
        bank = PatchBank(
            items,
            roles,
            [min(p, int(s)) for p, s in zip(self.patch_shape, np.min([i.spatial for i in items], axis=0))],
            self.device,
        )
        if any(s % d for s, d in zip(bank.patch, self.divisor)):
            raise DataError(
                f"validation images {bank.patch} are too small for the U-Net (sizes divisible by {list(self.divisor)})"
            )
        generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(
            self.config.seed + 17
        )
        size = self.config.batch_size
        return [
            self.make_batch(bank.sample(size, generator), generator, augment=False, fresh=False)
            for _ in range(max(1, self.config.val_patches // size))
        ]

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * self.ndim
        mean = torch.tensor(self.mean, device=x.device).view(view)
        std = torch.tensor(self.std, device=x.device).view(view)
        return (x - mean) / std

    def make_batch(
        self, crops: dict[str, torch.Tensor], generator: torch.Generator, augment: bool, fresh: bool
    ) -> Batch:
        """(input, target, mask) for the method from crops by role, standardised, augmented and masked."""
        cfg = self.config
        if fresh:
            clip = cfg.data_range or clip_range(self.splits["train"][0].dtype)
            crops = {"clean": crops["clean"], "noisy": add_noise(crops["clean"], cfg.noise, generator, clip)}
            if cfg.method == "n2n":
                crops["noisy2"] = add_noise(crops["clean"], cfg.noise, generator, clip)
        source = crops["noisy"]
        target = {"n2v": source, "n2n": crops.get("noisy2"), "supervised": crops.get("clean")}[self.method]
        assert target is not None  # check_method_data guarantees the method's target role is loaded
        source, target = self.standardize(source), self.standardize(target)
        if augment:
            source, target, _ = augment_pair(source, target, SegAugmentConfig(flip=True, rot90=True), generator)
        if cfg.method != "n2v":
            return source, target, None
        masked, mask = mask_pixels(source, cfg.blind_spot, generator)
        return masked, source, mask

    def build_model(self) -> UNet:
        return build_unet(self.channels, self.channels, self.ndim, **self.config.model_settings())

    def train_batches(self) -> DenoiseBatches:
        """``batch_size`` is the global batch: each of ``world`` processes draws its share from its own stream."""
        cfg, world = self.config, self.dist.world
        if cfg.batch_size % world:
            raise DeepscopeError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({world})")
        bank = PatchBank(self.splits["train"], self.train_roles, self.patch_shape, self.device)
        assert cfg.patches_per_epoch is not None  # planned in setup()
        return DenoiseBatches(self, bank, cfg.patches_per_epoch // cfg.batch_size, cfg.batch_size // world)

    def val_batches(self) -> ItemShard | None:
        return ItemShard(self.splits["val"], self.dist.rank, self.dist.world) if "val" in self.splits else None

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        source, target, mask = batch
        return masked_mse(model(source), target, mask)

    def denoiser(self, model: nn.Module) -> Denoiser:
        return Denoiser(
            model,
            self.channels,
            self.mean,
            self.std,
            self.tile,
            self.halo,
            self.divisor,
            self.config.inference,
            self.device,
            self.config.eval_batch_size,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        with eval_mode(model):
            losses = [float(self.loss(model, batch)) for batch in self.val_set]
        denoiser = self.denoiser(model)
        records = [score_item(denoiser, item, self.config.data_range)[0] for item in batches if "clean" in item.images]
        gathered = [r for part in gather_objects(records) for r in part]
        result: dict[str, Any] = {"loss": float(np.mean(losses))} if losses else {}
        return {**result, **summarize(gathered)} if gathered else result

    def inference_state(self) -> dict[str, Any]:
        return {
            "ndim": self.ndim,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
            "method": self.config.method,
            "model_settings": self.config.model_settings(),
            "patch_shape": list(self.patch_shape),
            "tile": list(self.tile),
            "halo": list(self.halo),
            "divisor": list(self.divisor),
        }

    def display_images(self, batch: Any) -> torch.Tensor:
        return (preview_images(batch[0]) * 0.25 + 0.5).clamp(0, 1)

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        test = self.splits.get("test", [])
        if test:
            result["test"] = self.evaluate(model, ItemShard(test, self.dist.rank, self.dist.world))
            result["test"].pop("loss", None)
            result.update({f"test_{k}": v for k, v in result["test"].items() if isinstance(v, float)})
        shown = "test" if test else "val" if "val" in self.splits else "train"
        if self.dist.is_main:
            with torch.no_grad():
                save_crops(self.denoiser(model), self.splits[shown], self.config.data_range, run_dir / "crops.png")
            result["shown_split"] = shown
        return result

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        final = metrics.get("test") or metrics.get("val") or {}
        split = "test" if metrics.get("test") else "validation"
        sections = report_sections(final, split, metrics.get("shown_split"), run_dir)
        cfg = self.config
        write_report(run_dir, f"deepscope denoise: {cfg.method} U-Net on {cfg.data}", metrics, history, sections)
