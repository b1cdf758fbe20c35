"""What a task hands to an exporter: the network, a real input, which axes may vary, and the settings that make its
outputs mean something (normalisation, tile and halo, post-processing and its tuned thresholds)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepscope.errors import DeepscopeError

# ONNX metadata_props key and TorchScript extra file stem holding :meth:`Exportable.metadata`
METADATA_KEY = "deepscope"
# the splits of a run's data the example image is taken from, the first found: images the network never trained on
EXAMPLE_SPLITS = ("test", "val", "all", "train")
# images in a fixed-size network's example batch: two, so that a batch axis frozen by a trace is caught
EXAMPLE_BATCH = 2
# the U-Net papers, cited by every package of a U-Net, by its number of spatial axes
UNET_CITATIONS = {
    2: {"text": "Ronneberger, Fischer and Brox 2015, U-Net", "doi": "10.1007/978-3-319-24574-4_28"},
    3: {"text": "Cicek et al. 2016, 3D U-Net", "doi": "10.1007/978-3-319-46723-8_49"},
}


@dataclass
class ZooParts:
    """What a task adds to an :class:`Exportable` for a zoo package.

    ``raw`` is the example before preprocessing (the package's test input); the package's ``preprocessing`` must turn
    it into the exportable's example as deepscope prepares images, which bioimageio.core's test checks. ``finish``
    applies the ``postprocessing`` to the network's output in torch, for the test output. ``architecture`` names the
    callable in the architecture source and its keyword arguments.
    """

    raw: np.ndarray
    preprocessing: list[dict[str, Any]]
    postprocessing: list[dict[str, Any]]
    finish: Callable[[torch.Tensor], torch.Tensor]
    halo: Sequence[int]
    channel_names: list[str]
    output_names: list[str]
    architecture: tuple[str, dict[str, Any]]
    cite: list[dict[str, str]]
    tags: list[str]
    description: str
    documentation: list[str] = field(default_factory=list)  # markdown paragraphs on inputs, outputs, post-processing
    metrics: dict[str, Any] = field(default_factory=dict)  # the run's test metrics, if it has any
    # deepscope modules (whole, less their deepscope imports) or classes assembled into the architecture file, in order
    sources: list[Any] = field(default_factory=lambda: unet_sources())
    spatial_output: bool = True  # outputs have the input's spatial axes; False: (batch, channel), e.g. class scores


def unet_sources() -> list[Any]:
    """The modules the U-Net's architecture file is made of."""
    from deepscope.models import layers, unet

    return [layers, unet]


def channel_ids(names: Sequence[str]) -> list[str]:
    """Names as the zoo's channel names take them (letters, digits and underscores, not starting with a digit),
    unique: class names such as "red blood cell" become red_blood_cell."""
    ids: list[str] = []
    for name in names:
        text = re.sub(r"\W+", "_", str(name), flags=re.ASCII).strip("_") or "channel"
        text = f"c_{text}" if text[0].isdigit() else text
        ids.append(text if text not in ids else f"{text}_{len(ids)}")
    return ids


@dataclass
class Exportable:
    """A trained network ready to leave deepscope.

    ``module`` maps a float32 (N, C, *spatial) batch to one tensor, in eval mode on the CPU; ``example`` is a real
    input (one image of the run's data, prepared as prediction prepares it). ``spatial_multiple`` says that the spatial
    axes may take any size that is a multiple of these (a fully convolutional network), None that they are fixed to
    the example's. ``state`` is what deepscope needs to predict with the file as with the checkpoint: the run's
    resolved ``config`` and its ``task_state``.
    """

    task: str
    module: nn.Module
    example: torch.Tensor
    spatial_multiple: tuple[int, ...] | None
    state: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)
    zoo: ZooParts | None = None  # what a bioimage.io package adds; None: the task has no package yet
    min_side: int = 1  # smallest spatial side the network takes (a detector's coarsest level needs two pixels)
    # (largest absolute, relative) difference of an exported output from the eager one; None: elementwise
    difference: Callable[[torch.Tensor, torch.Tensor], tuple[float, float]] | None = None

    def axes(self) -> str:
        """Axis letters of the input, as the BioImage Model Zoo names them: b, c, then z, y, x."""
        return "bc" + "zyx"[3 - (self.example.ndim - 2) :]

    def metadata(self) -> dict[str, Any]:
        """JSON-safe description stored inside the exported file, read back by :func:`deepscope.export.runtime`."""
        from deepscope import __version__

        return {
            "deepscope": __version__,
            "task": self.task,
            "source": self.source,
            "axes": self.axes(),
            "example_shape": list(self.example.shape),
            "spatial_multiple": None if self.spatial_multiple is None else list(self.spatial_multiple),
            "min_side": self.min_side,
            "config": self.state["config"],
            "task_state": self.state.get("task_state", {}),
        }

    def metadata_json(self) -> str:
        try:
            return json.dumps(self.metadata())
        except (TypeError, ValueError) as exc:
            raise DeepscopeError(
                f"{self.source}: its settings cannot be stored as JSON in the export ({exc})"
            ) from None


