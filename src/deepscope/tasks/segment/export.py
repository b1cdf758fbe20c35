"""A segmentation checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the U-Net's raw outputs (the
target's activation and post-processing, with its tuned thresholds, travel in the metadata), checked on a tile of a
real image of the run's data."""

from __future__ import annotations

from pathlib import Path

import torch

from deepscope.config import from_dict
from deepscope.data.io.views import input_view
from deepscope.data.segmentation.dataset import find_items
from deepscope.errors import DataError
from deepscope.export.exportable import Exportable, example_block
from deepscope.inference.blockio import open_input
from deepscope.inference.loading import load_trained_model
from deepscope.tasks.segment.config import SegmentConfig
from deepscope.tasks.segment.predict import _build_from_checkpoint

SPLIT_ORDER = ("test", "val", "all", "train")  # where the example image is taken from, first found


def sample_image(cfg: SegmentConfig, checkpoint: str | Path) -> tuple[Path, str | None]:
    """The first image of the run's data (test split first), with its key in a container."""
    try:
        found = find_items(cfg.data, cfg.raw_key, cfg.label_key, cfg.labels)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    for split in SPLIT_ORDER:
        if found.get(split):
            _, path, key, _, _ = found[split][0]
            return path, key
    raise DataError(f"{checkpoint}: its training data {cfg.data} holds no image; give --sample IMAGE")


def exportable(checkpoint: str | Path, sample: str | None = None, key: str | None = None) -> Exportable:
    model, state = load_trained_model(checkpoint, "segment", torch.device("cpu"), _build_from_checkpoint)
    cfg = from_dict(SegmentConfig, state["config"], f"{checkpoint}: config")
    info = state["task_state"]
    source, key = (Path(sample), key) if sample else sample_image(cfg, checkpoint)
    view = input_view(
        open_input(source, key), info["ndim"], info["channels"], str(source), cfg.normalize, cfg.invert or "never"
    )
    divisor = tuple(info["divisor"])
    notes = [
        f"outputs: the U-Net's {info['out_channels']} raw channel(s) for target {cfg.target}; deepscope applies "
        + ("a softmax over them" if cfg.target == "semantic" else "a sigmoid to the first")
        + " and its post-processing (settings in the metadata's config.post)",
        f"inputs: percentile-normalised {cfg.normalize} per image; sides multiples of {list(divisor)}",
        f"example: {source}",
    ]
    return Exportable(
        "segment", model, example_block(view, info["tile"], divisor), divisor, state, str(checkpoint), notes
    )
