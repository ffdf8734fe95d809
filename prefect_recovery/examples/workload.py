"""The example's workload: seeded synthetic data, a small MLP, and a training loop checkpointed
by ``Checkpointer``. Pure torch; the Prefect steps in ``steps.py`` wrap it."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..training.checkpointer import Checkpointer
from ..training.context import ResumePoint
from ..training.sampling import ResumableRandomSampler
from ..training.schedule import CheckpointSchedule, EveryNSteps, Milestones

FEATURES, CLASSES, HIDDEN = 128, 10, 512
TRAIN_SAMPLES, TEST_SAMPLES, BATCH = 8192, 2048, 256


def default_schedule() -> CheckpointSchedule:
    """Heavy every 50 steps, light every 10, and the pipeline's milestones."""
    return CheckpointSchedule(
        triggers=[
            EveryNSteps(every=50),
            EveryNSteps(every=10, tier="light"),
            Milestones(names=["train_end", "final"]),
        ]
    )


def make_data(seed: int) -> dict[str, torch.Tensor]:
    """A seeded synthetic classification task (a noisy random linear teacher)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    x = torch.randn(TRAIN_SAMPLES + TEST_SAMPLES, FEATURES, generator=generator)
    noise = 0.5 * torch.randn(TRAIN_SAMPLES + TEST_SAMPLES, CLASSES, generator=generator)
    y = (x @ teacher + noise).argmax(dim=1)
    return {
        "x_train": x[:TRAIN_SAMPLES].contiguous(),
        "y_train": y[:TRAIN_SAMPLES].contiguous(),
        "x_test": x[TRAIN_SAMPLES:].contiguous(),
        "y_test": y[TRAIN_SAMPLES:].contiguous(),
    }


def load_data(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    data = load_file(os.fspath(path))
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(data)
    if missing:
        raise ValueError(f"dataset {path} lacks the tensors {sorted(missing)}")
    return data


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Dropout(0.1),  # uses the global torch RNG: resuming must restore it
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )


def configure_threads() -> None:
    # Results depend on the intra-op thread count; fix it (recorded in every checkpoint).
    torch.set_num_threads(min(2, os.cpu_count() or 1))


Workload = tuple[torch.nn.Module, torch.optim.Optimizer, Any, StatefulDataLoader]


def _workload(data: dict[str, torch.Tensor], *, steps: int, seed: int) -> Workload:
    """Model, optimizer, LR scheduler and data loader, built the same way for training and replay."""
    configure_threads()
    torch.manual_seed(seed)  # model init; overwritten by a restore
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    dataset = TensorDataset(data["x_train"], data["y_train"])
    sampler = ResumableRandomSampler(len(dataset), seed=seed, batch_size=BATCH)
    # Whole batches, no collation. The loader's own generator keeps the global torch RNG (which
    # dropout uses, and checkpoints capture) from being advanced by each iter(loader) call.
    loader = StatefulDataLoader(
        dataset, batch_size=None, sampler=sampler, generator=torch.Generator().manual_seed(seed)
    )
    return model, optimizer, scheduler, loader


def _train_until(
    ckpt: Checkpointer,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: StatefulDataLoader,
    until: int,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The training loop, from the checkpointer's step up to ``until`` completed steps; the last loss."""
    batches = iter(loader)
    model.train()
    loss = torch.tensor(float("nan"))
    while ckpt.step_count < until:
        try:
            x, y = next(batches)
        except StopIteration:
            ckpt.epoch += 1
            ckpt.milestone("epoch_end")
            batches = iter(loader)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ckpt.step()
        if on_step is not None:
            on_step(ckpt.step_count)
    return loss


def _checkpointed(
    store: Any, lineage: str, data: dict[str, torch.Tensor], *, steps: int, seed: int, **options: Any
) -> tuple[Checkpointer, Workload]:
    """The workload under a Checkpointer of ``lineage`` that restores it on entry: the one setup
    ``train`` and ``replay_segment`` share, so a replay trains exactly as the run did."""
    workload = _workload(data, steps=steps, seed=seed)
    model, optimizer, scheduler, loader = workload
    checkpointer = Checkpointer(
        store, lineage, model=model, optimizer=optimizer, scheduler=scheduler, data=loader, seed=seed, **options
    )
    return checkpointer, workload


def train(
    store: Any,
    lineage: str,
    data: dict[str, torch.Tensor],
    *,
    steps: int,
    seed: int,
    schedule: CheckpointSchedule | None = None,
    on_step: Callable[[int], None] | None = None,
    resume_from: ResumePoint | None = None,
) -> dict[str, Any]:
    """Train to ``steps`` steps, resuming from the lineage's latest checkpoint, or where ``resume_from``
    (the pipeline run's ``run.resume_point()``) says; it also journals every commit."""
    checkpointer, workload = _checkpointed(
        store,
        lineage,
        data,
        steps=steps,
        seed=seed,
        schedule=schedule or default_schedule(),
        metadata={"seed": seed, "steps": steps},
        resume_from=resume_from,
    )
    with checkpointer as ckpt:
        start_step = ckpt.step_count
        loss = _train_until(ckpt, *workload, steps, on_step)
        if start_step < steps:
            ckpt.milestone("train_end")
        ckpt.flush()
        latest = ckpt.store.resolve(lineage)[0]
        return {
            "version": latest.version,
            "steps": ckpt.step_count,
            "trained_steps": ckpt.step_count - start_step,
            "resumed_from": ckpt.resumed_from,
            "last_loss": float(loss.detach()),
        }


def replay_segment(
    store: Any,
    lineage: str,
    data: dict[str, torch.Tensor],
    *,
    from_version: int,
    to_step: int,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Restore ``from_version`` of ``lineage``, train on to ``to_step`` exactly as ``train`` does,
    and return the state a heavy checkpoint at ``to_step`` holds (``Checkpointer.capture``).

    Nothing is saved: the checkpointer's schedule has no triggers, so the lineage is only read.
    """
    checkpointer, workload = _checkpointed(
        store,
        lineage,
        data,
        steps=steps,
        seed=seed,
        schedule=CheckpointSchedule(triggers=[], asynchronous=False),
        handle_sigterm=False,
        resume_version=from_version,
    )
    with checkpointer as ckpt:
        if ckpt.step_count > to_step:
            raise ValueError(f"{lineage} v{from_version} is at step {ckpt.step_count}, past step {to_step}")
        _train_until(ckpt, *workload, to_step)
        return ckpt.capture("heavy")


@torch.no_grad()
def evaluate(state: dict[str, Any], data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss and accuracy of the checkpointed model on the held-out split."""
    configure_threads()
    model = build_model()
    model.load_state_dict(state["model"])
    model.eval()
    logits = model(data["x_test"])
    return {
        "test_loss": float(torch.nn.functional.cross_entropy(logits, data["y_test"])),
        "test_accuracy": float((logits.argmax(dim=1) == data["y_test"]).float().mean()),
    }
