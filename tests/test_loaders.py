"""Data loaders under a ``Checkpointer`` (prefect_recovery/training/loaders.py), as users write them.

Each variant of torchdata's ``StatefulDataLoader`` that users write (``shuffle=True`` with and without
``generator=``, ``num_workers`` 0 and 2, a dataset drawing random augmentation in the workers) trains a tiny
model over three epochs; a second "process" (fresh objects, nothing shared but the store) resumes from a
checkpoint in the middle of the first epoch and must see exactly the batches, the dropout masks and the final
state of the uninterrupted run, across two epoch boundaries after the resume. A plain ``DataLoader`` is refused
when the Checkpointer is built, with the fix. Epochs: ``end_epoch()`` counts them, an ``epoch_end`` milestone
in the middle of gradient accumulation is saved at the next optimizer step with the gradients applied, and an
epoch ending on a step that was just saved writes no second heavy checkpoint.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from helpers.step_values import differing_leaves
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import (
    Checkpointer,
    CheckpointSchedule,
    CheckpointStore,
    EveryNSteps,
    Milestones,
    Timebox,
    UnsupportedLoaderError,
    seed_everything,
)

SEED = 11
SAMPLES, BATCH = 20, 4  # 5 batches an epoch
EPOCHS = 3


class NoisyDataset(Dataset):
    """Random augmentation from all three global RNGs, drawn where the sample is fetched (a worker, or here)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(SAMPLES, 6, generator=generator)
        self.y = torch.randint(0, 3, (SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        jitter = 0.1 * torch.randn(6) + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return self.x[index] + jitter, self.y[index]


def build(generator: bool, workers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, StatefulDataLoader]:
    seed_everything(SEED)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = StatefulDataLoader(
        NoisyDataset(),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(SEED) if generator else None,
    )
    return model, optimizer, loader


def train(store: CheckpointStore, lineage: str, generator: bool, workers: int, stop_after: int | None = None):
    """The README's loop; returns (batches seen, whether it stopped early). ``stop_after`` steps: a crash."""
    model, optimizer, loader = build(generator, workers)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=3)], asynchronous=False)
    seen: list[torch.Tensor] = []
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, schedule=schedule,
                      seed=SEED) as ckpt:  # fmt: skip
        for _epoch in range(ckpt.epoch, EPOCHS):
            for x, y in loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                seen.append(torch.cat([x.flatten(), loss.detach().reshape(1)]))
                ckpt.step()
                if stop_after is not None and ckpt.step_count == stop_after:
                    return seen, ckpt.capture()
            ckpt.end_epoch()
        return seen, ckpt.capture()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("generator", [True, False], ids=["generator", "no-generator"])
def test_a_resumed_loader_matches_across_epoch_boundaries(tmp_path, generator, workers):
    store = CheckpointStore.default(tmp_path / "store")
    reference, final = train(store, "uninterrupted", generator, workers)
    assert len(reference) == EPOCHS * SAMPLES // BATCH

    # killed after step 4 (the checkpoint at step 3 is mid-epoch 0), then resumed in fresh objects
    train(store, "crashed", generator, workers, stop_after=4)
    resumed, resumed_final = train(store, "crashed", generator, workers)

    assert store.latest("crashed").step == EPOCHS * SAMPLES // BATCH
    # the resumed run starts after step 3 and crosses the ends of epochs 0 and 1
    assert len(resumed) == len(reference) - 3
    differing = [i + 3 for i, (a, b) in enumerate(zip(reference[3:], resumed, strict=True)) if not torch.equal(a, b)]
    assert differing == [], f"batches (or losses) that differ after the resume: {differing}"
    assert differing_leaves(final, resumed_final) == []
    assert resumed_final["counters"] == {"step": 15, "epoch": EPOCHS}


