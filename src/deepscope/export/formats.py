"""Writing an :class:`Exportable` as ONNX or TorchScript, each checked against the eager network before it is kept.

ONNX goes through PyTorch's ``torch.export``-based exporter (its TorchScript-based one is deprecated): each free
spatial axis is declared a multiple of the network's divisor, which is what a U-Net's skips need and what its
``forward`` checks. Opset :data:`OPSET` is the first of the ``torch.export`` exporter and is run by every onnxruntime
since 1.14 (2023). TorchScript is traced; PyTorch marks TorchScript deprecated too, but it is the format Fiji
(deepImageJ), the BioImage Model Zoo and C++ programs load today.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepscope.atomic import atomic_write
from deepscope.errors import DeepscopeError
from deepscope.export.exportable import METADATA_KEY, Exportable
from deepscope.export.runtime import load_exported, torchscript_quiet

OPSET = 18
MAX_SIDE = 2**16  # largest batch or side an export declares it takes
TOLERANCE = 1e-4  # largest difference from the eager network, relative to its largest output (at least 1)
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript"}


def _quiet_trace(trace: Callable[[], Any]) -> Any:
    """Run a trace with the tracer's warnings about Python shape checks silenced: the networks check their input's
    shape in ``forward`` to explain a wrong one; those checks are not part of the graph, by design. PyTorch's notice
    that TorchScript is deprecated is silenced too (:func:`~deepscope.export.runtime.torchscript_quiet`)."""
    with warnings.catch_warnings(), torchscript_quiet():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return trace()


def onnx_bytes(ex: Exportable) -> bytes:
    """The network as an ONNX model with a dynamic batch axis (and spatial axes, in multiples of
    ``spatial_multiple``, when it is fully convolutional), its weights inside, and :meth:`Exportable.metadata_json`
    in its ``metadata_props``."""
    from torch.export import Dim

    axes: dict[int, Any] = {0: Dim("batch", min=1, max=MAX_SIDE)}
    for axis, multiple in enumerate(ex.spatial_multiple or (), start=2):
        name = "zyx"[axis - ex.example.ndim + 3]
        side = Dim(name, min=-(-ex.min_side // multiple), max=MAX_SIDE // multiple)
        axes[axis] = side if multiple == 1 else multiple * side
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ex.module,
                (ex.example,),
                dynamo=True,
                dynamic_shapes=(axes,),
                input_names=["input"],
                output_names=["output"],
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as exc:  # torch.export and the ONNX translation raise many types; the message names the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeepscopeError(f"{ex.source}: ONNX cannot express this network ({first})") from None
    assert program is not None  # dynamo=True always returns the program
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, ex.metadata_json()
    model.producer_name = "deepscope"
    return model.SerializeToString()


def torchscript_bytes(ex: Exportable) -> bytes:
    """The network traced to TorchScript, with the metadata as the extra file ``deepscope.json``."""
    buffer = io.BytesIO()
    extra = {f"{METADATA_KEY}.json": ex.metadata_json()}
    _quiet_trace(
        lambda: torch.jit.save(torch.jit.trace(ex.module, (ex.example,), check_trace=False), buffer, _extra_files=extra)
    )
    return buffer.getvalue()


WRITERS: dict[str, Callable[[Exportable], bytes]] = {"onnx": onnx_bytes, "torchscript": torchscript_bytes}


def check_inputs(ex: Exportable) -> list[torch.Tensor]:
    """The example, and with dynamic spatial axes a second input of another size (one multiple larger on every
    spatial axis, edges repeated), so that an axis frozen by the trace is caught."""
    inputs = [ex.example]
    if ex.spatial_multiple is not None:
        pad = [p for m in reversed(ex.spatial_multiple) for p in (0, m)]
        inputs.append(F.pad(ex.example, pad, mode="replicate"))
    return inputs


def elementwise_difference(expected: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, that relative to the expected output's largest magnitude, at least 1)."""
    if got.shape != expected.shape:
        return float("inf"), float("inf")
    diff = float((expected - got).abs().max())
    return diff, diff / max(1.0, float(expected.abs().max()))


@torch.no_grad()
def largest_difference(ex: Exportable, exported: nn.Module, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """The largest (absolute, relative) difference of the exported network's outputs from the eager network's, by
    the exportable's own measure (elementwise unless it has one)."""
    difference = ex.difference or elementwise_difference
    worst, relative = 0.0, 0.0
    for x in inputs:
        diff, rel = difference(ex.module(x).float(), exported(x).float())
        worst, relative = max(worst, diff), max(relative, rel)
    return worst, relative


def export(ex: Exportable, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write ``ex`` as ``fmt`` to ``out`` (atomically), load it back through its own runtime and compare it with the
    eager network on the example (and another size when the spatial axes are dynamic); a file that differs by more
    than :data:`TOLERANCE` is removed and refused."""
    if fmt not in WRITERS:
        raise DeepscopeError(f"unknown export format {fmt!r}; choose {' or '.join(WRITERS)}")
    out = Path(out)
    ex.module.eval()
    data = WRITERS[fmt](ex)
    atomic_write(out, lambda f: f.write(data), f"{fmt} model")
    exported, _ = load_exported(out, torch.device("cpu"))
    inputs = check_inputs(ex)
    worst, relative = largest_difference(ex, exported, inputs)
    if not relative <= TOLERANCE:
        out.unlink(missing_ok=True)
        raise DeepscopeError(
            f"{ex.source}: the {fmt} export differs from the checkpoint's network by {worst:.3g} on "
            f"{[list(x.shape) for x in inputs]} (more than {TOLERANCE:g} of its largest output); nothing written"
        )
    return {
        "format": fmt,
        "out": str(out),
        "task": ex.task,
        "input_axes": ex.axes(),
        "input_shape": list(ex.example.shape),
        "spatial_multiple": None if ex.spatial_multiple is None else list(ex.spatial_multiple),
        "checked_shapes": [list(x.shape) for x in inputs],
        "max_abs_difference": worst,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "bytes": len(data),
        "notes": ex.notes,
    }
