"""Self-supervised learning as a task of the one engine: two views per image, an encoder and a projection head, NT-Xent
(SimCLR) or VICReg; a kNN monitor on labelled validation images each epoch; after training, linear probes at label
fractions against the same encoder at random initialisation, an embedding map and nearest-neighbour pictures."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from deepscope.config import from_dict
from deepscope.data.ssl.dataset import (
    SSLData,
    SSLEvalBatches,
    SSLImages,
    SSLTrainBatches,
    load_ssl_data,
    seeded_sample,
    ssl_stats,
)
from deepscope.data.ssl.views import TwoViews, view_config
from deepscope.engine.checkpoint import random_state_kept
from deepscope.engine.distributed import DistInfo, gather_objects
from deepscope.engine.plan import budget_of
from deepscope.engine.precision import Precision, resolve_precision
from deepscope.engine.probe import agreed_seconds_per_step
from deepscope.engine.task import Batches, Task
from deepscope.errors import DataError
from deepscope.inference.loading import load_trained_model
from deepscope.losses.ssl import nt_xent, vicreg
from deepscope.metrics.knn import knn_accuracy
from deepscope.models import eval_mode
from deepscope.models.ssl import SSLModel, build_encoder
from deepscope.tasks.ssl.config import SSLConfig
from deepscope.tasks.ssl.plan import LONG_TEMPERATURE, Fingerprint, Timer, make_plan, timing_batch, view_side
from deepscope.tasks.ssl.probe import linear_probe, probe_rows
from deepscope.tasks.ssl.report import embedding_map, neighbour_grid, write_ssl_report

PICTURE_BANK = 5000  # training images searched for the nearest-neighbour picture
PROBE_STEPS = 3  # training steps timed per candidate width (the first is warm-up)


def accuracy_key(fraction: float) -> str:
    """Metric name of a linear probe on a label fraction: linear_accuracy@0.01, @0.1, @1."""
    return f"linear_accuracy@{fraction:g}"


def ssl_loss(cfg: SSLConfig, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    if cfg.method == "simclr":
        assert cfg.temperature is not None  # planned in setup
        return nt_xent(z1, z2, cfg.temperature)
    return vicreg(z1, z2, *cfg.vicreg_weights)


@torch.no_grad()
def extract_features(
    encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pre-projection features (float32, CPU) and labels of every batch, in eval mode."""
    features, labels = [], []
    with eval_mode(encoder):
        for x, y in batches:
            features.append(encoder(x).float().cpu())
            labels.append(y.cpu())
    return torch.cat(features), torch.cat(labels)


