"""Replay verification, the torch side: compare a state that re-running training produced with
a stored checkpoint, entry by entry, by the digests the store names its blobs with.

The replayed state is encoded exactly as a save would encode it (``encode_state``) and each of
its entries is hashed in the stored entry's chunk layout with the stored digests' algorithm, so
"equal" means "the same bytes the store would have written". Nothing is written anywhere. The
first differing entry (in state order) is read back from the store and compared element by
element. Knows torch and core, not Prefect (``flows/replay.py`` drives it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from ..core.digest import algorithm_of, hash_bytes
from ..core.manifest import Entry, Manifest, canonical_json
from ..core.store import Store
from ..core.store_writer import EntryPlan
from .determinism import apply_settings, capture_rng, capture_settings, restore_rng
from .encoding import allocate, encode_state, raw_view

MAX_LISTED = 50  # differing entries named in a comparison (the count is always exact)


class Difference(BaseModel):
    """Where a replayed state first differs from the stored one."""

    name: str = Field(description="Entry name (tensors, bytes) or state path (plain values, structure).")
    kind: Literal["tensor", "bytes", "value", "structure"]
    dtype: str | None = Field(default=None, description="The stored entry's dtype.")
    shape: list[int] | None = Field(default=None, description="The stored entry's shape.")
    elements: int | None = Field(default=None, description="Elements (bytes for a bytes entry) of the stored entry.")
    elements_differing: int | None = Field(default=None, description="Elements whose bits differ.")
    max_abs_diff: float | None = Field(
        default=None, description="Largest finite |stored - replayed| over differing elements (numeric dtypes)."
    )
    detail: str = ""


class Comparison(BaseModel):
    entries_compared: int
    entries_differing: int = Field(description="Tensor/bytes entries that differ (plain values not counted).")
    differing: list[str] = Field(description=f"What differs, in state order (at most {MAX_LISTED}).")
    first_difference: Difference | None

    @property
    def identical(self) -> bool:
        return self.first_difference is None


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Put the process's RNG states and determinism settings back after a replay changed them."""
    rng = capture_rng()
    settings = capture_settings(None)
    try:
        yield
    finally:
        restore_rng(rng)
        apply_settings(settings)


def _tag(node: Any) -> str:
    if isinstance(node, dict) and len(node) == 1:
        return next(iter(node))
    return "value"


def _plain(path: tuple[Any, ...]) -> str:
    return "/".join(str(part) for part in path) or "root"


