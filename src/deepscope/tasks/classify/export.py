"""A classification checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the classifier's logits for
images of the training size, standardised as in training (mean and std in the metadata's task_state), checked on
real images of the run's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepscope.config import to_dict
from deepscope.data.classification.dataset import ImageSet, load_classification
from deepscope.data.classification.loaders import BatchSpec, DeviceLoader
from deepscope.errors import DataError
from deepscope.export.exportable import (
    EXAMPLE_BATCH,
    EXAMPLE_SPLITS,
    Exportable,
    ZooParts,
    channel_ids,
    fixed_standardisation,
    run_metrics,
    standardised_images_note,
    standardised_input_doc,
)
from deepscope.tasks.classify.config import ClassifyConfig, resize_of
from deepscope.tasks.classify.predict import file_images, load_classifier

# the papers of each classifier's design, cited by its package (the zoo requires a citation)
BACKPROPAGATION = {
    "text": "Rumelhart, Hinton and Williams 1986, learning by back-propagation",
    "doi": "10.1038/323533a0",
}
CLASSIFIER_CITATIONS = {
    "logreg": BACKPROPAGATION,
    "mlp": BACKPROPAGATION,
    "cnn": {"text": "LeCun et al. 1998, gradient-based learning for document recognition", "doi": "10.1109/5.726791"},
    "resnet18": {"text": "He et al. 2016, deep residual learning", "doi": "10.1109/CVPR.2016.90"},
    "fastnet": {
        "text": "Jordan 2024, 94% on CIFAR-10 in 3.29 seconds (airbench)",
        "url": "https://arxiv.org/abs/2404.00498",
    },
}


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


def zoo_parts(
    cfg: ClassifyConfig, info: dict[str, Any], raw: np.ndarray, scale: float, checkpoint: str | Path
) -> ZooParts:
    """A classifier's package: the image in its stored units, standardised as in training, class probabilities out
    (softmax), the classifier's own module in the architecture file."""
    from deepscope.models import classifiers, layers, resnet
    from deepscope.models.registry import model_factory

    names = info["class_names"]
    channels = info["in_shape"][0]
    return ZooParts(
        raw=raw,
        preprocessing=[fixed_standardisation(info["mean"], info["std"], scale)],
        postprocessing=[{"id": "softmax", "kwargs": {"axis": "channel"}}],
        finish=lambda y: torch.softmax(y, 1),
        halo=[0, 0],
        channel_names=[f"channel{i}" for i in range(channels)],
        output_names=channel_ids(names),
        architecture=(
            model_factory(cfg.model).__name__,
            {"in_shape": list(info["in_shape"]), "num_classes": len(names), **cfg.model_args},
        ),
        cite=[CLASSIFIER_CITATIONS[cfg.model]],
        tags=["deepscope", "classification", cfg.model, "2d", "pytorch"],
        description=f"deepscope {cfg.model} image classifier of {len(names)} classes, trained on {Path(cfg.data).name}",
        documentation=[
            standardised_input_doc(info, scale),
            f"Output: the probability of each class, in this order: {', '.join(map(str, names))}.",
        ],
        metrics=run_metrics(checkpoint),
        sources=[layers, classifiers, resnet],
        spatial_output=False,
    )


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
    raw = np.moveaxis(np.asarray(images.images[: len(example)], np.float32), -1, 1)
    zoo = zoo_parts(cfg, info, raw, float(loader.scale), checkpoint)
    return Exportable("classify", model, example, None, state, str(checkpoint), notes, zoo)
