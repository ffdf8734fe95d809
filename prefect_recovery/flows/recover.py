"""The ``recover`` flow: preflight, select and verify a checkpoint, resume the pipeline.

1. Read the lineage's journal (the store is the source of truth, not Prefect's database): a
   finished lineage is reported and nothing changes.
2. Preflight checks (tasks/preflight.py), published as a table artifact. ``strict`` stops on
   any failure; ``warn`` goes on except when another live run or recovery holds the lineage.
3. Claim the lineage (``recovery_started``; of two recoveries at once exactly one proceeds).
4. Run the pipeline that wrote the lineage again with its recorded parameters, on the store this
   recovery opened (``shared_store``: the block is loaded once): finished steps are reused from
   the store, the training step's ``Checkpointer`` restores the selected checkpoint (its
   ``run.resume_point()``), later steps run.
5. Journal ``recovery_finished``.

The selected checkpoint's blobs are read once, by the restore itself. Selecting it already checked
its manifest (signature, write quorum) and that every blob it names is present with its size in
some region; the restore checks every blob against its digest before anything is handed out
and falls over to another region's copy. A blob with no intact copy anywhere stops the recovery
with a ``RecoveryError`` naming the version and what to do (repair, or an earlier version).
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from ..blocks import CheckpointStore, open_store, shared_store
from ..core.errors import BlobUnavailableError, CheckpointError, CheckpointNotFoundError
from ..core.journal import Journal
from ..core.lineage_history import fold_journal
from ..core.manifest import Manifest
from ..core.run_lookup import lineages_of_run
from ..deploy import DEFAULT_MAX_ATTEMPTS
from ..tasks.code import code_modules
from ..tasks.errors import PreflightError, RecoveryError
from ..tasks.pipeline_run import RecoveryPlan, claim_lineage, current_run_id, recovery_plan
from ..tasks.preflight import PreflightContext, artifact_key, as_rows, preflight_task
from ..tasks.step import STEP_CODE, code_digest
from ..telemetry import emit_recovery_finished, emit_recovery_started
from .lineage_status import LineageStatus, finished_result, lineage_status
from .registry import resolve_pipeline


def _select(store: CheckpointStore, status: LineageStatus, checkpoint: str | int) -> tuple[Manifest | None, list[str]]:
    """The manifest to resume from and the regions holding it. ``resolve`` checks the manifest
    (signature, quorum) and the presence and size of every blob it names; the blobs' bytes are read
    once, by the restore."""
    lineage = status.lineage
    if str(checkpoint) == "latest":
        if status.latest is None:  # lineage_status listed the lineage's consistent checkpoints already
            return None, []
        version = status.latest.version
    else:
        try:
            version = int(checkpoint)
        except ValueError:
            raise RecoveryError(f"checkpoint must be 'latest' or a version number, got {checkpoint!r}") from None
    try:
        return store.core.resolve(lineage, version)
    except CheckpointNotFoundError as exc:
        raise RecoveryError(
            f"checkpoint {lineage} v{version} is not a consistent checkpoint ({exc}); "
            f"see `prefect-recovery ls --lineage {lineage}`"
        ) from None


def _unrestorable(exc: BaseException, store: CheckpointStore, manifest: Manifest | None) -> RecoveryError | None:
    """A ``RecoveryError`` naming the checkpoint and what to do, when ``exc`` (or its cause) is a blob
    of the checkpoint this recovery resumes from that no region holds an intact copy of."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and not isinstance(cause, BlobUnavailableError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if manifest is None or not isinstance(cause, BlobUnavailableError):
        return None
    if cause.digest not in store.core.manifest_blobs(manifest):  # pages and the blobs they name, either form
        return None
    lineage, version = manifest.lineage, manifest.version
    try:
        earlier = [v for v in store.core.consistent_versions(lineage) if v < version]
    except CheckpointError:
        earlier = []
    instead = (
        f", or recover from the earlier v{earlier[-1]}: `prefect-recovery recover --lineage {lineage} "
        f"--checkpoint {earlier[-1]}`"
        if earlier
        else " (it has no earlier consistent version to resume from instead)"
    )
    return RecoveryError(
        f"checkpoint {lineage} v{version} cannot be restored: {cause} Nothing was restored from it. "
        f"Repair it from an intact copy with `prefect-recovery verify --repair --lineage {lineage}` and recover "
        f"again{instead}"
    )


