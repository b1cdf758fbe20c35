"""Star-convex polygon (StarDist) targets: per object pixel, the distance to the object's edge along fixed rays.

Works on batches of 2D (N, H, W) or 3D (N, D, H, W) label patches on the training device, after augmentation, so
the distances always match the patch the network sees. 0 is background; every positive id is one object.
Distances follow ``stardist.geometry.star_dist`` in 2D; the same definition is used in 3D (see
``batch_star_distances``). The geometry of star-convex shapes (inside test, area, rasterising) lives here too, as
``star_reconstruction`` needs it as much as ``deepscope.postprocess.star`` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import relabel_sequential
from torch import Tensor

from deepscope.errors import DataError, DeepscopeError

NON_STAR_CONVEX_IOU = 0.8
"""An object whose star-convex polygon (its true distances seen from its centre) covers it with IoU below this is
counted as not star-convex: StarDist cannot represent it, and a high fraction of such objects means another method
(flows, watershed) will do better on the data."""

_MIN_RAYS = {2: 3, 3: 6}
_PAIRS_PER_GROUP = 1 << 18
_POINTS_PER_CHUNK = 1 << 22  # point tests at once in ``inside_star``: bounds memory to tens of MB


def ray_directions(n_rays: int, ndim: int = 2) -> Tensor:
    """(n_rays, ndim) float32 unit vectors in axis order (y, x) or (z, y, x).

    2D: angle 2πk/n_rays measured from the x axis towards y, as StarDist's ``ray_angles`` (ray 0 points along +x).
    3D: StarDist's golden spiral (``Rays_GoldenSpiral`` without anisotropy), z running evenly from -1 to 1.
    """
    if ndim not in _MIN_RAYS:
        raise DeepscopeError(f"star-convex rays need 2 or 3 dimensions, got {ndim}")
    if isinstance(n_rays, bool) or not isinstance(n_rays, int | np.integer) or n_rays < _MIN_RAYS[ndim]:
        raise DeepscopeError(f"n_rays must be an integer >= {_MIN_RAYS[ndim]} in {ndim}D, got {n_rays!r}")
    k = np.arange(n_rays, dtype=np.float64)
    if ndim == 2:
        phi = 2 * np.pi * k / n_rays
        rays = np.stack([np.sin(phi), np.cos(phi)], axis=1)
    else:
        phi = (3.0 - np.sqrt(5.0)) * np.pi * k
        z = np.linspace(-1.0, 1.0, n_rays)
        rho = np.sqrt(1.0 - z**2)
        rays = np.stack([z, rho * np.sin(phi), rho * np.cos(phi)], axis=1)
    return torch.from_numpy(rays).float()


def _checked_labels(labels: Tensor) -> Tensor:
    """The labels as int64: torch has few ops for uint16/uint32, the dtypes label files come in."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"star-convex targets need integer label patches, got {labels.dtype}")
    if labels.ndim not in (3, 4):
        raise DataError(f"star-convex targets need labels (N, H, W) or (N, D, H, W), got shape {tuple(labels.shape)}")
    return labels.long()


