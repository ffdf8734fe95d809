"""Save and load torch states through a core ``Store`` (plan with encoding, then core I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import JsonValue

from ..core.manifest import Manifest
from ..core.models import CheckpointInfo
from ..core.store import Store
from .encoding import Key, allocate, decode_tree, encode_state, selected_entries


def save_state(
    store: Store,
    state: Any,
    *,
    lineage: str,
    step: int | None = None,
    metadata: dict[str, JsonValue] | None = None,
) -> CheckpointInfo:
    """Commit ``state`` as the next version of ``lineage``; blocks until committed."""
    encoded = encode_state(state)
    return store.commit(lineage, encoded.entries, step=step, tree=encoded.tree, metadata=metadata or {})


def load_state(
    store: Store,
    *,
    lineage: str,
    version: int | None = None,
    keys: Iterable[Key] | None = None,
) -> tuple[Any, Manifest]:
    """The state of ``version`` (default: latest consistent) and its manifest.

    With ``keys`` only those subtrees are read (`"model"`, `"optimizer/state/0"` or a tuple of
    path segments such as `("optimizer", "state", 0)`). Every byte is
    verified against its digest before a tensor is handed out.
    """
    manifest, holders = store.resolve(lineage, version)
    keys = list(keys) if keys is not None else None
    entries = selected_entries(manifest, keys)
    values: dict[str, Any] = {}
    targets = []
    for entry in entries:
        value, view = allocate(entry)
        values[entry.name] = value
        targets.append((entry, view))
    store.read_entries_into(targets, prefer=holders)
    return decode_tree(manifest.tree, values, keys=keys), manifest
