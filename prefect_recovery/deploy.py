"""Deployments and automations: what ``prefect-recovery serve`` and ``automations install`` set up.

The same three deployments as ``deployments/prefect.yaml``: the example pipeline, ``recover``
and a daily ``audit``. The automations, scoped to the flow runs of the deployments and tags the
user names (default: the ``prefect-recovery`` tag), never to every run in the workspace:

* **zombie detector**: a scoped flow run (or a ``recover`` run) that stops sending heartbeats
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, at least 30 s) for ``zombie_after`` is marked Crashed
  (Prefect's documented zombie-flow automation);
* **auto-recover**: when a scoped run becomes Crashed or Failed, run the ``recover`` deployment with
  that run's id (``crashed_run``): ``recover`` reads from the journal which lineage the run worked on,
  whatever the pipeline calls its lineage parameter (never for runs of ``recover`` or the audit themselves);
* **recover crashed recoveries**: when a ``recover`` run becomes Crashed (its process died; not Failed,
  which is an error it raised and would raise again), run ``recover`` again with the same parameters and
  ``attempt`` + 1; ``recover`` refuses once ``attempt`` exceeds ``max_attempts`` (default 3): no loop.

``prepare_run`` is the pull step deployments use on any worker host (docs/PRODUCTION.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

PIPELINE_DEPLOYMENT = "example-pipeline/example-pipeline"
AUDIT_DEPLOYMENT = "audit/audit-daily"
# Every shipped deployment carries it; `automations install` without --deployment/--tag scopes to it.
SHIPPED_TAG = "prefect-recovery"
RECOVER_DEPLOYMENT = "recover/recover"
AUDIT_CRON = "0 3 * * *"
WORKDIR_ENV = "PREFECT_RECOVERY_WORKDIR"
ZOMBIE_AUTOMATION = "prefect-recovery: crash zombie flow runs"
RECOVER_AUTOMATION = "prefect-recovery: recover crashed pipeline runs"
RECOVER_AGAIN_AUTOMATION = "prefect-recovery: recover crashed recoveries"
# How many times one crash is recovered when the recoveries themselves crash (flows/recover.py's default).
DEFAULT_MAX_ATTEMPTS = 3
# Flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, 30 at the least (Prefect's own
# bound): a zombie window shorter than two of them would mark healthy runs Crashed between two heartbeats.
MIN_ZOMBIE_AFTER_SECONDS = 60


def _jinja(template: str) -> dict[str, str]:
    return {"template": template, "__prefect_kind": "jinja"}


def _json(template: str) -> dict[str, Any]:
    """A parameter rendered by ``template`` and parsed as JSON: numbers stay numbers, null is None."""
    return {"__prefect_kind": "json", "value": _jinja(template)}


def _forwarded(parameter: str, default: str) -> dict[str, Any]:
    """The crashed run's own ``parameter`` (``default``, a Jinja literal, when it has none), as JSON."""
    return _json(f"{{{{ flow_run.parameters.get('{parameter}', {default}) | tojson }}}}")