def _crashed_run_parameters(run_id: str) -> dict[str, Any]:
    """The parameters Prefect recorded for flow run ``run_id`` ({} when Prefect cannot tell): only a hint of
    which lineages to read first, never the answer (that is the journal's)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return dict(client.read_flow_run(UUID(run_id)).parameters or {})
    except Exception:  # not a flow-run id, no API, unknown run: read every journal instead
        return {}


def lineage_of_run(store: CheckpointStore, run_id: str) -> str:
    """The lineage flow run ``run_id`` worked on, from the journals (core/run_lookup.py): the lineage whose
    journal holds an event of that run (its ``run_started``, or a recovery's ``recovery_started``), however
    the pipeline named or derived its lineage. A run that journaled nothing, or events in several lineages,
    is a ``RecoveryError`` that says so: nothing is guessed."""
    hints = _crashed_run_parameters(run_id)
    candidates = [value for value in hints.values() if isinstance(value, str)]
    found = lineages_of_run(store.core, run_id, candidates)
    where = ", ".join(region.url for region in store.regions)
    if len(found.lineages) == 1:
        return found.lineages[0]
    if found.lineages:
        raise RecoveryError(
            f"flow run {run_id} journaled events in several lineages ({', '.join(found.lineages)}) of the store "
            f"at {where}: recover each with `prefect-recovery recover --lineage NAME`"
        )
    unreadable = (
        f"; {len(found.unreadable)} journals could not be read ({', '.join(sorted(found.unreadable)[:5])}): run "
        "`prefect-recovery verify`, then recover again"
        if found.unreadable
        else ""
    )
    raise RecoveryError(
        f"flow run {run_id} journaled nothing in the store at {where} ({found.searched} lineage journals read"
        f"{unreadable}): it crashed before its pipeline opened PipelineRun (or it used another store), so no "
        "lineage is known to recover and nothing was changed. Check its logs; if it did work on a lineage, "
        "recover it by name: `prefect-recovery recover --lineage NAME`"
    )


@flow(name="recover", log_prints=True)
def recover(
    lineage: str = "",  # plain text, not Optional: the UI's Custom run form shows a text field to type it in
    checkpoint: str = "latest",
    from_step: str | None = None,
    preflight: Literal["strict", "warn"] = "strict",
    store_block: CheckpointStore | str | None = None,
    regions: list[str] | None = None,
    write_quorum: int = 1,
    crashed_run: str | None = None,
    attempt: int = 1,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> dict[str, Any]:
    """Recover a crashed or failed pipeline run: preflight, restore, resume at the failed step.

    Args:
        lineage: The lineage to recover; leave it empty to give `crashed_run` instead.
        checkpoint: "latest" (the latest consistent checkpoint) or a version number.
        from_step: Run this step and every later one again even if they finished.
        preflight: "strict" stops on any failed check; "warn" reports and goes on.
        store_block: A CheckpointStore block (the UI's Custom run form offers a picker) or a saved one's
            name (the CLI's form); default the embedded local store.
        regions: Region URLs of the store instead of a block (with ``write_quorum``).
        write_quorum: Write quorum of ``regions``.
        crashed_run: The id of the crashed flow run (a pipeline run or a recovery): its lineage is the one
            whose journal holds that run's events, whatever the pipeline's parameters are called.
        attempt: Which attempt at recovering this crash this is (auto-recovery counts crashed recoveries).
        max_attempts: Refuse, changing nothing, when ``attempt`` exceeds it.
    """
    logger = get_run_logger()
    if attempt > max_attempts:
        raise RecoveryError(
            f"recovery attempt {attempt} of {lineage or f'the lineage of flow run {crashed_run}'} refused: "
            f"{max_attempts} attempts crashed already (max_attempts). Nothing was changed; find why the recoveries "
            "crash (their logs, `prefect-recovery history`), then recover by hand: "
            "`prefect-recovery recover --lineage NAME`"
        )
    store = open_store(store_block, regions, write_quorum)
    if not lineage:
        if not crashed_run:
            raise RecoveryError("recover needs a lineage or the id of a crashed flow run (crashed_run)")
        lineage = lineage_of_run(store, crashed_run)
        logger.info("flow run %s worked on lineage %s (from its journal)", crashed_run, lineage)
    status = lineage_status(store, lineage)
    if status.status == "new":
        where = ", ".join(region.url for region in store.regions)
        raise RecoveryError(
            f"lineage {lineage!r} has no journal and no checkpoints in the store at {where}: nothing to recover "
            "(the default store is $PREFECT_RECOVERY_HOME, else ./.prefect-recovery under the working directory)"
        )
    journal = Journal(store.core, lineage)
    if status.status == "finished":
        logger.info("lineage %s already finished; nothing to recover and nothing changed", lineage)
        return finished_result(store, status)
    events, history = status.events, status.history  # the journal, read once for the whole recovery
    started = history.current_run_start
    if started is None or started.pipeline is None:
        raise RecoveryError(f"lineage {lineage!r} has no pipeline run in its journal; run the pipeline instead")
    pipeline = resolve_pipeline(started.pipeline)
    parameters = started.parameters
    if from_step is not None:
        known = {str(e.data.get("step")) for e in events if e.kind in ("step_started", "step_completed")}
        known |= set(STEP_CODE)  # steps defined by the pipeline's modules, run or not
        if from_step not in known:
            raise RecoveryError(
                f"from_step {from_step!r} is not a step of lineage {lineage!r}; its steps are {sorted(known)}"
            )
    manifest, holders = _select(store, status, checkpoint)
    run_id = current_run_id()

    ctx = PreflightContext(
        store=store.core,
        lineage=lineage,
        events=events,
        run_started=started,
        manifest=manifest,
        holders=holders,
        pipeline_code=code_digest(pipeline.fn),
        pipeline_modules=code_modules(pipeline.fn),
        run_id=run_id,
    )
    results = preflight_task(ctx, lineage)
    failed = [r for r in results if r.status == "fail"]
    blocking = failed if preflight == "strict" else [r for r in failed if r.check == "lineage lock"]
    if blocking:
        raise PreflightError(
            f"recovery of lineage {lineage!r} stopped by preflight ({preflight}): "
            + "; ".join(f"{r.check}: {r.reason}" for r in blocking),
            as_rows(results),
        )
    where = history.failed_step or history.interrupted_step
    resumed_from = {"version": manifest.version, "step": manifest.step} if manifest else None
    claim_lineage(
        journal,
        "recovery_started",
        run_id=run_id,
        data={
            "checkpoint": resumed_from,
            "from_step": from_step,
            "preflight": preflight,
            "failed_step": where,
            "checks": {r.check: r.status for r in results},
        },
        exclude=set(),
    )
    emit_recovery_started(lineage, run_id=run_id, checkpoint=resumed_from, failed_step=where, from_step=from_step,
                          preflight=preflight, regions=store.core.region_names)  # fmt: skip
    try:
        plan = RecoveryPlan(
            lineage=lineage,
            recovery_run=run_id,
            resume_version=manifest.version if manifest else None,
            from_step=from_step,
        )
        logger.info(
            "resuming %s (pipeline %s) at step %s from %s",
            lineage,
            pipeline.name,
            where,
            f"v{manifest.version} (step {manifest.step})" if manifest else "the start (no checkpoint yet)",
        )
        # The pipeline's own open_store(...) gets this store: one block load per recovery.
        with recovery_plan(plan), shared_store(store):
            result = pipeline(**parameters)
    except BaseException as exc:
        unrestorable = _unrestorable(exc, store, manifest)
        failure = unrestorable or exc
        error = f"{type(failure).__name__}: {failure}"[:2000]
        journal.append("recovery_finished", run_id=run_id, data={"status": "failed", "error": error})
        emit_recovery_finished(lineage, None, False, run_id=run_id, resumed_from=resumed_from, error=error)
        if unrestorable is not None:
            logger.error("%s", unrestorable)
            raise unrestorable from exc
        raise
    new_events = journal.events(after=events[-1].seq if events else 0)
    reused = [
        str(event.data.get("step"))
        for event in new_events
        if event.kind == "step_completed" and event.data.get("reused") is True
    ]
    # What the run ended with comes from the journal (the flow may return anything, or None).
    outputs = fold_journal(new_events).final or {}
    if outputs.get("final_version") is None and isinstance(result, dict):
        outputs = {key: result.get(key) for key in ("final_version", "final_digest")}
    final_version, final_digest_ = outputs.get("final_version"), outputs.get("final_digest")
    journal.append(
        "recovery_finished",
        run_id=run_id,
        data={
            "status": "completed",
            "final_version": final_version,
            "final_digest": final_digest_,
            "reused_steps": reused,
        },
    )
    emit_recovery_finished(lineage, final_version, True, run_id=run_id, resumed_from=resumed_from,
                           final_digest=final_digest_, reused_steps=reused)  # fmt: skip
    summary = {
        "lineage": lineage,
        "status": "recovered",
        "final_version": final_version,
        "final_digest": final_digest_,
        "resumed_from": resumed_from,
        "failed_step": where,
        "reused_steps": reused,
        "preflight": as_rows(results),
    }
    create_markdown_artifact(
        key=artifact_key("recovery", lineage),
        markdown=(
            f"# Recovery of `{lineage}`\n\n"
            f"* resumed at step `{where}` from "
            + (f"checkpoint v{manifest.version} (training step {manifest.step})" if manifest else "the start")
            + f"\n* reused steps: {', '.join(reused) or 'none'}\n"
            f"* final checkpoint v{summary['final_version']}, state digest `{summary['final_digest']}`\n"
        ),
        description=f"Recovery of lineage {lineage}",
    )
    return summary


__all__ = ["recover"]
