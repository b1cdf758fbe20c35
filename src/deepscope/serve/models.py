"""Trained deepscope models in the browser: list the checkpoints of the served folder, open one, and predict the
current image with it in the background, with progress, keeping compact results for the overlays.

Each task's checkpoint is loaded by the task's own loader and applied by its own prediction code (the segmentation
``Predictor`` and its instance post-processing, the ``Denoiser``, the classifier's ``predict_files``, the
``Detector``), so what the page shows is what ``deepscope predict`` writes for the same file. Semantic segmentation
models also get instances (connected objects of the classes after the first, by ``deepscope pixel predict
--instances``' own post-processing) so that their objects can be proofread too.

One worker thread runs the predictions, never two at once (they would share the same few cores): a newer request
for the image being predicted cancels that run (through the tiling progress callback); requests for other images
queue behind it. Opening another model cancels everything and forgets the results of the previous one.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deepscope.data.io.views import ChannelsFirst, input_view
from deepscope.engine.checkpoint import checkpoint_task, header_task
from deepscope.engine.distributed import pick_device
from deepscope.errors import CheckpointError, DataError, DeepscopeError
from deepscope.postprocess.tiled import tiled_instances
from deepscope.serve.folder import STATE_DIR, AccessError, ServedFolder, ServedImage
from deepscope.serve.http import NO_STORE, TILE_CACHE, integer, json_body, param, parse_contrast, png, slice_index
from deepscope.serve.tiles import image_png, labels_png, outlines_png, overlay_region, probabilities_png, tile_box

log = logging.getLogger(__name__)

KINDS = ("probabilities", "classes", "outlines", "denoised")
# app.js's
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
PROBABILITY_COLOUR = "#ff00ff"  # an instance model's object probability
MAX_LOOKED_AT = 2000  # files and folders looked at when listing checkpoints: a huge folder must not stall the page
MAX_DEPTH = 6
RESULTS_KEPT = 8  # (image, plane) results kept, least recently used dropped
TILING_SHARE = 0.95  # of the progress bar for the tiled network pass; the rest is post-processing
ProgressFn = Callable[[int, int], None]


class Cancelled(Exception):
    """A prediction stopped because a newer request or another model replaced it."""


def stored_layout(block: np.ndarray, ndim: int) -> np.ndarray:
    """A served (C, *spatial) block in the layout images are stored in, (Y, X), (Y, X, C), (Z, Y, X) or (C, Z, Y, X),
    which the tasks' own readers (``input_view``, ``ChannelsFirst``) take, as they take a file read from disk."""
    if block.shape[0] == 1:
        return block[0]
    return np.moveaxis(block, 0, -1) if ndim == 2 else block


