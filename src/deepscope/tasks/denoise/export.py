"""A denoising checkpoint as an :class:`~deepscope.export.exportable.Exportable`: the U-Net on standardised images
(per-channel mean and standard deviation of the training images, in the metadata's task_state), checked on a tile of
a real image of the run's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepscope.config import from_dict
from deepscope.data.denoise.dataset import find_denoise_files
from deepscope.data.io.views import ChannelsFirst
from deepscope.errors import DataError
from deepscope.export.exportable import (
    EXAMPLE_SPLITS,
    UNET_CITATIONS,
    Exportable,
    ZooParts,
    example_block,
    fixed_standardisation,
    run_metrics,
)
from deepscope.inference.blockio import open_input
from deepscope.inference.loading import load_trained_model
from deepscope.tasks.denoise.config import DenoiseConfig
from deepscope.tasks.denoise.predict import Standardized, _build_from_checkpoint

ROLE_ORDER = ("noisy", "clean")  # what the network takes; a clean image still checks the export


def sample_image(cfg: DenoiseConfig, checkpoint: str | Path) -> Path:
    """The first noisy (else clean) image of the run's data, test split first."""
    try:
        found = find_denoise_files(cfg.data, cfg.noise.synthetic)
    except DataError as exc:
        raise DataError(
            f"{checkpoint}: no image of its training data to check the export on ({exc}); give --sample IMAGE"
        ) from None
    for split in EXAMPLE_SPLITS:
        for role in ROLE_ORDER:
            files = found.get(split, {}).get(role)
            if files:
                return files[sorted(files)[0]]
    raise DataError(f"{checkpoint}: its training data {cfg.data} holds no image; give --sample IMAGE")


CITATIONS = {
    "n2v": {"text": "Krull, Buchholz and Jug 2019, Noise2Void", "doi": "10.1109/CVPR.2019.00223"},
    "n2v2": {"text": "Hoeck et al. 2022, N2V2", "doi": "10.1007/978-3-031-25069-9_33"},
    "n2n": {"text": "Lehtinen et al. 2018, Noise2Noise", "url": "https://arxiv.org/abs/1803.04189"},
}


def zoo_parts(cfg: DenoiseConfig, info: dict[str, Any], raw: np.ndarray, checkpoint: str | Path) -> ZooParts:
    """The package's view of a denoiser: fixed per-channel standardisation in, its inverse out (data units)."""
    ndim, channels = info["ndim"], info["channels"]
    mean, std = [float(m) for m in info["mean"]], [float(s) for s in info["std"]]
    settings = info["model_settings"]
    method = str(info.get("method") or cfg.method)
    cite = [UNET_CITATIONS[ndim]] + [
        CITATIONS[m] for m in (method, "n2v2" if settings.get("blurpool") else "") if m in CITATIONS
    ]
    shape = (1, -1, *([1] * ndim))
    return ZooParts(
        raw=raw,
        preprocessing=[fixed_standardisation(mean, std)],
        postprocessing=[{"id": "scale_linear", "kwargs": {"axis": "channel", "gain": std, "offset": mean}}],
        finish=lambda y: y * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape),
        halo=info["halo"],
        channel_names=[f"channel{i}" for i in range(channels)],
        output_names=[f"denoised{i}" for i in range(channels)],
        architecture=("UNet", {"in_channels": channels, "out_channels": channels, "dim": ndim, **settings}),
        cite=cite,
        tags=["deepscope", "unet", "denoising", method, f"{ndim}d", "pytorch"],
        description=f"deepscope {ndim}D U-Net for denoising ({method}), trained on {Path(cfg.data).name}",
        documentation=[
            f"Input: {channels} channel(s), {ndim}D, in the training images' units, any size that is a multiple of "
            f"{info['divisor']} (larger images tiled with halo {info['halo']}); standardised per channel with the "
            f"training images' mean {mean} and standard deviation {std}.",
            "Output: the denoised image in the same units (the standardisation undone).",
        ],
        metrics=run_metrics(checkpoint),
    )


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
    raw = example_block(view, info["tile"], divisor)
    block = example_block(Standardized(view, info["mean"], info["std"], str(source)), info["tile"], divisor)
    notes = [
        f"inputs and outputs standardised per channel: (x - mean) / std with mean {info['mean']} and std "
        f"{info['std']}; sides multiples of {list(divisor)}",
        f"example: {source}",
    ]
    zoo = zoo_parts(cfg, info, raw.numpy(), checkpoint)
    return Exportable("denoise", model, block, divisor, state, str(checkpoint), notes, zoo)
