"""Applying a trained classifier: scores of a data split, and class probabilities of image files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.config import from_dict
from deepscope.data.classification.dataset import ImageSet, conform, load_classification, read_images, stack_images
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader
from deepscope.errors import DataError
from deepscope.inference.fastest import announce, runtime_of
from deepscope.inference.loading import batched_logits, fastest, load_trained_model
from deepscope.tasks.classify.config import ClassifyConfig, resize_of
from deepscope.tasks.classify.task import choose_splits, evaluate_batches, make_batches

# ---- evaluation and prediction from a checkpoint -------------------------------------------------


def load_classifier(path: str | Path, device: torch.device) -> tuple[nn.Module, ClassifyConfig, dict[str, Any]]:
    """The trained model of a classification checkpoint, its config and its inference state (classes, normalization)."""
    model, state = load_trained_model(path, "classify", device)
    return model, from_dict(ClassifyConfig, state["config"], f"{path}: config"), state["task_state"]


def evaluate_checkpoint(path: str | Path, data_path: str | Path, split: str, device: torch.device) -> dict[str, Any]:
    """Metrics of a trained classifier on one split of a data set."""
    model, cfg, info = load_classifier(path, device)
    data = load_classification(data_path, resize_of(cfg), lazy=None)
    if data.class_names != info["class_names"]:
        raise DataError(f"{data_path}: classes {data.class_names} differ from the checkpoint's {info['class_names']}")
    if list(data.image_shape) != list(info["in_shape"]):
        raise DataError(
            f"{data_path}: images have shape {list(data.image_shape)} (C, H, W) but the model expects {info['in_shape']}"
        )
    if split == "test" and "test" not in data.splits:
        chosen = data.splits.get("all")
        if chosen is None:
            raise DataError(f"{data_path}: has no test split")
    else:
        splits = choose_splits(data, cfg.val_fraction, cfg.seed)
        if split not in splits:
            raise DataError(f"{data_path}: has no {split} split (found {', '.join(sorted(splits))})")
        chosen = splits[split]
    loader = make_batches(
        chosen, BatchSpec(cfg.eval_batch_size, info["mean"], info["std"]), device, channels_last=False
    )
    model = fastest(model, path, None)
    announce(model, len(loader))
    result = evaluate_batches(model, loader, info["class_names"], device)
    return {"checkpoint": str(path), "data": str(data_path), "split": split, **result, **runtime_of(model)}


def predict_files(
    path: str | Path, files: list[Path], device: torch.device, batch_size: int = 256
) -> tuple[list[str], np.ndarray]:
    """Class probabilities (N, classes) for image files, read and preprocessed as in training."""
    return class_probabilities(path, device, lambda cfg, info: file_images(files, cfg, info), batch_size)


def predict_arrays(
    path: str | Path, arrays: list[np.ndarray], names: list[str], device: torch.device
) -> tuple[list[str], np.ndarray]:
    """Class probabilities (N, classes) for (H, W) or (H, W, C) image arrays, preprocessed as in training."""

    def images(cfg: ClassifyConfig, info: dict[str, Any]) -> ImageSet:
        stacked = stack_images([a[..., None] if a.ndim == 2 else a for a in arrays], names, resize_of(cfg))
        return conformed(stacked, names, info)

    return class_probabilities(path, device, images)


def class_probabilities(
    path: str | Path,
    device: torch.device,
    images: Callable[[ClassifyConfig, dict[str, Any]], ImageSet],
    batch_size: int = 256,
) -> tuple[list[str], np.ndarray]:
    """The checkpoint's class names and probabilities of the images ``images(config, inference state)`` gives."""
    model, cfg, info = load_classifier(path, device)
    loader = DeviceLoader(
        images(cfg, info), BatchSpec(batch_size, info["mean"], info["std"]), device, channels_last=False
    )
    model = fastest(model, path, None)
    announce(model, len(loader))
    logits, _ = batched_logits(model, loader)
    return info["class_names"], logits.softmax(1).numpy()


def file_images(files: list[Path], cfg: ClassifyConfig, info: dict[str, Any]) -> ImageSet:
    """Image files read and resized as in training, checked against the model's (C, H, W)."""
    return conformed(read_images(files, resize_of(cfg)), [str(f) for f in files], info)


def conformed(images: np.ndarray, sources: list[str], info: dict[str, Any]) -> ImageSet:
    """Stacked (N, H, W, C) images checked against the model's (C, H, W), grey repeated to RGB where it takes RGB."""
    c, h, w = info["in_shape"]
    if images.shape[1:3] != (h, w):
        raise DataError(
            f"{sources[0]}: images are {images.shape[1]}x{images.shape[2]} but the model expects {h}x{w} (it was trained without --resize)"
        )
    if images.shape[3] != c:
        if images.shape[3] == 1 and c == 3:
            images = conform(images, 3, images.dtype)
        else:
            raise DataError(f"{sources[0]}: images have {images.shape[3]} channels but the model expects {c}")
    return ImageSet(images, np.zeros(len(images), dtype=np.int64), sources)
