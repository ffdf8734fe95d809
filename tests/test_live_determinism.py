"""Bit-identity with a live Prefect server (issue 18): the same pipeline, same seed and steps, run several
times at once against ``prefect server start`` (events, telemetry and heartbeats on) from the CLI and by
``prefect-recovery serve``, under the CPU load of those runs, must write exactly the same checkpoints.

Every checkpoint of every run (heavy and light, by step) is compared tensor for tensor, not only the final
one, so a divergence is reported at the first step where it appears and with the first differing leaf.
Strict determinism is on (PREFECT_RECOVERY_STRICT_DETERMINISM=1), so a Checkpointer whose own work moved a
global RNG fails its run with the step and the generator instead of drifting.

``make test`` runs the short form (3 CLI runs and 1 run under serve at once). The long form for hunting an
intermittent divergence: PREFECT_RECOVERY_DETERMINISM_RUNS=12 pytest tests/test_live_determinism.py (a 1-in-10
flake then fails it with probability > 0.7 per run of the module; it is marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import CLI, REPO
from helpers.live_prefect import Stack, api, deployment_id, live_stack, wait_completed
from helpers.rounding import CAUSES, ROUNDING, rounding_divergence
from helpers.step_values import differing_leaves, max_abs_difference

from prefect_recovery import CheckpointStore
from prefect_recovery.core.layout import LIGHT_SUFFIX
from prefect_recovery.training.determinism import fingerprint_differences

pytestmark = pytest.mark.slow

STEPS, SEED = 80, 11  # light checkpoints every 10 steps, heavy at 50, then train_end and final
RUNS = int(os.environ.get("PREFECT_RECOVERY_DETERMINISM_RUNS", "3"))
TIMEOUT = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with live_stack(tmp_path_factory.mktemp("live-determinism")) as stack:
        yield stack


def checkpoints_by_step(store: CheckpointStore, lineage: str) -> dict[tuple[str, int, str], Any]:
    """Every committed checkpoint of the lineage and its light tier, keyed by (tier, step, trigger)."""
    found: dict[tuple[str, int, str], Any] = {}
    for name in (lineage, lineage + LIGHT_SUFFIX):
        for info in store.list(name):
            key = (info.metadata["tier"], info.step, info.metadata["trigger"])
            found[key] = store.load_checkpoint(lineage=name, version=info.version)
    return found


@dataclass
class Divergence:
    checkpoint: tuple[str, int, str] | None  # (tier, step, trigger) of the first differing checkpoint
    leaves: list[str]  # its differing leaves (or the checkpoints one run lacks)
    sizes: dict[str, float]  # the largest absolute difference of each differing floating-point leaf
    also: list[tuple[str, int, str]]  # every later checkpoint that differs too (a torn save differs once)
    execution: dict[str, list[Any]] = field(default_factory=dict)  # how the two processes computed differently

    def rounding_only(self) -> bool:
        """Only floating-point training state (model, optimizer) differs, each by less than 1e-4."""
        return (
            self.checkpoint is not None
            and set(self.leaves) == set(self.sizes)
            and not any(cause in leaf for leaf in self.leaves for cause in CAUSES)
            and all(size < ROUNDING for size in self.sizes.values())
        )

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"different checkpoints: {self.leaves}"
        first = dict(list(self.sizes.items())[:8]) or self.leaves[:8]
        return (
            f"first differs at {self.checkpoint}: {first}; later ones that differ: {self.also}; "
            f"the processes computed differently in: {self.execution or 'no recorded difference'}"
        )


def first_divergence(reference: dict, other: dict) -> Divergence | None:
    """The first checkpoint (by step) where ``other`` differs from ``reference``, and its differing leaves."""
    if sorted(reference) != sorted(other):
        return Divergence(None, [str(key) for key in sorted(set(reference) ^ set(other))], {}, [])
    differing = [
        key
        for key in sorted(reference, key=lambda k: (k[1], k[0] == "heavy", k[2]))
        if differing_leaves(reference[key], other[key])
    ]
    if not differing:
        return None
    first = differing[0]
    leaves = differing_leaves(reference[first], other[first])
    return Divergence(first, leaves, max_abs_difference(reference[first], other[first]), differing[1:])


def execution_of(store: CheckpointStore, lineage: str, checkpoint: tuple[str, int, str]) -> dict[str, Any] | None:
    """How the process that saved ``checkpoint`` of ``lineage`` computed (its recorded execution fingerprint)."""
    tier, step, trigger = checkpoint
    name = lineage if tier == "heavy" else lineage + LIGHT_SUFFIX
    for info in store.list(name):
        if (info.step, info.metadata["trigger"]) == (step, trigger):
            return info.metadata.get("execution")
    return None


def test_runs_of_the_same_pipeline_are_bit_identical_against_a_live_server(stack: Stack) -> None:
    env = {**stack.env, "PREFECT_RECOVERY_STRICT_DETERMINISM": "1"}
    cli_lineages = [f"cli-{i}" for i in range(RUNS)]
    logs = {lineage: stack.tmp / f"{lineage}.log" for lineage in cli_lineages}
    processes = [
        subprocess.Popen(
            [*CLI, "demo", "--json", "--lineage", lineage, "--steps", str(STEPS), "--seed", str(SEED)],
            stdout=subprocess.PIPE,
            stderr=logs[lineage].open("wb"),
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        for lineage in cli_lineages
    ]
    # one more run of the same pipeline, executed by serve (a flow run process it starts), at the same time
    pipeline = deployment_id(stack.server, "example-pipeline/example-pipeline")
    run: dict = api(  # type: ignore[assignment]
        stack.server,
        "POST",
        f"/deployments/{pipeline}/create_flow_run",
        {"parameters": {"lineage": "served", "steps": STEPS, "seed": SEED}},
    )
    outputs = []
    for process in processes:
        out, _ = process.communicate(timeout=TIMEOUT)
        outputs.append(out.decode(errors="replace"))
    for lineage, process, out in zip(cli_lineages, processes, outputs, strict=True):
        assert process.returncode == 0, f"{lineage} failed:\n{logs[lineage].read_text()[-4000:]}"
        assert json.loads(out)["status"] == "completed", out[-2000:]
    wait_completed(stack, run["id"], "served pipeline run", TIMEOUT)

    store = CheckpointStore.default(stack.home)
    reference = checkpoints_by_step(store, cli_lineages[0])
    assert ("heavy", STEPS, "milestone:final") in reference and ("light", 10, "every_n_steps") in reference
    divergences = {
        lineage: first_divergence(reference, checkpoints_by_step(store, lineage))
        for lineage in [*cli_lineages[1:], "served"]
    }
    for lineage, found in divergences.items():
        if found is not None and found.checkpoint is not None:  # name how the two processes computed differently
            found.execution = fingerprint_differences(
                execution_of(store, cli_lineages[0], found.checkpoint), execution_of(store, lineage, found.checkpoint)
            )
    diverged = {lineage: str(found) for lineage, found in divergences.items() if found is not None}
    if diverged and all(found.rounding_only() for found in divergences.values() if found is not None):
        # Issue 18 (docs/DETERMINISM.md): under the CPU load of several runs, one run's weights differed from the
        # others' by about 1e-6 from the first checkpoint on, RNG states, data position and settings identical:
        # MKL's vector math racing at its first call, fixed (training/first_calls.py). Should it come back, the
        # failure keeps the evidence (both checkpoints, both processes' fingerprints) to find what else does it.
        kept = {name: rounding_divergence(name, (store, cli_lineages[0]), (store, name)) for name in diverged}
        evidence = {name: str(found[1]) for name, found in kept.items() if found is not None}
        pytest.fail(f"issue 18 again, rounding-level divergence under load: {diverged}; evidence in {evidence}")
    assert not diverged, diverged
