"""Training jobs of ``deepscope serve``: a U-Net trained on the folder's labels in the background, followed live.

A job is a ``deepscope`` command (``train segment`` on the painted class labels or on corrected instance masks, or
``pixel deep`` from the saved live forest) run by the same Python as the server, as a subprocess in its own process
group, so that cancelling it also stops any data-loading workers it started. Its output goes to
``FOLDER/.deepscope/jobs/<id>/log.txt`` and its run folder is ``FOLDER/models/<id>/``, where the models list finds the
checkpoint. A subprocess rather than a thread: training holds the interpreter and the cores for minutes, a crash in it
must not take the server down, and cancelling a process group is certain where stopping a thread is not. The
command runs under :mod:`deepscope.serve.lifeline`, which stops the group when the server process is gone, so that
no training outlives a server killed with ``kill -9`` either.

The data a job trains on is staged when it is submitted, in ``FOLDER/.deepscope/jobs/<id>/data/``: links to the
images (copies where links are not allowed) and copies of their label files, so it trains on the labels as they were
when the user pressed start even while they keep painting. One job trains at a time (the others wait in order) since
two would only share the same cores. Progress comes from the run's ``progress.json`` (``deepscope.engine.logging``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deepscope.data.io.volumes import read_volume
from deepscope.data.scribbles import read_sparse_labels
from deepscope.engine.logging import PROGRESS_FILE
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import STATE_DIR, ServedFolder
from deepscope.serve.http import NO_STORE, integer, json_body, param
from deepscope.serve.labels import LabelStore
from deepscope.serve.lifeline import KILL_AFTER_S
from deepscope.serve.project import Project
from deepscope.tasks.pixel.classifier import CLASSIFIER_FILE

KINDS = {"segment": ("labels", "instances"), "pixel-deep": ("labels",)}  # kind -> the sources it trains on
FIELDS = ("kind", "source", "max_minutes", "epochs", "target", "settings")  # of a job request
MODELS_DIR = "models"  # FOLDER/models/<id>/: the run folders, beside the images where users look for them
MASKS_DIR = "masks"  # FOLDER/masks/<stem>.tif: instance masks corrected in the browser
JOBS_DIR = "jobs"  # in STATE_DIR: a job's staged data and log
DEFAULT_MINUTES = 5.0
MAX_MINUTES = 7 * 24 * 60.0
MAX_EPOCHS = 100_000
# request settings passed on as --set KEY=VALUE: model, optimisation and augmentation only; never a path setting
# (data, out, init_from, ...), which could lead a job outside the served folder
SETTING_GROUPS = (
    "model_args",
    "optim",
    "augment",
    "inference",
    "post",
    "patch_shape",
    "batch_size",
    "patches_per_epoch",
    "val_fraction",
    "seed",
    "amp",
    "loss",
    "early_stopping",
    "normalize",
    "min_foreground",
    "eval_batch_size",
)
SETTING_KEY = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")
ERROR_LINES = 6  # log lines shown as a failed job's error
LOG_TAIL_BYTES = 64 * 1024  # of the log returned by /api/jobs/log
FINISHED = ("done", "failed", "cancelled")


class UnknownJobError(DeepscopeError):
    """A job id this server does not know (answered 404)."""


@dataclass
class Job:
    """One training job: what it runs, where it writes, and how far it is."""

    id: str
    kind: str
    source: str
    command: list[str]
    run_dir: Path  # the trainer's run folder: progress.json and best.pt
    log_path: Path
    max_minutes: float
    metric: str  # the validation metric its curve shows
    state: str = "queued"  # queued | running | done | failed | cancelled
    process: subprocess.Popen | None = None
    watcher: threading.Thread | None = None
    cancelling: bool = False
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    final: dict[str, Any] | None = None  # the progress file as the job left it


def minutes(value: Any) -> float:
    """``max_minutes`` of a request: a positive number of minutes, at most a week."""
    if value is None:
        return DEFAULT_MINUTES
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_MINUTES:
        raise DeepscopeError(
            f"max_minutes: expected a number of minutes above 0 and at most {MAX_MINUTES:g}, got {value!r}"
        )
    return float(value)


def setting_args(settings: Any) -> list[str]:
    """``--set KEY=VALUE`` arguments of a request's ``settings`` ({dotted key: JSON value}), checked against
    ``SETTING_GROUPS``; the values are written as JSON, which the command line reads as YAML."""
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise DeepscopeError('settings: expected an object of setting names and values, e.g. {"patch_shape": [64, 64]}')
    args = []
    for key, value in settings.items():
        if not SETTING_KEY.fullmatch(key) or key.split(".")[0] not in SETTING_GROUPS:
            raise DeepscopeError(
                f"settings: {key!r} cannot be set for a job; allowed are {', '.join(SETTING_GROUPS)} "
                "and their parts (e.g. model_args.features)"
            )
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def link_or_copy(source: Path, target: Path) -> None:
    """A symbolic link to ``source`` at ``target``, or a copy where the file system allows no links."""
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_progress(path: Path) -> dict[str, Any]:
    """A run's progress file, or {} while it has none (it is replaced atomically, so never read half written)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def fraction(progress: dict[str, Any], max_minutes: float) -> float:
    """How much of its work a run has done, 0..1: epochs (with the current one's steps) done, or the share of its
    wall-time limit used when that is larger (a run stopped by the clock ends before its last epoch)."""
    epochs, steps = progress.get("epochs") or 0, progress.get("steps") or 0
    done = (progress.get("epoch") or 0) + ((progress.get("step") or 0) / steps if steps else 0.0)
    by_epochs = done / epochs if epochs else 0.0
    by_time = (progress.get("elapsed_s") or 0.0) / (60.0 * max_minutes)
    return round(min(1.0, max(by_epochs, by_time)), 4)


