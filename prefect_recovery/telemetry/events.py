"""Prefect events for automations: checkpoints committed, restores, failed saves, recoveries, audit problems.

Every event concerns the lineage as its resource (``prefect-recovery.lineage.<lineage>``, named after the
lineage) and names the regions (role ``region``) and, where there is one, the checkpoint version (role
``checkpoint``) as related resources. Inside a flow or task run Prefect adds the run, flow and deployment
as related resources too. Resource labels carry what an automation trigger can match on (``match``
takes resource labels, not the payload): ``prefect-recovery.lineage``, ``prefect-recovery.base-lineage``,
``prefect-recovery.tier``, ``prefect-recovery.trigger``, ``prefect-recovery.outcome``,
``prefect-recovery.kind``. The payload holds the details (lineage, version, step, bytes, seconds, regions).

Telemetry never fails the work it reports: nothing here raises. An event is sent only where Prefect has
an API to take it (``PREFECT_API_URL`` set, or inside a flow or task run, whose API is already up):
without one, Prefect's ``emit_event`` would start a temporary local server, tens of seconds inside a
plain ``store.save_checkpoint(...)``. ``PREFECT_RECOVERY_EVENTS=off`` turns events off altogether.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..core.layout import LIGHT_SUFFIX, STEPS_SUFFIX
from ..core.observe import StoreEvent
from ..core.redact import scrub_obj

logger = logging.getLogger("prefect_recovery.telemetry")

EVENT_PREFIX = "prefect-recovery"
CHECKPOINT_COMMITTED = "prefect-recovery.checkpoint.committed"
RESTORE_COMPLETED = "prefect-recovery.restore.completed"
SAVE_FAILED = "prefect-recovery.save.failed"
RECOVERY_STARTED = "prefect-recovery.recovery.started"
RECOVERY_FINISHED = "prefect-recovery.recovery.finished"
AUDIT_PROBLEM = "prefect-recovery.audit.problem"

_STORE_EVENT_NAMES = {
    "checkpoint_committed": CHECKPOINT_COMMITTED,
    "checkpoint_restored": RESTORE_COMPLETED,
    "save_failed": SAVE_FAILED,
}
DERIVED_SUFFIXES = {LIGHT_SUFFIX: "light", STEPS_SUFFIX: "steps"}  # derived lineages -> their tier
_MAX_TEXT = 2000


def base_lineage(lineage: str) -> tuple[str, str]:
    """``(base lineage, tier)``: ``run.light`` -> ``("run", "light")``, ``run`` -> ``("run", "heavy")``."""
    for suffix, tier in DERIVED_SUFFIXES.items():
        if lineage.endswith(suffix) and len(lineage) > len(suffix):
            return lineage[: -len(suffix)], tier
    return lineage, "heavy"


def lineage_resource(lineage: str, **labels: Any) -> dict[str, str]:
    """The resource of an event about ``lineage`` (``prefect-recovery.lineage.<lineage>``)."""
    base, tier = base_lineage(lineage)
    resource = {
        "prefect.resource.id": f"{EVENT_PREFIX}.lineage.{lineage}",
        "prefect.resource.name": lineage,
        "prefect-recovery.lineage": lineage,
        "prefect-recovery.base-lineage": base,
        "prefect-recovery.tier": tier,
    }
    resource.update({f"prefect-recovery.{key}": str(value) for key, value in labels.items() if value is not None})
    return resource


def region_resource(region: str, status: str | None = None) -> dict[str, str]:
    related = {
        "prefect.resource.id": f"{EVENT_PREFIX}.region.{region}",
        "prefect.resource.role": "region",
        "prefect.resource.name": region,
    }
    if status is not None:
        related["prefect-recovery.region-status"] = status
    return related


def checkpoint_resource(lineage: str, version: int) -> dict[str, str]:
    return {
        "prefect.resource.id": f"{EVENT_PREFIX}.checkpoint.{lineage}.{version}",
        "prefect.resource.role": "checkpoint",
        "prefect.resource.name": f"{lineage} v{version}",
    }


def events_enabled() -> bool:
    """Whether an event can be sent without starting a server: an API URL, or a run (whose API is up)."""
    if os.environ.get("PREFECT_RECOVERY_EVENTS", "").strip().lower() in ("0", "off", "false", "no"):
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.settings import get_current_settings

        in_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
        return bool(get_current_settings().api.url) or in_run
    except Exception:  # a broken Prefect configuration must not break a save
        logger.debug("cannot tell whether Prefect events can be sent", exc_info=True)
        return False


def _emit(event: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any]) -> Any:
    """``prefect.events.emit_event`` that never raises; the Event sent, or None when none was sent."""
    if not events_enabled():
        return None
    try:
        from prefect.events import emit_event

        # Error texts and region names may carry a backend's echo of a credential (core/redact.py).
        return emit_event(
            event=event, resource=scrub_obj(resource), related=scrub_obj(related), payload=scrub_obj(payload)
        )
    except Exception:
        logger.warning("could not emit Prefect event %s for %s", event, resource.get("prefect.resource.id"),
                       exc_info=True)  # fmt: skip
        return None


def _scalars(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata's short scalar values (an event must stay small; the manifest has the rest)."""
    kept = {}
    for key, value in metadata.items():
        if isinstance(value, bool | int | float) or value is None:
            kept[key] = value
        elif isinstance(value, str):
            kept[key] = value[:_MAX_TEXT]
    return kept


def _related(lineage: str, version: int | None, regions: list[dict[str, str]]) -> list[dict[str, str]]:
    """An event's related resources: the checkpoint (when there is a version), then the regions."""
    checkpoint = [checkpoint_resource(lineage, version)] if isinstance(version, int) else []
    return checkpoint + regions


