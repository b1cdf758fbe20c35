"""Proofreading instance masks in the browser: delete, merge and split objects, undo and redo, and a corrected mask
saved where ``deepscope train segment`` finds it.

An image's instances (one id per object, 0 background) come from the open segment model's prediction or from the
saved mask ``FOLDER/masks/<stem>.tif`` (the folder ``train segment`` pairs with ``images/`` by name). For a 3D stack
the mask is (Z, Y, X) and every edit acts on the slice being viewed.

Edits stay fast on large images by never touching more than the objects they change: each plane keeps the bounding
box of every object (built once with ``ndimage.find_objects``, then updated from each edit's box), so an edit reads
and writes only the box of its objects, and an undo step stores only that box (before and after, zlib-compressed).
A background thread writes the mask atomically (temporary file, fsync, rename: ``atomic_write``) after changes; edits
made while it writes are covered by its next write, so a burst of edits costs one or two writes, not one each.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deepscope.atomic import atomic_write
from deepscope.errors import DataError, DeepscopeError
from deepscope.serve.folder import ServedFolder, ServedImage
from deepscope.serve.http import NO_STORE, integer, json_body, param, png, slice_index
from deepscope.serve.labels import Stroke
from deepscope.serve.models import ModelService
from deepscope.serve.tiles import outlines_png, overlay_region
from deepscope.serve.writer import BackgroundWriter

MASKS_DIR = "masks"
HISTORY = 100  # undo steps kept per image plane
OPEN_MASKS = 4  # masks kept in memory; the least recently used saved ones are dropped (with their undo history)
DIRECT_IDS = 1 << 20  # ids up to this are boxed by find_objects directly (one list entry per possible id)
SOURCES = ("model", "saved")
CONNECTED = ndimage.generate_binary_structure(2, 2)  # 8-connected: pixels touching at a corner stay one object

Box = tuple[slice, slice]


@dataclass
class _Step:
    """One undoable change of a plane: its box, the ids there before and after (zlib-compressed uint32), and the
    objects it changed (None: the whole plane was replaced)."""

    box: Box
    before: bytes
    after: bytes
    ids: list[int] | None


@dataclass
class _Plane:
    """Per plane: the bounding box of every object, and the history."""

    boxes: dict[int, Box]
    done: deque[_Step] = field(default_factory=lambda: deque(maxlen=HISTORY))
    undone: list[_Step] = field(default_factory=list)


@dataclass
class _Mask:
    """The live instance ids of one image, (Y, X) or (Z, Y, X) uint32."""

    name: str
    ids: np.ndarray
    path: Path
    top: int  # no id above this is used (or was, before an undo): new objects get top + 1, ...
    version: int
    saved: int  # the version the file holds; equal to ``version`` when nothing is waiting to be written
    planes: dict[int, _Plane] = field(default_factory=dict)


def _extents(region: np.ndarray, ids: np.ndarray, origin: tuple[int, int] = (0, 0)) -> dict[int, Box]:
    """Bounding boxes, in plane coordinates, of the objects ``ids`` (sorted, nonzero) of ``region``, a box of the
    plane starting at ``origin`` that holds those objects whole; ids absent from it get no box."""
    if not len(ids):
        return {}
    if ids[-1] <= DIRECT_IDS:
        found = ndimage.find_objects(region, max_label=int(ids[-1]))
        pairs = zip(ids, (found[i - 1] for i in ids))
    else:  # ids renumbered 1..n first: find_objects would make a list as long as the largest id
        position = np.minimum(np.searchsorted(ids, region), len(ids) - 1)
        compact = np.where(ids[position] == region, position + 1, 0)
        pairs = zip(ids, ndimage.find_objects(compact, max_label=len(ids)))
    oy, ox = origin
    return {
        int(i): (slice(b[0].start + oy, b[0].stop + oy), slice(b[1].start + ox, b[1].stop + ox))
        for i, b in pairs
        if b is not None
    }


def _index(plane: np.ndarray, top: int) -> dict[int, Box]:
    """The bounding box of every object of a whole plane."""
    ids = np.arange(1, top + 1) if top <= DIRECT_IDS else np.unique(plane)
    return _extents(plane, ids[ids > 0])


def _union(a: Box, b: Box) -> Box:
    (ay, ax), (by, bx) = a, b
    return slice(min(ay.start, by.start), max(ay.stop, by.stop)), slice(min(ax.start, bx.start), max(ax.stop, bx.stop))


def _crop(values: np.ndarray, box: Box, into: Box) -> np.ndarray:
    """``values`` (a boolean array covering ``box``) cut or padded with False to cover the box ``into``."""
    out = np.zeros([s.stop - s.start for s in into], bool)
    low = [max(s.start, t.start) for s, t in zip(box, into)]
    high = [min(s.stop, t.stop) for s, t in zip(box, into)]
    if all(lo < hi for lo, hi in zip(low, high)):
        out[tuple(slice(lo - t.start, hi - t.start) for lo, hi, t in zip(low, high, into))] = values[
            tuple(slice(lo - s.start, hi - s.start) for lo, hi, s in zip(low, high, box))
        ]
    return out


def _unpack(data: bytes, box: Box) -> np.ndarray:
    return np.frombuffer(zlib.decompress(data), np.uint32).reshape([s.stop - s.start for s in box])


def _pixel(point: Any, shape: tuple[int, ...]) -> tuple[int, int]:
    """A clicked pixel ``[y, x]`` (integer indices) inside a plane of ``shape``; DeepscopeError otherwise."""
    if not isinstance(point, list | tuple) or len(point) != 2:
        raise DeepscopeError(f"point {point!r}: expected [y, x] pixel indices")
    y, x = (integer(v, "point") for v in point)
    if not (0 <= y < shape[0] and 0 <= x < shape[1]):
        raise DeepscopeError(f"point ({y}, {x}) lies outside the {shape[0]}x{shape[1]} image")
    return y, x


def _checked_ids(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as uint32 ids; DataError naming ``what`` for floats or ids outside 0..2**32-1."""
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{what}: instance ids must be integers, got {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint32).max):
        raise DataError(f"{what}: instance ids {array.min()}..{array.max()} outside 0..{np.iinfo(np.uint32).max}")
    return array.astype(np.uint32)


