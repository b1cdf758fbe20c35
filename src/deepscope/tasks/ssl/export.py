"""A self-supervised checkpoint's encoder as an :class:`~deepscope.export.exportable.Exportable`: the features the
probes use (the projection head, which only serves the training loss, is left out), for standardised images of the
training views' size, checked on real images of the run's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepscope.config import to_dict
from deepscope.data.ssl.dataset import SSLEvalBatches, SSLImages, load_ssl_data
from deepscope.errors import DataError
from deepscope.export.exportable import EXAMPLE_BATCH, EXAMPLE_SPLITS, Exportable, standardised_images_note
from deepscope.tasks.ssl.config import SSLConfig
from deepscope.tasks.ssl.task import load_ssl_model


def example_images(cfg: SSLConfig, data: str, checkpoint: str | Path) -> SSLImages:
    """The first images of ``data`` (the run's data, or a sample), test split first."""
    try:
        found = load_ssl_data(data, cfg.patch_size, cfg.crops, cfg.normalize, cfg.channels, 0.0, cfg.seed)
    except DataError as exc:
        raise DataError(f"{checkpoint}: no image to check the export on ({exc}); give --sample IMAGE_FOLDER") from None
    split = next(found.splits[s] for s in EXAMPLE_SPLITS if s in found.splits)
    return split.subset(np.arange(min(EXAMPLE_BATCH, len(split))))


def exportable(checkpoint: str | Path, sample: str | None = None) -> Exportable:
    cpu = torch.device("cpu")
    model, cfg, info = load_ssl_model(checkpoint, cpu)
    size = tuple(info["in_shape"][1:])
    images = example_images(cfg, sample or cfg.data, checkpoint)
    batches = SSLEvalBatches(images, EXAMPLE_BATCH, info["mean"], info["std"], cpu, size=size)
    example = next(iter(batches))[0].float()
    state = {"config": to_dict(cfg), "task_state": info}
    notes = [
        f"outputs: the encoder's {model.encoder.out_features} features per image (the projection head is left out)",
        standardised_images_note(info["in_shape"], info["mean"], info["std"]),
        f"example: {images.sources[0] if images.sources else sample or cfg.data}",
    ]
    return Exportable("ssl", model.encoder, example, None, state, str(checkpoint), notes)
