"""Running a model on an image array for the napari widget: a segment, denoise, detect or classify checkpoint, one of
their exports (ONNX, TorchScript, bioimage.io package) or another tool's package, tiled as ``deepscope predict``
tiles, with a progress callback that can cancel between tiles."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deepscope.errors import DeepscopeError
from deepscope.napari.reader import LayerData

Progress = Callable[[int, int], None]


class Cancelled(DeepscopeError):
    """The user stopped a prediction; raised between tiles."""


def watched(progress: Progress, stop: threading.Event) -> Progress:
    """``progress``, raising :class:`Cancelled` once ``stop`` is set."""

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise Cancelled("prediction cancelled")
        progress(done, total)

    return report


def predict_image(
    model: Path, image: np.ndarray, name: str, progress: Progress, stop: threading.Event
) -> list[LayerData]:
    """The layers a model makes of one image: probabilities and labels (segment), the denoised image (denoise), boxes
    as shapes (detect), the class as a labelled frame around the image (classify), every output (another tool's
    package)."""
    from deepscope.export.packages import predict_array
    from deepscope.export.runtime import exported_format, exported_metadata
    from deepscope.inference.loading import saved_task

    report = watched(progress, stop)
    if exported_format(model) == "bioimageio" and exported_metadata(model) is None:
        report(0, 1)
        outputs = predict_array(model, image, name)
        report(1, 1)
        return [(output, {"name": f"{name} {key} ({model.name})"}, "image") for key, output in outputs.items()]
    task = saved_task(model)
    cpu = torch.device("cpu")
    if task == "segment":
        from deepscope.data.io.views import input_view
        from deepscope.tasks.segment.predict import load_predictor

        predictor, cfg = load_predictor(model, cpu)
        view = input_view(image, len(predictor.tile), predictor.channels, name, cfg.normalize, cfg.invert or "never")
        with torch.no_grad():
            probabilities = predictor.probabilities(view, progress=report)
        labels = predictor.labels(probabilities)
        kind = "classes" if cfg.target == "semantic" else "instances"
        channels = {"channel_axis": 0} if probabilities.shape[0] > 1 else {}
        return [
            (probabilities if channels else probabilities[0], {"name": f"{name} probabilities", **channels}, "image"),
            (labels, {"name": f"{name} {kind}"}, "labels"),
        ]
    if task == "denoise":
        from deepscope.data.io.views import ChannelsFirst
        from deepscope.tasks.denoise.predict import load_denoiser

        denoiser, _ = load_denoiser(model, cpu)
        with torch.no_grad():
            denoised = denoiser(ChannelsFirst(image, len(denoiser.tile), denoiser.channels), name, progress=report)
        return [(denoised[0] if denoised.shape[0] == 1 else denoised, {"name": f"{name} denoised"}, "image")]
    if task == "detect":
        from deepscope.napari.reader import shapes_layer
        from deepscope.tasks.detect.apply import load_detector
        from deepscope.tasks.detect.task import as_channels

        detector, _, info = load_detector(model, cpu)
        array = np.asarray(image)
        pixels = as_channels(array[..., None] if array.ndim == 2 else array, info["channels"], name)
        with torch.no_grad():
            found = detector(pixels, progress=report)
        names = [info["class_names"][label - 1] for label in found["labels"].tolist()]
        return [shapes_layer(f"{name} boxes", found["boxes"].tolist(), names, found["scores"].tolist())]
    if task == "classify":
        from deepscope.napari.reader import shapes_layer
        from deepscope.tasks.classify.predict import predict_arrays

        report(0, 1)
        array = np.asarray(image)
        names, probabilities = predict_arrays(model, [array], [name], cpu)
        report(1, 1)
        best = int(probabilities[0].argmax())
        height, width = array.shape[:2]
        # the class as a labelled frame around the whole image
        return [shapes_layer(f"{name} class", [[0, 0, width, height]], [names[best]], [float(probabilities[0, best])])]
    raise DeepscopeError(
        f"{model}: a {task} model; the napari widget runs segment, denoise, detect and classify models and packages"
    )
