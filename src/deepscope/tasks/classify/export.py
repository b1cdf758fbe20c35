"""A classification checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the classifier's logits for
images of the training size, standardised as in training (mean and std in the metadata's task_state), checked on
real images of the run's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepscope.config import to_dict
from deepscope.data.classification.dataset import ImageSet, load_classification
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader
from deepscope.errors import DataError
from deepscope.export.exportable import EXAMPLE_BATCH, EXAMPLE_SPLITS, Exportable, standardised_images_note
from deepscope.tasks.classify.config import ClassifyConfig, resize_of
from deepscope.tasks.classify.predict import file_images, load_classifier


def data_images(cfg: ClassifyConfig, checkpoint: str | Path) -> ImageSet:
    """The first images of the run's data, test split first, in memory (a folder too large for it is read lazily,
    and only these images are read)."""
    try:
        data = load_classification(cfg.data, resize_of(cfg), lazy=None)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    split = next(data.splits[s] for s in EXAMPLE_SPLITS if s in data.splits)
    first = split.subset(np.arange(min(EXAMPLE_BATCH, len(split))))
    if isinstance(first, ImageSet):
        return first
    return ImageSet(np.stack([first.image(i) for i in range(len(first))]), first.labels, first.sources)


def exportable(checkpoint: str | Path, sample: str | None = None) -> Exportable:
    cpu = torch.device("cpu")
    model, cfg, info = load_classifier(checkpoint, cpu)
    images = file_images([Path(sample)], cfg, info) if sample else data_images(cfg, checkpoint)
    loader = DeviceLoader(images, BatchSpec(EXAMPLE_BATCH, info["mean"], info["std"]), cpu, channels_last=False)
    example = next(iter(loader))[0].float()
    state = {"config": to_dict(cfg), "task_state": info}
    notes = [
        f"outputs: logits of the classes {info['class_names']} (softmax gives probabilities)",
        standardised_images_note(info["in_shape"], info["mean"], info["std"]),
        f"example: {images.sources[0] if images.sources else cfg.data}",
    ]
    return Exportable("classify", model, example, None, state, str(checkpoint), notes)
