"""A user's pipeline written from the README's "Your own pipeline" section: make-data -> normalize -> train ->
evaluate -> export, with a small GRU (dropout), AdamW with weight decay, OneCycleLR warm-up, gradient clipping,
gradient accumulation every 2 batches (5 batches an epoch, so every other epoch ends in the middle of an
accumulation) and heavy / light / timebox / milestone triggers. The flow returns None.

The only lines that are not the README's pattern are the test instrumentation (``kill_points``).
Run as ``python -m helpers.user_pipeline_steps LINEAGE`` with ``tests/`` on PYTHONPATH.
"""

from __future__ import annotations

import sys

import torch
from helpers import kill_points
from prefect import flow
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import (
    Checkpointer,
    CheckpointSchedule,
    CheckpointStore,
    EveryNSteps,
    Milestones,
    PipelineRun,
    Timebox,
    register_pipeline,
    seed_everything,
    state_digest,
    step,
)

PIPELINE = "user-gru-pipeline"
EPOCHS, SAMPLES, BATCH, ACCUMULATE = 4, 40, 8, 2


class GRUClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(input_size=3, hidden_size=8, batch_first=True)
        self.dropout = torch.nn.Dropout(0.2)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.gru(x)
        return self.head(self.dropout(hidden[-1]))


@step(name="make-data")
def make_data(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES + 16, 6, 3, generator=generator)
    y = (x.sum(dim=(1, 2)) > 0).long()
    return {"x": x, "y": y}


@step
def normalize(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mean, std = data["x"].mean(dim=(0, 1)), data["x"].std(dim=(0, 1))
    return {"x": (data["x"] - mean) / std, "y": data["y"]}


@step(ignore=["store"])
def train(store: CheckpointStore, lineage: str, data: dict[str, torch.Tensor], seed: int) -> dict[str, int]:
    seed_everything(seed)  # before building anything random: the model's initial weights
    model = GRUClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    total_steps = EPOCHS * (SAMPLES // BATCH) // ACCUMULATE
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-2, total_steps=total_steps)
    loader = StatefulDataLoader(TensorDataset(data["x"][:SAMPLES], data["y"][:SAMPLES]), batch_size=BATCH, shuffle=True)
    schedule = CheckpointSchedule(
        triggers=[
            EveryNSteps(every=3),  # heavy
            EveryNSteps(every=1, tier="light"),
            Timebox(seconds=0.5),
            Milestones(names=["epoch_end", "train_end"]),
        ]
    )
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                      schedule=schedule, seed=seed) as ckpt:  # fmt: skip
        micro = 0
        for _epoch in range(ckpt.epoch, EPOCHS):
            model.train()
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y) / ACCUMULATE
                loss.backward()
                micro += 1
                if micro % ACCUMULATE == 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    ckpt.step()
            ckpt.end_epoch()
        ckpt.milestone("train_end")
        ckpt.flush()
        return {"version": store.latest(lineage).version, "steps": ckpt.step_count}


@step(ignore=["store"])
def evaluate(store: CheckpointStore, lineage: str, trained: dict[str, int], data: dict[str, torch.Tensor]) -> float:
    kill_points.pause("evaluate")
    model = GRUClassifier()
    model.load_state_dict(store.load(lineage=lineage, version=trained["version"], keys=["model"])["model"])
    model.eval()
    with torch.no_grad():
        logits = model(data["x"][SAMPLES:])
    return float((logits.argmax(dim=1) == data["y"][SAMPLES:]).float().mean())


@step(ignore=["store"])
def export(store: CheckpointStore, lineage: str, trained: dict[str, int], accuracy: float) -> dict[str, object]:
    return {"accuracy": accuracy, "state_digest": state_digest(store, lineage, trained["version"])}


@register_pipeline
@flow(name=PIPELINE)
def user_gru_pipeline(lineage: str, seed: int = 0) -> None:
    store = CheckpointStore.default()
    kill_points.install(store)
    with PipelineRun(store, lineage, pipeline=PIPELINE, parameters={"lineage": lineage, "seed": seed}):
        data = make_data(seed)
        kill_points.pause("after:make-data")
        data = normalize(data)
        kill_points.pause("after:normalize")
        trained = train(store, lineage, data, seed)
        kill_points.pause("after:train")
        accuracy = evaluate(store, lineage, trained, data)
        export(store, lineage, trained, accuracy)


if __name__ == "__main__":
    user_gru_pipeline(lineage=sys.argv[1])
