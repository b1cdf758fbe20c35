"""Self-supervised losses: SimCLR's NT-Xent and VICReg, both over the global batch of all processes.

Under data parallelism each process holds a share of the batch. Both losses need the other processes' embeddings
(NT-Xent as negatives, VICReg for the variance and covariance of the whole batch), gathered with
``torch.distributed.nn.functional.all_gather``, whose backward sends each process the summed gradient of every
process's loss with respect to its own embeddings. DDP then averages parameter gradients over processes, which makes
the update equal to that of one process holding the whole batch (a plain ``dist.all_gather`` would cut the gradient
through the negatives, the bug solo-learn's GatherLayer and lightly#1528 are about). A test compares 2 processes with 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather(z: torch.Tensor) -> torch.Tensor:
    """The embeddings of all processes, in rank order, keeping the gradient path to every process's share."""
    world, _ = world_rank()
    if world == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z.contiguous()))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): each of the 2N views must pick its partner among the other 2N - 1 views of the global batch.

    ``z1[i]`` and ``z2[i]`` are this process's projections of two views of image i; the loss is the mean over this
    process's 2b anchors of the cross-entropy of cosine similarities / ``temperature``.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    _world, rank = world_rank()
    b = len(z1)
    keys = torch.cat([gather(z1), gather(z2)])  # (2N, d): all first views, then all second views
    n = len(keys) // 2
    logits = torch.cat([z1, z2]) @ keys.T / temperature
    own = rank * b + torch.arange(b, device=z1.device)
    self_index = torch.cat([own, own + n])
    partner = torch.cat([own + n, own])
    logits[torch.arange(2 * b, device=z1.device), self_index] = float("-inf")
    return F.cross_entropy(logits, partner)


def vicreg(
    z1: torch.Tensor, z2: torch.Tensor, invariance: float = 25.0, variance: float = 25.0, covariance: float = 1.0
) -> torch.Tensor:
    """VICReg (Bardes et al. 2022): views agree (MSE), each dimension keeps a standard deviation of at least 1 over the
    batch (hinge), and dimensions are decorrelated (squared off-diagonal covariance / d). No negatives and no momentum
    encoder: the variance term alone keeps embeddings from collapsing to a constant."""
    z1, z2 = z1.float(), z2.float()
    loss = invariance * F.mse_loss(z1, z2)
    for z in (gather(z1), gather(z2)):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        cov = z.T @ z / (len(z) - 1)
        off_diagonal = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
        loss = loss + variance * F.relu(1 - std).mean() / 2 + covariance * off_diagonal / z.shape[1] / 2
    return loss
