"""Sparse class labels painted in the browser: strokes rasterised, undo and redo, and saving that survives ``kill -9``.

A stroke is acknowledged only once it is durable. Every change is appended to a per-image journal
(``FOLDER/.deepscope/journal/<stem>.jsonl``) and fsynced before :meth:`LabelStore.apply` returns. A background thread
rewrites ``FOLDER/labels/<stem>.tif`` atomically (temporary file beside it, fsync, rename: ``atomic_write``), one
write covering a whole burst of strokes, stores the number of the last journal entry the file holds in its TIFF
description, and empties the journal once the file has caught up. On start the store loads the TIFF and replays the
newer journal entries, so killing the server at any moment loses no acknowledged stroke and never leaves a half
written label file (the temporary files are hidden, which ``deepscope pixel train`` skips). A label file that cannot
be written (disk full) keeps its previous version and its journal, and is written again by the next change or flush
(``writer.BackgroundWriter``); a change that cannot be journalled is refused (``WriteError``), not acknowledged.

Journal entries are patches (a box and its new values, zlib-compressed) rather than stroke parameters: replaying
them needs neither the rasteriser nor the in-memory undo history, and an undo is journalled like any other change.
Labels with no labelled pixel are saved by removing the file, since ``pixel train`` refuses an empty label image.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard, cast

import numpy as np
import tifffile
from skimage.draw import disk, polygon

from deepscope.atomic import WriteError, atomic_write, leftovers
from deepscope.data.scribbles import MAX_CLASSES
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import LABELS_DIR, STATE_DIR, ServedFolder, ServedImage
from deepscope.serve.writer import BackgroundWriter

MAX_POINTS = 10000  # points of one stroke
MAX_RADIUS = 128.0  # brush radius in pixels: bounds the work one request can ask for
HISTORY = 200  # undo steps kept per image
SAVE_LEVEL = 1  # zlib level of the label files: a 4096x4096 file is written in 28 ms instead of 95 ms (the default 6),
# CPU time taken from the refit of the next stroke; sparse labels stay small either way (76 KB instead of 19 KB)
JOURNAL_DIR = "journal"  # in STATE_DIR
JOURNAL_KEY = "deepscope_journal"  # TIFF description: {JOURNAL_KEY: number of the last journal entry in the file}

Box = tuple[slice, ...]


def _number(value: Any) -> TypeGuard[float]:
    """A finite JSON number (not a boolean, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass
class Stroke:
    points: list[tuple[float, float]]  # (y, x) full-resolution pixel coordinates along the stroke
    radius: float  # brush radius in pixels (>= 0.5)
    label: int  # 1..255 a class; 0 erases
    z: int | None = None  # slice of a 3D stack

    @classmethod
    def from_json(cls, data: dict, spatial: tuple[int, ...]) -> Stroke:
        """A stroke sent by the page (``{points: [[y, x], ...], radius, label, z}``; other keys are ignored), checked
        against an image of ``spatial`` shape because it comes from the network."""
        if not isinstance(data, dict):
            raise DeepscopeError("stroke: expected a JSON object with points, radius and label")
        points = data.get("points")
        if not isinstance(points, list) or not 1 <= len(points) <= MAX_POINTS:
            raise DeepscopeError(f"stroke: points must be a list of 1..{MAX_POINTS} [y, x] pairs")
        if not all(isinstance(p, list) and len(p) == 2 and all(map(_number, p)) for p in points):
            raise DeepscopeError("stroke: points must be [y, x] pairs of finite numbers")
        radius, label, z = data.get("radius"), data.get("label"), data.get("z")
        if not _number(radius):
            raise DeepscopeError(f"stroke: radius must be a finite number, got {radius!r}")
        if not isinstance(label, int) or isinstance(label, bool):
            raise DeepscopeError(f"stroke: label must be an integer 0..{MAX_CLASSES} (0 erases), got {label!r}")
        if z is not None and (not isinstance(z, int) or isinstance(z, bool)):
            raise DeepscopeError(f"stroke: z must be an integer slice index or null, got {z!r}")
        stroke = cls([(float(y), float(x)) for y, x in points], float(radius), label, z)
        stroke.check(spatial)
        return stroke

    def check(self, spatial: tuple[int, ...]) -> None:
        """DeepscopeError when the stroke cannot be painted on an image of ``spatial`` shape."""
        if not 1 <= len(self.points) <= MAX_POINTS:
            raise DeepscopeError(f"stroke: needs 1..{MAX_POINTS} points, got {len(self.points)}")
        points = np.asarray(self.points, np.float64)
        if not np.isfinite(points).all():
            raise DeepscopeError("stroke: points must be finite numbers")
        if not (math.isfinite(self.radius) and 0.5 <= self.radius <= MAX_RADIUS):
            raise DeepscopeError(f"stroke: radius must be in [0.5, {MAX_RADIUS:g}] pixels, got {self.radius}")
        if not 0 <= self.label <= MAX_CLASSES:
            raise DeepscopeError(f"stroke: label must be 0..{MAX_CLASSES} (0 erases), got {self.label}")
        size = np.array(spatial[-2:])
        if (points < -0.5 - self.radius).any() or (points > size - 0.5 + self.radius).any():
            raise DeepscopeError(f"stroke: points lie beyond the {size[0]}x{size[1]} image by more than the radius")
        depth = spatial[0] if len(spatial) == 3 else 1
        if not 0 <= (self.z or 0) < depth:
            raise DeepscopeError(f"stroke: slice z={self.z} is out of range; the image has {depth} slice(s)")

    def raster(self, spatial: tuple[int, ...]) -> tuple[Box, np.ndarray]:
        """The box the stroke touches (spatial slices, inside the image) and its painted pixels there: a disk of the
        radius at every point and a band of twice the radius along every segment, drawn by skimage.draw."""
        points = np.asarray(self.points, np.float64)
        size = np.array(spatial[-2:])
        low = np.clip(np.floor(points.min(0) - self.radius), 0, size).astype(int)
        high = np.clip(np.ceil(points.max(0) + self.radius) + 1, 0, size).astype(int)
        shape = tuple((high - low).tolist())
        local = points - low
        mask = np.zeros(shape, bool)
        for centre in local:
            mask[disk(tuple(centre), self.radius, shape=shape)] = True
        for start, end in itertools.pairwise(local):
            length = float(np.hypot(*(end - start)))
            if length > 0:
                normal = np.array([start[1] - end[1], end[0] - start[0]]) * (self.radius / length)
                corners = np.stack([start + normal, end + normal, end - normal, start - normal])
                mask[polygon(corners[:, 0], corners[:, 1], shape=shape)] = True
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        if len(spatial) == 3:
            z = int(self.z or 0)
            return (slice(z, z + 1), *box), mask[None]
        return box, mask


@dataclass
class _Step:
    """One undoable change: its box and the values there before and after (zlib-compressed uint8)."""

    box: Box
    before: bytes
    after: bytes


@dataclass
class _Image:
    """The live labels of one image, its journal and its history."""

    labels: np.ndarray
    seq: int  # number of the last change, journalled and applied
    path: Path  # the label file
    journal_path: Path
    journal: BinaryIO
    counts: np.ndarray  # (256,) pixels of each label value, kept up to date by every change
    done: deque[_Step] = field(default_factory=lambda: deque(maxlen=HISTORY))
    undone: list[_Step] = field(default_factory=list)


def _counts(labels: np.ndarray) -> np.ndarray:
    """(256,) number of pixels of each label value."""
    return np.bincount(labels.ravel(), minlength=256)


def _fsync_dir(folder: Path) -> None:
    """Make a file's creation, rename or removal in ``folder`` durable (the file's own fsync does not)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _read_saved(path: Path, image: ServedImage) -> tuple[np.ndarray, int]:
    """The label file of ``image`` (zeros when there is none) and the last journal entry it holds (0: none, as for
    a file painted in another program); DataError naming the file for bad types, values or shape."""
    if not path.exists():
        return np.zeros(image.spatial, np.uint8), 0
    try:
        with tifffile.TiffFile(path) as tif:
            # the first page is a TiffPage (a TiffFrame only follows one)
            array, description = tif.asarray(), cast(tifffile.TiffPage, tif.pages[0]).description
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise DataError(f"{path}: corrupt or unreadable label image ({type(exc).__name__}: {exc})") from None
    if array.shape != tuple(image.spatial):
        raise DataError(
            f"{path}: label image of shape {array.shape} does not match {image.path} "
            f"({'x'.join(map(str, image.spatial))})"
        )
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be integers (0 = unlabelled, 1..{MAX_CLASSES} = classes), got {array.dtype}"
        )
    if array.size and (array.min() < 0 or array.max() > MAX_CLASSES):
        raise DataError(f"{path}: label values {array.min()}..{array.max()} outside 0..{MAX_CLASSES}")
    try:
        seq = int(json.loads(description)[JOURNAL_KEY])
    except (ValueError, TypeError, KeyError):
        seq = 0
    return array.astype(np.uint8), seq


def _read_journal(path: Path) -> list[dict[str, Any]]:
    """The complete entries of a journal. A torn last line (killed while appending, so never acknowledged) is cut
    off, so that the next entry starts on a line of its own; any other damage is a DataError naming the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    entries = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            entry = json.loads(line)
            entries.append(
                {
                    "seq": int(entry["seq"]),
                    "box": tuple(slice(int(a), int(b)) for a, b in entry["box"]),
                    "data": base64.b64decode(entry["data"], validate=True),
                }
            )
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise DataError(f"{path}: line {number} is not a journal entry; move the file away to discard it") from None
    return entries


def _patch(labels: np.ndarray, box: Box, data: bytes) -> None:
    """Write the compressed values ``data`` into ``box`` of ``labels``; ValueError when they do not fit."""
    shape = tuple(s.stop - s.start for s in box)
    if len(box) != labels.ndim or any(s.start < 0 or s.stop > n for s, n in zip(box, labels.shape)):
        raise ValueError(f"box {shape} outside the labels")
    labels[box] = np.frombuffer(zlib.decompress(data), np.uint8).reshape(shape)


class LabelStore(BackgroundWriter):
    """Sparse class labels of every image of a ServedFolder, one uint8 label image per image in FOLDER/labels/,
    written by the background writer (an image is dirty while its label file is behind its journal)."""

    def __init__(self, folder: ServedFolder) -> None:
        self.folder = folder
        self._images: dict[str, _Image] = {}  # the live arrays, guarded by the writer's lock
        super().__init__("deepscope-labels-writer", f"{folder.root}: label files")

    def labels(self, name: str) -> np.ndarray:
        """(Y,X) or (Z,Y,X) uint8, loaded from disk or zeros; the live array (callers must not write into it)."""
        with self._changed:
            return self._image(name).labels

    def version(self, name: str) -> int:
        """Increases with every change, also across restarts while the label file exists."""
        with self._changed:
            return self._image(name).seq

    def classes(self, name: str) -> np.ndarray:
        """The class values (1..255) labelled in ``name``, from counts kept by every change: a refit asks this of
        every labelled image, and counting a 4096x4096 label image anew takes 0.13 s."""
        with self._changed:
            return np.flatnonzero(self._image(name).counts[1:]) + 1

    def changed_times(self) -> dict[str, float]:
        """Image stem -> latest modification time of its label file or its journal, for every image that has either:
        the images that may hold labels, including ones painted in another program or not yet written out."""
        changed: dict[str, float] = {}
        for folder, pattern in (
            (self.folder.root / LABELS_DIR, "*.tif"),
            (self.folder.root / STATE_DIR / JOURNAL_DIR, "*.jsonl"),
        ):
            for path in folder.glob(pattern) if folder.is_dir() else ():
                try:
                    changed[path.stem] = max(changed.get(path.stem, 0.0), path.stat().st_mtime)
                except FileNotFoundError:  # removed since listed: its labels were all erased
                    continue
        return changed

    def apply(self, name: str, stroke: Stroke) -> Box:
        """Paint ``stroke`` (durably: journalled and fsynced on return); the changed box as spatial slices."""
        with self._changed:
            image = self._image(name)
            stroke.check(image.labels.shape)
            box, mask = stroke.raster(image.labels.shape)
            before = image.labels[box]
            after = np.where(mask, np.uint8(stroke.label), before)
            step = _Step(box, zlib.compress(before.tobytes(), 1), zlib.compress(after.tobytes(), 1))
            self._change(name, image, box, step.after)
            image.done.append(step)
            image.undone.clear()
            return box

    def undo(self, name: str) -> Box | None:
        """Revert the last change of ``name`` (None when there is none); it can be redone until a new stroke."""
        return self._step(name, forward=False)

    def redo(self, name: str) -> Box | None:
        return self._step(name, forward=True)

    def close(self) -> None:
        """Write every label file, stop the writer and close the journals."""
        try:
            super().close()
        finally:
            for image in self._images.values():
                image.journal.close()

    # --- internals ---------------------------------------------------------------------------------------------

    def _image(self, name: str) -> _Image:
        """The live labels of ``name``, loaded on first use."""
        if name not in self._images:
            self._images[name] = self._load(name)
        return self._images[name]

    def _load(self, name: str) -> _Image:
        """The label file of ``name`` plus the journal entries newer than the file; a replayed journal is written
        into the file by the writer, which then empties it."""
        image = self.folder.open(name)
        path = self.folder.labels_path(name)
        for stale in leftovers(path.parent, path.name):  # left by a write that was killed
            stale.unlink(missing_ok=True)
        labels, seq = _read_saved(path, image)
        journal_path = self.folder.root / STATE_DIR / JOURNAL_DIR / f"{path.stem}.jsonl"
        entries = _read_journal(journal_path)
        for number, entry in enumerate(entries, 1):
            if entry["seq"] > seq:
                try:
                    _patch(labels, entry["box"], entry["data"])
                except (ValueError, zlib.error):
                    raise DataError(
                        f"{journal_path}: line {number} does not fit the labels of {image.path}; move "
                        "the journal away to discard it"
                    ) from None
                seq = entry["seq"]
        created = not journal_path.exists()
        try:
            journal_path.parent.mkdir(parents=True, exist_ok=True)
            journal = open(journal_path, "ab", buffering=0)  # noqa: SIM115 (open while the store is, closed by close())
            if created:
                _fsync_dir(journal_path.parent)
        except OSError as exc:
            raise WriteError(
                f"{journal_path}: cannot open the journal, so {name} cannot be labelled ({exc.strerror or exc})"
            ) from None
        if entries:
            self._mark(name)
        return _Image(labels, seq, path, journal_path, journal, _counts(labels))

    def _step(self, name: str, forward: bool) -> Box | None:
        """Undo (``forward`` False) or redo one step, journalled like a stroke."""
        with self._changed:
            image = self._image(name)
            source, target = (image.undone, image.done) if forward else (image.done, image.undone)
            if not source:
                return None
            step = source[-1]
            self._change(name, image, step.box, step.after if forward else step.before)
            target.append(source.pop())
            return step.box

    def _change(self, name: str, image: _Image, box: Box, data: bytes) -> None:
        """Journal the new values of ``box`` durably, then apply them and wake the writer."""
        entry = {"seq": image.seq + 1, "box": [[s.start, s.stop] for s in box], "data": base64.b64encode(data).decode()}
        end = image.journal.seek(0, os.SEEK_END)
        try:
            image.journal.write(json.dumps(entry).encode() + b"\n")
            os.fsync(image.journal.fileno())
        except OSError as exc:
            image.journal.truncate(end)  # no torn line for the next entry to be appended to
            raise WriteError(
                f"{image.journal_path}: could not record the change, so it was not made ({exc.strerror or exc})"
            ) from None
        image.counts -= _counts(image.labels[box])
        _patch(image.labels, box, data)
        image.counts += _counts(image.labels[box])
        image.seq += 1
        self._mark(name)

    def _snapshot(self, key: str) -> tuple[_Image, np.ndarray, int]:
        image = self._images[key]
        return image, image.labels.copy(), image.seq

    def _write(self, snapshot: tuple[_Image, np.ndarray, int]) -> None:
        image, labels, seq = snapshot
        self._save(image.path, labels, seq)

    def _written(self, snapshot: tuple[_Image, np.ndarray, int], error: Exception | None) -> None:
        image, _, seq = snapshot
        if error is None and image.seq == seq:  # caught up: the file holds every journal entry
            image.journal.truncate(0)

    @staticmethod
    def _save(path: Path, labels: np.ndarray, seq: int) -> None:
        """Replace the label file atomically with ``labels`` (or remove it when nothing is labelled)."""
        if labels.any():
            description = json.dumps({JOURNAL_KEY: seq})
            atomic_write(
                path,
                lambda handle: tifffile.imwrite(
                    handle,
                    labels,
                    photometric="minisblack",
                    compression="zlib",
                    compressionargs={"level": SAVE_LEVEL},
                    metadata=None,
                    description=description,
                ),
                "label file",
            )
        else:
            path.unlink(missing_ok=True)
        if path.parent.exists():
            _fsync_dir(path.parent)