def _describe(value: Any) -> str:
    text = canonical_json(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."


def _chunk_digests(data: memoryview, like: Entry) -> list[str]:
    """Digests of ``data`` split as ``like``'s chunks are, each with its chunk's algorithm."""
    flat = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    digests, offset = [], 0
    for chunk in like.chunks:
        digests.append(hash_bytes(flat[offset : offset + chunk.size], algorithm_of(chunk.content_digest)))
        offset += chunk.size
    return digests


def element_stats(stored: torch.Tensor, replayed: torch.Tensor) -> tuple[int, float | None, int]:
    """(elements whose bits differ, largest finite |difference| or None, non-finite differences)."""
    a, b = stored.reshape(-1), replayed.reshape(-1)
    size = a.element_size()
    try:
        if size in (1, 2, 4, 8):
            differs = raw_view(a) != raw_view(b)
        else:  # e.g. complex128: compare each element's bytes
            differs = (a.view(torch.uint8).reshape(-1, size) != b.view(torch.uint8).reshape(-1, size)).any(dim=1)
    except (RuntimeError, TypeError):
        return -1, None, 0
    count = int(differs.sum())
    if count == 0 or a.dtype == torch.bool:
        return count, None, 0
    try:
        wide = torch.complex128 if a.is_complex() else torch.float64
        delta = (a[differs].to(wide) - b[differs].to(wide)).abs()
    except (RuntimeError, TypeError):  # dtypes torch cannot do arithmetic on (float8, sub-byte ints...)
        return count, None, 0
    finite = delta[torch.isfinite(delta)]
    return count, float(finite.max()) if finite.numel() else None, int(delta.numel() - finite.numel())


# Top-level components in the order a difference propagates: settings and counters, the RNG
# and the data position drive every step, the scheduler and optimizer drive the weights.
CAUSE_ORDER = ("determinism", "counters", "rng", "data", "extras", "scheduler", "scaler", "optimizer", "model")


def _cause_rank(key: Any) -> int:
    return CAUSE_ORDER.index(key) if key in CAUSE_ORDER else len(CAUSE_ORDER) - 1


@dataclass
class _Walk:
    store: Store
    stored: dict[str, Entry]
    replayed: dict[str, EntryPlan]
    tensors: dict[str, torch.Tensor]
    compared: int = 0
    differing_entries: int = 0
    differing: list[str] = field(default_factory=list)
    first: Difference | None = None

    def note(self, difference: Difference, *, entry: bool) -> None:
        if entry:
            self.differing_entries += 1
        if len(self.differing) < MAX_LISTED:
            self.differing.append(difference.name)
        if self.first is None:
            self.first = self.detailed(difference)

    def detailed(self, difference: Difference) -> Difference:
        """The first difference, with element counts from the stored entry read back (verified)."""
        stored = self.stored.get(difference.name)
        replayed = self.tensors.get(difference.name)
        if difference.kind not in ("tensor", "bytes") or stored is None or difference.detail:
            return difference
        value, view = allocate(stored)
        self.store.read_entries_into([(stored, view)])
        if stored.kind == "bytes":
            theirs = bytes(self.replayed[difference.name].data)
            ours = bytes(value)
            count = sum(x != y for x, y in zip(ours, theirs, strict=True))
            return difference.model_copy(update={"elements": stored.size, "elements_differing": count})
        assert isinstance(value, torch.Tensor) and replayed is not None
        count, largest, non_finite = element_stats(value, replayed)
        detail = f"{non_finite} element(s) differ by a non-finite amount (inf/NaN)" if non_finite else ""
        return difference.model_copy(
            update={
                "elements": value.numel(),
                "elements_differing": None if count < 0 else count,
                "max_abs_diff": largest,
                "detail": detail,
            }
        )

    def leaf(self, tag: str, stored_name: str, replayed_name: str, path: tuple[Any, ...]) -> None:
        stored = self.stored.get(stored_name)
        plan = self.replayed.get(replayed_name)
        self.compared += 1
        base = Difference(
            name=stored_name,
            kind=tag,  # type: ignore[arg-type]
            dtype=stored.dtype if stored else None,
            shape=stored.shape if stored else None,
        )
        if stored is None or plan is None:
            self.note(base.model_copy(update={"detail": "the stored manifest lacks this entry"}), entry=True)
            return
        if (plan.dtype, plan.shape, plan.data.nbytes) != (stored.dtype, stored.shape, stored.size):
            self.note(
                base.model_copy(
                    update={
                        "detail": f"stored {stored.dtype}{stored.shape} ({stored.size} bytes), replayed "
                        f"{plan.dtype}{plan.shape} ({plan.data.nbytes} bytes)"
                    }
                ),
                entry=True,
            )
            return
        # Content digests: a chunk stored compressed or as a delta holds the same state.
        if _chunk_digests(plan.data, stored) != [chunk.content_digest for chunk in stored.chunks]:
            self.note(base, entry=True)

    def walk(self, stored: Any, replayed: Any, path: tuple[Any, ...]) -> None:
        tag, other = _tag(stored), _tag(replayed)
        if tag != other:
            self.note(
                Difference(
                    name=_plain(path),
                    kind="structure",
                    detail=f"stored {_describe(stored)}, replayed {_describe(replayed)}",
                ),
                entry=False,
            )
            return
        if tag in ("tensor", "bytes"):
            self.leaf(tag, stored[tag], replayed[tag], path)
        elif tag == "dict":
            ours = {key: node for key, node in stored["dict"]}
            theirs = {key: node for key, node in replayed["dict"]}
            if list(ours) != list(theirs):
                missing = [key for key in ours if key not in theirs]
                extra = [key for key in theirs if key not in ours]
                self.note(
                    Difference(
                        name=_plain(path),
                        kind="structure",
                        detail=f"keys missing from the replay: {missing}; keys only the replay has: {extra}"
                        if missing or extra
                        else "same keys in another order",
                    ),
                    entry=False,
                )
            order = list(ours.items())
            if not path:  # causes before effects: a differing RNG or data position explains differing weights
                order.sort(key=lambda item: _cause_rank(item[0]))
            for key, node in order:
                if key in theirs:
                    self.walk(node, theirs[key], (*path, key))
        elif tag in ("list", "tuple"):
            if len(stored[tag]) != len(replayed[tag]):
                self.note(
                    Difference(
                        name=_plain(path),
                        kind="structure",
                        detail=f"stored {tag} of {len(stored[tag])}, replayed {len(replayed[tag])}",
                    ),
                    entry=False,
                )
            for index, (a, b) in enumerate(zip(stored[tag], replayed[tag], strict=False)):
                self.walk(a, b, (*path, index))
        elif canonical_json(stored) != canonical_json(replayed):  # ints, str, bools, {"float": hex}
            self.note(
                Difference(
                    name=_plain(path),
                    kind="value",
                    detail=f"stored {_describe(stored)}, replayed {_describe(replayed)}",
                ),
                entry=False,
            )


def compare_state(store: Store, manifest: Manifest, state: Any) -> Comparison:
    """Compare ``state`` with the checkpoint ``manifest`` describes, causes first (``CAUSE_ORDER``:
    determinism settings, counters, RNG, data position, then the scheduler, optimizer and model).

    Entries are equal when the replayed bytes hash to the stored chunk digests (no blob is read
    for that); plain values when their canonical JSON is equal (floats bit for bit). Only the
    first differing tensor is read back from ``store``, to count differing elements.
    """
    encoded = encode_state(state)
    walk = _Walk(
        store=store,
        stored={entry.name: entry for entry in store.manifest_entries(manifest)},
        replayed={plan.name: plan for plan in encoded.entries},
        tensors=encoded.tensors,
    )
    walk.walk(manifest.tree, encoded.tree, ())
    return Comparison(
        entries_compared=walk.compared,
        entries_differing=walk.differing_entries,
        differing=walk.differing,
        first_difference=walk.first,
    )


__all__ = ["MAX_LISTED", "Comparison", "Difference", "compare_state", "element_stats", "preserved_global_state"]