def _read_mask(path: Path, image: ServedImage) -> np.ndarray:
    """The saved mask of ``image``; DataError naming the files when it is unreadable or of another shape."""
    try:
        with tifffile.TiffFile(path) as tif:
            array = tif.asarray()
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise DataError(f"{path}: corrupt or unreadable mask ({type(exc).__name__}: {exc})") from None
    if array.shape != tuple(image.spatial):
        raise DataError(
            f"{path}: mask of shape {array.shape} does not match {image.path} ({'x'.join(map(str, image.spatial))})"
        )
    return _checked_ids(array, str(path))


def _save(path: Path, ids: np.ndarray) -> None:
    """Replace the mask file atomically: uint16 when the largest id fits, else uint32."""
    fits = not ids.size or int(ids.max()) <= np.iinfo(np.uint16).max
    stored = ids.astype(np.uint16) if fits else ids
    atomic_write(
        path,
        lambda handle: tifffile.imwrite(handle, stored, photometric="minisblack", compression="zlib", metadata=None),
        "mask",
    )


class InstanceEditor(BackgroundWriter):
    """Instance masks of the images of a ServedFolder being proofread, saved by the background writer."""

    def __init__(self, folder: ServedFolder, models: ModelService) -> None:
        self.folder, self.models = folder, models
        self._masks: OrderedDict[str, _Mask] = OrderedDict()  # guarded by the writer's lock, as the live arrays
        self._versions = 0  # one counter for every mask: a version never repeats, even after a reload
        super().__init__("deepscope-masks-writer", f"{folder.root / MASKS_DIR}: masks")

    def mask_path(self, name: str) -> Path:
        """``masks/<stem>.tif``, paired with the image by name as ``train segment`` does."""
        self.folder.resolve(name)
        return self.folder.root / MASKS_DIR / f"{PurePosixPath(name).stem}.tif"

    # --- reading -------------------------------------------------------------------------------------------------

    def status(self, name: str, z: Any = None, point: Any = None) -> dict[str, Any]:
        """Where the image's instances stand; with ``point``, also the id there (``at``, 0 for background)."""
        image = self.folder.open(name)
        key = slice_index(image, z) or 0
        with self._changed:
            mask = self._mask(image)
            reply = self._status(image, mask, key)
            if point is not None:
                if mask is None:
                    raise self._not_loaded(image)
                reply["at"] = int(self._plane_ids(mask, key)[_pixel(point, image.spatial[-2:])])
            return reply

    def instances(self, name: str, z: Any = None) -> np.ndarray:
        """A copy of the (Y, X) ids of a plane."""
        image = self.folder.open(name)
        with self._changed:
            mask = self._loaded(image)
            return self._plane_ids(mask, slice_index(image, z) or 0).copy()

    def overlay(self, name: str, z: Any, level: int, ty: int, tx: int, selected: int | None = None) -> bytes:
        """Outlines PNG of one tile; the ``selected`` object (picked for a merge) is also filled."""
        image = self.folder.open(name)
        with self._changed:
            region = np.array(
                overlay_region(self._plane_ids(self._loaded(image), slice_index(image, z) or 0), level, ty, tx)
            )
        return outlines_png(region, selected=selected)

    # --- changing ------------------------------------------------------------------------------------------------

    def load(self, name: str, z: Any, source: Any) -> dict[str, Any]:
        """Instances from the open model's prediction of the plane (an undoable change, saved like any edit), or
        the saved mask file (replacing the live mask and its history)."""
        if source not in SOURCES:
            raise DeepscopeError(f"load: source must be one of {', '.join(SOURCES)}, got {source!r}")
        image = self.folder.open(name)
        zi = slice_index(image, z)
        if source == "saved":
            return self._reload(image, zi or 0)
        predicted = self.models.instances(name, zi)
        if predicted is None:
            raise DeepscopeError(
                f"{name}: no instances predicted yet; open a segment model and predict this image first"
            )
        predicted = np.asarray(predicted)
        if predicted.shape != tuple(image.spatial[-2:]):
            raise DeepscopeError(
                f"{name}: the model's instances of shape {predicted.shape} do not match the image plane "
                f"({'x'.join(map(str, image.spatial[-2:]))})"
            )
        after = _checked_ids(predicted, f"{name}: the model's instances")
        with self._changed:
            mask = self._mask(image) or self._new_mask(image)
            box = (slice(0, after.shape[0]), slice(0, after.shape[1]))
            return self._commit(image, mask, zi or 0, box, after, None)

    def delete(self, name: str, z: Any, point: Any) -> dict[str, Any]:
        """The object under ``point`` becomes background."""
        with self._changed:
            image, mask, key = self._editing(name, z)
            target = self._object_at(mask, key, point)
            box = mask.planes[key].boxes[target]
            region = self._plane_ids(mask, key)[box]
            return self._commit(image, mask, key, box, np.where(region == target, 0, region), [target])

    def merge(self, name: str, z: Any, point_a: Any, point_b: Any) -> dict[str, Any]:
        """The objects under the two points become one, keeping the smaller id."""
        with self._changed:
            image, mask, key = self._editing(name, z)
            a, b = self._object_at(mask, key, point_a), self._object_at(mask, key, point_b)
            if a == b:
                raise DeepscopeError(f"merge: both points are on object {a}; pick two different objects")
            kept, gone = min(a, b), max(a, b)
            boxes = mask.planes[key].boxes
            box = _union(boxes[a], boxes[b])
            region = self._plane_ids(mask, key)[box]
            return self._commit(image, mask, key, box, np.where(region == gone, kept, region), [kept, gone])

    def split(self, name: str, z: Any, points: Any, radius: Any) -> dict[str, Any]:
        """Cut the object most of the stroke lies on along the stroke: its pixels off the stroke fall into pieces
        (8-connected), the largest keeps the id and each other gets a new one; the stroke's own pixels of the object
        join the nearest piece, so the object's pixels stay the same, only their ids change."""
        with self._changed:
            image, mask, key = self._editing(name, z)
            stroke = Stroke.from_json(
                {"points": points, "radius": radius, "label": 0, "z": slice_index(image, z)}, image.spatial
            )
            drawn_box, drawn = stroke.raster(image.spatial)
            drawn_box, drawn = (drawn_box[-2], drawn_box[-1]), drawn.reshape(drawn.shape[-2:])
            plane = self._plane_ids(mask, key)
            under = plane[drawn_box][drawn]
            values, counts = np.unique(under[under > 0], return_counts=True)
            if not len(values):
                raise DeepscopeError("split: the stroke crosses no object; draw it across the object to cut")
            target = int(values[counts.argmax()])
            box = mask.planes[key].boxes[target]
            region = plane[box]
            whole = region == target
            cut = _crop(drawn, drawn_box, box) & whole
            pieces, count = ndimage.label(whole & ~cut, CONNECTED)
            if count <= ndimage.label(whole, CONNECTED)[1]:
                raise DeepscopeError(
                    f"split: the stroke does not cut object {target} in two; draw it across the whole object"
                )
            order = np.argsort(-np.bincount(pieces.ravel())[1:], kind="stable")  # largest piece first
            new_ids = np.zeros(count + 1, np.uint32)
            new_ids[order + 1] = [target, *range(mask.top + 1, mask.top + count)]
            nearest = ndimage.distance_transform_edt(pieces == 0, return_distances=False, return_indices=True)
            pieces = np.where(cut, pieces[tuple(nearest)], pieces)
            after = np.where(whole, new_ids[pieces], region)
            return self._commit(image, mask, key, box, after, sorted(int(i) for i in new_ids[1:]))

    def undo(self, name: str, z: Any = None) -> dict[str, Any]:
        """Revert the plane's last change (``box`` None when there is none); it can be redone until a new edit."""
        return self._step(name, z, forward=False)

    def redo(self, name: str, z: Any = None) -> dict[str, Any]:
        return self._step(name, z, forward=True)

    # --- internals (called holding the lock) ---------------------------------------------------------------------

    def _mask(self, image: ServedImage) -> _Mask | None:
        """The live mask of ``image``: the one in memory, else its saved file (None when there is neither)."""
        mask = self._masks.get(image.name)
        if mask is None and self.mask_path(image.name).exists():
            mask = self._keep(self._from_file(image))
        if mask is not None:
            self._masks.move_to_end(image.name)
        return mask

    def _loaded(self, image: ServedImage) -> _Mask:
        mask = self._mask(image)
        if mask is None:
            raise self._not_loaded(image)
        return mask

    def _not_loaded(self, image: ServedImage) -> DeepscopeError:
        return DeepscopeError(
            f"{image.name}: no instances loaded and no saved mask {MASKS_DIR}/"
            f"{self.mask_path(image.name).name}; load them from a segment model first"
        )

    def _editing(self, name: str, z: Any) -> tuple[ServedImage, _Mask, int]:
        image = self.folder.open(name)
        key = slice_index(image, z) or 0
        mask = self._loaded(image)
        self._plane(mask, key)
        return image, mask, key

    def _next_version(self) -> int:
        self._versions += 1
        return self._versions

    def _from_file(self, image: ServedImage) -> _Mask:
        path = self.mask_path(image.name)
        ids = _read_mask(path, image)
        version = self._next_version()
        return _Mask(image.name, ids, path, int(ids.max()) if ids.size else 0, version, version)

    def _new_mask(self, image: ServedImage) -> _Mask:
        version = self._next_version()
        return self._keep(
            _Mask(image.name, np.zeros(image.spatial, np.uint32), self.mask_path(image.name), 0, version, version)
        )

    def _keep(self, mask: _Mask) -> _Mask:
        """Keep ``mask`` in memory, dropping the least recently used masks that are saved beyond OPEN_MASKS."""
        self._masks[mask.name] = mask
        self._masks.move_to_end(mask.name)
        saved = [other for other, kept in self._masks.items() if other != mask.name and kept.saved == kept.version]
        for other in saved[: max(0, len(self._masks) - OPEN_MASKS)]:
            del self._masks[other]
        return mask

    def _reload(self, image: ServedImage, key: int) -> dict[str, Any]:
        """The saved file replaces the live mask; a pending write of the live mask is dropped, not made after."""
        with self._changed:
            if not self.mask_path(image.name).exists():
                raise self._not_loaded(image)
            self._changed.wait_for(lambda: not self._writing)
            self._dirty.discard(image.name)
            mask = self._keep(self._from_file(image))
            return self._status(image, mask, key)

    @staticmethod
    def _plane_ids(mask: _Mask, key: int) -> np.ndarray:
        return mask.ids if mask.ids.ndim == 2 else mask.ids[key]

    def _plane(self, mask: _Mask, key: int) -> _Plane:
        """The plane's object boxes and history, its boxes found on first use."""
        if key not in mask.planes:
            mask.planes[key] = _Plane(_index(self._plane_ids(mask, key), mask.top))
        return mask.planes[key]

    def _object_at(self, mask: _Mask, key: int, point: Any) -> int:
        plane = self._plane_ids(mask, key)
        y, x = _pixel(point, plane.shape)
        target = int(plane[y, x])
        if target == 0:
            raise DeepscopeError(f"point ({y}, {x}) is background, not an object")
        return target

    def _commit(
        self, image: ServedImage, mask: _Mask, key: int, box: Box, after: np.ndarray, ids: list[int] | None
    ) -> dict[str, Any]:
        """Make an edit of the objects ``ids`` (None: replace the whole plane): apply it, record it for undo
        (dropping what was undone) and reply."""
        before = self._plane_ids(mask, key)[box].copy()
        self._apply(mask, key, box, after, ids)
        plane = self._plane(mask, key)
        # .data: the arrays' own buffers (typed as such, unlike an ndarray under Python 3.11)
        done = _Step(box, zlib.compress(before.data, 1), zlib.compress(np.ascontiguousarray(after).data, 1), ids)
        plane.done.append(done)
        plane.undone.clear()
        return self._reply(image, mask, key, box, ids)

    def _apply(self, mask: _Mask, key: int, box: Box, after: np.ndarray, ids: list[int] | None) -> None:
        """Write ``after`` into ``box``, which holds the changed objects ``ids`` whole before and after (None: the
        box is the whole plane), update their boxes and wake the writer."""
        plane = self._plane(mask, key)
        self._plane_ids(mask, key)[box] = after
        if ids is None:
            mask.top = max(mask.top, int(after.max(initial=0)))
            plane.boxes = _index(after, mask.top)
        else:
            for changed in ids:
                plane.boxes.pop(changed, None)
            plane.boxes.update(_extents(after, np.array(sorted(ids)), (box[0].start, box[1].start)))
            mask.top = max(mask.top, *ids)
        mask.version = self._next_version()
        self._mark(mask.name)

    def _step(self, name: str, z: Any, forward: bool) -> dict[str, Any]:
        with self._changed:
            image, mask, key = self._editing(name, z)
            plane = mask.planes[key]
            source, target = (plane.undone, plane.done) if forward else (plane.done, plane.undone)
            if not source:
                return self._reply(image, mask, key, None, [])
            step = source.pop()
            self._apply(mask, key, step.box, _unpack(step.after if forward else step.before, step.box), step.ids)
            target.append(step)
            return self._reply(image, mask, key, step.box, step.ids)

    def _status(self, image: ServedImage, mask: _Mask | None, key: int) -> dict[str, Any]:
        path = self.mask_path(image.name)
        reply: dict[str, Any] = {
            "image": image.name,
            "z": key if image.ndim == 3 else None,
            "loaded": mask is not None,
            "saved": f"{MASKS_DIR}/{path.name}",
            "exists": path.exists(),
        }
        if mask is None:
            return {**reply, "version": None, "objects": None, "dirty": False, "error": None, "undo": 0, "redo": 0}
        plane = self._plane(mask, key)
        return {
            **reply,
            "version": mask.version,
            "objects": len(plane.boxes),
            "dirty": mask.saved != mask.version,
            "error": self.write_error(image.name),
            "undo": len(plane.done),
            "redo": len(plane.undone),
        }

    def _reply(
        self, image: ServedImage, mask: _Mask, key: int, box: Box | None, ids: list[int] | None
    ) -> dict[str, Any]:
        """The status after an edit, its box (with the slice for a stack, as the labels' replies) and the objects
        it changed (None: all of the plane's)."""
        spans = None if box is None else [[s.start, s.stop] for s in box]
        if spans is not None and image.ndim == 3:
            spans.insert(0, [key, key + 1])
        return {**self._status(image, mask, key), "box": spans, "ids": ids}

    # --- writer --------------------------------------------------------------------------------------------------

    def _snapshot(self, key: str) -> tuple[_Mask, np.ndarray, int]:
        mask = self._masks[key]
        return mask, mask.ids.copy(), mask.version

    def _write(self, snapshot: tuple[_Mask, np.ndarray, int]) -> None:
        mask, ids, _ = snapshot
        _save(mask.path, ids)

    def _written(self, snapshot: tuple[_Mask, np.ndarray, int], error: Exception | None) -> None:
        mask, _, version = snapshot
        if error is None:
            mask.saved = max(mask.saved, version)


