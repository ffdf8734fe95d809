"""Registered pipelines for tests/test_replay.py: a tiny checkpointed training whose model carries a
buffer that every step bumps by *unseeded* noise (``random.SystemRandom``), so re-running a segment can
never reproduce it, and the same training registered without a replay hook.

``noisy-replay-pipeline`` registers ``replay=noisy_replay``; ``hookless-replay-pipeline`` is registered the
old way, ``register_pipeline(flow)``. ``replay-check`` in another process finds both by flow name when
``PREFECT_RECOVERY_PIPELINES=helpers.replay_pipeline``.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from prefect import flow

from prefect_recovery import CheckpointStore
from prefect_recovery.flows.registry import register_pipeline
from prefect_recovery.tasks.pipeline_run import PipelineRun, current_run
from prefect_recovery.tasks.step import step
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps, Milestones

NOISY = "noisy-replay-pipeline"
HOOKLESS = "hookless-replay-pipeline"
HEAVY_EVERY = 4
_ENTROPY = random.SystemRandom()  # unseeded on purpose: what replay-check must catch


class NoisyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.register_buffer("noise", torch.zeros(3))


def noisy_train(
    store: Any, lineage: str, *, steps: int, seed: int, replay_from: int | None = None, stop: int | None = None
) -> dict[str, Any]:
    """Train ``steps`` steps (heavy checkpoint every 4, light every 2); with ``replay_from``, restore that
    version instead, train to ``stop`` without saving and return the captured state."""
    torch.manual_seed(seed)
    model = NoisyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator)
    replaying = replay_from is not None
    schedule = (
        CheckpointSchedule(triggers=[])
        if replaying
        else CheckpointSchedule(
            triggers=[EveryNSteps(every=HEAVY_EVERY), EveryNSteps(every=2, tier="light"), Milestones(names=["end"])]
        )
    )
    run = current_run()
    with Checkpointer(
        store,
        lineage,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        seed=seed,
        handle_sigterm=False,
        resume_version=replay_from,
        on_commit=run.checkpoint_committed if run is not None and not replaying else None,
    ) as ckpt:
        until = stop if replaying and stop is not None else steps
        while ckpt.step_count < until:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model.linear(x), y).backward()
            optimizer.step()
            with torch.no_grad():
                model.noise += torch.tensor([_ENTROPY.random() for _ in range(3)])
            ckpt.step()
        if replaying:
            return ckpt.capture("heavy")
        ckpt.milestone("end")
        return {"steps": ckpt.step_count}


@step(name="noisy-train", ignore=["store"], retry_delay_seconds=0)
def train_step(store: CheckpointStore, lineage: str, steps: int, seed: int) -> dict[str, Any]:
    return noisy_train(store, lineage, steps=steps, seed=seed)


def noisy_replay(segment: Any) -> dict[str, Any]:
    """Replay hook: the same training, from ``segment.from_version`` to ``segment.to_step``."""
    parameters = segment.parameters
    return noisy_train(
        segment.store,
        segment.lineage,
        steps=int(parameters["steps"]),
        seed=int(parameters["seed"]),
        replay_from=segment.from_version,
        stop=segment.to_step,
    )


def _run(name: str, lineage: str, steps: int, seed: int) -> dict[str, Any]:
    store = CheckpointStore.default()
    with PipelineRun(
        store, lineage, pipeline=name, parameters={"lineage": lineage, "steps": steps, "seed": seed}
    ) as run:
        result = train_step(store, lineage, steps, seed)
        run.finish()
    return result


@register_pipeline(replay=noisy_replay)
@flow(name=NOISY)
def noisy_pipeline(lineage: str, steps: int = 12, seed: int = 0) -> dict[str, Any]:
    return _run(NOISY, lineage, steps, seed)


@flow(name=HOOKLESS)
def hookless_pipeline(lineage: str, steps: int = 8, seed: int = 0) -> dict[str, Any]:
    return _run(HOOKLESS, lineage, steps, seed)


register_pipeline(hookless_pipeline)  # the one-argument form, as pipelines registered before replay hooks
