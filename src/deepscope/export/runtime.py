"""Running exported networks: ONNX through onnxruntime and TorchScript through PyTorch's TorchScript interpreter, each
as an ``nn.Module`` so that deepscope's tiled prediction takes them as it takes a checkpoint's network.

Neither format runs Python: an ONNX file is a graph of standard operators, and a TorchScript archive holds TorchScript
code that PyTorch compiles and interprets itself (its loader unpickles only tensors and TorchScript types). Files are
recognised by their first bytes, not their names.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepscope.engine.checkpoint import PACKAGE_FILES, package_description, package_member
from deepscope.errors import CheckpointError, DeepscopeError
from deepscope.export.exportable import METADATA_KEY

ZIP_MAGIC = b"PK\x03\x04"


def exported_format(path: str | Path) -> str | None:
    """``"onnx"``, ``"torchscript"`` or ``"bioimageio"`` (a package, zipped or its YAML) for a file in one of those
    formats, None for anything else (a checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return None
        if any(Path(name).name in PACKAGE_FILES for name in names):
            return "bioimageio"
        return "torchscript" if any("/code/__torch__" in name for name in names) else None
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.name in PACKAGE_FILES or path.name.endswith(".bioimageio.yaml"):
        return "bioimageio"
    return None


def package_metadata(path: Path, rdf: dict[str, Any]) -> dict[str, Any] | None:
    """The deepscope settings in a package's ``config`` (JSON text), None for a package another tool wrote."""
    config = rdf.get("config")
    text = config.get(METADATA_KEY) if isinstance(config, dict) else None
    return _decoded(text, path) if isinstance(text, str) else None


def deepscope_package(path: Path) -> tuple[nn.Module, dict[str, Any] | None]:
    """A package's ONNX weights (the fastest runtime whose outputs equal eager PyTorch's, benchmarks/RESULTS.md
    "export_speed") and the deepscope settings stored in its ``config``; None for a package another tool wrote."""
    rdf = package_description(path)
    metadata = package_metadata(path, rdf)
    if metadata is None:
        return nn.Identity(), None
    onnx = (rdf.get("weights") or {}).get("onnx") or {}
    if not isinstance(onnx, dict) or not isinstance(onnx.get("source"), str):
        raise CheckpointError(f"{path}: the package has no ONNX weights, which deepscope runs its own packages with")
    return OnnxModule(path, package_member(path, onnx["source"])), metadata


@contextlib.contextmanager
def torchscript_quiet() -> Iterator[None]:
    """PyTorch's notice that TorchScript is deprecated, silenced: the format is still what Fiji (deepImageJ), the
    BioImage Model Zoo and C++ programs load, and the notice says nothing a user of deepscope can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*is deprecated", category=FutureWarning)
        yield


class OnnxModule(nn.Module):
    """An ONNX model in an onnxruntime session on the CPU, called like the network it was exported from; ``model`` is
    the file, or its bytes (weights inside a package), with ``path`` naming where they came from."""

    def __init__(self, path: Path, model: bytes | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise DeepscopeError(
                f"{path}: running ONNX models needs onnxruntime: pip install 'deepscope[export]'"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
        try:
            self.session = ort.InferenceSession(
                str(path) if model is None else model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types, not exported under stable names
            raise CheckpointError(f"{path}: onnxruntime cannot load this model ({str(exc).splitlines()[0]})") from None
        self.path = path
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{path}: the model takes {len(inputs)} inputs; deepscope runs models of one input")
        self.input_name = inputs[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        except Exception as exc:  # onnxruntime's own exception types, as above
            raise CheckpointError(
                f"{self.path}: onnxruntime cannot run this model on an input of shape {list(x.shape)} "
                f"({str(exc).splitlines()[0]})"
            ) from None
        return torch.from_numpy(out).to(x.device)


def onnx_metadata(path: Path) -> dict[str, Any] | None:
    """The deepscope metadata of an ONNX file (None when another tool made it), read without its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    found = {p.key: p.value for p in model.metadata_props}
    return _decoded(found.get(METADATA_KEY), path)


def _decoded(text: str | bytes | None, path: Path) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: its deepscope metadata is not valid JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("task"), str):
        raise CheckpointError(f"{path}: its deepscope metadata names no task")
    return value


def torchscript_metadata(path: Path) -> dict[str, Any] | None:
    """The deepscope metadata of a TorchScript archive, read from the zip without loading the model."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}.json")]
        return _decoded(archive.read(names[0]) if names else None, path)


def exported_metadata(path: str | Path) -> dict[str, Any] | None:
    """The deepscope metadata of an exported file, without loading its network; None when another tool made it."""
    path = Path(path)
    fmt = exported_format(path)
    if fmt is None:
        raise CheckpointError(f"{path}: neither an ONNX nor a TorchScript model nor a bioimage.io package")
    if fmt == "bioimageio":
        return package_metadata(path, package_description(path))
    return onnx_metadata(path) if fmt == "onnx" else torchscript_metadata(path)


def load_exported(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network in an exported file, ready to call, and the deepscope metadata stored with it (None: made
    elsewhere)."""
    path = Path(path)
    fmt = exported_format(path)
    if fmt == "onnx":
        return OnnxModule(path), onnx_metadata(path)
    if fmt == "bioimageio":
        return deepscope_package(path)
    if fmt == "torchscript":
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            with torchscript_quiet():
                module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: not a loadable TorchScript model ({str(exc).splitlines()[0]})") from None
        return module.eval(), _decoded(extra[f"{METADATA_KEY}.json"], path)
    raise CheckpointError(f"{path}: neither an ONNX nor a TorchScript model nor a bioimage.io package")