def prefect_event_observer(event: StoreEvent) -> Any:
    """Store observer: one Prefect event per commit, restore and failed save (``Store(observers=[...])``).

    Names: ``prefect-recovery.checkpoint.committed``, ``prefect-recovery.restore.completed``,
    ``prefect-recovery.save.failed``. Payload: lineage, version, step, bytes, seconds, regions (name -> "ok"
    or why it missed the operation), tier, trigger, metadata (scalar values), error for a failed save.
    Returns the Prefect ``Event`` sent, or None.
    """
    name = _STORE_EVENT_NAMES.get(event.kind)
    if name is None:
        return None
    metadata = dict(event.metadata)
    _base, tier = base_lineage(event.lineage)
    tier = str(metadata.get("tier") or tier)
    trigger = metadata.get("trigger")
    outcome = "failed" if event.kind == "save_failed" else "ok"
    resource = lineage_resource(event.lineage, outcome=outcome, trigger=trigger)
    resource["prefect-recovery.tier"] = tier
    regions = [region_resource(region, "ok" if ok == "ok" else "missed") for region, ok in event.regions.items()]
    related = _related(event.lineage, event.version, regions)
    payload: dict[str, Any] = {
        "lineage": event.lineage,
        "version": event.version,
        "step": event.step,
        "bytes": event.bytes,
        "seconds": round(event.seconds, 6),
        "regions": {region: str(status)[:_MAX_TEXT] for region, status in event.regions.items()},
        "regions_ok": [region for region, status in event.regions.items() if status == "ok"],
        "tier": tier,
        "trigger": trigger,
    }
    if event.kind == "save_failed":
        payload["error"] = str(metadata.get("error", ""))[:_MAX_TEXT]
    else:
        payload["metadata"] = _scalars(metadata)
    return _emit(name, resource, related, payload)


def emit_recovery_started(
    lineage: str,
    *,
    run_id: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    failed_step: str | None = None,
    from_step: str | None = None,
    preflight: str | None = None,
    regions: list[str] | None = None,
) -> Any:
    """``prefect-recovery.recovery.started``: a recovery claimed ``lineage`` and is about to resume it.

    ``checkpoint`` is ``{"version": ..., "step": ...}`` of the checkpoint it resumes from (None: from the
    start). Returns the Prefect ``Event`` sent, or None.
    """
    checkpoint = checkpoint or None
    version = checkpoint.get("version") if checkpoint else None
    related = _related(lineage, version, [region_resource(region) for region in regions or []])
    payload = {
        "lineage": lineage,
        "run_id": run_id,
        "version": version,
        "step": checkpoint.get("step") if checkpoint else None,
        "failed_step": failed_step,
        "from_step": from_step,
        "preflight": preflight,
        "regions": list(regions or []),
    }
    return _emit(RECOVERY_STARTED, lineage_resource(lineage, outcome="started"), related, payload)


def emit_recovery_finished(
    lineage: str,
    version: int | None,
    ok: bool,
    *,
    run_id: str | None = None,
    step: int | None = None,
    resumed_from: dict[str, Any] | None = None,
    final_digest: str | None = None,
    reused_steps: list[str] | None = None,
    error: str | None = None,
    regions: list[str] | None = None,
) -> Any:
    """``prefect-recovery.recovery.finished``: the recovery of ``lineage`` ended.

    ``version`` is the final checkpoint version the resumed run wrote (None if it wrote none or failed).
    The resource label ``prefect-recovery.outcome`` is ``ok`` or ``failed``, so an automation can match
    failed recoveries only. Returns the Prefect ``Event`` sent, or None.
    """
    related = _related(lineage, version, [region_resource(region) for region in regions or []])
    payload = {
        "lineage": lineage,
        "run_id": run_id,
        "ok": ok,
        "version": version,
        "step": step,
        "resumed_from": resumed_from,
        "final_digest": final_digest,
        "reused_steps": list(reused_steps or []),
        "error": None if error is None else error[:_MAX_TEXT],
        "regions": list(regions or []),
    }
    resource = lineage_resource(lineage, outcome="ok" if ok else "failed")
    return _emit(RECOVERY_FINISHED, resource, related, payload)


def emit_audit_problem(lineage: str | None, version: int | None, region: str, kind: str, detail: str) -> Any:
    """``prefect-recovery.audit.problem``: an audit found ``kind`` (missing, corrupt...) in ``region``.

    The resource is the lineage (``prefect-recovery.lineage.<lineage>``), or the region
    (``prefect-recovery.region.<region>``) for a problem that belongs to no lineage (an orphan blob).
    Resource labels ``prefect-recovery.kind`` and ``prefect-recovery.region`` let an automation match
    them. Returns the Prefect ``Event`` sent, or None.
    """
    if lineage:
        resource = lineage_resource(lineage, kind=kind, region=region)
    else:
        resource = {
            "prefect.resource.id": f"{EVENT_PREFIX}.region.{region}",
            "prefect.resource.name": region,
            "prefect-recovery.kind": kind,
            "prefect-recovery.region": region,
        }
    related = _related(lineage, version, [region_resource(region, "problem")]) if lineage else []
    payload = {"lineage": lineage, "version": version, "region": region, "kind": kind, "detail": detail[:_MAX_TEXT]}
    return _emit(AUDIT_PROBLEM, resource, related, payload)


__all__ = [
    "AUDIT_PROBLEM",
    "CHECKPOINT_COMMITTED",
    "RECOVERY_FINISHED",
    "RECOVERY_STARTED",
    "RESTORE_COMPLETED",
    "SAVE_FAILED",
    "base_lineage",
    "emit_audit_problem",
    "emit_recovery_finished",
    "emit_recovery_started",
    "events_enabled",
    "prefect_event_observer",
]
