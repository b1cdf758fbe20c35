"""A denoising checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the U-Net on standardised images
(per-channel mean and standard deviation of the training images, in the metadata's task_state), checked on a tile of
a real image of the run's data."""

from __future__ import annotations

from pathlib import Path

import torch

from deepscope.config import from_dict
from deepscope.data.denoise.dataset import find_denoise_files
from deepscope.data.io.views import ChannelsFirst
from deepscope.errors import DataError
from deepscope.export.exportable import Exportable, example_block
from deepscope.inference.blockio import open_input
from deepscope.inference.loading import load_trained_model
from deepscope.tasks.denoise.config import DenoiseConfig
from deepscope.tasks.denoise.predict import Standardized, _build_from_checkpoint

SPLIT_ORDER = ("test", "val", "all", "train")  # where the example image is taken from, first found
ROLE_ORDER = ("noisy", "clean")  # what the network takes; a clean image still checks the export


def sample_image(cfg: DenoiseConfig, checkpoint: str | Path) -> Path:
    """The first noisy (else clean) image of the run's data, test split first."""
    try:
        found = find_denoise_files(cfg.data, cfg.noise.synthetic)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    for split in SPLIT_ORDER:
        for role in ROLE_ORDER:
            files = found.get(split, {}).get(role)
            if files:
                return files[sorted(files)[0]]
    raise DataError(f"{checkpoint}: its training data {cfg.data} holds no image; give --sample IMAGE")


def exportable(checkpoint: str | Path, sample: str | None = None, key: str | None = None) -> Exportable:
    model, state = load_trained_model(checkpoint, "denoise", torch.device("cpu"), _build_from_checkpoint)
    cfg = from_dict(DenoiseConfig, state["config"], f"{checkpoint}: config")
    info = state["task_state"]
    source = Path(sample) if sample else sample_image(cfg, checkpoint)
    try:
        view = ChannelsFirst(open_input(source, key or cfg.key), info["ndim"], info["channels"])
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    divisor = tuple(info["divisor"])
    block = example_block(Standardized(view, info["mean"], info["std"], str(source)), info["tile"], divisor)
    notes = [
        f"inputs and outputs standardised per channel: (x - mean) / std with mean {info['mean']} and std "
        f"{info['std']}; sides multiples of {list(divisor)}",
        f"example: {source}",
    ]
    return Exportable("denoise", model, block, divisor, state, str(checkpoint), notes)
