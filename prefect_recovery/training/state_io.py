"""Save and load torch states through a core ``Store`` (plan with encoding, then core I/O)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from pydantic import JsonValue

from ..core.manifest import Manifest
from ..core.models import CheckpointInfo
from ..core.observe import StoreEvent, notify
from ..core.store import Store
from .encoding import (
    Key,
    allocate,
    decode_tree,
    encode_state,
    find_target,
    reusable,
    selected_entries,
    tensor_bytes,
)


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
    into: Any = None,
) -> tuple[Any, Manifest]:
    """The state of ``version`` (default: latest consistent) and its manifest.

    With ``keys`` only those subtrees are read (`"model"`, `"optimizer/state/0"` or a tuple of
    path segments such as `("optimizer", "state", 0)`). Every byte is verified against its
    digest before a tensor is handed out.

    With ``into`` (a nested state of the same shape, e.g. ``{"model": model.state_dict()}``),
    tensors are read straight into the matching existing CPU tensors (same dtype and shape,
    contiguous, no grad) instead of new ones: no allocation and no later copy. Those tensors
    are changed in place, and are left partly written if the load fails (no intact copy of a
    blob in any region); the returned state holds them.
    """
    started = time.monotonic()
    manifest, holders = store.resolve(lineage, version)
    keys = list(keys) if keys is not None else None
    values: dict[str, Any] = {}
    targets = []
    # Every entry's page is read and verified here, before any blob (core/store_pages.py).
    entries = store.manifest_entries(manifest, prefer=holders)
    for entry, path in selected_entries(manifest, keys, entries):
        target = find_target(into, path) if into is not None else None
        if reusable(target, entry):
            value, view = target, tensor_bytes(target) if entry.size else memoryview(bytearray())
        else:
            value, view = allocate(entry)
        values[entry.name] = value
        targets.append((entry, view))
    store.read_entries_into(targets, prefer=holders)
    event = StoreEvent(
        "checkpoint_restored",
        lineage,
        manifest.version,
        manifest.step,
        sum(entry.size for entry, _view in targets),
        time.monotonic() - started,
        {name: "ok" for name in holders},
        dict(manifest.metadata),
    )
    notify(store.observers, event)
    return decode_tree(manifest.tree, values, keys=keys), manifest
