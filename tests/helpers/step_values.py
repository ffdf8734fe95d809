"""Exact comparison of step results and checkpoint states (tensors by dtype, shape and raw bytes)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import torch


def same(a: Any, b: Any) -> bool:
    """Type-exact, bit-exact equality: tensors by dtype, shape and raw bytes, floats by their bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        raw_a, raw_b = a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
        return torch.equal(raw_a, raw_b)
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}/{key}")
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{path}/{i}")
    else:
        yield path, tree


def differing_leaves(a: Any, b: Any) -> list[str]:
    """Paths where two nested states differ (missing on one side, or not ``same``)."""
    left, right = dict(leaves(a)), dict(leaves(b))
    return sorted(set(left) ^ set(right)) + [
        path for path in sorted(set(left) & set(right)) if not same(left[path], right[path])
    ]


def max_abs_difference(a: Any, b: Any) -> dict[str, float]:
    """For each floating-point leaf that differs (a tensor, or a Python float such as a metric): the largest
    absolute difference (a divergence's size)."""
    left, right = dict(leaves(a)), dict(leaves(b))
    sizes = {}
    for path in sorted(set(left) & set(right)):
        x, y = left[path], right[path]
        comparable = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.is_floating_point()
        if comparable and x.shape == y.shape and x.dtype == y.dtype and not same(x, y):
            sizes[path] = float((x.double() - y.double()).abs().max())
        elif isinstance(x, float) and isinstance(y, float) and not same(x, y):
            sizes[path] = abs(x - y)
    return sizes


def final_state(home, lineage: str, steps: int) -> tuple[Any, Any]:
    """State and info of a lineage's final checkpoint (milestone ``final`` at ``steps``) in the default store."""
    from prefect_recovery import CheckpointStore

    store = CheckpointStore.default(home)
    final = store.latest(lineage)
    assert final is not None and final.metadata["trigger"] == "milestone:final", final
    assert final.step == steps
    return store.load(lineage=lineage, version=final.version), final
