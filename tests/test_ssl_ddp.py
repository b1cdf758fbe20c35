"""Contrastive and VICReg losses over 2 gloo processes give the update of one process holding the whole batch: the
gathered embeddings pass gradients back to the process that computed them (summed), and DDP averages the rest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepscope.losses.ssl import nt_xent, vicreg

BATCH, FEATURES = 8, 6
METHODS = ("simclr", "vicreg")


def batch_and_model() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    v1, v2 = torch.randn(BATCH, FEATURES), torch.randn(BATCH, FEATURES)
    # no batch norm: its statistics are per process
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 5))
    return v1, v2, model


def loss_of(method: str, model: nn.Module, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    return nt_xent(z1, z2, 0.5) if method == "simclr" else vicreg(z1, z2)


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for method in METHODS:
            v1, v2, model = batch_and_model()
            net = DistributedDataParallel(model)
            share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            loss_of(method, net, v1[share], v2[share]).backward()
            results[method] = gradients(model)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # neither leaves while the other still works: gloo can abort at exit otherwise
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's and the C++ runtime's teardown: there gloo's threads can still abort the process
    # ("terminate called without an active exception", seen once in CI after both processes had done their work).
    # The gradients are written and both processes passed the barrier; an error above still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_processes_give_the_gradient_of_one(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2, join=True)
    distributed = torch.load(out)
    for method in METHODS:
        v1, v2, model = batch_and_model()
        loss_of(method, model, v1, v2).backward()
        for got, want in zip(distributed[method], gradients(model)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_gather_without_gradient_would_differ() -> None:
    """The check above can fail: detaching the other half's negatives (what a plain all_gather does) changes the gradient."""
    v1, v2, model = batch_and_model()
    loss_of("simclr", model, v1, v2).backward()
    full = gradients(model)
    model.zero_grad()
    z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    half = BATCH // 2
    z1 = torch.cat([z1[:half], z1[half:].detach()])
    z2 = torch.cat([z2[:half], z2[half:].detach()])
    # the first process's loss with the second's embeddings detached, as a plain all_gather leaves them
    nt_xent(z1, z2, 0.5).backward()
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gradients(model), full))
