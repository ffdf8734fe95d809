"""A small registered pipeline for tests/test_recover.py: load -> transform -> fit -> report.

Every step appends its name to the file named by ``$RECOVER_TEST_TRACE`` when its code runs, so a test sees
exactly which step code ran in which process. ``$RECOVER_TEST_BLOCK=<step>`` makes that step block (after
tracing ``<step>:blocking``) until the process is killed; ``$RECOVER_TEST_HOLD=<step>:<path>`` makes it wait
(after tracing ``<step>:holding``) until the file ``<path>`` exists. Both are read by each process from its
own environment, so a run can block while the recovery that follows it does not.

Run as ``python -m helpers.recover_pipeline LINEAGE [--seed N] [--data-path P] [--store-block B]`` with
``tests/`` on PYTHONPATH; it prints the flow's result as JSON. ``recover`` finds the pipeline by its flow name
when ``PREFECT_RECOVERY_PIPELINES=helpers.recover_pipeline``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow

from prefect_recovery import CheckpointStore
from prefect_recovery.flows.registry import register_pipeline
from prefect_recovery.tasks.errors import StepInputError
from prefect_recovery.tasks.pipeline_run import PipelineRun, file_input
from prefect_recovery.tasks.step import code_digest, step, value_digest

PIPELINE = "recover-test-pipeline"
MODULE = "helpers.recover_pipeline"
STEPS = ("load", "transform", "fit", "report")
TRACE_ENV = "RECOVER_TEST_TRACE"
BLOCK_ENV = "RECOVER_TEST_BLOCK"
HOLD_ENV = "RECOVER_TEST_HOLD"
HOLD_TIMEOUT = 300


def trace(line: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(f"{line}\n")


def enter(name: str) -> None:
    """Record that ``name``'s code runs; block or hold there when this process's environment says so."""
    trace(name)
    if os.environ.get(BLOCK_ENV) == name:
        trace(f"{name}:blocking")
        while True:  # until SIGKILL
            time.sleep(0.1)
    hold = os.environ.get(HOLD_ENV, "")
    if hold.startswith(f"{name}:"):
        release = Path(hold.split(":", 1)[1])
        trace(f"{name}:holding")
        deadline = time.monotonic() + HOLD_TIMEOUT
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def save_numbers(path: str | os.PathLike[str], values: torch.Tensor) -> None:
    """The pipeline's input file (safetensors, one tensor ``x``)."""
    from safetensors.torch import save_file

    save_file({"x": values.contiguous()}, os.fspath(path))


@step(name="load", retry_delay_seconds=0)
def load(seed: int, data_path: str | None = None, data_digest: str | None = None) -> torch.Tensor:
    enter("load")
    if data_path is None:
        return torch.randn(256, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    from safetensors.torch import load_file

    try:
        return load_file(data_path)["x"]
    except (OSError, KeyError) as exc:
        raise StepInputError(f"cannot read {data_path}: {exc}") from None


@step(name="transform", retry_delay_seconds=0)
def transform(x: torch.Tensor) -> torch.Tensor:
    enter("transform")
    return torch.tanh(x * 1.5) + 0.25


@step(name="fit", retry_delay_seconds=0)
def fit(x: torch.Tensor, seed: int) -> dict[str, Any]:
    enter("fit")
    generator = torch.Generator().manual_seed(seed + 1)
    weights = torch.randn(8, generator=generator, dtype=torch.float64)
    features = torch.stack([x**k for k in range(8)], dim=1)
    target = torch.sin(x)
    for _ in range(50):
        gradient = features.T @ (features @ weights - target) / len(x)
        weights = weights - 0.05 * gradient
    loss = float(((features @ weights - target) ** 2).mean())
    return {"weights": weights, "loss": loss}


@step(name="report", retry_delay_seconds=0)
def report(fitted: dict[str, Any]) -> dict[str, Any]:
    enter("report")
    return {"loss": fitted["loss"], "norm": float(fitted["weights"].norm()), "weights": fitted["weights"].clone()}


@register_pipeline
@flow(name=PIPELINE)
def recover_test_pipeline(
    lineage: str, seed: int = 0, data_path: str | None = None, store_block: str | None = None
) -> dict[str, Any]:
    store = CheckpointStore.load(store_block) if store_block else CheckpointStore.default()
    parameters = {"lineage": lineage, "seed": seed, "data_path": data_path, "store_block": store_block}
    inputs = {"numbers": file_input(data_path)} if data_path else {}
    run = PipelineRun(
        store,
        lineage,
        pipeline=PIPELINE,
        parameters=parameters,
        inputs=inputs,
        code_digest=code_digest(recover_test_pipeline.fn),
    )
    with run:
        x = load(seed, data_path, inputs["numbers"]["digest"] if data_path else None)
        fitted = fit(transform(x), seed)
        summary = report(fitted)
        digest = value_digest(summary)
        run.finish(final_digest=digest)
    return {"lineage": lineage, "status": "completed", "final_version": None, "final_digest": digest}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lineage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path")
    parser.add_argument("--store-block")
    args = parser.parse_args()
    result = recover_test_pipeline(
        lineage=args.lineage, seed=args.seed, data_path=args.data_path, store_block=args.store_block
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
