"""Where two runs of the same parameters first diverged, from their checkpoints' manifests alone.

Blobs are content addressed, so two checkpoints hold the same tensor exactly when their
entries name the same chunk digests: comparing two lineages needs no tensor to be read.
Checkpoints are paired by (tier, step, trigger) over each lineage and its light tier and
walked in step order; the first pair that differs is reported with what differs, causes first
(``replay.CAUSE_ORDER``: settings, counters, RNG and data position before the optimizer and
the weights), so "the loader's generator differed at step 10" is named before the weights it
went on to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..core.layout import LIGHT_SUFFIX
from ..core.manifest import Manifest
from ..core.store import Store
from .determinism import fingerprint_differences
from .replay import CAUSE_ORDER

Key = tuple[int, str, str]  # (step, tier, trigger)


@dataclass
class Divergence:
    """The first checkpoint at which two lineages differ."""

    step: int | None
    tier: str
    trigger: str
    versions: tuple[int | None, int | None]  # of each lineage (None: that lineage has no such checkpoint)
    differing: list[str] = field(default_factory=list)  # entries and components, causes first
    compared: int = 0  # checkpoint pairs found identical before this one
    # How the two saving processes computed differently (CPU, instruction set, threads, kernel-selecting
    # environment; ``determinism.execution_fingerprint``): {field: [a's value, b's value]}. A divergence in the
    # weights alone with a difference here is rounding from another kernel, not a random draw.
    execution: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def first_cause(self) -> str | None:
        return self.differing[0] if self.differing else None

    def describe(self, a: str, b: str) -> str:
        where = f"step {self.step} ({self.tier} {self.trigger})"
        if None in self.versions:
            missing = a if self.versions[0] is None else b
            return f"{a} and {b} first differ at {where}: {missing} has no such checkpoint"
        shown = ", ".join(self.differing[:6]) + (" ..." if len(self.differing) > 6 else "")
        text = f"{a} and {b} first differ at {where}, v{self.versions[0]} vs v{self.versions[1]}: {shown}"
        if self.execution:
            text += "; their processes computed differently: " + ", ".join(
                f"{name} {values[0]!r} vs {values[1]!r}" for name, values in self.execution.items()
            )
        return text


def _rank(name: str) -> tuple[int, str]:
    top = name.split("/", 1)[0]
    return (CAUSE_ORDER.index(top) if top in CAUSE_ORDER else len(CAUSE_ORDER), name)


def _leaves(store: Store, manifest: Manifest) -> dict[str, str]:
    """What each entry holds (its chunk digests, dtype, shape) and each component's plain values."""
    leaves = {
        entry.name: json.dumps([[c.content_digest for c in entry.chunks], entry.dtype, entry.shape])
        for entry in store.manifest_entries(manifest)
    }
    tree: Any = manifest.tree
    if isinstance(tree, dict) and isinstance(tree.get("dict"), list):
        for pair in tree["dict"]:  # top-level components: their non-tensor values sit in the tree
            if isinstance(pair, list) and len(pair) == 2:
                leaves[f"{pair[0]} (values)"] = json.dumps(pair[1], sort_keys=True)
    else:
        leaves["(values)"] = json.dumps(tree, sort_keys=True)
    return leaves


def _checkpoints(store: Store, lineage: str) -> dict[Key, int]:
    found: dict[Key, int] = {}
    for name in (lineage, lineage + LIGHT_SUFFIX):
        for info in store.list(name):
            key = (info.step if info.step is not None else -1, str(info.metadata.get("tier", "heavy")),
                   str(info.metadata.get("trigger", "")))  # fmt: skip
            found[key] = info.version
    return found


def first_divergence(store: Store, a: str, b: str) -> Divergence | None:
    """The first checkpoint (in step order) where lineages ``a`` and ``b`` differ, or None if none does."""
    ours, theirs = _checkpoints(store, a), _checkpoints(store, b)
    for compared, key in enumerate(sorted(set(ours) | set(theirs), key=lambda k: (k[0], k[1] == "heavy", k[2]))):
        step, tier, trigger = key
        version_a, version_b = ours.get(key), theirs.get(key)
        if version_a is None or version_b is None:
            return Divergence(step, tier, trigger, (version_a, version_b), compared=compared)
        manifest_a = store.resolve(a + ("" if tier == "heavy" else LIGHT_SUFFIX), version_a)[0]
        manifest_b = store.resolve(b + ("" if tier == "heavy" else LIGHT_SUFFIX), version_b)[0]
        left, right = _leaves(store, manifest_a), _leaves(store, manifest_b)
        differing = sorted(
            (name for name in set(left) | set(right) if left.get(name) != right.get(name)), key=_rank
        )  # fmt: skip
        if differing:
            execution = fingerprint_differences(
                manifest_a.metadata.get("execution"), manifest_b.metadata.get("execution")
            )
            return Divergence(step, tier, trigger, (version_a, version_b), differing, compared, execution)
    return None
