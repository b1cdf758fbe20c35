"""A checkpoint's network that moves itself to onnxruntime during a long prediction, when that is faster with equal
outputs: the default runtime of ``deepscope predict`` on a checkpoint.

onnxruntime runs deepscope's 2D U-Net 1.7-1.8x faster than eager PyTorch in float32 on the CPU with outputs equal
to 1e-7 (benchmarks/RESULTS.md, "export_speed"), but building the ONNX graph costs about 5 seconds, and on other
networks (3D U-Nets: 1.07x; small detectors) it gains little or nothing. So nothing is decided in advance: the first
batches run eagerly and are timed; once the eager time left for the work announced (:meth:`FastestRuntime.expect`,
called by tiled prediction per image) exceeds :data:`SWITCH_SECONDS`, the network is exported in memory, the same
batch is run through onnxruntime, and onnxruntime is kept only if it was faster and its output equals the eager one
to :data:`~deepscope.export.formats.TOLERANCE`. Either way the choice is made once per process.

Only float32 on the CPU switches: under autocast (bf16) or on a GPU the network stays eager, and without
onnxruntime installed (it is the ``export`` extra) too.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepscope.errors import DeepscopeError
from deepscope.export.exportable import Exportable
from deepscope.export.formats import TOLERANCE, elementwise_difference, onnx_bytes
from deepscope.export.runtime import OnnxModule

log = logging.getLogger(__name__)

# eager seconds left above which an ONNX export (about 5 s for a 2D U-Net) is tried: a 1.8x faster runtime then pays
# for it with room to spare, and a prediction shorter than this never waits for an export
SWITCH_SECONDS = 15.0
FASTER = 0.9  # onnxruntime is kept when a batch takes at most this share of eager's time


def announce(model: nn.Module, calls: int) -> None:
    """Tell every :class:`FastestRuntime` inside ``model`` that ``calls`` batches are about to come."""
    for module in model.modules():
        if isinstance(module, FastestRuntime):
            module.expect(calls)


def runtime_of(model: nn.Module) -> dict[str, str]:
    """``{"runtime": "eager" | "onnxruntime"}`` of the first :class:`FastestRuntime` inside ``model``, for a command's
    result; empty when there is none (an exported file runs in its own runtime)."""
    found = next((m for m in model.modules() if isinstance(m, FastestRuntime)), None)
    return {} if found is None else {"runtime": found.choice}


def faster(eager_seconds: float, onnx_seconds: float) -> bool:
    return onnx_seconds <= FASTER * eager_seconds


class FastestRuntime(nn.Module):
    """``model`` (float32 batches in, one tensor out), run eagerly until a long prediction makes onnxruntime worth
    trying (see the module's docstring). ``spatial_multiple``: what the spatial sides must be multiples of (a U-Net's
    divisor), None for networks of a fixed input size. ``choice`` says what runs: ``"eager"`` until decided, then
    ``"eager"`` or ``"onnxruntime"``."""

    def __init__(self, model: nn.Module, spatial_multiple: tuple[int, ...] | None, source: str) -> None:
        super().__init__()
        self.model, self.spatial_multiple, self.source = model, spatial_multiple, source
        self.onnx: nn.Module | None = None
        self.decided, self.calls_left = False, 0
        self.choice = "eager"

    def expect(self, calls: int) -> None:
        """``calls`` batches are about to come (one image's tiles)."""
        self.calls_left = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None:
            return self.onnx(x)
        start = time.perf_counter()
        y = self.model(x)
        seconds = time.perf_counter() - start
        self.calls_left = max(0, self.calls_left - 1)
        if not self.decided and seconds * self.calls_left > SWITCH_SECONDS and self.can_switch(x):
            self.decided = True
            self.try_onnx(x, y, seconds)
        return y

    def can_switch(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and importlib.util.find_spec("onnxruntime") is not None
        )

    def try_onnx(self, x: torch.Tensor, y: torch.Tensor, eager_seconds: float) -> None:
        """Export the network in memory and keep onnxruntime if it runs ``x`` faster to the same ``y``."""
        example = x[:1].detach()
        state: dict[str, Any] = {"config": {}, "task_state": {}}
        try:
            onnx = OnnxModule(
                Path(self.source),
                onnx_bytes(Exportable("", self.model, example, self.spatial_multiple, state, self.source)),
            )
            start = time.perf_counter()
            got = onnx(x)
            onnx_seconds = time.perf_counter() - start
        except DeepscopeError as exc:
            log.info("%s: stays eager, the ONNX export failed (%s)", self.source, exc)
            return
        _, relative = elementwise_difference(y.detach().float(), got.float())
        if relative <= TOLERANCE and faster(eager_seconds, onnx_seconds):
            self.onnx, self.choice = onnx, "onnxruntime"
        log.info(
            "%s: %s (a batch took %.3f s eager, %.3f s in onnxruntime; outputs differ by %.1e of the largest)",
            self.source,
            self.choice,
            eager_seconds,
            onnx_seconds,
            relative,
        )
