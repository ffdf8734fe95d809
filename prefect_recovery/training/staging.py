"""Reusable host buffers for asynchronous snapshots (bounded memory, no page-fault stall).

An async save must copy the state before training changes it. A fresh ``clone()`` of a
large state pays a page fault per 4 KiB on every save; here each in-flight slot keeps its
buffers, so after the first save a snapshot is a plain memcpy. At most ``slots`` copies of
the state exist: the memory bound that ``max_in_flight`` promises.
"""

from __future__ import annotations

import queue

import torch

from .encoding import contiguous_copy


class StagingBuffers:
    def __init__(self, slots: int):
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(slot)

    def take(self) -> int:
        """A free slot (the caller already holds one of the saver's in-flight permits)."""
        return self._free.get_nowait()

    def give_back(self, slot: int) -> None:
        self._free.put(slot)

    def copier(self, slot: int):
        """A ``snapshot`` callable for ``encode_state`` that copies into ``slot``'s buffers."""
        buffers = self._buffers[slot]

        def copy(name: str, tensor: torch.Tensor) -> torch.Tensor:
            buffer = buffers.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                pin = tensor.device.type == "cuda"  # pinned memory makes device-to-host copies async-capable
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
                buffers[name] = buffer
            return contiguous_copy(tensor, out=buffer)

        return copy

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self._buffers for t in slot.values())