def as_uint8(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as 0..255: a quarter of the memory of float32, enough to show them."""
    return np.rint(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)


@dataclass
class Result:
    """What one prediction leaves, compactly. Arrays are of one plane, or of the whole stack for a 3D model
    (``stack``), with the spatial axes last."""

    probabilities: np.ndarray | None = None  # (K, ..., Y, X) uint8: class probabilities, or an object probability
    classes: np.ndarray | None = None  # (..., Y, X) class index (semantic models)
    instances: np.ndarray | None = None  # (..., Y, X) int32 objects
    denoised: np.ndarray | None = None  # (C, ..., Y, X) float32 in the image's units
    scores: list[dict[str, Any]] | None = None  # classify: [{class, probability}], most probable first
    boxes: list[dict[str, Any]] | None = None  # detect: [{y0, x0, y1, x1, score, class}], highest score first
    summary: str = ""
    stack: bool = False

    def plane(self, kind: str, z: int | None) -> np.ndarray | None:
        """The (..., Y, X) array of an overlay ``kind`` at slice ``z`` (None: not computed)."""
        array = {
            "probabilities": self.probabilities,
            "classes": self.classes,
            "outlines": self.instances,
            "denoised": self.denoised,
        }[kind]
        if array is None or not self.stack or z is None:
            return array
        return array[..., z, :, :]


class Model(ABC):
    """An opened checkpoint: what it takes (``ndim`` spatial axes, ``channels``; grey images are repeated to them)
    and how it predicts a served image (a 2D model: slice ``z``; a 3D model: the whole stack). The subclasses
    import their task when a checkpoint is opened, so the server starts without loading every task."""

    task = ""

    def __init__(self, path: Path, relative: str, ndim: int, channels: int, classes: list[str], **details: Any) -> None:
        self.path, self.relative, self.ndim, self.channels = path, relative, ndim, channels
        self.description = {
            "path": relative,
            "task": self.task,
            "ndim": ndim,
            "channels": channels,
            "classes": classes,
            "target": None,
            **details,
        }

    def check(self, image: ServedImage) -> None:
        """DataError when the image cannot go to this model (before queueing it: a one-line message naming both)."""
        if self.ndim == 3 and image.ndim == 2:
            raise DataError(f"{image.name} is a 2D image but the model {self.relative} is 3D")
        if image.channels not in (1, self.channels):
            raise DataError(
                f"{image.name} has {image.channels} channel(s) but the model {self.relative} takes {self.channels}"
            )

    def block(self, image: ServedImage, z: int | None) -> np.ndarray:
        """The image as the model reads it, in the stored layout: the whole stack for a 3D model, else slice ``z``."""
        return stored_layout(image.stored if self.ndim == 3 else image.raw(z), self.ndim)

    @abstractmethod
    def run(self, image: ServedImage, z: int | None, progress: ProgressFn) -> Result:
        """The prediction, calling ``progress(done, total)`` as windows are predicted (which may raise Cancelled)."""


class SegmentModel(Model):
    task = "segment"

    def __init__(self, path: Path, relative: str, device: torch.device) -> None:
        from deepscope.tasks.segment.predict import load_predictor

        self.predictor, self.config = load_predictor(path, device)
        semantic = self.config.target == "semantic"
        count = self.predictor.out_channels
        classes = [str(v) for v in (self.config.class_values or range(count))] if semantic else ["object"]
        super().__init__(
            path,
            relative,
            len(self.predictor.tile),
            self.predictor.channels,
            classes,
            target=self.config.target,
            device=str(device),
        )

    def run(self, image: ServedImage, z: int | None, progress: ProgressFn) -> Result:
        predictor, cfg = self.predictor, self.config
        view = input_view(
            self.block(image, z), self.ndim, predictor.channels, image.name, cfg.normalize, invert=cfg.invert or "never"
        )
        probs = predictor.probabilities(view, progress=progress)
        stack = self.ndim == 3
        if cfg.target != "semantic":  # as ``predict --instances`` finds them: block by block beyond instance_block
            instances = tiled_instances(predictor.instances, probs, cfg.inference.instance_block, predictor.halo)
            return Result(
                probabilities=as_uint8(probs[:1]),
                instances=instances,
                summary=f"{int(instances.max())} objects",
                stack=stack,
            )
        from deepscope.tasks.pixel.predict import InstanceSettings, instances_from

        classes = predictor.labels(probs)
        # ``instances_from`` reads only the classes a classifier predicts; here the model's class indices, so the
        # default settings make objects of every class but the first (the background)
        instances = instances_from(SimpleNamespace(classes=list(range(len(probs)))), probs, InstanceSettings())
        shares = np.bincount(classes.ravel(), minlength=len(probs)) / classes.size
        names = self.description["classes"]
        top = ", ".join(f"{names[k]} {shares[k]:.0%}" for k in np.argsort(-shares)[:3])
        return Result(
            probabilities=as_uint8(probs),
            classes=classes.astype(np.min_scalar_type(len(probs) - 1)),
            instances=instances,
            summary=f"{int(instances.max())} objects; pixels: {top}",
            stack=stack,
        )


class DenoiseModel(Model):
    task = "denoise"

    def __init__(self, path: Path, relative: str, device: torch.device) -> None:
        from deepscope.tasks.denoise.predict import load_denoiser

        self.denoiser, _ = load_denoiser(path, device)
        super().__init__(path, relative, len(self.denoiser.tile), self.denoiser.channels, [], device=str(device))

    def run(self, image: ServedImage, z: int | None, progress: ProgressFn) -> Result:
        view = ChannelsFirst(self.block(image, z), self.ndim, self.denoiser.channels)
        denoised = self.denoiser(view, image.name, progress=progress)
        return Result(denoised=denoised, summary=f"denoised, {len(denoised)} channel(s)", stack=self.ndim == 3)


class ClassifyModel(Model):
    task = "classify"

    def __init__(self, path: Path, relative: str, device: torch.device) -> None:
        from deepscope.tasks.classify.predict import load_classifier

        _, config, info = load_classifier(path, device)  # checks the weights fit; predicting reads the file anew
        self.device = device
        size = config.resize or info["in_shape"][1:]
        super().__init__(
            path,
            relative,
            2,
            int(info["in_shape"][0]),
            list(info["class_names"]),
            input=f"{size[0]}x{size[1]}" + (" (resized)" if config.resize else ""),
            device=str(device),
        )

    def run(self, image: ServedImage, z: int | None, progress: ProgressFn) -> Result:
        """The class probabilities of the image file, read, resized and normalised as ``deepscope predict`` does."""
        from deepscope.tasks.classify.predict import predict_files

        if image.ndim == 3:
            raise DataError(f"{image.name} is a 3D stack; the classifier {self.relative} takes 2D pictures")
        names, probs = predict_files(self.path, [image.path], self.device)
        order = np.argsort(-probs[0])
        scores = [{"class": names[k], "probability": float(probs[0, k])} for k in order]
        return Result(scores=scores, summary=f"{scores[0]['class']} ({scores[0]['probability']:.0%})")


class DetectModel(Model):
    task = "detect"

    def __init__(self, path: Path, relative: str, device: torch.device) -> None:
        from deepscope.tasks.detect.apply import load_detector

        self.detector, _, info = load_detector(path, device)
        super().__init__(path, relative, 2, int(info["channels"]), list(info["class_names"]), device=str(device))

    def run(self, image: ServedImage, z: int | None, progress: ProgressFn) -> Result:
        """Boxes of the slice as ``deepscope predict`` finds them: (H, W, C) in the stored type, scaled by the
        detector."""
        from deepscope.tasks.detect.task import as_channels

        plane = as_channels(np.moveaxis(image.raw(z), 0, -1), self.channels, image.name)
        found = self.detector(plane)
        names = self.description["classes"]
        boxes = [
            {
                "y0": float(b[1]),
                "x0": float(b[0]),
                "y1": float(b[3]),
                "x1": float(b[2]),
                "score": float(s),
                "class": names[int(k) - 1],
            }
            for b, s, k in zip(found["boxes"], found["scores"], found["labels"])
        ]
        confident = sum(b["score"] >= 0.5 for b in boxes)
        return Result(boxes=boxes, summary=f"{len(boxes)} boxes, {confident} scoring at least 0.5")


# by task: the subclasses open a checkpoint from (path, path relative to the folder, device)
MODELS: dict[str, Callable[[Path, str, torch.device], Model]] = {
    m.task: m for m in (SegmentModel, DenoiseModel, ClassifyModel, DetectModel)
}


@dataclass
class Job:
    """One prediction request and where it stands."""

    image: ServedImage
    z: int | None
    model: Model
    state: str = "running"  # running (also while queued) | done | failed
    progress: float = 0.0
    error: str | None = None
    summary: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, done: int, total: int) -> None:
        """The tiling callback: progress (never going back) and the place where a cancelled run stops."""
        if self.cancel.is_set():
            raise Cancelled
        self.progress = max(self.progress, TILING_SHARE * done / max(total, 1))

    def scrubbed(self, message: str) -> str:
        """An error's first line with the folder's names for the server's paths of the image and the model."""
        message = message.replace(str(self.image.path), self.image.name).replace(
            str(self.model.path), self.model.relative
        )
        return message.splitlines()[0] if message else "prediction failed"


class ModelService:
    """The open model, its prediction worker and the results it left, per (image, plane)."""

    def __init__(self, folder: ServedFolder) -> None:
        self.folder = folder
        self.model: Model | None = None
        self.version = 0  # bumped by every new model and result: the overlays' cache key
        self._jobs: dict[str, Job] = {}  # the latest request per image
        self._queue: OrderedDict[str, Job] = OrderedDict()  # waiting, one per image
        self._results: OrderedDict[tuple[str, int | None], Result] = OrderedDict()
        self._tasks: dict[tuple[str, int, int], tuple[str | None, str | None]] = {}  # by (path, mtime, size)
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    # --- checkpoints -------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every ``*.pt`` under the folder (not ``.deepscope/``, hidden folders or symlinks leading out; at most
        MAX_DEPTH folders deep and MAX_LOOKED_AT entries looked at), newest first, with the task each was trained
        for, or why it cannot be opened."""
        found, looked = [], 0
        for top, dirs, files in os.walk(self.folder.root):
            depth = len(Path(top).relative_to(self.folder.root).parts)
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and d.casefold() != STATE_DIR and depth < MAX_DEPTH
            )
            looked += len(dirs) + len(files)
            found += [Path(top) / name for name in sorted(files) if name.endswith(".pt") and not name.startswith(".")]
            if looked > MAX_LOOKED_AT:
                break
        listed, known = [], {}
        for path in found:
            relative = path.relative_to(self.folder.root).as_posix()
            try:
                self.folder.resolve(relative)
                stat = path.stat()
            except (AccessError, OSError):
                continue
            key = (str(path), stat.st_mtime_ns, stat.st_size)
            known[key] = self._tasks.get(key) or self._task_of(path, relative)
            task, error = known[key]
            listed.append(
                (
                    -stat.st_mtime_ns,
                    relative,
                    {
                        "path": relative,
                        "task": task,
                        "error": error,
                        "size": stat.st_size,
                        "modified": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds"),
                    },
                )
            )
        self._tasks = known  # read once per version of a file; files gone or changed are forgotten
        return [entry for *_, entry in sorted(listed, key=lambda item: item[:2])]

    @staticmethod
    def _task_of(path: Path, relative: str) -> tuple[str | None, str | None]:
        """(task, None), or (task or None, why it cannot be opened here), read from the file's header alone: listing
        a folder someone else filled must not unpickle anything. (None, None): a deepscope 0.1 checkpoint, a pickle,
        whose task is known only once it is opened (safely, when the user asks)."""
        try:
            task = header_task(path)
        except CheckpointError as exc:
            return None, str(exc).replace(str(path), relative)  # no server paths in the page
        return task, None if task is None or task in MODELS else f"task {task!r} cannot be shown here"

    def open(self, path: object) -> dict[str, Any]:  # from a request body: checked here
        """Load the checkpoint at ``path`` (relative to the folder) on CUDA when present, else the CPU; it replaces
        the open model, whose runs are cancelled and whose results are forgotten. Its description."""
        if not isinstance(path, str) or not path:
            raise DeepscopeError("path: expected the checkpoint's path relative to the served folder")
        resolved = self.folder.resolve(path)
        if PurePosixPath(path).suffix != ".pt":
            raise DeepscopeError(f"{path}: not a checkpoint (expected a .pt file)")
        if not resolved.is_file():
            raise CheckpointError(f"{path}: checkpoint not found in the served folder")
        try:
            task = checkpoint_task(resolved)
            if task not in MODELS:
                raise CheckpointError(f"{path}: a {task!r} checkpoint; the viewer shows {', '.join(MODELS)} models")
            model = MODELS[task](resolved, path, pick_device("auto"))
        except DeepscopeError as exc:
            raise type(exc)(str(exc).replace(str(resolved), path)) from None
        with self._lock:
            self.model = model
            self.version += 1
            self._cancel_all()
            self._results.clear()
        return model.description

    # --- predicting -----------------------------------------------------------------------------------------------

    def _opened(self) -> Model:
        if self.model is None:
            raise DeepscopeError("no model is open: open a checkpoint first")
        return self.model

    def predict(self, name: str, z: int | None = None) -> dict[str, Any]:
        """Start predicting image ``name`` (a 2D model: slice ``z``; a 3D model: the whole stack) in the background;
        its status. An image the model cannot take fails at once, with the reason as the status's error."""
        model = self._opened()
        image = self.folder.open(name)
        job = Job(image, slice_index(image, z), model)
        try:
            model.check(image)
        except DataError as exc:
            job.state, job.error = "failed", str(exc)
        with self._lock:
            if self._closed:
                raise DeepscopeError("the server is shutting down")
            old = self._jobs.get(name)
            if old is not None:
                old.cancel.set()
            self._jobs[name] = job
            self._queue.pop(name, None)
            if job.state == "running":
                self._queue[name] = job
                self._start_worker()
                self._lock.notify_all()
        return self.status(name, z)

    def _start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="deepscope-models", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """The worker: one prediction at a time, oldest request first."""
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                _, job = self._queue.popitem(last=False)
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            with torch.no_grad():
                result = job.model.run(job.image, job.z, job.report)
        except Cancelled:
            return
        except DeepscopeError as exc:
            job.state, job.error = "failed", job.scrubbed(str(exc))
            return
        except Exception as exc:  # a model or library failure: the page says so, the log has the traceback
            log.exception("predicting %s with %s", job.image.name, job.model.relative)
            job.state, job.error = "failed", job.scrubbed(f"prediction failed ({type(exc).__name__}: {exc})")
            return
        with self._lock:
            if job.cancel.is_set() or job.model is not self.model:
                return
            key = (job.image.name, None if result.stack else job.z)
            self._results[key] = result
            self._results.move_to_end(key)
            while len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)
            self.version += 1
            job.summary, job.progress, job.state = result.summary, 1.0, "done"

    def _cancel_all(self) -> None:
        """Stop the running prediction and drop the waiting ones (caller holds the lock)."""
        for job in [*self._jobs.values(), *self._queue.values()]:
            job.cancel.set()
        self._jobs.clear()
        self._queue.clear()

    # --- results ---------------------------------------------------------------------------------------------------

    def result(self, name: str, z: int | None = None) -> Result | None:
        """The result covering slice ``z`` of image ``name`` (None: not predicted by the open model)."""
        z = slice_index(self.folder.open(name), z)
        with self._lock:
            stack = self.model is not None and self.model.ndim == 3
            return self._results.get((name, None if stack else z))

    def status(self, name: str, z: int | None = None) -> dict[str, Any]:
        """Where the prediction of image ``name`` stands: {model, task, state: idle|running|done|failed, progress,
        error, summary, z (of the latest request), computed (a result covers slice ``z``), version, ...}."""
        image = self.folder.open(name)
        z = slice_index(image, z)
        result = self.result(name, z)
        with self._lock:
            model, job = self.model, self._jobs.get(name)
            reply: dict[str, Any] = {
                "image": name,
                "model": model.relative if model else None,
                "task": model.task if model else None,
                "description": model.description if model else None,
                "state": job.state if job else "idle",
                "progress": round(job.progress, 4) if job else 0.0,
                "error": job.error if job else None,
                "summary": job.summary if job else None,
                "z": job.z if job else None,
                "computed": result is not None,
                "version": self.version,
            }
        if result is not None:
            reply["scores"] = result.scores
            reply["boxes"] = None if result.boxes is None else len(result.boxes)
        return reply

    def instances(self, name: str, z: int | None = None) -> np.ndarray | None:
        """(Y, X) int32 objects the open segmentation model found on that plane (a copy, free to edit), or None."""
        result = self.result(name, z)
        plane = None if result is None else result.plane("outlines", slice_index(self.folder.open(name), z))
        return None if plane is None else np.array(plane, np.int32)

    def boxes(self, name: str) -> list[dict[str, Any]]:
        """The open detector's boxes of image ``name`` (its latest predicted slice); [] until predicted."""
        model = self._opened()
        if model.task != "detect":
            raise DeepscopeError(f"the open model {model.relative} is a {model.task} model, not a detector")
        with self._lock:
            job = self._jobs.get(name)
        result = self.result(name, job.z if job else None)
        return [] if result is None or result.boxes is None else result.boxes

    def overlay(
        self, name: str, z: int | None, kind: str, level: int, ty: int, tx: int, contrast: str | None = None
    ) -> tuple[bytes, bool]:
        """(PNG of one overlay tile, whether it shows a result); a result not computed yet is a transparent tile."""
        if kind not in KINDS:
            raise DeepscopeError(f"overlay kind {kind!r}: expected one of {', '.join(KINDS)}")
        self._opened()
        image = self.folder.open(name)
        z = slice_index(image, z)
        y0, y1, x0, x1 = tile_box((image.spatial[-2], image.spatial[-1]), level, ty, tx)
        result = self.result(name, z)
        array = None if result is None else result.plane(kind, z)
        if array is None:
            return labels_png(np.zeros((y1 - y0, x1 - x0), np.uint8), {}), False
        region = overlay_region(array, level, ty, tx)
        if kind == "probabilities":
            colours = (
                [PALETTE[k % len(PALETTE)] for k in range(len(region))] if len(region) > 1 else [PROBABILITY_COLOUR]
            )
            return probabilities_png(region, colours), True
        if kind == "classes":
            return labels_png(
                region, {k: PALETTE[k % len(PALETTE)] for k in range(1, int(region.max(initial=0)) + 1)}
            ), True
        if kind == "outlines":
            return outlines_png(region), True
        limits = parse_contrast(contrast, image)
        if len(limits) != len(region):  # a grey image denoised by a model of more channels
            limits = limits[:1] * len(region)
        return image_png(region, limits), True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cancel_all()
            self._lock.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(timeout=30)


