"""What a task hands to an exporter: the network, a real input, which axes may vary, and the settings that make its
outputs mean something (normalisation, tile and halo, post-processing and its tuned thresholds)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepscope.errors import DeepscopeError

# ONNX metadata_props key and TorchScript extra file stem holding :meth:`Exportable.metadata`
METADATA_KEY = "deepscope"
EXAMPLE_BATCH = (
    2  # images in a fixed-size network's example batch: two, so that a batch axis frozen by a trace is caught
)


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
    block = np.asarray(view[(slice(None), *(slice(0, side) for side in sides))], np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(block))[None]
    pad = [p for side, got in zip(reversed(sides), reversed(block.shape[1:])) for p in (0, side - got)]
    return F.pad(tensor, pad, mode="replicate") if any(pad) else tensor


def standardised_images_note(in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> str:
    """What a classifier's or encoder's export takes, in words for its notes."""
    return (
        f"inputs: {list(in_shape)} (C, H, W) images scaled to 0..1, then (x - mean) / std per channel with mean "
        f"{list(mean)} and std {list(std)}"
    )