def routes(editor: InstanceEditor) -> list[Route]:
    """``/api/instances/...``: load, status, overlay tiles and the edits (POST, JSON bodies)."""

    def points(body: dict[str, Any], count: int | None) -> list[Any]:
        value = body.get("points")
        if not isinstance(value, list) or (count is not None and len(value) != count):
            raise DeepscopeError(f"request body: 'points' must be a list of {count or 'several'} [y, x] points")
        return value

    edits = {
        "delete": lambda name, z, body: editor.delete(name, z, body.get("point")),
        "merge": lambda name, z, body: editor.merge(name, z, *points(body, 2)),
        "split": lambda name, z, body: editor.split(name, z, points(body, None), body.get("radius")),
        "undo": lambda name, z, body: editor.undo(name, z),
        "redo": lambda name, z, body: editor.redo(name, z),
        "load": lambda name, z, body: editor.load(name, z, body.get("source")),
    }

    def changing(action: str) -> Any:
        async def endpoint(request: Request) -> Response:
            body, params = await json_body(request), request.query_params
            reply = await run_in_threadpool(edits[action], param(params, "image"), params.get("z"), body)
            return JSONResponse(reply, headers=NO_STORE)

        return endpoint

    def point(params: QueryParams) -> list[str] | None:
        return None if params.get("y") is None and params.get("x") is None else [param(params, "y"), param(params, "x")]

    def status(request: Request) -> Response:
        params = request.query_params
        return JSONResponse(editor.status(param(params, "image"), params.get("z"), point(params)), headers=NO_STORE)

    def overlay(request: Request) -> Response:
        params = request.query_params
        level, ty, tx = (integer(param(params, key), key) for key in ("level", "ty", "tx"))
        selected = params.get("selected")
        return png(
            editor.overlay(
                param(params, "image"),
                params.get("z"),
                level,
                ty,
                tx,
                integer(selected, "selected") if selected else None,
            ),
            NO_STORE,
        )

    return [
        Route("/api/instances/status", status),
        Route("/api/instances/overlay", overlay),
        *(Route(f"/api/instances/{action}", changing(action), methods=["POST"]) for action in edits),
    ]