class SSLTask(Task):
    name = "ssl"
    config: SSLConfig

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        cfg = self.config
        started = time.time()
        self.device, self.dist = device, dist
        self.data: SSLData = load_ssl_data(
            cfg.data,
            cfg.patch_size,
            cfg.crops,
            cfg.normalize,
            cfg.channels,
            cfg.val_fraction,
            cfg.seed,
            cfg.max_patches,
        )
        train = self.data.splits["train"]
        # (C, H, W): SSLImages hold (N, C, H, W) images
        self.in_shape = cast(tuple[int, int, int], tuple(int(s) for s in train.images.shape[1:]))
        self.preset = self.data.kind if cfg.views == "auto" else cfg.views
        self.mean, self.std = ssl_stats(train, self.data.kind)
        val = self.data.splits.get("val")
        self.labelled = train.labelled and val is not None and val.labelled
        labelled_train = np.flatnonzero(train.labels >= 0)
        fp = Fingerprint(
            images=len(train),
            val_images=0 if val is None else len(val),
            bank_images=len(labelled_train),
            channels=self.in_shape[0],
            height=self.in_shape[1],
            width=self.in_shape[2],
            kind=self.data.kind,
            labelled=self.labelled,
        )
        budget = budget_of(cfg, self.default_budget_minutes)
        timer = self.step_timer(resolve_precision(cfg.amp, device))
        make_plan(cfg, fp, budget, time.time() - started, timer, self.plan)
        self.plan.apply(cfg)
        self.views = self.two_views(cfg.view_scale or 1.0)
        if cfg.monitor == "auto":
            cfg.monitor, cfg.monitor_mode = ("knn_accuracy", "max") if self.labelled else ("loss", "min")
        bank_size = cfg.knn_bank or len(labelled_train)  # 0: every labelled training image
        self.bank = train.subset(labelled_train[seeded_sample(len(labelled_train), bank_size, cfg.seed)])
        self.monitored = (
            None if val is None else val.subset(seeded_sample(len(val), cfg.monitor_images or len(val), cfg.seed))
        )
        self.bank_batches = self.eval_batches(self.bank) if self.labelled else None  # built once, read every epoch
        self.notes.append(
            f"ssl: {cfg.method} on {len(train)} training images of shape {self.in_shape} ({self.data.kind}, "
            f"{self.preset} views); monitor {cfg.monitor}"
            + (f" on {len(self.monitored)} validation images" if self.monitored is not None else "")
            + (f" (kNN k={cfg.knn_k}, T={cfg.knn_temperature}, bank of {len(self.bank)})" if self.labelled else "")
        )

    def step_timer(self, precision: Precision) -> Timer:
        """Seconds per training step of the encoder with ``model_args`` over the given ones, measured on views of the
        training images on this device in this precision, the same on every process; the random state is left as it
        was, so planning does not change the run."""
        cfg = self.config
        timed = dataclasses.replace(cfg, temperature=cfg.temperature or LONG_TEMPERATURE)  # any costs the same

        def loss(model: nn.Module, batch: Any) -> torch.Tensor:
            _, z = model(torch.cat(batch[:2]))
            return ssl_loss(timed, *z.chunk(2))

        def timer(args: dict[str, Any], channels_last: bool, view_scale: float) -> float:
            with random_state_kept():
                encoder = build_encoder(cfg.model, self.in_shape, **{**cfg.model_args, **args})
                net = SSLModel(encoder, cfg.projector_widths()).to(self.device)
                if channels_last:
                    net.to(memory_format=torch.channels_last)
                batch = timing_batch(cfg, len(self.data.splits["train"]))
                batches = self.train_batches(batch, channels_last, self.two_views(view_scale))
                first = itertools.islice(batches, min(PROBE_STEPS, len(batches)))
                return agreed_seconds_per_step(net, first, loss, precision, self.device)

        return timer

    def build_model(self) -> nn.Module:
        encoder = build_encoder(self.config.model, self.in_shape, **self.config.model_args)
        return SSLModel(encoder, self.config.projector_widths())

    def eval_batches(self, images: SSLImages, world: int | None = None, rank: int | None = None) -> SSLEvalBatches:
        world = self.dist.world if world is None else world
        rank = self.dist.rank if rank is None else rank
        return SSLEvalBatches(
            images, self.config.eval_batch_size, self.mean, self.std, self.device, rank, world, self.in_shape[1:]
        )

    def two_views(self, view_scale: float) -> TwoViews:
        """The view maker of the run's preset at ``view_scale`` times the images' side."""
        _, height, width = self.in_shape
        size = (view_side(height, view_scale), view_side(width, view_scale))
        return TwoViews(view_config(self.preset, self.config.view_settings), size)

    def train_batches(
        self, batch_size: int | None = None, channels_last: bool | None = None, views: TwoViews | None = None
    ) -> Batches:
        """The training views, in batches of ``batch_size``, in the memory format ``channels_last`` and made by
        ``views`` (the config's and the run's when None: the plan times others)."""
        cfg = self.config
        batch = batch_size or cfg.batch_size
        fmt = cfg.channels_last if channels_last is None else channels_last
        assert batch is not None and fmt is not None  # planned in setup, before any batch is drawn
        return SSLTrainBatches(
            self.data.splits["train"],
            views or self.views,
            batch,
            self.mean,
            self.std,
            self.device,
            cfg.seed,
            self.dist.rank,
            self.dist.world,
            fmt,
        )

    def val_batches(self) -> Batches | None:
        return None if self.monitored is None else self.eval_batches(self.monitored)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        v1, v2, _ = batch
        _, z = model(torch.cat([v1, v2]))  # both views in one pass: one set of batch-norm statistics, half the calls
        z1, z2 = z.chunk(2)
        return ssl_loss(self.config, z1, z2)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
        """Validation loss on two fixed-seed views of each image and, with labels, the kNN accuracy of the validation
        features against a bank of training features (both gathered from every process)."""
        cfg = self.config
        generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(
            cfg.seed + 17
        )
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        total, count, features, labels = 0.0, 0, [], []
        with eval_mode(model):
            for x, y in batches:
                v1, v2 = self.views(x * std + mean, generator, len(x), slice(None))
                _, z = model((torch.cat([v1, v2]) - mean) / std)
                if len(x) > 1:  # VICReg's variance needs two images; a lone last image is left out of the loss
                    total += float(ssl_loss(cfg, *z.chunk(2))) * len(x)
                    count += len(x)
                if self.labelled:
                    features.append(cast(SSLModel, model).encoder(x).float().cpu())
                    labels.append(y.cpu())
        sums = gather_objects((total, count))
        result: dict[str, Any] = {"loss": sum(s[0] for s in sums) / max(1, sum(s[1] for s in sums))}
        if self.labelled:
            assert self.bank_batches is not None  # setup builds it whenever the data are labelled
            bank, bank_labels = extract_features(cast(SSLModel, model).encoder, self.bank_batches)
            query = torch.cat([t for part in gather_objects(features) for t in part])
            query_labels = torch.cat([t for part in gather_objects(labels) for t in part])
            bank = torch.cat(gather_objects(bank))
            bank_labels = torch.cat(gather_objects(bank_labels))
            result["knn_accuracy"] = knn_accuracy(
                query, query_labels, bank, bank_labels, len(self.data.class_names), cfg.knn_k, cfg.knn_temperature
            )
        return result

    def inference_state(self) -> dict[str, Any]:
        return {
            "in_shape": list(self.in_shape),
            "mean": self.mean,
            "std": self.std,
            "kind": self.data.kind,
            "class_names": self.data.class_names,
        }

    def display_images(self, batch: Any) -> torch.Tensor:
        v1, v2, _ = batch
        mean = torch.tensor(self.mean, device=v1.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=v1.device).view(1, -1, 1, 1)
        pairs = torch.stack([v1[:8], v2[:8]], 1).flatten(0, 1).float()  # view 1 and view 2 of each image side by side
        images = (pairs * std + mean).clamp(0, 1)
        return images[:, :3] if images.shape[1] >= 3 else images[:, :1]

    def finish(
        self, model: nn.Module, run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Probes and pictures, on the main process: the trained encoder and, as the baseline, the same encoder at random
        initialisation, judged on the test split (else the validation split) by the same code."""
        if not self.dist.is_main:
            return {}
        cfg = self.config
        splits = self.data.splits
        held_out = "test" if "test" in splits else "val" if "val" in splits else None
        result: dict[str, Any] = {"probe_split": held_out}
        if held_out is None:
            return result
        train_split, test_split = splits["train"], splits[held_out]
        labelled = train_split.labelled and test_split.labelled
        probe = ProbeRun(self.mean, self.std, self.device, cfg.eval_batch_size, self.in_shape[1:], cfg.seed)
        scores = {"self-supervised": probe.run(cast(SSLModel, model).encoder, train_split, test_split, cfg, labelled)}
        result.update(scores["self-supervised"])
        if labelled and cfg.probe_random:
            torch.manual_seed(cfg.seed)
            random_encoder = build_encoder(cfg.model, self.in_shape, **cfg.model_args).to(self.device)
            scores["random init"] = probe.run(random_encoder, train_split, test_split, cfg, labelled)
            result.update({f"random_encoder_{k}": v for k, v in scores["random init"].items()})
        if labelled:
            result["probe_table"] = probe_rows(
                {name: {f: s[accuracy_key(f)] for f in cfg.probe_fractions} for name, s in scores.items()},
                {name: s["knn_accuracy"] for name, s in scores.items()},
            )
        result["pictures"] = probe.pictures(run_dir, self.data.class_names, cfg.seed)
        return result

    def write_report(self, run_dir: Path, history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        cfg = self.config
        title = f"deepscope ssl: {cfg.method} with a {cfg.model} encoder on {cfg.data}"
        write_ssl_report(run_dir, title, metrics, history, metrics.get("probe_table", []), metrics.get("pictures", {}))


class ProbeRun:
    """Features of a train and a held-out split through one encoder, then kNN and linear probes on them; keeps the
    last features for the pictures."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        batch_size: int,
        size: Sequence[int],
        seed: int,
    ) -> None:
        self.mean, self.std, self.device, self.batch_size, self.size, self.seed = (
            mean,
            std,
            device,
            batch_size,
            cast(tuple[int, int], tuple(size)),  # the training views' (H, W)
            seed,
        )
        self.first: tuple[SSLImages, torch.Tensor, SSLImages, torch.Tensor] | None = None

    def features(self, encoder: nn.Module, images: SSLImages) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(
            encoder, SSLEvalBatches(images, self.batch_size, self.mean, self.std, self.device, size=self.size)
        )

    def run(
        self,
        encoder: nn.Module,
        train: SSLImages,
        test: SSLImages,
        cfg: Any,
        labelled: bool,
        probes: Sequence[str] = ("knn", "linear"),
    ) -> dict[str, Any]:
        """``knn_accuracy`` and ``linear_accuracy@<fraction>`` of ``encoder``'s features; features only without labels."""
        train_x, train_y = self.features(encoder, train)
        test_x, test_y = self.features(encoder, test)
        if self.first is None:
            self.first = (train, train_x, test, test_x)
        if not labelled:
            return {}
        scores: dict[str, Any] = {}
        if "knn" in probes:
            keep = train_y >= 0
            scores["knn_accuracy"] = knn_accuracy(
                test_x[test_y >= 0],
                test_y[test_y >= 0],
                train_x[keep],
                train_y[keep],
                int(train_y.max()) + 1,
                cfg.knn_k,
                cfg.knn_temperature,
            )
        if "linear" in probes:
            accuracy = linear_probe(
                train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), cfg.probe_fractions, self.seed
            )
            scores.update({accuracy_key(f): a for f, a in accuracy.items()})
        return scores

    def pictures(self, run_dir: Path, class_names: list[str], seed: int) -> dict[str, str]:
        """Embedding map of the held-out features and nearest training images of a few held-out ones."""
        if self.first is None:
            return {}
        train, train_x, test, test_x = self.first
        embedding_map(test_x.numpy(), test.labels, class_names, run_dir / "embedding.png", seed=seed)
        bank = seeded_sample(len(train), PICTURE_BANK, seed)
        neighbour_grid(
            display(test),
            test_x.numpy(),
            display(train.subset(bank)),
            train_x[torch.from_numpy(bank)].numpy(),
            run_dir / "neighbours.png",
            seed=seed,
        )
        return {"embedding": "embedding.png", "neighbours": "neighbours.png"}


