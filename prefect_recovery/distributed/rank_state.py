"""How the distributed ``Checkpointer`` lays its state out in one DCP checkpoint.

DCP (``torch.distributed.checkpoint``) saves a flat ``{key: tensor}`` dict: tensors that every
rank holds under the same key are written once (DDP's replicated weights), DTensors are written
shard by shard (FSDP2) and resharded on load. Everything that is not a tensor (optimizer
``param_groups``, a scheduler's floats, Python's RNG state, a data loader's counters) would be
pickled by DCP's planner, and pickle never runs on this project's load path (DESIGN.md
invariant 4). So each state is split here into its tensors, kept as DCP values, and its
structure, a JSON tree in the state-tree format of ``training/encoding.py`` (FORMAT.md, "State
tree") whose tensor leaves name DCP keys, stored as a ``uint8`` tensor:

=========================  ==================================================================
``global/tree``            rank 0's global state: model, optimizer, scheduler, scaler, extras,
                           counters (the structure; their tensors are the keys below)
``global/<path>``          a tensor of the global state (``global/model/fc.weight``,
                           ``global/optimizer/state/fc.weight/exp_avg``): DCP dedups and shards
``ranks/<r>/tree``         rank ``r``'s own state: RNG, data position, determinism settings
``ranks/<r>/<path>``       a tensor of rank ``r``'s state (its torch RNG state...)
=========================  ==================================================================

Keys are built from the state's own keys, so the model's and optimizer's keys are the fully
qualified parameter names that ``get_state_dict`` returns: the same at every world size, which
is what lets DCP reshard them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import torch

from ..training.encoding import MAX_JSON_DEPTH, UnsupportedValueError, _path_part, decode_tree, encode_float

GLOBAL = "global"
RANKS = "ranks"
TREE = "tree"


def rank_prefix(rank: int) -> str:
    return f"{RANKS}/{rank}"


def split_state(state: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as (JSON tree, ``{DCP key: tensor}``): tensors (DTensors included) stay as they
    are, under ``<prefix>/<path>``; everything else is encoded in the tree, floats bit-exact."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(value: Any, path: tuple[str, ...], depth: int) -> Any:
        where = "/".join((prefix, *path))
        if depth > MAX_JSON_DEPTH:
            raise UnsupportedValueError(f"state nested too deeply at {where!r}; flatten it")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return {"float": encode_float(value)}
        if isinstance(value, torch.Tensor):
            tensors[where] = value.detach()
            return {"tensor": where}
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise UnsupportedValueError(f"{where!r}: dict keys must be str or int, got {type(key).__name__}")
                items.append([key, visit(item, (*path, _path_part(key)), depth + 3)])
            return {"dict": items}
        if isinstance(value, (list, tuple)):
            nodes = [visit(item, (*path, _path_part(i)), depth + 2) for i, item in enumerate(value)]
            return {"tuple" if isinstance(value, tuple) else "list": nodes}
        if isinstance(value, (bytes, bytearray)):
            tensors[where] = torch.tensor(list(value), dtype=torch.uint8)
            return {"bytes": where}
        raise UnsupportedValueError(
            f"{where!r}: cannot checkpoint a {type(value).__module__}.{type(value).__qualname__} without pickle; "
            "store tensors, numbers, str, bytes, None, or dict/list/tuple of them"
        )

    tree = visit(state, (), 0)
    return tree, tensors


def tree_tensor(tree: Any) -> torch.Tensor:
    """A JSON tree as a ``uint8`` tensor (what DCP stores without pickle)."""
    data = json.dumps(tree, separators=(",", ":"), ensure_ascii=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tree_of(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.contiguous().numpy().tobytes()).decode())


def tensor_keys(tree: Any) -> list[str]:
    """The DCP keys a tree's tensor and bytes leaves name, in tree order."""
    keys: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag in ("tensor", "bytes") and isinstance(body, str):
                keys.append(body)
            elif tag == "dict" and isinstance(body, list):
                for pair in body:
                    if isinstance(pair, list) and len(pair) == 2:
                        visit(pair[1])
            elif tag in ("list", "tuple") and isinstance(body, list):
                for child in body:
                    visit(child)

    visit(tree)
    return keys


def join_state(tree: Any, values: dict[str, Any]) -> Any:
    """The state again: ``tree`` with its leaves filled from ``values`` (loaded DCP tensors).
    A ``bytes`` leaf was stored as a ``uint8`` tensor and comes back as bytes."""
    bytes_keys = set(_bytes_keys(tree))
    return decode_tree(
        tree,
        {key: value.contiguous().numpy().tobytes() if key in bytes_keys else value for key, value in values.items()},
    )


def _bytes_keys(tree: Any) -> list[str]:
    found: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag == "bytes":
                found.append(body)
            elif tag == "dict":
                for pair in body:
                    visit(pair[1])
            elif tag in ("list", "tuple"):
                for child in body:
                    visit(child)

    visit(tree)
    return found


def derived_seed(seed: int | None, rank: int) -> int:
    """The seed of a rank that did not exist when the checkpoint was written (a resume at a larger
    world size): a hash of the run's seed and the rank, so it is repeatable and differs per rank."""
    digest = hashlib.blake2b(f"prefect-recovery/rank-seed/{seed or 0}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def source_rank(rank: int, saved_world: int) -> int:
    """Whose saved per-rank state rank ``rank`` restores: its own when it existed, else
    ``rank % saved_world`` (used only for state that is not rank-specific, see DISTRIBUTED.md)."""
    return rank if rank < saved_world else rank % saved_world


def map_values(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``state`` with every tensor leaf replaced by ``fn(tensor)``."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_values(value, fn) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_values(value, fn) for value in state)
    return state


__all__ = [
    "GLOBAL",
    "RANKS",
    "TREE",
    "derived_seed",
    "join_state",
    "map_values",
    "rank_prefix",
    "source_rank",
    "split_state",
    "tensor_keys",
    "tree_of",
    "tree_tensor",
]