def log_tail(path: Path, size: int) -> str:
    """The last ``size`` bytes of a log, from a line start; "" when there is no log yet."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            handle.seek(max(0, end - size))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return text.split("\n", 1)[-1] if end > size else text


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the job's process group (the job and the workers it started); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


class JobService:
    """The training jobs of one served folder, queued and run one at a time; see the module docstring."""

    def __init__(
        self, folder: ServedFolder, project: Project, store: LabelStore, save_classifier: Callable[[], Path]
    ) -> None:
        self.folder, self.project, self.store, self.save_classifier = folder, project, store, save_classifier
        self._jobs: dict[str, Job] = {}  # in order of submission
        self._lock = threading.Lock()
        self._closed = False

    # --- requests ------------------------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Check a job request, stage its data and queue it; DeepscopeError (400) naming what is wrong or missing."""
        unknown = sorted(set(request) - set(FIELDS))
        if unknown:
            raise DeepscopeError(
                f"job: unknown setting(s) {', '.join(map(str, unknown))}; expected {', '.join(FIELDS)}"
            )
        kind, source = request.get("kind"), request.get("source", "labels")
        if not isinstance(kind, str) or kind not in KINDS:
            raise DeepscopeError(f"job kind {kind!r}: expected one of {', '.join(KINDS)}")
        if source not in KINDS[kind]:
            raise DeepscopeError(f"job source {source!r}: a {kind} job trains on {' or '.join(KINDS[kind])}")
        max_minutes = minutes(request.get("max_minutes"))
        epochs = request.get("epochs")
        if epochs is not None and not 1 <= integer(epochs, "epochs") <= MAX_EPOCHS:
            raise DeepscopeError(f"epochs: expected 1 to {MAX_EPOCHS}, got {epochs!r}")
        target = request.get("target")
        # segment's settings import its post-processing (scikit-image): when a job is asked for, not at start
        from deepscope.tasks.segment.config import INSTANCE_TARGETS

        if target is not None and (source != "instances" or target not in INSTANCE_TARGETS):
            raise DeepscopeError(
                f"target {target!r}: only instance jobs take a target, one of {', '.join(INSTANCE_TARGETS)}"
            )
        options = (["--epochs", str(integer(epochs, "epochs"))] if epochs is not None else []) + setting_args(
            request.get("settings")
        )
        job_id, job_dir = self._reserve(kind)
        try:
            out = self.folder.root / MODELS_DIR / job_id
            if kind == "pixel-deep":  # pixel deep takes the time limit as a segment setting
                options = ["--set", f"max_minutes={max_minutes:g}", *options]
                command, run_dir, metric = self._pixel_deep(job_dir, out, options), out / "unet", "val_mean_iou"
            else:
                options = ["--max-minutes", f"{max_minutes:g}", *options]
                if source == "labels":
                    command, run_dir, metric = self._segment_labels(job_dir, out, options), out, "val_mean_iou"
                else:
                    command, run_dir, metric = (
                        self._segment_instances(job_dir, out, options, target),
                        out,
                        "val_mean_score",
                    )
            with self._lock:
                if self._closed:
                    raise DeepscopeError("the server is shutting down; no new jobs")
                job = self._jobs[job_id] = Job(
                    job_id, kind, source, command, run_dir, job_dir / "log.txt", max_minutes, metric
                )
                self._start_next()
                return self._describe(job)
        except BaseException:
            if job_id not in self._jobs:
                shutil.rmtree(job_dir, ignore_errors=True)
            raise

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of this server session, oldest first."""
        with self._lock:
            return [self._describe(job) for job in self._jobs.values()]

    def job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._describe(self._get(job_id))

    def log(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            path = self._get(job_id).log_path
        return {"id": job_id, "log": log_tail(path, LOG_TAIL_BYTES)}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Drop a queued job, or stop a running one (SIGTERM to its process group, SIGKILL after ``KILL_AFTER_S``)
        and wait until it is gone; a finished job stays as it is."""
        with self._lock:
            job = self._get(job_id)
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
                return self._describe(job)
            if job.state != "running" or job.process is None:
                return self._describe(job)
            job.cancelling = True
            process, watcher = job.process, job.watcher
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(KILL_AFTER_S)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait()
        if watcher is not None:
            watcher.join()
        return self.job(job_id)

    def close(self) -> None:
        """Server shutdown: drop the queue and stop running jobs, so that no training outlives the server."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state == "queued":
                    job.state, job.ended = "cancelled", time.time()
            running = [job.id for job in self._jobs.values() if job.state == "running"]
        for job_id in running:
            self.cancel(job_id)

    # --- staging the data ----------------------------------------------------------------------------------------

    def _reserve(self, kind: str) -> tuple[str, Path]:
        """A new job id (date, time and kind, numbered when taken) and its folder, created."""
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"
        for number in range(1, 1000):
            job_id = base if number == 1 else f"{base}-{number}"
            job_dir = self.folder.root / STATE_DIR / JOBS_DIR / job_id
            if (self.folder.root / MODELS_DIR / job_id).exists():
                continue
            try:
                job_dir.mkdir(parents=True)
            except FileExistsError:
                continue
            return job_id, job_dir
        raise DeepscopeError(f"{self.folder.root / STATE_DIR / JOBS_DIR}: too many jobs started this second")

    def _served(self) -> list[tuple[str, Path]]:
        """(file name, path) of every readable served image."""
        return [
            (Path(entry.name).name, self.folder.resolve(entry.name))
            for entry in self.folder.images()
            if entry.error is None
        ]

    @staticmethod
    def _stage(data: Path, pairs: list[tuple[str, Path, Path]], label_dir: str) -> None:
        """``data/images`` (links) and ``data/<label_dir>`` (copies) of the (image name, image, label file) triples,
        paired by stem as the segment task reads them."""
        (data / "images").mkdir(parents=True)
        (data / label_dir).mkdir()
        for name, image, labels in pairs:
            link_or_copy(image, data / "images" / name)
            shutil.copyfile(labels, data / label_dir / f"{Path(name).stem}.tif")

    def _segment_labels(self, job_dir: Path, out: Path, options: list[str]) -> list[str]:
        """``train segment`` of a semantic U-Net on the sparse class labels: unlabelled pixels (0) are ignored by the
        loss and the metrics, and class value ``v`` of the project is output channel ``class_values.index(v)``."""
        self.store.flush()  # the label files hold every acknowledged stroke
        pairs = [(name, path, self.folder.labels_path(name)) for name, path in self._served()]
        pairs = [pair for pair in pairs if pair[2].is_file()]
        if not pairs:
            raise DeepscopeError("nothing to train on: no image has labels yet; paint labels of at least two classes")
        data = job_dir / "data"
        self._stage(data, pairs, "labels")
        present = set()
        for path in sorted((data / "labels").iterdir()):
            present |= set(np.unique(read_sparse_labels(path)).tolist())
        present.discard(0)
        values = [c.value for c in self.project.classes]
        if len(present) < 2:
            names = ", ".join(f"{c.value} ({c.name})" for c in self.project.classes if c.value in present)
            raise DeepscopeError(f"nothing to train on: only class {names} is labelled; label at least two classes")
        missing = sorted(present - set(values))
        if missing:
            raise DataError(f"{self.folder.root / 'labels'}: label value(s) {missing} are not classes of the project")
        return [
            *self._deepscope("train", "segment"),
            "--data",
            str(data),
            "--out",
            str(out),
            *options,
            "--set",
            "target=semantic",
            "--set",
            "ignore_label=0",
            "--set",
            f"class_values={json.dumps(values)}",
        ]

    def _segment_instances(self, job_dir: Path, out: Path, options: list[str], target: str | None) -> list[str]:
        """``train segment`` of an instance U-Net (planned defaults, or ``target``) on the corrected instance masks
        ``FOLDER/masks/<stem>.tif``; masks without an object are left out (the task refuses them)."""
        pairs = []
        for name, path in self._served():
            mask = self.folder.root / MASKS_DIR / f"{Path(name).stem}.tif"
            if mask.is_file() and read_volume(mask).any():
                pairs.append((name, path, mask))
        if not pairs:
            raise DeepscopeError(
                f"nothing to train on: no instance masks with objects in {MASKS_DIR}/; "
                "proofread a model's instances and save them first"
            )
        self._stage(job_dir / "data", pairs, "masks")
        command = [*self._deepscope("train", "segment"), "--data", str(job_dir / "data"), "--out", str(out), *options]
        return command + (["--set", f"target={target}"] if target else [])

    def _pixel_deep(self, job_dir: Path, out: Path, options: list[str]) -> list[str]:
        """``pixel deep``: the live forest (saved now, and copied so later labelling does not change this job) labels
        every served image and a semantic U-Net learns from it."""
        classifier = job_dir / CLASSIFIER_FILE
        shutil.copyfile(self.save_classifier(), classifier)  # DeepscopeError with fewer than two classes labelled
        images = [str(path) for _, path in self._served()]
        if not images:
            raise DeepscopeError("nothing to train on: the folder has no readable image")
        return [*self._deepscope("pixel", "deep"), str(classifier), *images, "--out", str(out), *options]

    @staticmethod
    def _deepscope(*args: str) -> list[str]:
        """The command line of this deepscope, run by the server's own Python."""
        return [sys.executable, "-m", "deepscope", *args]

    # --- running -------------------------------------------------------------------------------------------------

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"job {job_id!r}: no such job")
        return job

    def _start_next(self) -> None:
        """Start the oldest queued job when none is running (call with the lock held)."""
        if self._closed or any(job.state == "running" for job in self._jobs.values()):
            return
        for job in self._jobs.values():
            if job.state != "queued":
                continue
            job.started = time.time()
            try:
                with open(job.log_path, "ab") as log:  # stdin: the pipe whose end tells the lifeline the server is gone
                    job.process = subprocess.Popen(
                        [sys.executable, "-m", "deepscope.serve.lifeline", *job.command],
                        stdin=subprocess.PIPE,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=job.log_path.parent,
                        start_new_session=True,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
            except OSError as exc:
                job.state, job.ended, job.error = "failed", time.time(), f"could not start: {exc.strerror or exc}"
                continue
            job.state = "running"
            job.watcher = threading.Thread(target=self._watch, args=(job,), name=f"job-{job.id}", daemon=True)
            job.watcher.start()
            return

    def _watch(self, job: Job) -> None:
        """Wait for the job's process, record how it ended, and start the next job."""
        assert job.process is not None and job.process.stdin is not None
        code = job.process.wait()
        job.process.stdin.close()
        with self._lock:
            job.ended = time.time()
            if job.cancelling:
                job.state = "cancelled"
                signal_group(job.process, signal.SIGKILL)  # any worker that outlived it, before another job starts
            elif code == 0:
                job.state = "done"
                best = job.run_dir / "best.pt"
                if best.is_file():
                    try:
                        self.project.record(self.folder, "models", best.relative_to(self.folder.root).as_posix())
                    except DeepscopeError as exc:  # the model is there; only the project's list of them is behind
                        job.error = f"trained, but not listed in the project: {exc}"
            else:
                job.state = "failed"
                lines = [line for line in log_tail(job.log_path, LOG_TAIL_BYTES).splitlines() if line.strip()]
                job.error = "\n".join(lines[-ERROR_LINES:]) or f"exited with status {code} and no output"
            job.final = read_progress(job.run_dir / PROGRESS_FILE)
            self._start_next()

    def _describe(self, job: Job) -> dict[str, Any]:
        """What the page shows of a job (call with the lock held)."""
        progress = job.final if job.final is not None else read_progress(job.run_dir / PROGRESS_FILE)
        best = job.run_dir / "best.pt"
        return {
            "id": job.id,
            "kind": job.kind,
            "source": job.source,
            "state": job.state,
            "progress": 1.0 if job.state == "done" else fraction(progress, job.max_minutes),
            "epoch": progress.get("epoch", 0),
            "epochs": progress.get("epochs"),
            "step": progress.get("step", 0),
            "steps": progress.get("steps"),
            "loss": progress.get("loss"),
            "history": progress.get("history", []),
            "metric": job.metric,
            "max_minutes": job.max_minutes,
            "checkpoint": best.relative_to(self.folder.root).as_posix()
            if job.state in ("done", "cancelled") and best.is_file()
            else None,
            "error": job.error,
            "pid": job.process.pid if job.process is not None else None,
            "created": job.created,
            "started": job.started,
            "ended": job.ended,
        }


def routes(service: JobService) -> list[Route]:
    """``GET /api/jobs``, ``POST /api/jobs`` {kind, source?, max_minutes?, epochs?, target?, settings?},
    ``POST /api/jobs/cancel`` {id} and ``GET /api/jobs/log?id=``; an unknown job id is answered 404."""

    def known(call: Callable[[], dict[str, Any]]) -> Response:
        try:
            return JSONResponse(call(), headers=NO_STORE)
        except UnknownJobError as exc:
            return JSONResponse({"error": str(exc)}, 404, headers=NO_STORE)

    def listing(request: Request) -> Response:
        return JSONResponse({"jobs": service.jobs()}, headers=NO_STORE)

    async def start(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(await run_in_threadpool(service.submit, body), headers=NO_STORE)

    async def cancel(request: Request) -> Response:
        job_id = (await json_body(request)).get("id")
        if not isinstance(job_id, str) or not job_id:
            raise DeepscopeError(f'cancel: expected {{"id": job id}}, got id {job_id!r}')
        return await run_in_threadpool(known, lambda: service.cancel(job_id))

    def log(request: Request) -> Response:
        job_id = param(request.query_params, "id")
        return known(lambda: service.log(job_id))

    return [
        Route("/api/jobs", listing),
        Route("/api/jobs", start, methods=["POST"]),
        Route("/api/jobs/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/log", log),
    ]