def display(images: SSLImages) -> np.ndarray:
    """(N, H, W, C) in [0, 1] for pictures: the first three channels (or the first, for two)."""
    x = (images.images.float() / images.scale).clamp(0, 1)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return x.permute(0, 2, 3, 1).numpy()


# ---- probing a checkpoint (deepscope evaluate CKPT --probe ...) and any encoder (benchmarks) ----------------------------


def load_ssl_model(path: str | Path, device: torch.device) -> tuple[SSLModel, SSLConfig, dict[str, Any]]:
    def build(config: dict[str, Any], info: dict[str, Any]) -> nn.Module:
        cfg = from_dict(SSLConfig, config, f"{path}: config")
        return SSLModel(build_encoder(cfg.model, tuple(info["in_shape"]), **cfg.model_args), cfg.projector_widths())

    model, state = load_trained_model(path, "ssl", device, build)
    # the SSLModel that build() made
    return cast(SSLModel, model), from_dict(SSLConfig, state["config"], f"{path}: config"), state["task_state"]


def probe_data(
    encoder: nn.Module,
    data: SSLData,
    source: str | Path,
    cfg: SSLConfig,
    mean: Sequence[float],
    std: Sequence[float],
    size: Sequence[int],
    device: torch.device,
    probes: Sequence[str],
) -> dict[str, Any]:
    """kNN and/or linear probes of ``encoder`` on ``data``'s train split against its test split (else val)."""
    held_out = "test" if "test" in data.splits else "val" if "val" in data.splits else None
    train = data.splits["train"]
    if held_out is None or not train.labelled or not data.splits[held_out].labelled:
        raise DataError(
            f"{source}: a probe needs labelled images in a training and a test (or validation) split "
            "(class folders or an .npz with x_train/y_train and x_test/y_test)"
        )
    probe = ProbeRun(mean, std, device, cfg.eval_batch_size, size, cfg.seed)
    result = probe.run(encoder, train, data.splits[held_out], cfg, True, probes)
    return {"probe_split": held_out, "train_images": len(train), "test_images": len(data.splits[held_out]), **result}