def example_block(view: Any, tile: Sequence[int], divisor: Sequence[int]) -> torch.Tensor:
    """The (1, C, *spatial) float32 corner of a (C, *spatial) image or view that a fully convolutional network
    takes: at most ``tile``, each side a multiple of ``divisor`` (an image smaller than one multiple is padded by
    repeating its edges)."""
    spatial = tuple(view.shape[1:])
    sides = [max(d, min(t, s) // d * d) for s, t, d in zip(spatial, tile, divisor)]
    # a copy: the blocks of a memory-mapped file are read-only, which torch does not support
    block = np.array(view[(slice(None), *(slice(0, side) for side in sides))], np.float32)
    tensor = torch.from_numpy(block)[None]
    pad = [p for side, got in zip(reversed(sides), reversed(block.shape[1:])) for p in (0, side - got)]
    return F.pad(tensor, pad, mode="replicate") if any(pad) else tensor


def fixed_standardisation(mean: Sequence[float], std: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """The zoo's preprocessing step for deepscope's ``(x / scale - mean) / std`` per channel, in the raw image's
    units (one step: ``(x - mean * scale) / (std * scale)``)."""
    return {
        "id": "fixed_zero_mean_unit_variance",
        "kwargs": {"axis": "channel", "mean": [m * scale for m in mean], "std": [s * scale for s in std]},
    }


def standardised_images_note(in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> str:
    """What a classifier's or encoder's export takes, in words for its notes."""
    return (
        f"inputs: {list(in_shape)} (C, H, W) images scaled to 0..1, then (x - mean) / std per channel with mean "
        f"{list(mean)} and std {list(std)}"
    )


def standardised_input_doc(info: dict[str, Any], scale: float) -> str:
    """A package's README paragraph on the input of a classifier or encoder (``info``: its ``in_shape``, ``mean``,
    ``std``), given in the images' stored units up to ``scale``."""
    channels, height, width = info["in_shape"]
    return (
        f"Input: {channels}-channel {height}x{width} images in their stored units (0..{scale:g}), standardised per "
        f"channel with the training images' mean {info['mean']} and standard deviation {info['std']} (in 0..1 units)."
    )


def run_metrics(checkpoint: str | Path) -> dict[str, Any]:
    """The run's test scores (numbers only) from the metrics.json beside the checkpoint: its ``test`` section and
    its ``test_*`` entries; empty when there is none."""
    try:
        metrics = json.loads(Path(checkpoint).with_name("metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    test = metrics.get("test")
    found = {
        **(test if isinstance(test, dict) else {}),
        **{k[5:]: v for k, v in metrics.items() if k.startswith("test_")},
    }
    return {k: v for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
