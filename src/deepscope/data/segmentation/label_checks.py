"""Sanity checks of instance label images: objects with holes, and ids used for more than one object.

Both are common annotation slips (a ring drawn where a filled nucleus was meant, an id reused after a merge) that
targets built from the labels silently inherit: a star-convex distance or a flow field of an object in two pieces
points at a centre outside both. The checks warn rather than fail, since some data sets mean them (ring-shaped
cells); the messages name the file and up to ``MAX_IDS`` ids so the user can look.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from deepscope.errors import DataError

MAX_IDS = 5  # ids listed per message


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_IDS])
    return f"id{'s' if len(ids) > 1 else ''} {shown}{', ...' if len(ids) > MAX_IDS else ''}"


def _message(name: str, ids: list[int], total: int, singular: str, plural: str) -> str:
    verb = singular if len(ids) == 1 else plural
    return f"{name}: {len(ids)} of {total} objects {verb} ({_ids(ids)})"


def _enclosed_background(labels: np.ndarray) -> np.ndarray:
    """Background pixels whose 4- (3D: 6-) connected background region does not reach the image border.

    Every hole of an object lies in such a region (the region cannot leave the object's enclosure), so only objects
    whose bounding box holds one of these pixels need the fill test; in typical label images that is a few objects.
    """
    regions, _ = ndimage.label(labels == 0)
    border = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        border[(slice(None),) * axis + (0,)] = border[(slice(None),) * axis + (-1,)] = True
    return (regions > 0) & ~np.isin(regions, regions[border])


def compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``labels`` with ids renumbered 1..n, the original id of each new id with 0 for 0) for non-negative labels whose
    ids may be sparse: ``find_objects`` and ``bincount`` allocate a slot per id up to the largest, which for an id such
    as 2**32 - 1 is more memory than the machine has. Labels whose ids are at most their pixel count come back as they
    are, for speed."""
    largest = int(labels.max(initial=0))
    if largest <= labels.size:
        return labels, np.arange(largest + 1)
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:  # no background pixel: keep 0 free for it
        ids, inverse = np.concatenate([np.zeros(1, ids.dtype), ids]), inverse + 1
    return inverse.reshape(labels.shape), ids


def label_warnings(labels: np.ndarray, name: str) -> list[str]:
    """One message per kind of problem in a 2D or 3D instance label image (0 is background), none when clean.

    A hole is background enclosed by one object (``binary_fill_holes`` of the object's mask adds background pixels;
    it fills background that is not 4-connected, in 3D 6-connected, to the outside, the complement of the 8-, in
    3D 26-connectivity used for objects). An object that is not contiguous has more than one 8- (26-) connected
    component. Both are properties of one object's mask, which scipy computes for one binary image at a time, so
    this loops over objects; each works on the object's bounding box from ``find_objects``, so the total work is
    about one pass over the image rather than one per object. Sparse ids (more than the pixel count) are made
    sequential first (:func:`compact_ids`); messages give the original ids.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim not in (2, 3):
        raise DataError(
            f"{name}: instance labels must be a 2D or 3D integer image, got {labels.dtype} of shape {labels.shape}"
        )
    if labels.size == 0:  # no objects, so nothing to warn about (and no border for the hole test to start from)
        return []
    if labels.min() < 0:
        raise DataError(f"{name}: instance labels must be >= 0, found {labels.min()}")
    labels, original = compact_ids(labels)
    enclosed = _enclosed_background(labels)
    full = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    holes: list[int] = []
    pieces: list[int] = []
    boxes = ndimage.find_objects(labels)
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        crop = labels[box]
        mask = crop == index
        if enclosed[box].any() and np.any(ndimage.binary_fill_holes(mask) & enclosed[box]):
            holes.append(int(original[index]))
        if ndimage.label(mask, structure=full)[1] > 1:
            pieces.append(int(original[index]))
    total = sum(box is not None for box in boxes)
    found = []
    if holes:
        found.append(_message(name, holes, total, "has holes", "have holes"))
    if pieces:
        found.append(_message(name, pieces, total, "is not contiguous", "are not contiguous"))
    return found
