"""A user's pipeline with no ``lineage`` parameter: its lineage is derived from two parameters,
``f"{experiment}-seed{seed}"``. tests/test_auto_recover_journal.py deploys it (``serve()``, with the
``recover`` deployment) and crashes it: auto-recovery must
find the lineage from the journal, not from a parameter.

The ``train`` step blocks, after appending ``<pid>`` to ``$DERIVED_TEST_TRACE``, while the file
``$DERIVED_TEST_BLOCK`` exists: the test kills exactly that process (a pipeline run, or the recovery running
it again), then removes the file to let the next recovery finish.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from prefect import flow

from prefect_recovery import CheckpointStore, PipelineRun, register_pipeline, step
from prefect_recovery.tasks.step import value_digest

PIPELINE = "derived-lineage-pipeline"
DEPLOYMENT = f"{PIPELINE}/nightly"
TRACE_ENV = "DERIVED_TEST_TRACE"
BLOCK_ENV = "DERIVED_TEST_BLOCK"


def lineage_of(experiment: str, seed: int) -> str:
    return f"{experiment}-seed{seed}"


@step(name="prepare", retry_delay_seconds=0)
def prepare(seed: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@step(name="train", retry_delay_seconds=0)
def train(x: torch.Tensor, seed: int) -> dict[str, Any]:
    block = os.environ.get(BLOCK_ENV)
    if block and os.path.exists(block):
        with open(os.environ[TRACE_ENV], "a") as trace:
            trace.write(f"{os.getpid()}\n")
        while os.path.exists(block):  # until SIGKILL, or the test lets it go on
            time.sleep(0.1)
    weights = torch.randn(4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    features = torch.stack([x**k for k in range(4)], dim=1)
    for _ in range(20):
        weights = weights - 0.05 * features.T @ (features @ weights - torch.sin(x)) / len(x)
    return {"weights": weights}


@register_pipeline
@flow(name=PIPELINE)
def derived_lineage_pipeline(experiment: str, seed: int = 0) -> dict[str, Any]:
    lineage = lineage_of(experiment, seed)
    parameters = {"experiment": experiment, "seed": seed}
    with PipelineRun(CheckpointStore.default(), lineage, pipeline=PIPELINE, parameters=parameters) as run:
        fitted = train(prepare(seed), seed)
        digest = value_digest(fitted)
        run.finish(final_digest=digest)
    return {"lineage": lineage, "final_digest": digest}


def serve() -> None:
    """This pipeline's deployment and ``recover/recover``, served from this process."""
    from prefect import serve as prefect_serve
    from prefect.deployments.runner import EntrypointType

    from prefect_recovery.flows.recover import recover

    module = EntrypointType.MODULE_PATH
    prefect_serve(
        derived_lineage_pipeline.to_deployment(name="nightly", entrypoint_type=module),
        recover.to_deployment(name="recover", entrypoint_type=module),
    )
