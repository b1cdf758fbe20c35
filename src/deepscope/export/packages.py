"""Running bioimage.io model packages written by other tools, through bioimageio.core with the package's own pre- and
postprocessing, tiled by the package's size parameters.

Every output of the package is written (the first as the input's name, further ones with their output id). Only ONNX
and TorchScript weights are run: a ``pytorch_state_dict`` entry needs the package's architecture source,
Python code that would run on loading, and files from other people never run code here. Packages deepscope wrote
carry its settings and run through deepscope's own prediction instead (``runtime.deepscope_package``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepscope.atomic import write_tiff
from deepscope.data.io.volumes import read_volume
from deepscope.errors import CheckpointError, DataError, DeepscopeError

SAFE_FORMATS: tuple[Literal["onnx", "torchscript"], ...] = (
    "onnx",
    "torchscript",
)  # weights that run none of the package's Python, fastest first
BLOCK = 512  # tile side aimed at along each size-parameterised axis of images larger than this


def axis_letters(axes: Sequence[Any], path: Path) -> list[str]:
    """The package input's axes as letters: b(atch), c(hannel), z, y, x; other kinds (time, index) are refused."""
    letters = []
    for axis in axes:
        kind = str(axis.type)
        letter = {"batch": "b", "channel": "c"}.get(kind, str(axis.id) if kind == "space" else "")
        if letter not in ("b", "c", "z", "y", "x"):
            raise CheckpointError(
                f"{path}: its input has a {kind} axis {axis.id}; deepscope feeds images (b, c, z, y, x)"
            )
        letters.append(letter)
    return letters


def arranged(image: np.ndarray, letters: list[str], name: str) -> np.ndarray:
    """An image as deepscope stores it ((y, x), (y, x, C), (z, y, x) or (C, z, y, x)) in the package's axis order."""
    spatial = [a for a in letters if a in "zyx"]
    if image.ndim == len(spatial):
        data, stored = image, list(spatial)
    elif image.ndim == len(spatial) + 1:
        data, stored = image, ([*spatial, "c"] if len(spatial) == 2 else ["c", *spatial])
    else:
        raise DataError(
            f"{name}: image of shape {image.shape} does not fit the package's input axes {''.join(letters)}"
        )
    if "c" not in stored and "c" in letters:
        data, stored = data[None], ["c", *stored]
    if "c" in stored and "c" not in letters:
        if data.shape[stored.index("c")] != 1:
            raise DataError(f"{name}: image has {data.shape[stored.index('c')]} channels; the package takes one")
        data = np.squeeze(data, stored.index("c"))
        stored.remove("c")
    if "b" in letters:
        data, stored = data[None], ["b", *stored]
    return np.ascontiguousarray(np.transpose(data, [stored.index(a) for a in letters]), np.float32)


def package_pipeline(path: Path) -> tuple[Any, Any, list[str], str]:
    """bioimageio.core's prediction pipeline of a package on its ONNX or TorchScript weights, its input tensor, that
    tensor's axis letters and the weight format chosen."""
    try:
        from bioimageio.core import create_prediction_pipeline, load_model_description
    except ImportError:
        raise DeepscopeError(
            "running bioimage.io packages needs bioimageio.core: pip install 'deepscope[export]'"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            descr = load_model_description(path, format_version="latest", perform_io_checks=False)
        except Exception as exc:  # bioimageio.spec reports a bad description through several exception types
            raise CheckpointError(f"{path}: not a valid bioimage.io model ({str(exc).splitlines()[0]})") from None
    present: list[Literal["onnx", "torchscript"]] = [
        f for f in SAFE_FORMATS if getattr(descr.weights, f, None) is not None
    ]
    if not present:
        given = ", ".join(
            f
            for f in ("pytorch_state_dict", "keras_hdf5", "tensorflow_saved_model_bundle")
            if getattr(descr.weights, f, None)
        )
        raise CheckpointError(
            f"{path}: its weights are {given or 'none deepscope knows'}; deepscope runs only the ONNX and TorchScript "
            "weights of packages it did not write (pytorch_state_dict runs the package's own Python code)"
        )
    source = str(getattr(descr.weights, present[0]).source)
    if "://" in source:
        raise CheckpointError(
            f"{path}: its {present[0]} weights are at {source}; deepscope downloads nothing, so fetch the package with "
            "its files first (a .zip from bioimage.io holds them)"
        )
    if len(descr.inputs) != 1:
        raise CheckpointError(f"{path}: the model takes {len(descr.inputs)} inputs; deepscope runs models of one input")
    tensor = descr.inputs[0]
    letters = axis_letters(tensor.axes, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = create_prediction_pipeline(descr, weight_format=present[0], devices=["cpu"])
    return pipeline, tensor, letters, present[0]


def run_pipeline(pipeline: Any, tensor: Any, letters: list[str], image: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The package's outputs for one image (stored as deepscope stores images), by output id in the package's order,
    each without its batch axis."""
    from bioimageio.core import predict

    array = arranged(image, letters, name)
    large = any(array.shape[letters.index(a)] > BLOCK for a in letters if a in "zyx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = predict(
            model=pipeline, inputs={tensor.id: array}, blocksize_parameter=block_parameter(tensor) if large else None
        )
    found = {}
    for output in pipeline.output_ids:
        result = np.asarray(sample.members[output].data.to_numpy(), np.float32)
        found[str(output)] = result[0] if result.shape[0] == 1 else result
    return found


def block_parameter(tensor: Any) -> int:
    """The size parameter n (side = min + n * step on every parameterised axis) whose tiles come closest to
    :data:`BLOCK` without exceeding it on any axis (at least 0: the smallest tiles the package allows)."""
    sizes = [axis.size for axis in tensor.axes if hasattr(getattr(axis, "size", None), "step")]
    return max(0, min(((BLOCK - size.min) // size.step for size in sizes), default=0))


def predict_array(path: Path, image: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """One image array through a package (see :func:`run_pipeline`)."""
    pipeline, tensor, letters, _ = package_pipeline(path)
    return run_pipeline(pipeline, tensor, letters, image, name)


def predict_package(path: Path, inputs: Sequence[Path], out: Path) -> list[dict[str, Any]]:
    """Each input through the package into ``out`` (a folder of float32 TIFFs, or one .tif for one input): the
    package's first output as ``<stem>.tif``, any further one as ``<stem>_<output id>.tif``, each in its axis order
    without the batch axis."""
    pipeline, tensor, letters, weights = package_pipeline(path)
    records, single = [], len(inputs) == 1 and out.suffix.lower() in (".tif", ".tiff")
    for source in inputs:
        results = run_pipeline(pipeline, tensor, letters, np.asarray(read_volume(source)), str(source))
        first = out if single else out / f"{source.stem}.tif"
        first.parent.mkdir(parents=True, exist_ok=True)
        written = {}
        for index, (output, result) in enumerate(results.items()):
            target = first if index == 0 else first.with_name(f"{first.stem}_{output}.tif")
            write_tiff(target, result, "prediction")
            written[output] = {"file": str(target), "shape": list(result.shape)}
        records.append({"input": str(source), "outputs": written, "weights": weights})
    return records
