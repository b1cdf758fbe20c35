"""BioImage Model Zoo packages (model description 0.5, built and validated by ``bioimageio.spec``, then run through
``bioimageio.core``'s own model test before they are kept).

A package holds the weights three ways: ``pytorch_state_dict`` with the architecture's source, TorchScript and ONNX
(the latter two as ``deepscope export`` writes them); test input and output tensors from a real image of the run's
data; the preprocessing the spec can express (percentile ``scale_range`` as deepscope normalises, or fixed mean and
standard deviation) and postprocessing; axes with their size steps and halo; a cover, a README with the run's metrics,
and deepscope's own settings under ``config.deepscope`` so that ``deepscope predict`` runs the package as it runs the
checkpoint.

The architecture source is assembled from deepscope's own modules when the package is written (the task names them
in ``ZooParts.sources``: ``models/layers.py`` and ``models/unet.py`` for a U-Net, the classifiers' modules, an
encoder's): the zoo loads one Python file, and the networks live in several modules that import deepscope's error
type. The file imports only torch (torchvision for a ResNet; deepscope's error type when it is installed), so a
package runs where deepscope is not installed, and it never drifts from the code that trained the weights.
"""

from __future__ import annotations

import inspect
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from deepscope.atomic import atomic_write
from deepscope.errors import DeepscopeError
from deepscope.export.exportable import Exportable, ZooParts, unet_sources
from deepscope.export.formats import OPSET, WRITERS, export
from deepscope.export.runtime import torchscript_quiet

ARCHITECTURE_FILE = "architecture.py"
FORMAT_VERSION = "0.5.4"
TEST_TOLERANCE = {"absolute_tolerance": 1e-4, "relative_tolerance": 1e-4}
INPUT_ID, OUTPUT_ID = "raw", "output"


@dataclass
class PackageInfo:
    """What the user tells the zoo about the model: its name, authors, licence (SPDX id) and an optional cover."""

    name: str | None = None
    authors: list[str] = field(default_factory=list)
    license: str | None = None
    description: str | None = None
    cover: str | None = None


def architecture_source(sources: list[Any] | None = None) -> str:
    """One Python file holding deepscope's modules or classes ``sources`` (the U-Net's by default) in order, less
    their deepscope imports, importing only torch (torchvision for a ResNet)."""

    def body(source: Any) -> str:
        lines = inspect.getsource(source).splitlines()
        return "\n".join(line for line in lines if not line.startswith(("from __future__", "from deepscope")))

    parts = sources or unet_sources()
    names = ", ".join(getattr(p, "__name__", str(p)).rsplit(".", 1)[-1] for p in parts)
    return "\n".join(
        [
            f'"""deepscope\'s network for a BioImage Model Zoo package: {names} in one file."""',
            "",
            "from __future__ import annotations",
            "",
            "try:",
            "    from deepscope.errors import DeepscopeError",
            "except ImportError:  # run where deepscope is not installed",
            "    DeepscopeError = ValueError",
            "",
            *[body(p) + "\n" for p in parts],
        ]
    )


