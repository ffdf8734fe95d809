"""A shuffling sampler for torch.distributed ranks whose position survives a change of world size.

``torch.utils.data.DistributedSampler`` gives rank ``r`` of ``W`` the samples ``r, r+W, ...``
of the epoch's permutation and has no state: a data loader restored on another number of ranks
cannot tell which samples the epoch already used. ``DistributedResumableSampler`` keeps one
number for the whole job instead: the **global cursor**, how many samples of the epoch's
permutation all ranks together have taken. Every round each of the ``W`` ranks takes the next
unit (one sample, or a batch of ``batch_size``): rank ``r`` takes
``order[cursor + r*B : cursor + (r+1)*B]``, and the cursor moves by ``W*B``.

The state (seed, epoch, cursor) is the same on every rank, so a job resumed on ``W'`` ranks
continues the same permutation at the same cursor, rank ``r`` now taking every ``W'``-th unit:
no sample of the epoch is skipped or seen twice (the rule docs/DISTRIBUTED.md documents). The
epoch's permutation is ``randperm(num_samples)`` under seed ``seed + epoch``, as in
``training/sampling.py``. A last round that runs past the end wraps to the start of the
permutation, so every rank takes a full unit and all ranks do the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

FORMAT = "prefect-recovery/distributed-sampler/1"


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedResumableSampler(Sampler[Any]):
    """Yields this rank's indices (or lists of ``batch_size`` indices: pair it with
    ``batch_size=None`` in a ``StatefulDataLoader`` and a dataset indexable by a list).

    Args:
        num_samples: Samples in the dataset.
        seed: Seed of every epoch's permutation (``seed + epoch``).
        batch_size: Indices per unit; None yields single indices.
        rank: This rank (default: ``torch.distributed``'s, else 0).
        world_size: Ranks in the job (default: ``torch.distributed``'s, else 1).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        batch_size: int | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        default_rank, default_world = _world()
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size}")
        self.epoch = 0
        self.cursor = 0  # samples of this epoch's permutation that all ranks together have taken
        self._resumed = False

    @property
    def unit(self) -> int:
        return self.batch_size or 1

    def __len__(self) -> int:
        """Units this rank takes in a whole epoch."""
        return -(-self.num_samples // (self.world_size * self.unit))

    def __iter__(self) -> Iterator[Any]:
        if not self._resumed and self.cursor:  # the previous epoch is done (or abandoned): next one
            self.epoch += 1
            self.cursor = 0
        self._resumed = False
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        unit, stride = self.unit, self.world_size * self.unit
        while self.cursor < self.num_samples:
            start = self.cursor + self.rank * unit
            mine = [order[i % self.num_samples] for i in range(start, start + unit)]
            self.cursor += stride
            yield mine if self.batch_size else mine[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global cursor, at this sampler's own rank and world size."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._resumed = self.cursor < self.num_samples


def find_sampler(data: Any) -> DistributedResumableSampler | None:
    """The ``DistributedResumableSampler`` a ``Checkpointer(data=...)`` object draws from, if any."""
    if isinstance(data, DistributedResumableSampler):
        return data
    loader = getattr(data, "loader", data)  # training/loaders.py's ResumableData wraps the loader
    for attribute in ("sampler", "batch_sampler"):
        found = getattr(loader, attribute, None)
        if isinstance(found, DistributedResumableSampler):
            return found
        inner = getattr(found, "sampler", None)
        if isinstance(inner, DistributedResumableSampler):
            return inner
    return None


__all__ = ["DistributedResumableSampler", "find_sampler"]
