"""A self-supervised checkpoint's encoder as an :class:`~deepscope.export.exportable.Exportable`: the features the
probes use (the projection head, which only serves the training loss, is left out), for standardised images of the
training views' size, checked on real images of the run's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from deepscope.config import to_dict
from deepscope.data.ssl.dataset import SSLEvalBatches, SSLImages, centre_crop, load_ssl_data
from deepscope.errors import DataError
from deepscope.export.exportable import (
    EXAMPLE_BATCH,
    EXAMPLE_SPLITS,
    Exportable,
    ZooParts,
    fixed_standardisation,
    standardised_images_note,
    standardised_input_doc,
)
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


METHOD_CITATIONS = {
    "simclr": {
        "text": "Chen et al. 2020, a simple framework for contrastive learning (SimCLR)",
        "url": "https://arxiv.org/abs/2002.05709",
    },
    "vicreg": {"text": "Bardes, Ponce and LeCun 2022, VICReg", "url": "https://arxiv.org/abs/2105.04906"},
}


def zoo_parts(cfg: SSLConfig, info: dict[str, Any], raw: np.ndarray, scale: float, features: int) -> ZooParts:
    """An encoder's package: images standardised as in training in, the encoder's features out (no postprocessing),
    the encoder's own code in the architecture file."""
    from deepscope.models import layers, resnet, unet
    from deepscope.models.ssl import UNetEncoder

    channels = info["in_shape"][0]
    if cfg.model == "unet":
        architecture = ("UNetEncoder", {"in_channels": channels, **cfg.model_args})
        sources: list[Any] = [layers, unet, UNetEncoder]
    else:
        architecture = ("ResNet", {"in_shape": list(info["in_shape"]), "num_classes": 0, **cfg.model_args})
        sources = [resnet]
    return ZooParts(
        raw=raw,
        preprocessing=[fixed_standardisation(info["mean"], info["std"], scale)],
        postprocessing=[],
        finish=lambda y: y,
        halo=[0, 0],
        channel_names=[f"channel{i}" for i in range(channels)],
        output_names=[f"feature{i}" for i in range(features)],
        architecture=architecture,
        cite=[METHOD_CITATIONS[cfg.method]],
        tags=["deepscope", "self-supervised", cfg.method, cfg.model, "feature-extraction", "2d", "pytorch"],
        description=f"deepscope {cfg.model} encoder pretrained by {cfg.method} on {Path(cfg.data).name}",
        documentation=[
            standardised_input_doc(info, scale),
            f"Output: the encoder's {features} features per image (its projection head, which only serves the "
            "training loss, is left out); use them for k-nearest neighbours, linear probes or clustering.",
        ],
        sources=sources,
        spatial_output=False,
    )


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
    raw = centre_crop(images.images[: len(example)], size).float().numpy()
    zoo = zoo_parts(cfg, info, raw, images.scale, cast(int, model.encoder.out_features))  # every encoder sets it
    return Exportable("ssl", model.encoder, example, None, state, str(checkpoint), notes, zoo)
