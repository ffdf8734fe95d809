"""Replay verification: is a lineage's training deterministic between two of its checkpoints?

``replay_check(store, lineage, v1, v2)`` restores checkpoint ``v1``, re-runs the pipeline's
training from ``v1``'s step to ``v2``'s step with the parameters the journal recorded for the run
that wrote ``v2`` (``run_started``), and compares the resulting state with ``v2``'s stored state
entry by entry, by the digests of the same canonical bytes the store hashes
(``training/replay.py``). It reports ``deterministic`` or the first entry that differs.

Nothing is written: the replayed state stays in memory, the lineage and its journal are only
read. The process's RNG states and determinism settings are put back afterwards.

The pipeline that wrote the lineage is found by the name its journal recorded, in the registry
(``flows/registry.py``); it opts in with ``register_pipeline(flow, replay=hook)``, where
``hook(segment: ReplaySegment)`` returns the state its training holds at ``segment.to_step``
(the example pipeline's hook drives ``examples.workload.replay_segment``).

``sample_segment`` picks two consecutive heavy checkpoints of a lineage for an audit to check;
``replay_check_task`` and the ``replay-check`` flow run a check under Prefect.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from ..blocks import CheckpointStore, open_store
from ..core import progress
from ..core.errors import CheckpointError, CheckpointNotFoundError
from ..core.journal import Journal
from ..core.journal_format import JournalEvent
from ..core.layout import LIGHT_SUFFIX, STEPS_SUFFIX
from ..core.lineage_history import fold_journal
from ..core.manifest import Manifest
from ..core.store import Store, core_store
from ..tasks.errors import RecoveryError, ReplayError
from ..tasks.pipeline_run import environment_differences
from ..training.replay import Difference, compare_state, preserved_global_state
from ..training.state_io import load_state
from .registry import replay_hook


@dataclasses.dataclass(frozen=True)
class ReplaySegment:
    """What a pipeline's replay hook re-runs: from checkpoint ``from_version`` to step ``to_step``.

    The hook restores ``from_version`` of ``lineage`` from ``store``, trains on to ``to_step``
    with ``parameters`` (what the run recorded in its ``run_started``), writes nothing, and returns
    the state a heavy checkpoint at ``to_step`` holds.
    """

    store: Any  # the CheckpointStore block, or a core Store
    lineage: str
    pipeline: str
    from_version: int
    from_step: int
    to_version: int
    to_step: int
    to_metadata: dict[str, Any]
    parameters: dict[str, Any]
    run: dict[str, Any] = dataclasses.field(repr=False)  # data of the run's run_started
    run_id: str | None = dataclasses.field(repr=False)  # that run's id
    events: list[JournalEvent] = dataclasses.field(repr=False)

    @property
    def core(self) -> Store:
        return core_store(self.store)

    def step_result(self, name: str) -> Any:
        """The stored result of ``@step`` ``name`` in this lineage (what the training got), or None.

        Taken from the latest ``step_completed`` of that step, preferring the run that wrote the
        segment's end; read from ``<lineage>.steps`` and verified like every read.
        """
        done = [e for e in self.events if e.kind == "step_completed" and e.data.get("step") == name]
        own = [e for e in done if e.run_id == self.run_id]
        chosen = (own or done)[-1:] if done else []
        if not chosen or not isinstance(chosen[0].data.get("result_version"), int):
            return None
        version = chosen[0].data["result_version"]
        state, _manifest = load_state(self.core, lineage=self.lineage + STEPS_SUFFIX, version=version)  # type: ignore[arg-type]
        return state["result"]


class ReplayReport(BaseModel):
    """The outcome of one replay check (``prefect-recovery replay-check --json`` prints it)."""

    lineage: str
    pipeline: str
    deterministic: bool = Field(description="Every entry and value of the replayed state equals the stored one.")
    from_version: int
    from_step: int
    to_version: int
    to_step: int
    steps_replayed: int
    entries_compared: int = Field(description="Tensor and bytes entries compared by digest.")
    entries_differing: int
    differing: list[str] = Field(
        description="What differs, causes first: settings, counters, RNG, data position, then optimizer and model "
        "(the first 50)."
    )
    first_difference: Difference | None = Field(
        description="The earliest cause that differs (RNG and data state before weights): name, dtype, shape, "
        "elements differing, max |diff|."
    )
    notes: list[str] = Field(
        default_factory=list, description="Differences between this environment and the run's, which may explain one."
    )
    seconds: float


def _resolve(core: Store, lineage: str, version: int, which: str) -> Manifest:
    try:
        return core.resolve(lineage, version)[0]
    except CheckpointNotFoundError as exc:
        raise ReplayError(f"--{which} {version}: {exc}. See `prefect-recovery ls --lineage {lineage}`.") from None


def _heavy_versions(core: Store, lineage: str) -> list[int]:
    try:
        infos = core.list(lineage)
    except CheckpointError:
        return []
    return [info.version for info in infos if info.metadata.get("tier") == "heavy" and not info.metadata.get("final")]


def _check_replayable(core: Store, lineage: str, manifest: Manifest, which: str) -> None:
    base = lineage.removesuffix(LIGHT_SUFFIX)
    if lineage.endswith(LIGHT_SUFFIX) or manifest.metadata.get("tier") == "light":
        raise ReplayError(
            f"--{which} {manifest.version}: {lineage} v{manifest.version} is a light-tier checkpoint (weights, RNG "
            f"and data position only), which training cannot resume from or be compared with; use heavy versions "
            f"of lineage {base!r}: {_heavy_versions(core, base) or 'none yet'}"
        )
    if manifest.metadata.get("final") is True:
        raise ReplayError(
            f"--{which} {manifest.version}: {lineage} v{manifest.version} is the pipeline's final checkpoint, "
            f"written after training (with its metrics), not by the training loop; compare training checkpoints: "
            f"{_heavy_versions(core, lineage) or 'none'}"
        )
    if manifest.step is None:
        raise ReplayError(f"--{which} {manifest.version}: {lineage} v{manifest.version} records no training step")


def _environment_notes(recorded: Any) -> list[str]:
    if not isinstance(recorded, dict):
        return []
    problems, warnings = environment_differences(recorded)  # what the recovery's preflight checks
    return problems + warnings


@contextmanager
def _steps_reported(from_step: int, to_step: int) -> Iterator[None]:
    """While the hook trains, show its steps against the segment (a terminal's bar: "train 4/10"): the
    Checkpointer reports its open-ended step count, which only the replay can turn into a fraction."""
    outer = progress.current_reporter()
    if outer is None:
        yield
        return

    def report(operation: str, done: int, total: int) -> None:
        if operation == "step" and total <= 0:
            outer("train", max(0, done - from_step), max(1, to_step - from_step))
        else:
            outer(operation, done, total)

    with progress.reporting(report):
        yield


def replay_check(store: Any, lineage: str, from_version: int, to_version: int) -> ReplayReport:
    """Re-run ``lineage``'s training from checkpoint ``from_version`` to ``to_version``'s step and
    compare the result with ``to_version``'s stored state, tensor by tensor. Writes nothing.

    Args:
        store: A CheckpointStore block or a core Store.
        lineage: The lineage (a pipeline run's ``lineage``; not its ``.light`` or ``.steps`` sibling).
        from_version: The checkpoint to start from (a heavy training checkpoint).
        to_version: A later heavy training checkpoint of the same lineage.

    Raises:
        ReplayError: a version that is not a consistent checkpoint, ``from_version >= to_version``,
            a light-tier or final checkpoint, a lineage without a pipeline run in its journal,
            a pipeline that is not registered here or registered no replay hook, or a hook that failed.
    """
    started = time.monotonic()
    core = core_store(store)
    if from_version >= to_version:
        raise ReplayError(
            f"--from {from_version} must be an earlier version than --to {to_version}; "
            f"see `prefect-recovery ls --lineage {lineage}` for the lineage's versions and steps"
        )
    source = _resolve(core, lineage, from_version, "from")
    target = _resolve(core, lineage, to_version, "to")
    _check_replayable(core, lineage, source, "from")
    _check_replayable(core, lineage, target, "to")
    assert source.step is not None and target.step is not None
    if target.step < source.step:
        raise ReplayError(
            f"{lineage} v{to_version} is at step {target.step}, before v{from_version}'s step {source.step}: "
            "they are not one run of training going forward; pick versions in step order"
        )
    events = Journal(core, lineage).events()
    writer = fold_journal(events).writer_of(to_version)
    run = dict(writer.data) if writer is not None else {}
    if not isinstance(run.get("pipeline"), str):
        raise ReplayError(
            f"lineage {lineage!r} has no pipeline run in its journal, so there is no pipeline or parameters to "
            "replay with; only lineages written by a registered pipeline (PipelineRun) can be replay-checked"
        )
    pipeline = str(run["pipeline"])
    try:
        hook = replay_hook(pipeline)
    except RecoveryError as exc:
        raise ReplayError(str(exc)) from None
    if hook is None:
        raise ReplayError(
            f"pipeline {pipeline!r} (which wrote lineage {lineage!r}) registered no replay hook; register it with "
            "register_pipeline(flow, replay=hook), where hook(segment) re-runs its training from "
            "segment.from_version to segment.to_step and returns the state, saving nothing"
        )
    segment = ReplaySegment(
        store=store,
        lineage=lineage,
        pipeline=pipeline,
        from_version=from_version,
        from_step=source.step,
        to_version=to_version,
        to_step=target.step,
        to_metadata=dict(target.metadata),
        parameters=dict(run.get("parameters") or {}),
        run=run,
        run_id=writer.run_id if writer is not None else None,
        events=events,
    )
    with preserved_global_state(), _steps_reported(source.step, target.step):
        try:
            state = hook(segment)
        except CheckpointError:
            raise
        except Exception as exc:
            raise ReplayError(
                f"the replay hook of pipeline {pipeline!r} failed on {lineage} v{from_version} -> v{to_version}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    comparison = compare_state(core, target, state)
    return ReplayReport(
        lineage=lineage,
        pipeline=pipeline,
        deterministic=comparison.identical,
        from_version=from_version,
        from_step=source.step,
        to_version=to_version,
        to_step=target.step,
        steps_replayed=target.step - source.step,
        entries_compared=comparison.entries_compared,
        entries_differing=comparison.entries_differing,
        differing=comparison.differing,
        first_difference=comparison.first_difference,
        notes=_environment_notes(run.get("environment")),
        seconds=round(time.monotonic() - started, 3),
    )


def sample_segment(
    store: Any, lineage: str, rng: random.Random | None = None, *, run_id: str | None = None
) -> tuple[int, int] | None:
    """Two consecutive heavy training checkpoints ``(v1, v2)`` of ``lineage`` with ``v2``'s step past
    ``v1``'s, chosen with ``rng``; None when the lineage has no such pair.

    With ``run_id``, only checkpoints that run committed (its ``checkpoint_committed`` events).
    Light-tier, final and step-less versions are never chosen.
    """
    core = core_store(store)
    if lineage.endswith((LIGHT_SUFFIX, STEPS_SUFFIX)):
        return None
    try:
        infos = core.list(lineage)
    except CheckpointError:
        return None
    if run_id is not None:
        mine = {
            e.data.get("version")
            for e in Journal(core, lineage).events()
            if e.kind == "checkpoint_committed" and e.run_id == run_id
        }
        infos = [info for info in infos if info.version in mine]
    heavy = sorted(
        (info for info in infos if info.metadata.get("tier") == "heavy" and not info.metadata.get("final")),
        key=lambda info: info.version,
    )
    heavy = [info for info in heavy if info.step is not None]
    pairs = [
        (a.version, b.version)
        for a, b in itertools.pairwise(heavy)
        if b.step > a.step  # type: ignore[operator]
    ]
    if not pairs:
        return None
    return (rng or random.Random()).choice(pairs)


# -- Prefect ---------------------------------------------------------------------------------------
@task(name="replay-check", cache_policy=NO_CACHE, persist_result=False)
def replay_check_task(store: CheckpointStore, lineage: str, from_version: int, to_version: int) -> ReplayReport:
    """``replay_check`` as a Prefect task (for the audit flow)."""
    report = replay_check(store, lineage, from_version, to_version)
    logger = get_run_logger()
    if report.deterministic:
        logger.info("replay %s v%s -> v%s: deterministic", lineage, from_version, to_version)
    else:
        logger.warning("replay %s v%s -> v%s: %s", lineage, from_version, to_version, describe(report))
    return report


def describe(report: ReplayReport) -> str:
    """One line saying what the check found."""
    head = (
        f"{report.lineage} v{report.from_version} (step {report.from_step}) -> v{report.to_version} "
        f"(step {report.to_step}), {report.steps_replayed} steps replayed, {report.entries_compared} entries compared"
    )
    if report.deterministic:
        return f"deterministic: {head}"
    diff = report.first_difference
    assert diff is not None
    what = f"{diff.name}"
    if diff.dtype is not None:
        what += f" ({diff.dtype}{diff.shape})"
    if diff.elements_differing is not None:
        what += f": {diff.elements_differing} of {diff.elements} elements differ"
    if diff.max_abs_diff is not None:
        what += f", max |diff| {diff.max_abs_diff:.6g}"
    if diff.detail:
        what += f" ({diff.detail})"
    return f"NOT deterministic: {head}; {report.entries_differing} entries differ, first {what}"


@flow(name="replay-check", log_prints=True)
def replay_check_flow(
    lineage: str,
    from_version: int,
    to_version: int,
    store_block: CheckpointStore | str | None = None,
    fail_on_difference: bool = True,
) -> dict[str, Any]:
    """Re-run a lineage's training between two checkpoints and compare with the stored state.

    Args:
        lineage: The lineage to check.
        from_version: Checkpoint to start from.
        to_version: Later checkpoint whose stored state the replay must reproduce.
        store_block: A CheckpointStore block (the UI's Custom run form offers a picker) or a saved one's
            name (the CLI's form); default the embedded local store.
        fail_on_difference: Fail the run (after publishing the report) when the replay differs.
    """
    store = open_store(store_block)
    report = replay_check_task(store, lineage, from_version, to_version)
    create_markdown_artifact(
        key="replay-" + (re.sub(r"[^a-z0-9-]+", "-", lineage.lower()).strip("-") or "lineage"),
        markdown=f"# Replay check of `{lineage}`\n\n{describe(report)}\n",
        description=f"Replay check of lineage {lineage}",
    )
    if fail_on_difference and not report.deterministic:
        raise ReplayError(describe(report))
    return report.model_dump(mode="json")


__all__ = [
    "ReplayReport",
    "ReplaySegment",
    "describe",
    "replay_check",
    "replay_check_flow",
    "replay_check_task",
    "sample_segment",
]