def declared_halo(ex: Exportable, parts: ZooParts) -> list[int]:
    """The tiling halo per spatial axis, at most what leaves the test tensor larger than twice it (the spec's rule for
    the smallest input), so that a small test image still fits the sizes the package declares."""
    return [min(halo, (side - 1) // 2) for halo, side in zip(parts.halo, ex.example.shape[2:])]


def _axes(ex: Exportable, parts: ZooParts, names: list[str], output: bool) -> list[dict[str, Any]]:
    axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": names}]
    letters = ex.axes()[2:]
    multiples = ex.spatial_multiple or tuple(ex.example.shape[2:])
    if output and not parts.spatial_output:
        return axes
    for letter, multiple, halo in zip(letters, multiples, declared_halo(ex, parts)):
        if output:
            axes.append(
                {"type": "space", "id": letter, "size": {"tensor_id": INPUT_ID, "axis_id": letter}, "halo": halo}
            )
        elif ex.spatial_multiple is None:
            axes.append({"type": "space", "id": letter, "size": multiple})
        else:  # the smallest multiple of the divisor that leaves something inside the halo on both sides
            smallest = (2 * halo // multiple + 1) * multiple
            axes.append({"type": "space", "id": letter, "size": {"min": smallest, "step": multiple}})
    return axes


def cover_picture(raw: np.ndarray, output: np.ndarray) -> bytes:
    """A 2:1 PNG: the test input's first channel beside the test output's first channel (middle slice of a volume),
    each stretched to its own 1st-99th percentile, or beside the first output's values as bars when it has no image
    (class scores, features)."""

    def panel(array: np.ndarray) -> Image.Image:
        plane = array[0, 0] if array.ndim == 4 else array[0, 0, array.shape[2] // 2]
        low, high = np.percentile(plane, [1, 99])
        scaled = np.clip((plane - low) / max(float(high - low), 1e-6), 0, 1)
        return Image.fromarray((scaled * 255).astype(np.uint8)).resize((256, 256), Image.Resampling.NEAREST)

    def bars(values: np.ndarray) -> Image.Image:
        """One value per channel (class scores, features) as bars from the bottom, scaled to the largest."""
        image = Image.new("L", (256, 256))
        draw = ImageDraw.Draw(image)
        top = max(float(np.abs(values).max()), 1e-6)
        width = 256 / len(values)
        for i, value in enumerate(np.abs(values)):
            draw.rectangle([i * width, 255 - 250 * value / top, (i + 1) * width - 1, 255], fill=220)
        return image

    picture = Image.new("L", (512, 256))
    picture.paste(panel(raw), (0, 0))
    picture.paste(panel(output) if output.ndim >= 4 else bars(output[0]), (256, 0))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def readme(ex: Exportable, parts: ZooParts, name: str, checks: dict[str, Any]) -> str:
    metrics = (
        "\n".join(f"- {k}: {v}" for k, v in parts.metrics.items()) or "- none recorded (the run had no test split)"
    )
    return "\n".join(
        [
            f"# {name}",
            "",
            parts.description,
            "",
            "Trained with deepscope (`deepscope train " + ex.task + "`), exported with `deepscope export --format "
            "bioimageio`. The run's full settings are in this package's `config.deepscope`.",
            "",
            "## Inputs and outputs",
            "",
            *[p + "\n" for p in parts.documentation],
            "## Metrics of the run",
            "",
            metrics,
            "",
            "## Validation",
            "",
            "Before this package was written, its TorchScript and ONNX weights were loaded back and compared with the "
            f"trained network on a tile of a real image of the run's data ({ex.notes[-1]}): largest differences "
            f"{checks['torchscript']:.1e} (TorchScript) and {checks['onnx']:.1e} (ONNX). The package then passed "
            "bioimageio.core's model test (every weight format on the test tensors).",
            "",
        ]
    )


def spec_error(summary: Any) -> str:
    """The first error of a bioimageio validation summary, as one line."""
    for detail in getattr(summary, "details", []):
        for error in getattr(detail, "errors", []):
            where = ".".join(str(p) for p in getattr(error, "loc", ()))
            return f"{where}: {getattr(error, 'msg', error)}" if where else str(getattr(error, "msg", error))
    return str(getattr(summary, "status", "failed"))


def required(info: PackageInfo) -> None:
    """The fields the zoo needs that only the user can give."""
    if not info.authors:
        raise DeepscopeError(
            "a bioimage.io package names its authors: give --author 'Full Name' (once per author), or set "
            "package.authors in the run's config"
        )
    if not info.license:
        raise DeepscopeError(
            "a bioimage.io package needs a licence: give --license with an SPDX id, e.g. MIT or CC-BY-4.0, or set "
            "package.license in the run's config"
        )


def write_package(ex: Exportable, info: PackageInfo, out: str | Path) -> dict[str, Any]:
    """Build, validate, write and test the package of ``ex`` at ``out`` (a .zip); returns what was checked."""
    required(info)
    if ex.zoo is None:
        raise DeepscopeError(f"{ex.source}: deepscope writes no bioimage.io package of {ex.task} models yet")
    try:
        from bioimageio.core import test_model
        from bioimageio.spec import InvalidDescr, ValidationContext, build_description, save_bioimageio_package
    except ImportError:
        raise DeepscopeError("bioimage.io packages need bioimageio.core: pip install 'deepscope[export]'") from None
    parts = ex.zoo
    out = Path(out)
    name = info.name or f"deepscope {ex.task} {Path(ex.source).parent.name}"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checks = {fmt: export(ex, fmt, root / f"weights.{fmt}")["max_abs_difference"] for fmt in WRITERS}
        torch.save({k: v.detach().cpu() for k, v in ex.module.state_dict().items()}, root / "weights.pt")
        (root / ARCHITECTURE_FILE).write_text(architecture_source(parts.sources))
        with torch.no_grad():
            test_output = parts.finish(ex.module(ex.example).float()).numpy()
        np.save(root / "test_input.npy", parts.raw.astype(np.float32))
        np.save(root / "test_output.npy", test_output)
        if info.cover:
            cover = Path(info.cover)
            if not cover.is_file() or cover.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                raise DeepscopeError(f"{cover}: --cover must be a PNG or JPEG file")
            cover_name = f"cover{cover.suffix.lower()}"
            (root / cover_name).write_bytes(cover.read_bytes())
        else:
            cover_name = "cover.png"
            (root / cover_name).write_bytes(cover_picture(parts.raw, test_output))
        (root / "README.md").write_text(readme(ex, parts, name, checks))
        callable_name, kwargs = parts.architecture
        torch_version = torch.__version__.split("+")[0]
        rdf: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "type": "model",
            "name": name,
            "description": info.description or parts.description,
            "authors": [{"name": author} for author in info.authors],
            "license": info.license,
            "cite": parts.cite,
            "tags": parts.tags,
            "documentation": "README.md",
            "covers": [cover_name],
            "inputs": [
                {
                    "id": INPUT_ID,
                    "axes": _axes(ex, parts, parts.channel_names, output=False),
                    "test_tensor": {"source": "test_input.npy"},
                    "data": {"type": "float32"},
                    "preprocessing": parts.preprocessing,
                }
            ],
            "outputs": [
                {
                    "id": OUTPUT_ID,
                    "axes": _axes(ex, parts, parts.output_names, output=True),
                    "test_tensor": {"source": "test_output.npy"},
                    "data": {"type": "float32"},
                    "postprocessing": parts.postprocessing,
                }
            ],
            "weights": {
                "pytorch_state_dict": {
                    "source": "weights.pt",
                    "architecture": {"source": ARCHITECTURE_FILE, "callable": callable_name, "kwargs": kwargs},
                    "pytorch_version": torch_version,
                },
                "torchscript": {
                    "source": "weights.torchscript",
                    "pytorch_version": torch_version,
                    "parent": "pytorch_state_dict",
                },
                "onnx": {"source": "weights.onnx", "opset_version": OPSET, "parent": "pytorch_state_dict"},
            },
            "config": {
                # JSON text, not YAML: YAML 1.1 readers turn values such as "off" into booleans
                "deepscope": ex.metadata_json(),
                "bioimageio": {
                    "test_kwargs": dict.fromkeys(("pytorch_state_dict", "torchscript", "onnx"), TEST_TOLERANCE)
                },
            },
        }
        with ValidationContext(root=root, perform_io_checks=True):
            descr = build_description(rdf)
        if isinstance(descr, InvalidDescr):
            raise DeepscopeError(
                f"{ex.source}: the package does not meet the model spec ({spec_error(descr.validation_summary)})"
            )
        package = root / "package.zip"
        save_bioimageio_package(descr, output_path=package)
        with torchscript_quiet():
            summary = test_model(package)
        if summary.status != "passed":
            raise DeepscopeError(
                f"{ex.source}: the package failed bioimageio.core's model test ({spec_error(summary)})"
            )
        data = package.read_bytes()
    atomic_write(out, lambda f: f.write(data), "bioimage.io package")
    return {
        "format": "bioimageio",
        "out": str(out),
        "task": ex.task,
        "format_version": FORMAT_VERSION,
        "weights": ["pytorch_state_dict", "torchscript", "onnx"],
        "max_abs_difference": checks,
        "bioimageio_test": "passed",
        "input_axes": ex.axes(),
        "bytes": len(data),
        "notes": ex.notes,
    }
