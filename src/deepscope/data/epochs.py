"""The random stream of one epoch as a function of (seed, epoch) alone, shared by every task's batches, so a resumed
run replays exactly the batches an uninterrupted one would."""

from __future__ import annotations

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """Randomness of an epoch as a function of (seed, epoch) alone, so a resumed run replays it exactly."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    generator.manual_seed(epoch_seed(seed, epoch))
    return generator
