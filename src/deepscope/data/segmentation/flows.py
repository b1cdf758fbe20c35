"""Cellpose flow targets (Stringer et al., Nature Methods 2021) for batches of label patches, 2D or 3D.

Each object gets a field of unit vectors that leads every one of its pixels to the object's centre: heat is released
at the centre pixel and diffused inside the object only, and the flow is the normalised gradient of
``log(1 + heat)``. Following the flows from any pixel therefore ends at the centre, even in non-convex objects
where a straight line to the centroid would leave the object. The targets are computed on the training device, per
batch of augmented label patches, so they always match the augmented geometry.

Hand-written because no maintained library computes these flows on torch tensors (Cellpose is a whole application
with its own heavy dependencies). Everything runs on the object pixels only (a sparse list, not the dense patch),
vectorised over all objects of the whole batch; the only Python loop is over diffusion iterations.
"""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import Tensor

from deepscope.errors import DataError

# diffusion steps per pixel of an object's extent (sum of its bounding-box sides), as Cellpose
ITERATIONS_PER_EXTENT = 2


def _checked(labels: Tensor) -> Tensor:
    """Refuse what would silently give wrong flows: float or bool masks, a missing batch axis, negative ids."""
    if not isinstance(labels, Tensor):
        raise DataError(f"flow labels must be a torch tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"flow labels must be integers, got {labels.dtype}")
    if labels.ndim not in (3, 4):
        raise DataError(f"flow labels must be (N, H, W) or (N, D, H, W), got shape {tuple(labels.shape)}")
    if labels.numel() and labels.min() < 0:
        raise DataError(f"flow labels must not be negative, got {int(labels.min())}")
    return labels.long().contiguous()  # _neighbours steps through the flat array by its strides


def _offsets(ndim: int, device: torch.device) -> Tensor:
    """(3**ndim, ndim) int64: every step to a pixel of the full neighbourhood, the pixel itself included."""
    return torch.tensor(list(itertools.product((-1, 0, 1), repeat=ndim)), dtype=torch.long, device=device)


def _neighbours(labels: Tensor, pixels: Tensor, coords: Tensor, offsets: Tensor) -> Tensor:
    """(P, 3**ndim) int64: each object pixel's neighbours as positions in ``pixels``, or P where the neighbour is
    outside the patch or not in the same object (there the diffusion reads the 0 kept in a slot at position P)."""
    shape = torch.tensor(labels.shape[1:], device=labels.device)
    flat = labels.reshape(-1)
    position = torch.full((flat.numel(),), len(pixels), dtype=torch.long, device=labels.device)
    position[pixels] = torch.arange(len(pixels), device=labels.device)
    strides = torch.tensor(labels.stride()[1:], device=labels.device)
    own = flat[pixels]
    columns = []
    for step in offsets:  # one neighbour direction at a time keeps the temporaries at P elements
        moved = coords[:, 1:] + step
        inside = ((moved >= 0) & (moved < shape)).all(1)
        index = pixels + torch.where(inside, (step * strides).sum(), 0)
        columns.append(torch.where(inside & (flat[index] == own), position[index], len(pixels)))
    return torch.stack(columns, 1)


def _centres(coords: Tensor, obj: Tensor, count: Tensor) -> Tensor:
    """(K,) position in the pixel list of each object's pixel nearest its centroid (inside even when the centroid of
    a non-convex object is not); ties go to the first pixel."""
    n_obj, n_pix = len(count), len(coords)
    centroid = torch.zeros((n_obj, coords.shape[1]), device=coords.device).index_add_(0, obj, coords.float())
    centroid /= count[:, None]
    dist = ((coords - centroid[obj]) ** 2).sum(1)
    nearest = torch.full((n_obj,), float("inf"), device=coords.device).scatter_reduce(0, obj, dist, "amin")
    candidate = torch.where(dist <= nearest[obj], torch.arange(n_pix, device=coords.device), n_pix)
    return torch.full((n_obj,), n_pix, device=coords.device).scatter_reduce(0, obj, candidate, "amin")


def _diffuse(neighbours: Tensor, centres: Tensor, active_obj: list[int], active_pix: list[int]) -> Tensor:
    """(P,) heat after one step per entry of ``active_obj``/``active_pix`` (how many objects and pixels, taken from
    the front of the sorted lists, still take that step).

    Each step is one product with a sparse CSR matrix holding 1/3**ndim per same-object neighbour: on CPU that is
    about three times faster than gathering the neighbours and averaging them (in float32: the float64 product is
    dozens of times slower). Its first rows form a valid CSR matrix on their own, so the shrinking prefix costs no
    copies. float32 heat underflows to 0 only at the far ends of an object over about 60 times longer than wide,
    whose flows there come out 0.
    """
    n_pix, width = neighbours.shape
    valid = neighbours < n_pix
    crow = torch.cat([valid.new_zeros(1, dtype=torch.long), valid.sum(1).cumsum(0)])
    col = neighbours[valid]
    weight = torch.full(col.shape, 1 / width, device=col.device)
    ends = crow[torch.tensor(active_pix, device=col.device)].tolist()
    heat = torch.zeros(n_pix, device=col.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for n_o, n_p, end in zip(active_obj, active_pix, ends):
            heat[centres[:n_o]] += 1
            step = torch.sparse_csr_tensor(
                crow[: n_p + 1], col[:end], weight[:end], (n_p, n_pix), check_invariants=False
            )
            heat[:n_p] = step @ heat
    return heat


def batch_flows(labels: Tensor) -> Tensor:
    """(N, ndim, *spatial) float32 unit vectors towards each object's centre; axis order (y, x) or (z, y, x); 0 on
    background and on single-pixel objects.

    ``labels`` (N, H, W) or (N, D, H, W), integers, 0 = background; ids need only be unique within a patch. Each
    object diffuses for ``ITERATIONS_PER_EXTENT`` x its extent steps, as Cellpose does for the largest object of a
    batch. Taking each object's own count instead makes an object's flows independent of its batch mates, and since
    pixels are sorted by that count, each step updates only a shrinking prefix of the pixel list, so small objects
    cost only their own few steps. Each step adds 1 at the centre and replaces every pixel by the mean of its
    3**ndim neighbourhood, where pixels of other objects and background count as 0 (heat leaks out at the border).
    """
    labels = _checked(labels)
    n_batch, *shape = labels.shape
    ndim, device = len(shape), labels.device
    out = torch.zeros((n_batch, *shape, ndim), device=device)
    pixels = torch.nonzero(labels.reshape(-1)).squeeze(1)
    if not len(pixels):
        return out.movedim(-1, 1).contiguous()
    coords = torch.stack(torch.unravel_index(pixels, labels.shape), 1)
    _, obj = torch.unique(coords[:, 0] * (labels.max() + 1) + labels.reshape(-1)[pixels], return_inverse=True)
    n_obj = int(obj.max()) + 1
    count = torch.bincount(obj, minlength=n_obj)
    spatial = coords[:, 1:]
    low = torch.full((n_obj, ndim), torch.iinfo(torch.long).max, device=device)
    low = low.scatter_reduce(0, obj[:, None].expand_as(spatial), spatial, "amin")
    high = torch.zeros((n_obj, ndim), dtype=torch.long, device=device)
    high = high.scatter_reduce(0, obj[:, None].expand_as(spatial), spatial, "amax")
    steps = ITERATIONS_PER_EXTENT * (high - low + 1).sum(1)

    # Sort pixels (and objects) by descending step count: step t then updates the pixels of the first objects only.
    order = torch.argsort(steps[obj], descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=device)
    offsets = _offsets(ndim, device)
    neighbours = _neighbours(labels, pixels, coords, offsets)
    neighbours = torch.where(neighbours < len(pixels), rank[neighbours.clamp(max=len(pixels) - 1)], len(pixels))[order]
    obj_order = torch.argsort(steps, descending=True, stable=True)
    centres = rank[_centres(spatial, obj, count)][obj_order]
    descending = steps[obj_order].flip(0)  # ascending, for searchsorted
    n_steps = int(descending[-1])
    remaining = torch.arange(n_steps, device=device)
    active_obj = (n_obj - torch.searchsorted(descending, remaining, right=True)).tolist()
    active_pix = (len(pixels) - torch.searchsorted(steps[obj][order].flip(0), remaining, right=True)).tolist()

    heat = _diffuse(neighbours, centres, active_obj, active_pix)
    # Central differences of log(1 + heat) along each axis; log1p keeps the tiny far-from-centre values exact.
    heat = torch.cat([torch.log1p(heat), heat.new_zeros(1)])  # position P: the 0 outside the object
    centre, stride = len(offsets) // 2, [3 ** (ndim - 1 - axis) for axis in range(ndim)]  # columns of +-1 along axis
    grad = torch.stack([heat[neighbours[:, centre + s]] - heat[neighbours[:, centre - s]] for s in stride], 1)
    # rescale by the largest component first: squares of gradients near 1e-23 underflow float32, and a zero norm
    # clamped to a tiny value would turn them into flows of length 1e7 instead of 1
    grad = grad / grad.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(grad.dtype).tiny)
    grad = grad / grad.norm(dim=1, keepdim=True).clamp(min=1.0)
    out.view(-1, ndim)[pixels[order]] = grad
    return out.movedim(-1, 1).contiguous()


def batch_flow_target(labels: Tensor) -> Tensor:
    """(N, 1 + ndim, *spatial) float32: channel 0 the cell-probability target (foreground 0/1), then the flows."""
    flows = batch_flows(labels)
    return torch.cat([(labels > 0).unsqueeze(1).float(), flows], 1)
