"""A resumable shuffling sampler whose order depends only on (seed, epoch, position).

``torch.utils.data.RandomSampler`` draws each epoch's permutation from a generator that the
data loader also advances when it creates an iterator, so a loader restored mid-run shuffles
later epochs differently. Here epoch ``e`` is always ``randperm(n)`` under seed ``seed + e``,
and the state is two integers, so a resumed run sees exactly the batches an uninterrupted
run would. Works as ``sampler=`` of ``torchdata``'s ``StatefulDataLoader``, which saves and
restores it through ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[Any]):
    """Yields indices, or lists of ``batch_size`` indices (pair it with ``batch_size=None`` in
    the loader and a dataset indexable by a list, e.g. ``TensorDataset``, to skip collation)."""

    def __init__(self, num_samples: int, seed: int = 0, batch_size: int | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out
        self._resumed = False

    def __len__(self) -> int:
        if self.batch_size:
            return -(-self.num_samples // self.batch_size)
        return self.num_samples

    def __iter__(self) -> Iterator[Any]:
        if not self._resumed and self.position:  # previous epoch done (or abandoned): next one
            self.epoch += 1
            self.position = 0
        self._resumed = False
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        while self.position < self.num_samples:
            if self.batch_size:
                batch = order[self.position : self.position + self.batch_size]
                self.position += len(batch)
                yield batch
            else:
                index = order[self.position]
                self.position += 1
                yield index

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._resumed = self.position < self.num_samples