def _march(labels: Tensor, origins: Tensor, rays: Tensor) -> Tensor:
    """(P, R) int32 number of unit steps along each ray from each origin until the rounded position leaves the object.

    ``labels`` (N, *spatial) int64, ``origins`` (P, 1 + ndim) integer indices of object pixels, ``rays`` (R, ndim).
    Written by hand because no library marches rays through label images. Rounding an integer origin plus
    ``t * ray`` equals the origin plus ``round(t * ray)``, so one offset per ray and step serves every origin; the
    patch is padded with a background ring that a ray cannot jump over (one step moves at most one pixel per axis),
    so leaving the patch needs no bounds check (steps past the ring land in a neighbouring patch or a margin, and
    are never the first outside). A chunk of steps is tested with one gather, its one-byte hit flags read 8 at a
    time as int64 words (little-endian, as all current CPUs and GPUs), and the (origin, ray) pairs that left are
    dropped after each chunk, so the cost follows the objects' sizes. Rays go in groups of about
    ``_PAIRS_PER_GROUP`` pairs: small working sets stay in cache, and a few origins (object centres) still get all
    rays in one pass.
    """
    device, n_rays, n_origins = labels.device, rays.shape[0], origins.shape[0]
    group = min(n_rays, max(1, _PAIRS_PER_GROUP // max(n_origins, 1)))
    # few pairs (object centres) test up to 64 steps per gather: the loop's fixed cost then dominates, not the tests
    chunk = 8 * min(8, max(1, _PAIRS_PER_GROUP // max(n_origins * group, 1)))
    padded_shape = [labels.shape[0], *(n + 2 for n in labels.shape[1:])]
    stride_list = [math.prod(padded_shape[axis + 1 :]) for axis in range(labels.ndim)]
    # a pair still inside its object is inside the batch, and the chunk's steps past its exit move at most ``chunk``
    # pixels per axis: a margin that wide at both ends of the flat array keeps every tested position in range
    margin = chunk * sum(stride_list[1:])
    low, high = torch.aminmax(labels)
    fits = int(low) >= -(2**31) and int(high) < 2**31
    small = fits and max(math.prod(padded_shape) + 2 * margin, n_origins * n_rays) < 2**31
    index = torch.int32 if small else torch.int64  # int32 gathers are cheaper
    flat = F.pad(F.pad(labels.to(index), [1, 1] * (labels.ndim - 1)).reshape(-1), [margin, margin])
    strides = torch.tensor(stride_list, dtype=torch.int64, device=device)
    origin = ((origins + F.pad(torch.ones_like(origins[0, 1:]), [1, 0])) * strides).sum(1).to(index) + margin
    origin_value = flat.index_select(0, origin)
    steps = torch.zeros(n_origins * n_rays, dtype=torch.int32, device=device)
    rays64 = rays.to(device=device, dtype=torch.float64)
    ahead = torch.arange(1, chunk + 1, device=device, dtype=torch.float64)
    for first_ray in range(0, n_rays, group):
        group_rays = rays64[first_ray : first_ray + group]
        count = group_rays.shape[0]
        pair = (
            torch.arange(n_origins, device=device, dtype=index)[:, None] * n_rays
            + torch.arange(first_ray, first_ray + count, device=device, dtype=index)
        ).view(-1)
        ray = torch.arange(count, device=device, dtype=index).repeat(n_origins)
        base, value = origin.repeat_interleave(count)[:, None], origin_value.repeat_interleave(count)[:, None]
        walked = 0
        while pair.numel():
            offset = (torch.round((walked + ahead)[None, :, None] * group_rays[:, None]).long() * strides[1:]).sum(-1)
            position = (base + offset.to(index).index_select(0, ray)).view(-1)
            # hit flags, 8 steps to an int64 word
            hit = (flat.index_select(0, position).view(-1, chunk) != value).view(torch.int64)
            before: int | Tensor = walked + 1  # a tensor, one number per pair, when words are searched
            if chunk > 8:  # the first word with a set byte holds the first step outside
                word = (hit != 0).byte().argmax(1, keepdim=True)
                hit, before = hit.gather(1, word), before + 8 * word.squeeze(1)
            hit = hit.squeeze(1)
            out = hit != 0
            done = out.nonzero().squeeze(1)
            flags = hit.index_select(0, done)
            # isolate the lowest set bit, read its byte off the exponent
            first = torch.frexp((flags & -flags).double())[1] // 8
            first += before.index_select(0, done) if isinstance(before, Tensor) else before  # chunk > 8
            steps.index_copy_(0, pair.index_select(0, done).long(), first.int())
            stay = (~out).nonzero().squeeze(1)
            pair, ray, base, value = (a.index_select(0, stay) for a in (pair, ray, base, value))
            walked += chunk
    return steps.view(n_origins, n_rays)


def _steps_to_distance(steps: Tensor, rays: Tensor) -> Tensor:
    """Distance from the origin to where the ray crosses into the first outside pixel: StarDist walks back from
    the first outside position by ``1 - 0.5 / max|ray|`` steps, to the face of the pixel it stepped over."""
    correction = 0.5 / rays.abs().amax(1).to(steps.device) - 1.0
    return steps.float() + correction


def batch_star_distances(labels: Tensor, n_rays: int) -> Tensor:
    """(N, n_rays, *spatial) float32 on the labels' device: distance from each object pixel to its object's edge along
    each of ``ray_directions(n_rays, ndim)``; 0 on background (labels <= 0).

    A ray marches in unit steps until the rounded position holds another label or leaves the patch, then steps back
    to the face of the last object pixel, as ``stardist.geometry.star_dist`` in 2D (equal to it within float error).
    3D uses the same definition; StarDist's ``star_dist3D`` instead reports the length of the rounded first outside
    position, about half a voxel more.
    """
    labels = _checked_labels(labels)
    rays = ray_directions(n_rays, labels.ndim - 1)
    out = torch.zeros((labels.shape[0], n_rays, *labels.shape[1:]), dtype=torch.float32, device=labels.device)
    foreground = labels > 0
    origins = foreground.nonzero()
    if origins.numel():
        out.movedim(1, -1)[foreground] = _steps_to_distance(_march(labels, origins, rays), rays)
    return out


def object_probability(labels: np.ndarray) -> np.ndarray:
    """float32 map like ``labels`` (2D or 3D): StarDist's ``edt_prob``, each object pixel's Euclidean distance to the
    nearest pixel with another label, divided by the object's maximum (so exactly 1 at its peak); 0 on background.

    The image border is not an edge (as in the ``edt`` package StarDist uses), unless one object fills the whole
    image. scipy has no multi-label distance transform, and one transform of all objects would let touching objects
    see each other as inside, so each object is transformed on its bounding box grown by one pixel (a per-object
    loop over small boxes). Unlike ``targets.distance_map``, even a one-pixel-wide object gets a peak of 1.
    """
    labels = np.where(np.asarray(labels) > 0, labels, 0)
    if labels.max(initial=0) > labels.size:  # sparse ids: find_objects makes one entry per id up to the largest
        labels = relabel_sequential(labels)[0]
    prob = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, labels.shape))
        inside = labels[grown] == index
        if inside.all():  # no other label anywhere: as StarDist, assume background around the image
            distance = ndimage.distance_transform_edt(np.pad(inside, 1))[(slice(1, -1),) * inside.ndim][inside]
        else:
            distance = ndimage.distance_transform_edt(inside)[inside]
        prob[grown][inside] = distance / distance.max()
    return prob


def batch_star_target(labels: Tensor, n_rays: int) -> Tensor:
    """(N, 1 + n_rays, *spatial) float32 on the labels' device: channel 0 ``object_probability`` (StarDist's edt_prob,
    computed on the CPU per sample as no torch op does a distance transform), channels 1.. ``batch_star_distances``."""
    distances = batch_star_distances(labels, n_rays)
    prob = np.stack([object_probability(sample) for sample in labels.cpu().numpy()])
    return torch.cat([torch.from_numpy(prob).to(labels.device).unsqueeze(1), distances], dim=1)


# ---- geometry of star-convex shapes ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _fan(n_rays: int, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """The star-convex shape as a fan of simplices (centre + ``ndim`` ray tips): (faces (F, ndim) ray indices,
    inverse (F, ndim, ndim) of the matrices whose columns are the faces' rays). 2D: neighbouring rays; 3D: the
    triangles of the rays' convex hull (scipy), as StarDist's polyhedra."""
    rays = ray_directions(n_rays, ndim).double().numpy()
    if ndim == 2:
        faces = np.stack([np.arange(n_rays), (np.arange(n_rays) + 1) % n_rays], axis=1)
    else:
        # imported by 3D star targets alone
        from scipy.spatial import ConvexHull

        faces = ConvexHull(rays).simplices
    return faces, np.linalg.inv(rays[faces].transpose(0, 2, 1))


def inside_star(offsets: Tensor, owner: Tensor, dist: Tensor, rays: Tensor) -> Tensor:
    """bool (K,): whether points at ``offsets`` (K, ndim) from the centre of shape ``owner`` (K,) lie inside it; the
    shapes are ``dist`` (M, R) along ``rays`` (R, ndim) from ``ray_directions``.

    Exact for the polygon (2D) or polyhedron (3D) through the ray tips. The point is written in the rays of the fan
    face it points into, p = Σ λ_m ray_m with λ >= 0, and is inside when Σ λ_m / d_m <= 1. In 2D the face follows
    from the point's angle; in 3D it is the face whose smallest λ is largest (>= 0 only for the face containing p),
    found by testing all faces, in chunks to bound memory.
    """
    n_rays, ndim = rays.shape
    faces_np, inverse_np = _fan(n_rays, ndim)
    faces = torch.from_numpy(faces_np).to(offsets.device)
    inverse = torch.from_numpy(inverse_np).to(device=offsets.device, dtype=offsets.dtype)
    if ndim == 2:
        face = torch.floor(torch.atan2(offsets[:, 0], offsets[:, 1]) * (n_rays / (2 * math.pi))).long() % n_rays
    else:
        every = inverse.reshape(-1, ndim).T
        size = max(1, _POINTS_PER_CHUNK // (4 * len(faces_np)))
        face = torch.cat(
            [(part @ every).view(len(part), len(faces_np), ndim).amin(2).argmax(1) for part in offsets.split(size)]
        )
    weights = (inverse.index_select(0, face) @ offsets.unsqueeze(-1)).squeeze(-1)
    index = owner[:, None] * n_rays + faces.index_select(0, face)
    corner = dist.reshape(-1).index_select(0, index.view(-1)).view(-1, ndim).to(offsets.dtype)
    # Σ λ_m / d_m <= 1 multiplied by Π d, so a zero distance needs no division
    others = torch.stack([corner[:, [n for n in range(ndim) if n != m]].prod(1) for m in range(ndim)], dim=1)
    return (weights * others).sum(1) <= corner.prod(1) * (1 + 1e-6)


def star_extent(dist: Tensor, rays: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) (M, ndim) corner offsets of the box around the centre and the ray tips of ``dist`` (M, R)."""
    tips = dist.unsqueeze(-1) * rays
    return tips.amin(1).clamp(max=0), tips.amax(1).clamp(min=0)


def star_volume(dist: Tensor, rays: Tensor) -> Tensor:
    """(M,) area (2D) or volume (3D) of the shapes ``dist`` (M, R): the sum over the fan's simplices, each
    |det(face rays)| · Π d / ndim!, exact for the polygon or polyhedron of ``inside_star``."""
    n_rays, ndim = rays.shape
    faces_np, inverse_np = _fan(n_rays, ndim)
    simplex = torch.from_numpy(np.abs(1 / np.linalg.det(inverse_np)) / math.factorial(ndim)).to(dist)
    faces = torch.from_numpy(faces_np).to(dist.device)
    return (dist[:, faces].prod(2) * simplex).sum(1)


def _box_pixels(low: Tensor, high: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Every integer position in the boxes [low, high] (M, ndim) clipped to ``shape``: (owner (K,), position (K, ndim)).

    The ragged sets come from one ``repeat_interleave`` instead of a loop over boxes.
    """
    limit = torch.tensor(shape, device=low.device) - 1
    start = torch.minimum(torch.ceil(low).long().clamp(min=0), limit)
    size = (torch.minimum(torch.floor(high).long(), limit) - start + 1).clamp(min=0)
    counts = size.prod(1)
    owner = torch.repeat_interleave(torch.arange(len(size), device=low.device), counts)
    local = torch.arange(len(owner), device=low.device) - (torch.cumsum(counts, 0) - counts).index_select(0, owner)
    size, position = size.index_select(0, owner), start.index_select(0, owner)
    for axis in range(low.shape[1] - 1, -1, -1):  # unravel, last axis fastest
        position[:, axis] += local % size[:, axis]
        local = local // size[:, axis]
    return owner, position


def star_pixels(centres: Tensor, dist: Tensor, rays: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pixels inside each star-convex shape at ``centres`` (M, ndim): (owner (K,), integer position (K, ndim)). A
    pixel counts when its centre is inside, as ``skimage.draw.polygon`` rasterises; one code path for 2D and 3D."""
    low, high = star_extent(dist, rays)
    owner, position = _box_pixels(centres + low, centres + high, shape)
    keep = torch.zeros(len(owner), dtype=torch.bool, device=owner.device)
    for start in range(0, len(owner), _POINTS_PER_CHUNK):
        part = slice(start, start + _POINTS_PER_CHUNK)
        offsets = position[part].to(dist.dtype) - centres.index_select(0, owner[part])
        keep[part] = inside_star(offsets, owner[part], dist, rays)
    return owner[keep], position[keep]


# ---- how well star-convex shapes describe a label image --------------------------------------------------------------


def star_reconstruction(labels: np.ndarray, n_rays: int) -> np.ndarray:
    """float64 (n_objects,): per object (ids sorted) the IoU of the object with the star-convex shape of its true
    distances seen from its centre, the object pixel farthest from other labels, as StarDist's reconstruction check.

    The shape's size is its exact area or volume (``star_volume``) rather than a count of rasterised pixels, so only
    the object's own pixels need testing and only the centres marching: an image costs a few ms.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim not in (2, 3):
        raise DataError(f"star reconstruction needs a 2D or 3D integer label image, got {labels.dtype} {labels.shape}")
    labels = np.where(labels > 0, labels, 0).astype(np.int64)
    # the first pixel (raster order) where each object's normalised distance reaches exactly 1 is its centre
    peaks = np.flatnonzero((object_probability(labels) == 1) & (labels > 0))
    ids, first = np.unique(labels.flat[peaks], return_index=True)
    if not len(ids):
        return np.zeros(0)
    centres = torch.from_numpy(np.stack(np.unravel_index(peaks[first], labels.shape), axis=1))
    rays = ray_directions(n_rays, labels.ndim)
    origins = torch.cat([torch.zeros((len(ids), 1), dtype=torch.long), centres], 1)
    dist = _steps_to_distance(_march(torch.from_numpy(labels).unsqueeze(0), origins, rays), rays)
    pixels = np.flatnonzero(labels)
    owner = np.searchsorted(ids, labels.flat[pixels])
    position = torch.from_numpy(np.stack(np.unravel_index(pixels, labels.shape), axis=1))
    owner_t = torch.from_numpy(owner)
    inside = inside_star((position - centres.index_select(0, owner_t)).float(), owner_t, dist, rays).numpy()
    overlap = np.bincount(owner[inside], minlength=len(ids))
    area = np.bincount(owner, minlength=len(ids))
    return overlap / (area + star_volume(dist, rays).double().numpy() - overlap)


def non_star_convex_fraction(labels_list: Sequence[np.ndarray], n_rays: int) -> tuple[float, int, int]:
    """(fraction, bad, total): objects over all images whose ``star_reconstruction`` IoU is below
    ``NON_STAR_CONVEX_IOU``; (0.0, 0, 0) when there are no objects."""
    scores = [star_reconstruction(labels, n_rays) for labels in labels_list]
    total = sum(len(s) for s in scores)
    bad = sum(int((s < NON_STAR_CONVEX_IOU).sum()) for s in scores)
    return (bad / total if total else 0.0), bad, total