def test_a_plain_dataloader_is_refused_with_the_fix(tmp_path):
    store = CheckpointStore.default(tmp_path / "store")
    dataset = TensorDataset(torch.zeros(8, 2))
    with pytest.raises(UnsupportedLoaderError, match="StatefulDataLoader"):
        Checkpointer(store, "plain", data=DataLoader(dataset, batch_size=2, shuffle=True), seed=0)
    with pytest.raises(UnsupportedLoaderError, match="state_dict"):
        Checkpointer(store, "list", data=[1, 2, 3], seed=0)


def test_torchdata_set_vital_warning_is_silenced():
    import prefect_recovery.training.loaders

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import importlib

        importlib.reload(prefect_recovery.training.loaders)
        StatefulDataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    assert not [w for w in caught if "set_vital" in str(w.message)]


# -- epochs and gradient accumulation ---------------------------------------------------------------------------
def accumulate(store: CheckpointStore, lineage: str, stop_after: int | None = None, epochs: int = 2):
    """5 batches an epoch, one optimizer step every 2: every epoch ends in the middle of an accumulation."""
    seed_everything(SEED)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = StatefulDataLoader(NoisyDataset(), batch_size=BATCH, shuffle=True)
    schedule = CheckpointSchedule(triggers=[Milestones(names=["epoch_end"])], asynchronous=False)
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, schedule=schedule,
                      seed=SEED) as ckpt:  # fmt: skip
        micro = 0
        for _epoch in range(ckpt.epoch, epochs):
            for x, y in loader:
                torch.nn.functional.cross_entropy(model(x), y).backward()
                micro += 1
                if micro % 2 == 0:
                    optimizer.step()
                    optimizer.zero_grad()
                    ckpt.step()
                    if ckpt.step_count == stop_after:
                        return ckpt.capture()
            ckpt.end_epoch()
        return ckpt.capture()


def test_epoch_end_in_the_middle_of_accumulation_saves_at_the_next_step(tmp_path):
    store = CheckpointStore.default(tmp_path / "store")
    final = accumulate(store, "accum")
    infos = store.list("accum")
    # epoch 0 ends after batch 5 (step 2 done, one micro-batch pending): saved at step 3, gradients applied
    assert [(i.step, i.metadata["trigger"], i.metadata["epoch"]) for i in infos] == [
        (3, "milestone:epoch_end", 1),
        (5, "milestone:epoch_end", 2),  # epoch 1 ends on a whole accumulation: saved at once
    ]
    assert final["counters"] == {"step": 5, "epoch": 2}

    # a run killed right after that checkpoint resumes bit-identically
    accumulate(store, "accum-crashed", stop_after=3)
    resumed = accumulate(store, "accum-crashed")
    assert differing_leaves(final, resumed) == []


def test_an_epoch_ending_on_a_saved_step_writes_no_second_heavy_checkpoint(tmp_path):
    store = CheckpointStore.default(tmp_path / "store")
    seed_everything(0)
    model = torch.nn.Linear(2, 1)
    loader = StatefulDataLoader(TensorDataset(torch.zeros(10, 2)), batch_size=5)
    now = [0.0]
    schedule = CheckpointSchedule(triggers=[Timebox(seconds=10), Milestones(names=["epoch_end"])], asynchronous=False)
    with Checkpointer(store, "dup", model=model, data=loader, schedule=schedule, seed=0, clock=lambda: now[0]) as ckpt:
        for _epoch in range(ckpt.epoch, 2):
            for _batch in loader:
                now[0] += 6  # the timebox fires on every second step: the last step of each epoch
                ckpt.step()
            ckpt.end_epoch()
    steps = [(info.step, info.metadata["trigger"]) for info in store.list("dup")]
    assert steps == [(2, "timebox"), (4, "timebox")], steps
    assert ckpt.epoch == 2


def test_a_model_built_before_seeding_is_warned_about_on_a_first_run(tmp_path):
    store = CheckpointStore.default(tmp_path / "store")
    torch.manual_seed(12345)  # some other seed: the model's init is not the Checkpointer's seed
    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=r"seed_everything\(7\)"), Checkpointer(store, "unseeded", model=model, seed=7):
        pass
    seed_everything(7)
    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Checkpointer(store, "seeded", model=model, seed=7):
            pass
