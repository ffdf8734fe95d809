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

from ..core.errors import CheckpointError, CheckpointNotFoundError
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
    # Set when every shared checkpoint was identical and one lineage simply stops earlier: its last step.
    ended_at: int | None = None
    # How the two pipeline runs were started differently (``run_differences``: parameters, input file contents,
    # code), from each lineage's first ``run_started``: a cause that comes before every step.
    runs: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def first_cause(self) -> str | None:
        return self.differing[0] if self.differing else None

    def describe(self, a: str, b: str) -> str:
        text = self._describe(a, b)
        if self.runs:
            text += "; their runs were started differently: " + ", ".join(
                f"{name} {values[0]!r} vs {values[1]!r}" for name, values in self.runs.items()
            )
        return text

    def _describe(self, a: str, b: str) -> str:
        where = f"step {self.step} ({self.tier} {self.trigger})"
        if None in self.versions:
            missing, other = (a, b) if self.versions[0] is None else (b, a)
            if self.ended_at is not None:
                return (
                    f"{a} and {b}: the {self.compared} checkpoint(s) both have are identical; {missing} ends at step "
                    f"{self.ended_at}, {other} goes on (first at {where})"
                )
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


def _is_container(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("dict", "list", "tuple")


def _values(node: Any, path: str, out: dict[str, str]) -> None:
    """Each plain value of a state tree under the path a user knows it by (``optimizer/param_groups/0/lr``,
    ``rng/python``, ``counters/step``); tensors and bytes are entries, compared by digest elsewhere.

    Dicts are walked key by key, and so are lists whose items are all containers (the optimizer's
    param_groups); a list of plain values (a Python RNG state, a group's parameter ids) is one value."""
    if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("tensor", "bytes"):
        return
    if isinstance(node, dict) and isinstance(node.get("dict"), list) and len(node) == 1:
        if not node["dict"]:
            out[path or "(values)"] = "{}"
        for pair in node["dict"]:
            if isinstance(pair, list) and len(pair) == 2:
                _values(pair[1], f"{path}/{pair[0]}" if path else str(pair[0]), out)
        return
    items = node.get("list", node.get("tuple")) if _is_container(node) else None
    if isinstance(items, list) and items and all(_is_container(item) for item in items):
        for index, item in enumerate(items):
            _values(item, f"{path}/{index}", out)
        return
    out[path or "(values)"] = json.dumps(node, sort_keys=True)


def _leaves(store: Store, manifest: Manifest) -> dict[str, str]:
    """What each entry holds (its chunk digests, dtype, shape) and each plain value of the state, by path."""
    leaves = {
        entry.name: json.dumps([[c.content_digest for c in entry.chunks], entry.dtype, entry.shape])
        for entry in store.manifest_entries(manifest)
    }
    values: dict[str, str] = {}
    _values(manifest.tree, "", values)
    for name, value in values.items():  # a value named like an entry cannot hide it
        leaves[name if name not in leaves else f"{name} (value)"] = value
    return leaves


def _run_record(store: Store, lineage: str) -> dict[str, Any]:
    """What a lineage's first pipeline run was started with, flattened: ``parameters.lr``, the content of each
    input file (``inputs.corpus.digest``/``.size``; not its path), ``code_digest``, ``pipeline``."""
    from ..core.journal import Journal

    try:
        events = Journal(store, lineage).events()
    except CheckpointError:  # an unreadable journal is not a reason to refuse the checkpoint comparison
        return {}
    started = next((event.data for event in events if event.kind == "run_started"), None)
    if not isinstance(started, dict):
        return {}
    record: dict[str, Any] = {"pipeline": started.get("pipeline"), "code_digest": started.get("code_digest")}
    parameters = started.get("parameters")
    if isinstance(parameters, dict):  # a parameter naming the lineage itself differs between any two runs
        record |= {f"parameters.{k}": v for k, v in parameters.items() if v != lineage}
    inputs = started.get("inputs")
    if isinstance(inputs, dict):
        for name, value in inputs.items():
            content = {k: v for k, v in value.items() if k != "uri"} if isinstance(value, dict) else {"": value}
            record |= {f"inputs.{name}" + (f".{k}" if k else ""): v for k, v in content.items()}
    return record


def run_differences(store: Store, a: str, b: str) -> dict[str, list[Any]]:
    """``{field: [a's, b's]}`` where the first pipeline runs of ``a`` and ``b`` were started differently
    (parameters, input contents, code); empty when they agree or either has no pipeline run in its journal."""
    left, right = _run_record(store, a), _run_record(store, b)
    if not left or not right:
        return {}
    return {name: [left.get(name), right.get(name)] for name in sorted(set(left) | set(right))
            if left.get(name) != right.get(name)}  # fmt: skip


def _checkpoints(store: Store, lineage: str) -> dict[Key, int]:
    found: dict[Key, int] = {}
    for name in (lineage, lineage + LIGHT_SUFFIX):
        for info in store.list(name):
            key = (info.step if info.step is not None else -1, str(info.metadata.get("tier", "heavy")),
                   str(info.metadata.get("trigger", "")))  # fmt: skip
            found[key] = info.version
    return found


def first_divergence(store: Store, a: str, b: str) -> Divergence | None:
    """The first checkpoint (in step order) where lineages ``a`` and ``b`` differ, or None if none does.

    Checkpoints are paired by (step, tier, trigger). One that only one lineage has (a timebox save, a
    save skipped under backpressure) says nothing about the training and is passed over; a lineage
    that stops before the other is reported at the first checkpoint past its end, after every pair
    they share was found identical.

    Raises:
        CheckpointNotFoundError: a lineage without any checkpoint in ``store``, or two lineages
            without a single checkpoint at the same step to compare.
    """
    ours, theirs = _checkpoints(store, a), _checkpoints(store, b)
    for name, found in ((a, ours), (b, theirs)):
        if name.endswith(LIGHT_SUFFIX):  # its light checkpoints are paired with the heavy ones of its base
            base = name.removesuffix(LIGHT_SUFFIX)
            raise CheckpointNotFoundError(
                f"{name!r} is the light tier of lineage {base!r}; compare lineages by their base name "
                f"({base!r}): their light and heavy checkpoints are paired together"
            )
        if not found:
            raise CheckpointNotFoundError(
                f"lineage {name!r} has no checkpoint in this store, so there is nothing to compare; "
                "see `prefect-recovery ls` for the lineages it holds"
            )
    order = sorted(set(ours) | set(theirs), key=lambda k: (k[0], k[1] == "heavy", k[2]))
    shared = [key for key in order if key in ours and key in theirs]
    if not shared:
        raise CheckpointNotFoundError(
            f"lineages {a!r} and {b!r} have no checkpoint at the same step and trigger to compare ({a} saved at "
            f"steps {_steps(ours)}, {b} at steps {_steps(theirs)}); compare runs of the same schedule"
        )
    for compared, key in enumerate(shared):
        step, tier, trigger = key
        version_a, version_b = ours[key], theirs[key]
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
            found = Divergence(step, tier, trigger, (version_a, version_b), differing, compared, execution)
            found.runs = run_differences(store, a, b)
            return found
    last_a, last_b = max(key[0] for key in ours), max(key[0] for key in theirs)
    if last_a == last_b:
        return None
    longer, last = (theirs, last_a) if last_a < last_b else (ours, last_b)
    step, tier, trigger = next(key for key in order if key[0] > last and key in longer)
    versions = (ours.get((step, tier, trigger)), theirs.get((step, tier, trigger)))
    return Divergence(step, tier, trigger, versions, compared=len(shared), ended_at=last,
                      runs=run_differences(store, a, b))  # fmt: skip


def _steps(found: dict[Key, int]) -> str:
    steps = sorted({key[0] for key in found})
    return ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
