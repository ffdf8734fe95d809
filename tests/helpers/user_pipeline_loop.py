"""A user's plain training loop in a pipeline, from the README: a ``StatefulDataLoader`` with the standard
arguments (``shuffle=True``, no generator, two workers with random augmentation), an MLP with dropout, SGD with
momentum and a step LR schedule, written inline in the flow around one ``@step`` that prepares the data; the
loop counts epochs with ``end_epoch()``; evaluation runs in the flow. The flow returns None.

Run as ``python -m helpers.user_pipeline_loop LINEAGE`` with ``tests/`` on PYTHONPATH.
"""

from __future__ import annotations

import sys

import torch
from helpers import kill_points
from prefect import flow
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import (
    Checkpointer,
    CheckpointSchedule,
    CheckpointStore,
    EveryNSteps,
    Milestones,
    PipelineRun,
    register_pipeline,
    seed_everything,
    step,
)

PIPELINE = "user-loop-pipeline"
EPOCHS = 3


class Augmented(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.05 * torch.randn(self.x.shape[1]), self.y[index]  # runs in a worker


@step(name="prepare")
def prepare(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 5, generator=generator)
    return {"x": x, "y": (x[:, 0] > 0).long()}


@register_pipeline
@flow(name=PIPELINE)
def user_loop_pipeline(lineage: str, seed: int = 0) -> None:
    store = CheckpointStore.default()
    kill_points.install(store)
    with PipelineRun(store, lineage, pipeline=PIPELINE, parameters={"lineage": lineage, "seed": seed}):
        data = prepare(seed)
        kill_points.pause("after:prepare")
        seed_everything(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(16, 2)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        loader = StatefulDataLoader(Augmented(data["x"], data["y"]), batch_size=8, shuffle=True, num_workers=2)
        schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4), Milestones(names=["epoch_end"])])
        with Checkpointer(store, lineage, model=model, optimizer=optimizer, scheduler=scheduler, data=loader,
                          schedule=schedule, seed=seed) as ckpt:  # fmt: skip
            for _epoch in range(ckpt.epoch, EPOCHS):
                for x, y in loader:
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    optimizer.step()
                    scheduler.step()
                    ckpt.step()
                ckpt.end_epoch()
        kill_points.pause("evaluate")
        model.eval()
        with torch.no_grad():
            accuracy = float((model(data["x"]).argmax(dim=1) == data["y"]).float().mean())
        print(f"accuracy {accuracy:.3f}")


if __name__ == "__main__":
    user_loop_pipeline(lineage=sys.argv[1])