def _z(params: Any) -> int | None:
    return None if params.get("z") in (None, "") else integer(params["z"], "z")


def routes(service: ModelService) -> list[Route]:
    """``/api/models``: list, open, predict, status, overlay tiles and detection boxes."""

    def listing(request: Request) -> Response:
        return JSONResponse(service.checkpoints(), headers=NO_STORE)

    async def open_model(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await run_in_threadpool(service.open, body.get("path")), headers=NO_STORE)

    def predict(request: Request) -> Response:
        params = request.query_params
        return JSONResponse(service.predict(param(params, "image"), _z(params)), headers=NO_STORE)

    def status(request: Request) -> Response:
        params = request.query_params
        return JSONResponse(service.status(param(params, "image"), _z(params)), headers=NO_STORE)

    def overlay(request: Request) -> Response:
        params = request.query_params
        level, ty, tx = (integer(param(params, key), key) for key in ("level", "ty", "tx"))
        data, shown = service.overlay(
            param(params, "image"), _z(params), param(params, "kind"), level, ty, tx, params.get("contrast")
        )
        return png(data, TILE_CACHE if shown else NO_STORE)

    def boxes(request: Request) -> Response:
        return JSONResponse(service.boxes(param(request.query_params, "image")), headers=NO_STORE)

    return [
        Route("/api/models", listing),
        Route("/api/models/open", open_model, methods=["POST"]),
        Route("/api/models/predict", predict, methods=["POST"]),
        Route("/api/models/status", status),
        Route("/api/models/overlay", overlay),
        Route("/api/models/boxes", boxes),
    ]
