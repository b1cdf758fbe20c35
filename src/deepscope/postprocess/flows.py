"""From Cellpose-style predictions (cell probability and flows, 2D or 3D) to instances, as Cellpose does it.

Every foreground pixel follows the predicted flows for a fixed number of Euler steps, all pixels at once on the
torch device; pixels of one object end up in one small cluster around its centre. Seeds are the local maxima of
the histogram of end points, each grown over the neighbouring well-visited bins, and every pixel takes the seed
region its end point lies in. Masks whose own recomputed flows disagree with the predicted ones are dropped (a
merged or invented object has flows that point elsewhere), holes are filled and small objects removed.

Flows are read in the network's scale, ``FLOW_SCALE`` x unit vectors (see ``deepscope.losses.flows``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.segmentation import relabel_sequential
from torch import Tensor

from deepscope.data.segmentation.flows import batch_flows
from deepscope.errors import DataError, DeepscopeError
from deepscope.losses.flows import FLOW_SCALE
from deepscope.postprocess.watershed import size_filter

SEED_MIN_COUNT = 10  # end points a histogram maximum needs to seed an object (Cellpose's value)
GROW_MIN_COUNT = 2  # end points a histogram bin needs to be taken into a growing seed region (Cellpose's value)
GROW_STEPS = 5  # 3**ndim dilations of each seed region, as Cellpose
PEAK_WINDOW = 5  # side of the window a seed must be the histogram maximum of


def _inputs(
    prob: np.ndarray | Tensor, flows: np.ndarray | Tensor, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """Both maps as float32 on one device (``device``, else that of a tensor input, else the CPU), shapes checked."""
    if device is None:
        device = next((x.device for x in (prob, flows) if isinstance(x, Tensor)), torch.device("cpu"))
    prob = torch.as_tensor(prob).to(device=device, dtype=torch.float32)
    flows = torch.as_tensor(flows).to(device=device, dtype=torch.float32)
    if prob.ndim not in (2, 3) or flows.shape != (prob.ndim, *prob.shape):
        raise DataError(
            f"flow_instances wants prob (*spatial) 2D or 3D and flows (ndim, *spatial), got {tuple(prob.shape)} "
            f"and {tuple(flows.shape)}"
        )
    return prob, flows


def follow_flows(flows: Tensor, points: Tensor, steps: int) -> Tensor:
    """(P, ndim) end points, in pixel coordinates, of ``steps`` Euler steps from ``points`` along ``flows``.

    ``flows`` (ndim, *spatial) in pixels per step, read between pixel centres by bilinear/trilinear
    ``grid_sample``; points stay inside the image.
    """
    ndim, shape = flows.shape[0], flows.shape[1:]
    # grid_sample wants (x, y[, z]), the reverse of our axis order, in [-1, 1] from the first to the last pixel centre
    scale = (2 / (torch.tensor(shape, device=flows.device, dtype=torch.float32) - 1).clamp(min=1)).flip(0)
    grid = (points.float().flip(-1) * scale - 1).reshape(1, *[1] * (ndim - 1), -1, ndim)
    field = flows.unsqueeze(0)
    for _ in range(steps):
        moved = F.grid_sample(field, grid, mode="bilinear", align_corners=True).reshape(ndim, -1).T.flip(-1)
        grid = (grid + (moved * scale).reshape(grid.shape)).clamp(-1, 1)
    return ((grid.reshape(-1, ndim) + 1) / scale).flip(-1)


def cluster_end_points(ends: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(P,) int64 object id (0 = none) of each end point, by Cellpose's histogram clustering, vectorised.

    Seeds are histogram bins with over ``SEED_MIN_COUNT`` end points that are the maximum of their
    ``PEAK_WINDOW`` window; each seed region grows ``GROW_STEPS`` times into neighbouring bins with over
    ``GROW_MIN_COUNT`` end points. Growing all regions at once by a max filter of seed ids ordered by count gives
    what Cellpose gets by growing each seed separately and letting the fuller seed win where regions overlap.
    """
    ndim = len(shape)
    bins = ends.round().long()
    strides = torch.tensor([int(np.prod(shape[i + 1 :])) for i in range(ndim)], device=ends.device)
    flat = (bins * strides).sum(1)
    hist = torch.bincount(flat, minlength=int(np.prod(shape))).reshape(shape).float()
    pool = F.max_pool3d if ndim == 3 else F.max_pool2d
    peaks = (hist >= pool(hist[None], PEAK_WINDOW, 1, PEAK_WINDOW // 2)[0]) & (hist > SEED_MIN_COUNT)
    seeds = torch.nonzero(peaks.reshape(-1)).squeeze(1)
    regions = torch.zeros(hist.numel(), device=ends.device)
    if not len(seeds):
        return torch.zeros(len(ends), dtype=torch.long, device=ends.device)
    rank = torch.argsort(torch.argsort(hist.reshape(-1)[seeds], stable=True))  # fuller seeds get higher ids
    regions[seeds] = (rank + 1).float()
    regions = regions.reshape(shape)
    visited = hist > GROW_MIN_COUNT
    for _ in range(GROW_STEPS):
        regions = torch.where(visited, pool(regions[None], 3, 1, 1)[0], 0)
    return regions.reshape(-1)[flat].long()


def flow_errors(labels: Tensor, flows: Tensor) -> Tensor:
    """(n + 1,) per label id (0 unused): mean over the object's pixels of the squared difference, summed over axes,
    between the unit flows recomputed from the mask and ``flows`` / ``FLOW_SCALE`` (Cellpose's ``flow_error``)."""
    recomputed = batch_flows(labels[None])[0]
    error = ((recomputed - flows / FLOW_SCALE) ** 2).sum(0).reshape(-1)
    ids = labels.reshape(-1)
    count = torch.bincount(ids).float()
    return torch.bincount(ids, weights=error, minlength=len(count)) / count.clamp(min=1)


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """``labels`` with each background region enclosed by one single object (not touching the image border) given
    to that object; gaps enclosed by several objects stay background. Vectorised over all objects, where
    ``binary_fill_holes`` would need one call per object."""
    background, n_regions = ndimage.label(labels == 0)
    if not n_regions:
        return labels
    ids = np.arange(1, n_regions + 1)
    cross = ndimage.generate_binary_structure(labels.ndim, 1)
    highest = ndimage.maximum(ndimage.grey_dilation(labels, footprint=cross), background, ids)
    big = np.iinfo(labels.dtype).max
    lowest = ndimage.minimum(ndimage.grey_erosion(np.where(labels > 0, labels, big), footprint=cross), background, ids)
    edge = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        edge[(slice(None),) * axis + (0,)] = edge[(slice(None),) * axis + (-1,)] = True
    on_edge = np.zeros(n_regions + 1, bool)
    on_edge[background[edge]] = True
    fill = np.where((np.asarray(highest) == np.asarray(lowest)) & ~on_edge[1:], np.asarray(highest), 0)
    return np.where(background > 0, np.concatenate([[0], fill]).astype(labels.dtype)[background], labels)


def flow_instances(
    prob: np.ndarray | Tensor,
    flows: np.ndarray | Tensor,
    prob_threshold: float = 0.5,
    steps: int = 200,
    min_size: int = 0,
    flow_threshold: float | None = 0.4,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """int32 labels 1..n from ``prob`` (*spatial) in [0, 1] and ``flows`` (ndim, *spatial) in the network's scale.

    Pixels with ``prob > prob_threshold`` follow the flows (masked to that foreground, so paths stop at its
    edge) for ``steps`` steps of about one pixel; their end points are clustered. With ``flow_threshold``,
    masks whose flow error (``flow_errors``) is above it are dropped, as Cellpose's quality check. Then holes are
    filled, objects under ``min_size`` pixels removed and ids made consecutive. Runs on ``device`` (default: that
    of a tensor input, else the CPU).
    """
    if steps < 0 or min_size < 0 or (flow_threshold is not None and flow_threshold < 0):
        raise DeepscopeError(
            f"flow_instances: steps, min_size and flow_threshold must be >= 0, got {steps}, {min_size}, {flow_threshold}"
        )
    prob, flows = _inputs(prob, flows, device)
    shape = tuple(prob.shape)
    foreground = prob > prob_threshold
    points = torch.nonzero(foreground)
    labels = torch.zeros(shape, dtype=torch.long, device=prob.device)
    if len(points):
        ends = follow_flows(flows * foreground / FLOW_SCALE, points, steps)
        labels[tuple(points.T)] = cluster_end_points(ends, shape)
    if flow_threshold is not None and labels.any():
        bad = flow_errors(labels, flows) > flow_threshold
        bad[0] = False
        labels = torch.where(bad[labels], 0, labels)
    out = fill_holes(labels.cpu().numpy().astype(np.int32))
    return relabel_sequential(size_filter(out, min_size))[0].astype(np.int32)