def evaluate_checkpoint(
    path: str | Path,
    data_path: str | Path,
    probes: Sequence[str],
    fractions: Sequence[float] | None,
    device: torch.device,
) -> dict[str, Any]:
    """``deepscope evaluate CKPT --probe knn|linear``: probes of a trained ssl checkpoint's encoder on a labelled data set."""
    model, cfg, info = load_ssl_model(path, device)
    if fractions:
        cfg = dataclasses.replace(cfg, probe_fractions=list(fractions))  # checked again by __post_init__
    data = load_ssl_data(
        data_path, cfg.patch_size, cfg.crops, cfg.normalize, info["in_shape"][0], cfg.val_fraction, cfg.seed
    )
    result = probe_data(
        model.encoder, data, data_path, cfg, info["mean"], info["std"], info["in_shape"][1:], device, probes
    )
    return {"checkpoint": str(path), "data": str(data_path), **result}


def probe_encoder(
    encoder: nn.Module,
    data_path: str | Path,
    fractions: Sequence[float],
    device: torch.device,
    seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The same kNN and linear probes for any encoder (e.g. one trained by another library, for a side-by-side benchmark);
    ``mean``/``std`` are the standardisation it was trained with (default: the training split's)."""
    cfg = SSLConfig(probe_fractions=list(fractions), seed=seed)
    data = load_ssl_data(data_path, seed=seed)
    train = data.splits["train"]
    if mean is None or std is None:
        mean, std = ssl_stats(train, data.kind)
    return probe_data(
        encoder.to(device), data, data_path, cfg, mean, std, tuple(train.images.shape[2:]), device, ("knn", "linear")
    )
