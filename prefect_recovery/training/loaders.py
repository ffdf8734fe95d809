"""Data loaders a ``Checkpointer`` can resume bit-identically (``Checkpointer(data=...)``).

What a loader's own ``state_dict()`` misses, and what this module adds around it:

* **A plain ``torch.utils.data.DataLoader`` cannot say where it is.** It is refused when the
  ``Checkpointer`` is built (``UnsupportedLoaderError``), with the fix: torchdata's
  ``StatefulDataLoader`` takes the same arguments.
* **The RNG the loader draws from at each ``iter(loader)``** (its ``generator=``, or the global
  torch RNG without one: a base seed for workers, and ``RandomSampler``'s seed) is not in
  torchdata's state. The ``generator`` state is saved beside the loader's, and the iterator a
  resumed run creates first undoes the draws its creation made: the uninterrupted run made them
  at the start of the epoch, before the checkpoint. Later epochs then draw exactly what the
  uninterrupted run drew.
* **Randomness inside workers** (``num_workers > 0``: augmentation with ``torch.rand``,
  ``random``, ``numpy.random``): each worker seeds itself from the loader's base seed, and its
  RNG then advances with every sample it fetches, which torchdata does not record. A map-style
  dataset is given a thin wrapper whose ``state_dict()`` (which torchdata calls in the worker
  after every batch) holds that worker's Python, NumPy and torch RNG states, so a resumed
  worker continues from exactly where it was.

Other ``data=`` objects (a sampler, a custom loader) need ``state_dict()`` and
``load_state_dict()`` and are saved as they are.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

# torchdata 0.11 calls the deprecated torch.set_vital in StatefulDataLoader.__init__; the
# warning is torchdata's, says nothing to a user, and shows once per process.
warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*", category=UserWarning)

FORMAT = "prefect-recovery/loader/1"


class UnsupportedLoaderError(TypeError):
    """``Checkpointer(data=...)`` got something whose position cannot be saved and restored."""


def _is_plain_dataloader(data: Any) -> bool:
    from torch.utils.data import DataLoader

    if not isinstance(data, DataLoader):
        return False
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:  # pragma: no cover - torchdata is a dependency
        return True
    return not isinstance(data, StatefulDataLoader)


def check_data(data: Any) -> None:
    """Refuse, with the fix, a ``data=`` object that cannot be resumed."""
    if _is_plain_dataloader(data):
        raise UnsupportedLoaderError(
            "Checkpointer(data=...) got a torch.utils.data.DataLoader, which cannot save its position, "
            "so a resumed run would start the epoch over and see different batches. Use torchdata's "
            "drop-in replacement with the same arguments: `from torchdata.stateful_dataloader import "
            "StatefulDataLoader` and `StatefulDataLoader(dataset, batch_size=..., shuffle=..., ...)`."
        )
    if not (hasattr(data, "state_dict") and hasattr(data, "load_state_dict")):
        raise UnsupportedLoaderError(
            f"Checkpointer(data=...) got a {type(data).__name__}, which has no state_dict()/load_state_dict() "
            "to save and restore its position: pass a torchdata StatefulDataLoader, or a sampler or "
            "loader that has both methods."
        )


# -- worker RNG -----------------------------------------------------------------------------------
def _worker_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch CPU RNG states as plain values (no CUDA: a forked
    worker must not initialise CUDA; no tensors: torchdata compares worker states with ``==``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": bytes(torch.get_rng_state().numpy().tobytes()),
    }


def _set_worker_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))


class WorkerRngDataset(torch.utils.data.Dataset):
    """A map-style dataset whose torchdata state is its worker's RNG state (and the dataset's own)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the user's attributes (classes, vocab...) stay reachable
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def state_dict(self) -> dict[str, Any]:
        inner = self.dataset.state_dict() if hasattr(self.dataset, "state_dict") else None
        return {"worker_rng": _worker_rng_state(), "dataset": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dataset") is not None and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["dataset"])
        if state.get("worker_rng") is not None:
            _set_worker_rng_state(state["worker_rng"])


class _WorkerRngBatchedDataset(WorkerRngDataset):
    def __getitems__(self, indices: list[Any]) -> Any:
        return self.dataset.__getitems__(indices)


# -- the adapter the Checkpointer saves -----------------------------------------------------------
class ResumableData:
    """What ``Checkpointer`` saves as its ``data`` component for a torchdata ``StatefulDataLoader``."""

    def __init__(self, loader: Any):
        self.loader = loader
        self._wrap_workers()

    def _wrap_workers(self) -> None:
        loader = self.loader
        dataset = loader.dataset
        if loader.num_workers == 0 or isinstance(dataset, (WorkerRngDataset, torch.utils.data.IterableDataset)):
            return
        wrapper_type = _WorkerRngBatchedDataset if hasattr(dataset, "__getitems__") else WorkerRngDataset
        # DataLoader forbids setting `dataset` after construction; iterators read it afresh each time.
        object.__setattr__(loader, "dataset", wrapper_type(dataset))

    def state_dict(self) -> dict[str, Any]:
        generator = self.loader.generator
        return {
            "format": FORMAT,
            "loader": self.loader.state_dict(),
            "generator": generator.get_state() if generator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not (isinstance(state, dict) and state.get("format") == FORMAT):
            self.loader.load_state_dict(state)  # a checkpoint written before this adapter existed
            return
        self.loader.load_state_dict(state["loader"])
        if state.get("generator") is not None and self.loader.generator is not None:
            self.loader.generator.set_state(state["generator"])
        self._undo_draws_of_next_iterator()

    def _undo_draws_of_next_iterator(self) -> None:
        """The first iterator after a restore continues an epoch whose draws the uninterrupted run
        made before the checkpoint: put back whatever its creation drew."""
        loader = self.loader
        loader.__dict__.pop("_get_iterator", None)
        original = loader._get_iterator

        def resumed_iterator() -> Any:
            loader.__dict__.pop("_get_iterator", None)  # one-shot: later epochs draw as usual
            global_state = torch.get_rng_state()
            generator_state = loader.generator.get_state() if loader.generator is not None else None
            try:
                return original()
            finally:
                torch.set_rng_state(global_state)
                if generator_state is not None:
                    loader.generator.set_state(generator_state)

        loader._get_iterator = resumed_iterator


def adapt(data: Any) -> Any:
    """What the Checkpointer saves for ``data`` (checked first: see ``check_data``)."""
    check_data(data)
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:  # pragma: no cover
        return data
    return ResumableData(data) if isinstance(data, StatefulDataLoader) else data


__all__ = ["ResumableData", "UnsupportedLoaderError", "WorkerRngDataset", "adapt", "check_data"]
