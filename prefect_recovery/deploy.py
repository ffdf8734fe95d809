"""Deployments and automations: what ``prefect-recovery serve`` and ``automations install`` set up.

The same three deployments as ``deployments/prefect.yaml``: the example pipeline, ``recover``
and a daily ``audit``. The automations:

* **zombie detector**: a flow run of any deployment that stops sending heartbeats
  (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, at least 30 s) for ``zombie_after`` is marked Crashed
  (Prefect's documented zombie-flow automation);
* **auto-recover**: when a run of the pipeline deployment becomes Crashed or Failed, run the
  ``recover`` deployment with that run's ``lineage`` parameter.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

PIPELINE_DEPLOYMENT = "example-pipeline/example-pipeline"
RECOVER_DEPLOYMENT = "recover/recover"
AUDIT_CRON = "0 3 * * *"
ZOMBIE_AUTOMATION = "prefect-recovery: crash zombie flow runs"
RECOVER_AUTOMATION = "prefect-recovery: recover crashed pipeline runs"


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
            tags=["prefect-recovery"],
        ),
        recover.to_deployment(
            name="recover",
            entrypoint_type=module,
            description="Recover a crashed pipeline run: preflight, restore, resume at the failed step.",
            tags=["prefect-recovery"],
        ),
        audit.to_deployment(
            name="audit-daily",
            entrypoint_type=module,
            description="Scrub every checkpoint in every region (signatures, presence, a re-hashed sample), "
            "repair from verified copies, apply the retention policy, collect garbage; publish the report.",
            parameters={"read_data": 0.1, "repair": True, "apply_retention": True},
            cron=AUDIT_CRON,
            tags=["prefect-recovery"],
        ),
    ]


def serve(limit: int | None = None) -> None:
    """Serve the deployments from this process (blocks until interrupted)."""
    from prefect import serve as prefect_serve

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


def install_automations(
    pipeline_deployment: str = PIPELINE_DEPLOYMENT,
    recover_deployment: str = RECOVER_DEPLOYMENT,
    zombie_after: timedelta = timedelta(seconds=120),
) -> list[dict[str, str]]:
    """Create (or update) the zombie detector and the auto-recover trigger; idempotent."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState, RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        pipeline = client.read_deployment_by_name(pipeline_deployment)
        recover = client.read_deployment_by_name(recover_deployment)
        zombie = AutomationCore(
            name=ZOMBIE_AUTOMATION,
            description="Marks flow runs Crashed when their heartbeats stop (a killed process or a lost node).",
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
            description=f"Runs {recover_deployment} with the lineage of a crashed or failed {pipeline_deployment} run.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
                match_related=ResourceSpecification(
                    {"prefect.resource.id": f"prefect.deployment.{pipeline.id}", "prefect.resource.role": "deployment"}
                ),
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=recover.id,
                    parameters={
                        "lineage": {"template": "{{ flow_run.parameters['lineage'] }}", "__prefect_kind": "jinja"},
                        "store_block": {
                            "template": "{{ flow_run.parameters['store_block'] or '' }}",
                            "__prefect_kind": "jinja",
                        },
                    },
                )
            ],
        )
        results = [_upsert(client, zombie), _upsert(client, auto_recover)]
    return [{"automation": name, "action": action} for name, action in results]
