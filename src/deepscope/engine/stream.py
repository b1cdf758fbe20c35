"""Epochs of any number of steps over a task's batches, so a planned schedule is not bound to whole passes.

A budget rarely holds a whole number of passes over the training set: a planned epoch may be shorter than a pass
(large data, short budget) or span several (small data, costly validation). :class:`EpochBatches` reads the task's
passes as one stream and cuts it into epochs of ``steps`` batches: epoch ``e`` holds stream batches
``e * steps`` to ``(e + 1) * steps - 1``, and pass ``p`` of the stream is the task's epoch ``p`` (its own
``set_epoch(p)``, so its seeded shuffling and augmentation). Every image is then seen as often as the steps allow,
and what an epoch holds is a function of its number alone, so a resumed run replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from deepscope.engine.task import Batches


class EpochBatches:
    """``inner``'s batches in epochs of ``steps``; the pass in progress is kept between epochs so that consecutive
    epochs continue it instead of producing its skipped batches again."""

    def __init__(self, inner: Batches, steps: int) -> None:
        if len(inner) == 0:
            raise ValueError("no batches to draw epochs from")
        self.inner, self.steps, self.epoch = inner, steps, 0
        self._pass: int | None = None  # pass the kept iterator belongs to
        self._position = 0  # batches of that pass already produced
        self._iterator: Iterator[Any] | None = None

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        start = self.epoch * self.steps
        for index in range(start, start + self.steps):
            yield self._batch(*divmod(index, len(self.inner)))

    def _batch(self, pass_number: int, position: int) -> Any:
        """Batch ``position`` of pass ``pass_number``, continuing the kept iterator where it stands."""
        if self._iterator is None or self._pass != pass_number or self._position > position:
            self.inner.set_epoch(pass_number)
            self._iterator, self._pass, self._position = iter(self.inner), pass_number, 0
        while True:
            batch = next(self._iterator)
            self._position += 1
            if self._position > position:
                return batch
