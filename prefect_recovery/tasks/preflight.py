"""Preflight checks a recovery runs before it touches anything.

Each check returns a ``CheckResult`` (pass / warn / fail, with a reason that says what to fix).
They read the lineage's journal (what the crashed run recorded) and the selected checkpoint's
manifest, and compare with this machine. Only the storage check writes: one probe object per
region, deleted again.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from ..core.errors import CheckpointError
from ..core.journal import JournalEvent
from ..core.lineage_history import RunRecord
from ..core.manifest import Manifest
from ..core.region import LocalRegionIO
from ..core.store import Store
from ..training.encoding import DTYPES
from .code import changed_units, digest_of
from .pipeline_run import describe_claim, environment, environment_differences, file_input, live_claims
from .step import STEP_CODE

Status = Literal["pass", "warn", "fail"]
# Extra free bytes every local restore target must keep beyond what the restore needs.
HEADROOM_ENV = "PREFECT_RECOVERY_MIN_FREE_BYTES"
DEFAULT_HEADROOM = 64 * 2**20


class CheckResult(BaseModel):
    check: str
    status: Status
    reason: str


class PreflightContext(BaseModel):
    """What the checks look at."""

    model_config = {"arbitrary_types_allowed": True}

    store: Store
    lineage: str
    events: list[JournalEvent]
    run_started: RunRecord | None  # the run being recovered (the journal's last run_started)
    manifest: Manifest | None
    holders: list[str] = []  # the regions holding the selected manifest's committed copy
    pipeline_code: str | None = None
    pipeline_modules: dict[str, str] | None = None
    run_id: str = ""


def _result(check: str, problems: list[str], warnings: list[str], ok: str) -> CheckResult:
    if problems:
        return CheckResult(check=check, status="fail", reason="; ".join(problems))
    if warnings:
        return CheckResult(check=check, status="warn", reason="; ".join(warnings))
    return CheckResult(check=check, status="pass", reason=ok)


def check_environment(ctx: PreflightContext) -> CheckResult:
    """Python, library versions, CUDA and threads against what the crashed run recorded."""
    if ctx.run_started is None:
        return CheckResult(check="environment", status="warn", reason="the journal records no run to compare with")
    recorded = ctx.run_started.data.get("environment")
    if not isinstance(recorded, dict):
        return CheckResult(check="environment", status="warn", reason="the run recorded no environment")
    now = environment()
    problems, warnings = environment_differences(recorded, now)
    if problems:
        problems.append("install the versions the run used (bit-identical results depend on them)")
    return _result("environment", problems, warnings, f"Python {now['python']}, same libraries as the run")


def check_dtypes(ctx: PreflightContext) -> CheckResult:
    """Every dtype the checkpoint stores exists in this torch build."""
    if ctx.manifest is None:
        return CheckResult(check="dtypes", status="pass", reason="no checkpoint to restore: training starts afresh")
    entries = ctx.store.manifest_entries(ctx.manifest, prefer=ctx.holders)
    stored = {entry.dtype for entry in entries if entry.kind == "tensor" and entry.dtype}
    unknown = sorted(stored - set(DTYPES))
    if unknown:
        return CheckResult(
            check="dtypes",
            status="fail",
            reason=f"this torch cannot read the stored dtypes {unknown}; install the torch version the run used",
        )
    return CheckResult(check="dtypes", status="pass", reason=f"all {len(stored)} stored dtypes are readable")


def check_checkpoint(ctx: PreflightContext) -> CheckResult:
    """The checkpoint to resume from, without reading its blobs: selecting it (``Store.resolve``)
    checked its manifest (schema, signature on a signing store, committed at the write quorum) and
    that every blob it names is present with its size in some region. The blobs' digests are
    checked once, by the restore, before anything is handed out (a damaged copy falls over to
    another region's)."""
    manifest = ctx.manifest
    if manifest is None:
        return CheckResult(check="checkpoint", status="pass", reason="no checkpoint to restore: training starts afresh")
    signed = ", signed" if manifest.signature is not None else ""
    where = ", ".join(ctx.holders) or "its regions"
    if manifest.pages is not None:  # paged (FORMAT.md, "Entry pages"): resolve checked the pages only
        present = f"its {len(manifest.pages)} entry pages present ({manifest.total_bytes:,} bytes of state)"
    else:
        blobs = manifest.blob_digests()  # delta parents included
        present = f"its {len(blobs)} blobs present with their sizes ({manifest.total_bytes:,} bytes)"
    return CheckResult(
        check="checkpoint",
        status="pass",
        reason=f"v{manifest.version} (step {manifest.step}): manifest valid{signed} and committed in {where}; "
        f"{present}, each blob checked against its digest as the restore reads it",
    )


def check_storage(ctx: PreflightContext) -> CheckResult:
    """Every region reachable and writable (a probe object, deleted again); quorum available."""
    problems, failing = [], []
    for region in ctx.store.regions:
        key = f"preflight/{uuid.uuid4().hex}"
        try:
            region.probe()
            region.put_if_absent(key, b"prefect-recovery preflight probe")
            region.delete(key)
        except CheckpointError as exc:
            failing.append(region.name)
            problems.append(f"region {region.name}: {exc}")
    usable = len(ctx.store.regions) - len(failing)
    if usable < ctx.store.write_quorum:
        problems.append(
            f"only {usable} of {len(ctx.store.regions)} regions usable, the write quorum is {ctx.store.write_quorum}: "
            "new checkpoints could not commit. Bring the regions back (or lower write_quorum) and retry"
        )
        return CheckResult(check="storage", status="fail", reason="; ".join(problems))
    if problems:  # quorum still met: a degraded store, repaired later by verify --repair
        return CheckResult(check="storage", status="warn", reason="; ".join(problems))
    return CheckResult(
        check="storage",
        status="pass",
        reason=f"{usable} regions reachable and writable (write quorum {ctx.store.write_quorum})",
    )


def check_data(ctx: PreflightContext) -> CheckResult:
    """Inputs the run recorded still exist and still have their digests."""
    inputs = ctx.run_started.data.get("inputs") if ctx.run_started else None
    files = {name: spec for name, spec in (inputs or {}).items() if isinstance(spec, dict) and "uri" in spec}
    if not files:
        return CheckResult(check="data", status="pass", reason="the run recorded no external input files")
    problems = []
    for name, spec in sorted(files.items()):
        uri = str(spec["uri"])
        try:
            now = file_input(uri)
        except (OSError, ValueError) as exc:
            problems.append(f"input {name!r} at {uri} cannot be read ({type(exc).__name__}: {exc}); restore the file")
            continue
        if now["digest"] != spec.get("digest"):
            problems.append(
                f"input {name!r} at {uri} changed since the run (digest {spec.get('digest')} recorded, "
                f"{now['digest']} now); restore the original file, or start a new lineage for the new data"
            )
    return _result("data", problems, [], f"{len(files)} input file(s) present with their recorded digests")


def _local_paths(store: Store) -> list[Path]:
    paths = [Path(tempfile.gettempdir())]
    paths += [region.root for region in store.regions if isinstance(region, LocalRegionIO)]
    return paths


def check_disk(ctx: PreflightContext) -> CheckResult:
    """Room for the restore: each local region and the temp dir keep the checkpoint's size plus headroom."""
    need = ctx.manifest.total_bytes if ctx.manifest is not None else 0
    headroom = int(os.environ.get(HEADROOM_ENV, DEFAULT_HEADROOM))
    problems = []
    for path in _local_paths(ctx.store):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need + headroom:
            problems.append(
                f"{path} has {free:,} bytes free; the restore needs {need:,} plus {headroom:,} headroom "
                f"({HEADROOM_ENV}). Free some space and retry"
            )
    return _result("disk", problems, [], f"enough free space for {need:,} bytes of checkpoint")


def check_code(ctx: PreflightContext) -> CheckResult:
    """Code drift since the run: the pipeline and each finished step (a warning, never a failure)."""
    warnings = []
    recorded = ctx.run_started.data.get("code_digest") if ctx.run_started else None
    recorded_modules = ctx.run_started.data.get("code_modules") if ctx.run_started else None
    if recorded and ctx.pipeline_code and recorded != ctx.pipeline_code:
        what = ""
        if isinstance(recorded_modules, dict) and ctx.pipeline_modules:
            what = ": " + ", ".join(changed_units(recorded_modules, ctx.pipeline_modules))
        warnings.append(f"the pipeline's code changed since the run{what}")
    drifted: dict[str, str] = {}
    for event in ctx.events:
        step, code, then = event.data.get("step"), event.data.get("code"), event.data.get("code_modules")
        if event.kind != "step_completed" or not code or not isinstance(step, str) or step not in STEP_CODE:
            continue
        recorded = then if isinstance(then, dict) else None
        now = STEP_CODE.modules(step, recorded)  # this pipeline's definition, if another defines the same name
        if now is None or digest_of(now) == code:
            continue
        drifted[step] = ", ".join(changed_units(recorded, now)) if recorded is not None else ""
    if drifted:
        listed = "; ".join(f"{step}" + (f" ({what})" if what else "") for step, what in sorted(drifted.items()))
        warnings.append(f"steps whose code changed since they ran (they will run again): {listed}")
    return _result("code", [], warnings, "same code as the run")


def check_lock(ctx: PreflightContext) -> CheckResult:
    """No other live run or recovery holds the lineage."""
    busy = live_claims(ctx.events, {ctx.run_id})
    if busy:
        holders = "; ".join(describe_claim(claim, alive) for claim, alive in busy)
        return CheckResult(
            check="lineage lock", status="fail", reason=f"{holders}; wait for it to finish or stop it, then retry"
        )
    return CheckResult(check="lineage lock", status="pass", reason="no live run or recovery holds the lineage")


CHECKS: list[Callable[[PreflightContext], CheckResult]] = [
    check_environment,
    check_checkpoint,
    check_dtypes,
    check_storage,
    check_data,
    check_disk,
    check_code,
    check_lock,
]


def run_checks(ctx: PreflightContext) -> list[CheckResult]:
    results = []
    for check in CHECKS:
        try:
            results.append(check(ctx))
        except Exception as exc:  # a check that cannot run is a failure with its reason, not a crash
            name = check.__name__.removeprefix("check_")
            results.append(CheckResult(check=name, status="fail", reason=f"check could not run: {exc}"))
    return results


def as_rows(results: list[CheckResult]) -> list[dict[str, Any]]:
    return [result.model_dump() for result in results]


def artifact_key(prefix: str, lineage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"{prefix}-" + (re.sub(r"[^a-z0-9-]+", "-", lineage.lower()).strip("-") or "lineage")


@task(name="preflight", cache_policy=NO_CACHE, persist_result=False)
def preflight_task(ctx: PreflightContext, lineage: str) -> list[CheckResult]:
    """The checks as a Prefect task: a table artifact in the UI and one log line per check."""
    results = run_checks(ctx)
    create_table_artifact(
        table=as_rows(results),
        key=artifact_key("preflight", lineage),
        description=f"Preflight checks of the recovery of lineage `{lineage}`",
    )
    logger = get_run_logger()
    for result in results:
        log = logger.error if result.status == "fail" else logger.warning if result.status == "warn" else logger.info
        log("preflight %s: %s (%s)", result.check, result.status, result.reason)
    return results


__all__ = ["CHECKS", "CheckResult", "PreflightContext", "artifact_key", "as_rows", "preflight_task", "run_checks"]