def _on_flow_run(expect: set[str], related: Any) -> Any:
    """A trigger that fires once for each flow run entering one of the ``expect`` states (events), among the
    runs ``related`` (resource specifications of the run's deployment, tags...) selects."""
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return EventTrigger(
        expect=expect,
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
        match_related=related,
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def deployment_home() -> Path:
    """Where a deployed or served run keeps the embedded default store: ``$PREFECT_RECOVERY_HOME``, else
    ``~/.prefect-recovery``. Never the run's working directory, which is often a code checkout (a worker's
    runs there grew one to 272 MB) and differs between hosts and runs."""
    from .blocks.checkpoint_store import HOME_ENV

    return Path(os.environ.get(HOME_ENV) or Path.home() / ".prefect-recovery").expanduser().absolute()


def prepare_run(directory: str | None = None) -> dict[str, str]:
    """A deployment pull step (``prefect_recovery.deploy.prepare_run`` in prefect.yaml) for workers on any host.

    Runs in the flow-run process before the flow is imported: pins ``PREFECT_RECOVERY_HOME`` to
    ``deployment_home()`` when unset, then makes ``directory`` (default ``$PREFECT_RECOVERY_WORKDIR``,
    else the worker's own working directory) the working directory and puts it first on ``sys.path``, so
    pipeline modules named by ``PREFECT_RECOVERY_PIPELINES`` import from there. Nothing of the deploying
    machine is recorded: its paths do not exist on other hosts.
    """
    from .blocks.checkpoint_store import HOME_ENV

    os.environ[HOME_ENV] = str(deployment_home())
    target = directory or os.environ.get(WORKDIR_ENV) or os.getcwd()
    path = Path(target).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(
            f"the working directory {str(path)!r} (from {'the pull step' if directory else WORKDIR_ENV}) does not "
            f"exist on this worker; create it (e.g. a checkout of your pipelines' code) or change {WORKDIR_ENV}"
        )
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return {"directory": str(path)}


def build_deployments() -> list[Any]:
    from prefect.deployments.runner import EntrypointType

    from .examples.pipeline import example_pipeline
    from .flows.audit import audit
    from .flows.recover import recover

    # Module paths, not file paths: the runner starts each run in a fresh process that imports
    # the flow, and a package module loaded as a loose file loses its relative imports.
    module = EntrypointType.MODULE_PATH
    return [
        example_pipeline.to_deployment(
            name="example-pipeline",
            entrypoint_type=module,
            description="The example training pipeline; an unfinished lineage resumes.",
            tags=[SHIPPED_TAG],
        ),
        recover.to_deployment(
            name="recover",
            entrypoint_type=module,
            description="Recover a crashed pipeline run: preflight, restore, resume at the failed step.",
            tags=[SHIPPED_TAG],
        ),
        audit.to_deployment(
            name="audit-daily",
            entrypoint_type=module,
            description="Scrub every checkpoint in every region (signatures, presence, a re-hashed sample), "
            "repair from verified copies, apply the retention policy, collect garbage; publish the report.",
            parameters={"read_data": 0.1, "repair": True, "apply_retention": True},
            cron=AUDIT_CRON,
            tags=[SHIPPED_TAG],
        ),
    ]


def serve(limit: int | None = None) -> None:
    """Serve the deployments from this process (blocks until interrupted)."""
    from prefect import serve as prefect_serve

    from .blocks.checkpoint_store import HOME_ENV

    # Every served run (a child process, whatever its working directory) uses one store, outside the checkout.
    os.environ[HOME_ENV] = str(deployment_home())
    prefect_serve(*build_deployments(), limit=limit)


def _upsert(client: Any, automation: Any) -> tuple[str, str]:
    """Create ``automation`` or replace the one with the same name: re-running changes nothing."""
    existing = client.read_automations_by_name(automation.name)
    payload = automation
    if existing:
        client.update_automation(existing[0].id, payload)
        for duplicate in existing[1:]:
            client.delete_automation(duplicate.id)
        return automation.name, "updated"
    client.create_automation(payload)
    return automation.name, "created"


class AutomationScopeError(ValueError):
    """``automations install`` was pointed at something it cannot scope to (an unknown or its own deployment, an
    empty tag) or given a setting it cannot honour (a zombie window shorter than two heartbeats)."""


def _deployment_id(client: Any, name: str, what: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    if "/" not in name:
        raise AutomationScopeError(f"{what} {name!r} is not a deployment name: write it as FLOW_NAME/DEPLOYMENT_NAME")
    try:
        return client.read_deployment_by_name(name).id
    except ObjectNotFound:
        raise AutomationScopeError(
            f"{what} {name!r} does not exist on {_api_url()}: deploy it first (`prefect deploy` or "
            "`prefect-recovery serve`), or check the name with `prefect deployment ls`"
        ) from None


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "the temporary local server"


def automation_scope(deployment_ids: Sequence[Any] = (), tags: Sequence[str] = ()) -> dict[str, list[str]]:
    """The ``match_related`` that selects flow runs of any of ``deployment_ids`` *or* carrying any of ``tags``.

    One resource specification whose ``prefect.resource.id`` lists them all: Prefect matches a related
    resource against any of the listed values, so this is a union (a list of specifications would be an
    intersection). Deployment and tag ids never collide (``prefect.deployment.<uuid>``, ``prefect.tag.<tag>``).
    """
    ids = [f"prefect.deployment.{i}" for i in deployment_ids] + [f"prefect.tag.{tag}" for tag in tags]
    if not ids:
        raise AutomationScopeError("an automation needs at least one deployment or tag to match")
    return {"prefect.resource.id": ids}


def _not_deployment(deployment_id: Any) -> dict[str, str]:
    """A ``match_related`` part that holds for runs of a deployment other than ``deployment_id``."""
    return {"prefect.resource.role": "deployment", "prefect.resource.id": f"!prefect.deployment.{deployment_id}"}


def install_automations(
    deployments: Sequence[str] = (),
    tags: Sequence[str] = (),
    recover_deployment: str = RECOVER_DEPLOYMENT,
    zombie_after: timedelta = timedelta(seconds=120),
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[dict[str, Any]]:
    """Create (or update) the zombie detector and the auto-recover trigger; idempotent.

    Both match only flow runs of ``deployments`` (``FLOW/DEPLOYMENT`` names) or carrying one of
    ``tags``; with neither, runs tagged ``prefect-recovery`` (the tag every shipped deployment
    carries). The zombie detector also watches the ``recover`` deployment's runs; auto-recover
    never fires for a run of ``recover`` itself or of the audit, and starts ``recover_deployment`` with
    the crashed run's id: ``recover`` finds the lineage that run journaled, then the pipeline that wrote
    it, and resumes it through the registry (flows/registry.py), whatever pipeline it is. A crashed
    ``recover`` run is started again (attempt + 1) until ``max_attempts``; a failed one is not.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    if zombie_after.total_seconds() < MIN_ZOMBIE_AFTER_SECONDS:
        raise AutomationScopeError(
            f"a zombie window of {zombie_after.total_seconds():g} s is too short: flow runs send a heartbeat every "
            f"30 s at the most often (PREFECT_FLOWS_HEARTBEAT_FREQUENCY), so healthy runs would be marked Crashed; "
            f"give at least {MIN_ZOMBIE_AFTER_SECONDS} s (two heartbeats)"
        )
    if max_attempts < 1:
        raise AutomationScopeError(f"max_attempts must be at least 1, got {max_attempts}")
    blank = [repr(tag) for tag in tags if not tag.strip()] + [repr(name) for name in deployments if not name.strip()]
    if blank:
        raise AutomationScopeError(f"empty tag or deployment name ({', '.join(blank)}): it would match no run")
    deployments = list(dict.fromkeys(deployments))
    tags = list(dict.fromkeys(tags)) or ([] if deployments else [SHIPPED_TAG])
    with get_client(sync_client=True) as client:
        recover = _deployment_id(client, recover_deployment, "the recover deployment")
        pipeline_ids = []
        for name in deployments:
            deployment_id = _deployment_id(client, name, "deployment")
            if deployment_id == recover:
                raise AutomationScopeError(
                    f"{name!r} is the recover deployment itself: name the deployments of your pipelines"
                )
            pipeline_ids.append(deployment_id)
        excluded = [recover]
        try:
            excluded.append(client.read_deployment_by_name(AUDIT_DEPLOYMENT).id)
        except ObjectNotFound:
            pass  # not deployed here: nothing to exclude
        scope = automation_scope(pipeline_ids, tags)
        watched = automation_scope([*pipeline_ids, recover], tags)  # a crashed recovery shows as Crashed too
        what = ", ".join([*deployments, *(f"tag {t}" for t in tags)])
        zombie = AutomationCore(
            name=ZOMBIE_AUTOMATION,
            description="Marks flow runs Crashed when their heartbeats stop (a killed process or a lost node): "
            f"runs of {what} and of {recover_deployment}.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={
                    "prefect.flow-run.heartbeat",
                    "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed",
                },
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                match_related=ResourceSpecification(watched),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=zombie_after,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    name=Crashed().name,
                    message=f"No heartbeat for {int(zombie_after.total_seconds())} s: marked Crashed",
                )
            ],
        )
        auto_recover = AutomationCore(
            name=RECOVER_AUTOMATION,
            description=f"Runs {recover_deployment} with the lineage of a crashed or failed run of {what}.",
            trigger=_on_flow_run(
                {"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
                [ResourceSpecification(scope), *(ResourceSpecification(_not_deployment(i)) for i in excluded)],
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=recover,
                    parameters={
                        # the run's id, not a parameter of it: recover reads which lineage the run worked on from
                        # the journal, whatever the pipeline calls (or however it derives) its lineage
                        "crashed_run": _jinja("{{ flow_run.id }}"),
                        # as JSON, so a block picked in the UI (a {"$ref": ...} parameter) reaches the recovery
                        # as that block, a name as a name, and no store as None
                        "store_block": _forwarded("store_block", "None"),
                        "max_attempts": max_attempts,
                    },
                )
            ],
        )
        # A recovery whose process died (Crashed, not Failed) is started again with the same parameters and
        # attempt + 1; recover refuses once attempt exceeds max_attempts, and a Failed recovery (an error it
        # raised: preflight, an unrestorable checkpoint, the pipeline's own exception) never starts another.
        recover_again = AutomationCore(
            name=RECOVER_AGAIN_AUTOMATION,
            description=f"Runs {recover_deployment} again, attempt + 1 (at most max_attempts), for a crashed run "
            f"of {recover_deployment}.",
            trigger=_on_flow_run(
                {"prefect.flow-run.Crashed"},
                ResourceSpecification(
                    {"prefect.resource.role": "deployment", "prefect.resource.id": [f"prefect.deployment.{recover}"]}
                ),
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=recover,
                    parameters={
                        "lineage": _forwarded("lineage", "''"),
                        "crashed_run": _forwarded("crashed_run", "None"),
                        "checkpoint": _forwarded("checkpoint", "'latest'"),
                        "from_step": _forwarded("from_step", "None"),
                        "preflight": _forwarded("preflight", "'strict'"),
                        "store_block": _forwarded("store_block", "None"),
                        "regions": _forwarded("regions", "None"),
                        "write_quorum": _forwarded("write_quorum", "1"),
                        "attempt": _json("{{ (flow_run.parameters.get('attempt') or 1) + 1 }}"),
                        "max_attempts": _forwarded("max_attempts", str(max_attempts)),
                    },
                )
            ],
        )
        results = [_upsert(client, zombie), _upsert(client, auto_recover), _upsert(client, recover_again)]
    scoped = {"deployments": deployments, "tags": tags}
    return [{"automation": name, "action": action, "scope": scoped} for name, action in results]
