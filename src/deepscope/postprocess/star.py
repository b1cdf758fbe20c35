"""From star-convex polygon (StarDist) predictions to instances: candidates, non-maximum suppression, rendering.

The network predicts, per pixel, an object probability and the distances to the object's edge along the rays of
``deepscope.data.segmentation.star.ray_directions``. Every confident local maximum proposes the star-convex shape around it;
overlapping proposals are suppressed greedily, best first, and the survivors are painted into a label image. No
library does non-maximum suppression of polygons (torchvision's ``nms`` takes boxes), so it is written here with
tensor operations.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from skimage.segmentation import relabel_sequential
from torch import Tensor

from deepscope.data.segmentation.star import inside_star, ray_directions, star_extent, star_pixels
from deepscope.errors import DataError
from deepscope.postprocess.watershed import size_filter

_LATTICE = {2: 12, 3: 6}  # sample points per axis in a shape's box when estimating overlaps
_POINTS_PER_CHUNK = 1 << 21
PIXELS_PER_CANDIDATE = 64  # at most one proposal per this many pixels (an 8x8 square), the most probable ones
MIN_CANDIDATES = 2000


def _maps(
    prob: np.ndarray | Tensor, dist: np.ndarray | Tensor, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """Both maps as float32 tensors on one device; refuse a leftover channel axis or maps that do not line up."""
    prob_t, dist_t = torch.as_tensor(prob).detach(), torch.as_tensor(dist).detach()
    device = torch.device(device) if device is not None else prob_t.device
    prob_t, dist_t = prob_t.to(device=device, dtype=torch.float32), dist_t.to(device=device, dtype=torch.float32)
    if prob_t.ndim not in (2, 3) or dist_t.ndim != prob_t.ndim + 1 or dist_t.shape[1:] != prob_t.shape:
        raise DataError(
            f"star instances need prob (*spatial) in 2D or 3D and dist (n_rays, *spatial), got "
            f"{tuple(prob_t.shape)} and {tuple(dist_t.shape)}"
        )
    return prob_t, dist_t


def _candidates(prob: Tensor, threshold: float) -> Tensor:
    """(M, ndim) positions of the local maxima (3x3(x3) window, ties kept) above ``threshold``, best first.

    StarDist proposes every pixel above the threshold; nearly all of them sit on the flank of a peak whose own shape
    suppresses them anyway, and their pairwise overlaps would cost O(object area²) each, so only maxima propose.
    At most one candidate per ``PIXELS_PER_CANDIDATE`` pixels (``MIN_CANDIDATES`` at least) is kept, the most probable:
    an untrained or noisy map has a maximum every few pixels, and suppressing tens of thousands of them takes
    minutes, while real objects are larger than that spacing.
    """
    pool = F.max_pool2d if prob.ndim == 2 else F.max_pool3d
    peak = (prob >= pool(prob[None, None], 3, stride=1, padding=1)[0, 0]) & (prob > threshold)
    positions = peak.nonzero()
    order = torch.sort(prob[peak], descending=True, stable=True).indices  # ties: raster order
    return positions[order[: max(MIN_CANDIDATES, prob.numel() // PIXELS_PER_CANDIDATE)]]


def _neighbours(centres: Tensor, dist: Tensor, rays: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs (first, second), first < second, of shapes that may overlap: the convex hulls of their centres and ray
    tips are not separated along the line between the centres (each reaches max(0, d_k ray_k·e) towards the other).

    A k-d tree (scipy) first finds the pairs within twice the largest radius, and the radii sort out most of them.
    """
    radius = dist.amax(1)
    points, radii = centres.cpu().double().numpy(), radius.cpu().double().numpy()
    # imported when star instances are first drawn
    from scipy.spatial import cKDTree

    pairs = cKDTree(points).query_pairs(2 * float(radii.max()), output_type="ndarray")
    close = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1) < radii[pairs[:, 0]] + radii[pairs[:, 1]]
    first, second = torch.from_numpy(pairs[close]).to(centres.device).unbind(1)

    def apart(a: Tensor, b: Tensor) -> Tensor:
        gap = centres.index_select(0, b) - centres.index_select(0, a)
        length = gap.norm(dim=1)
        towards = (gap / length.clamp(min=1e-9)[:, None]) @ rays.T  # (P, R): ray_k·e
        reach = (dist.index_select(0, a) * towards).amax(1).clamp(min=0)  # the hull holds the centre too
        return reach + (dist.index_select(0, b) * -towards).amax(1).clamp(min=0) <= length

    size = max(_POINTS_PER_CHUNK // rays.shape[0], 1)
    keep = ~torch.cat([apart(a, b) for a, b in zip(first.split(size), second.split(size))])
    return first[keep], second[keep]


def _overlap_function(centres: Tensor, dist: Tensor, rays: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A function of index pairs (first, second) giving StarDist's overlap of each: intersection over the smaller
    shape's area, i.e. the larger of the two fractions of one shape lying inside the other.

    Estimated with a fixed lattice of sample points over each shape's box (exact clipping of star-convex polygons is
    costly and in no library): each shape's own points are tested once here, then only those inside it are tested
    against its partners, in chunks so memory stays bounded.
    """
    ndim, count = rays.shape[1], _LATTICE[rays.shape[1]] ** rays.shape[1]
    axis = (torch.arange(_LATTICE[ndim], device=dist.device, dtype=dist.dtype) + 0.5) / _LATTICE[ndim]
    lattice = torch.stack(torch.meshgrid([axis] * ndim, indexing="ij"), dim=-1).reshape(-1, ndim)
    low, high = star_extent(dist, rays)
    points = (low[:, None] + (high - low)[:, None] * lattice).reshape(-1, ndim)  # (M * S) offsets from own centre
    own = inside_star(points, torch.arange(len(dist), device=dist.device).repeat_interleave(count), dist, rays)
    own = own.view(len(dist), count)
    area = own.sum(1).clamp(min=1)

    def covered(a: Tensor, b: Tensor) -> Tensor:
        pair, sample = own.index_select(0, a).nonzero(as_tuple=True)
        mine, other = a.index_select(0, pair), b.index_select(0, pair)
        shift = centres.index_select(0, mine) - centres.index_select(0, other)
        inside = inside_star(points.index_select(0, mine * count + sample) + shift, other, dist, rays)
        return torch.bincount(pair[inside], minlength=len(a)) / area.index_select(0, a)

    def overlap(first: Tensor, second: Tensor) -> Tensor:
        size = max(_POINTS_PER_CHUNK // count, 1)
        parts = [torch.maximum(covered(a, b), covered(b, a)) for a, b in zip(first.split(size), second.split(size))]
        return torch.cat(parts) if parts else torch.zeros(0, device=dist.device)

    return overlap


def _suppress(
    n: int, higher: Tensor, lower: Tensor, overlap: Callable[[Tensor, Tensor], Tensor], threshold: float
) -> Tensor:
    """bool (n,): the candidates kept by greedy suppression among neighbours (higher[e] ranks above lower[e]).

    Equal to visiting candidates best first and keeping one unless it overlaps one kept before by more than
    ``threshold``, but done in rounds of tensor operations: the overlaps of the newly kept candidates with their
    undecided neighbours are computed (only those: most candidates fall to the first shape kept next to them), the
    neighbours they beat are suppressed, and every candidate whose better neighbours are all decided is kept. Each
    round decides at least the best undecided candidate.
    """
    state = torch.zeros(n, dtype=torch.int8, device=higher.device)  # 0 undecided, 1 kept, 2 suppressed
    while True:
        asked = ((state.index_select(0, higher) == 1) & (state.index_select(0, lower) == 0)).nonzero().squeeze(1)
        beaten = asked[overlap(higher[asked], lower[asked]) > threshold]
        state[lower[beaten]] = 2
        waiting = (state.index_select(0, higher) == 0) & (state.index_select(0, lower) == 0)
        higher, lower = higher[waiting], lower[waiting]
        fresh = state == 0
        fresh[lower] = False
        if not bool(fresh.any()):
            return state == 1
        state[fresh] = 1


def star_instances(
    prob: np.ndarray | Tensor,
    dist: np.ndarray | Tensor,
    prob_threshold: float = 0.5,
    nms_threshold: float = 0.4,
    min_size: int = 0,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """int32 labels 1..n (*spatial) from ``prob`` (*spatial, in [0, 1]) and ``dist`` (n_rays, *spatial, pixel units).

    Candidates are the local maxima of ``prob`` above ``prob_threshold`` (see ``_candidates``); going best first, a
    candidate is dropped when it overlaps an already kept shape by more than ``nms_threshold``, where overlap is, as
    in StarDist, the intersection over the smaller shape's area (not the IoU: a small shape inside a big one is
    suppressed). Kept shapes are painted with the better one winning where they overlap (StarDist's
    ``polygons_to_label``); negative predicted distances count as 0. Objects under ``min_size`` pixels are removed
    and ids are consecutive in order of probability. Shapes are exact polygons (2D) or polyhedra (3D, StarDist's
    convex-hull faces); overlaps are estimated on sample points (``_overlap_function``). Runs on ``device``
    (default: where ``prob`` is), except the neighbour search.
    """
    prob_t, dist_t = _maps(prob, dist, device)
    rays = ray_directions(dist_t.shape[0], prob_t.ndim).to(prob_t.device)
    positions = _candidates(prob_t, prob_threshold)
    if not len(positions):
        return np.zeros(prob_t.shape, dtype=np.int32)
    shapes = dist_t[(slice(None), *positions.T)].T.clamp(min=0).contiguous()
    centres = positions.float()
    first, second = _neighbours(centres, shapes, rays)
    overlap = _overlap_function(centres, shapes, rays)
    kept = _suppress(len(positions), first, second, overlap, nms_threshold).nonzero().squeeze(1)  # best first
    owner, pixel = star_pixels(centres[kept], shapes[kept], rays, prob_t.shape)
    best = torch.full(prob_t.shape, len(kept), dtype=torch.long, device=prob_t.device)  # len(kept): no shape
    index = (pixel * torch.tensor(best.stride(), device=pixel.device)).sum(1)
    best.view(-1).scatter_reduce_(0, index, owner, reduce="amin")  # owner 0 is the best shape
    labels = torch.where(best < len(kept), best + 1, 0).cpu().numpy()
    return relabel_sequential(size_filter(labels, min_size))[0].astype(np.int32)
