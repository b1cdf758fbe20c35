"""Shallow to deep: a forest trained from a few scribbles labels many unlabelled images, and a U-Net learns from them.

The forest's class maps become semantic masks (class k -> k - 1, as the segment task's ``semantic`` target expects);
pixels where the forest is unsure (top probability under ``min_confidence``) get the ignore label, so the network is
not taught the forest's coin flips. The U-Net then trains through the shared engine like any segment run and is
used with ``deepscope predict``; unlike the forest it sees context beyond the filter scales.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepscope.atomic import write_tiff
from deepscope.config import from_dict
from deepscope.engine.trainer import Trainer
from deepscope.errors import DataError
from deepscope.inference.blockio import open_input
from deepscope.tasks import get_task
from deepscope.tasks.pixel.classifier import PixelClassifier
from deepscope.tasks.pixel.features import compute_features

IGNORE = 255


def pseudo_labels(classifier: PixelClassifier, probs: np.ndarray, min_confidence: float) -> np.ndarray:
    """uint8 semantic mask: forest class index 0..K-1, ``IGNORE`` where the top probability is under ``min_confidence``."""
    mask = np.argmax(probs, axis=0).astype(np.uint8)
    mask[probs.max(axis=0) < min_confidence] = IGNORE
    return mask


def write_pseudo_dataset(
    classifier: PixelClassifier,
    inputs: Sequence[Path],
    root: Path,
    device: torch.device,
    key: str | None = None,
    min_confidence: float = 0.0,
    tile: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``root/images`` (links to the inputs, copies where links are not allowed) and ``root/masks`` (pseudo-labels)."""
    if not inputs:
        raise DataError("no images to label with the forest")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ignored = 0
    total = 0
    for source in inputs:
        view = classifier.view(open_input(source, key), str(source))
        probs = classifier.probabilities(compute_features(view, classifier.spec, tile, device))
        mask = pseudo_labels(classifier, probs, min_confidence)
        ignored += int(np.count_nonzero(mask == IGNORE))
        total += mask.size
        link = root / "images" / source.name
        link.unlink(missing_ok=True)
        try:
            os.symlink(source.resolve(), link)
        except OSError:
            shutil.copyfile(source, link)
        write_tiff(root / "masks" / f"{source.stem}.tif", mask, "pseudo-labels", compression="zlib")
    return {"pseudo_labelled_images": len(inputs), "ignored_fraction": round(ignored / total, 4)}


def train_unet_from_forest(
    classifier_path: str | Path,
    inputs: Sequence[Path],
    out: str | Path,
    device: torch.device,
    settings: dict[str, Any] | None = None,
    key: str | None = None,
    min_confidence: float = 0.0,
) -> dict[str, Any]:
    """Label ``inputs`` with the forest into ``out/pseudo``, then train a semantic U-Net on them into ``out/unet``.

    ``settings`` are segment-task settings (epochs, max_minutes, patch_shape, ...) laid over the semantic target the
    forest sets; the schedule the user leaves open is planned from the time budget (``max_minutes``, else the segment
    task's default budget) by the engine, as for every semantic segment run.
    """
    classifier = PixelClassifier.load(classifier_path)
    out = Path(out)
    summary = write_pseudo_dataset(classifier, inputs, out / "pseudo", device, key, min_confidence)
    values = {
        "data": str(out / "pseudo"),
        "out": str(out / "unet"),
        **(settings or {}),  # epochs and steps left open are planned from the budget by the engine
        "target": "semantic",
        "num_classes": len(classifier.classes),
        "ignore_label": IGNORE,
    }
    config_cls, task_cls = get_task("segment")  # by name: tasks do not import each other
    config = from_dict(config_cls, values, "shallow-to-deep settings")
    metrics = Trainer(task_cls(config)).fit()
    return {
        **summary,
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "classes": classifier.classes,
        "checkpoint": str(out / "unet" / "best.pt"),
    }
