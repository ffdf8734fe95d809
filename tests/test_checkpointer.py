"""``Checkpointer`` in-process: what a save holds, what a fresh process restores from it, and how the
background writer behaves when the disk is slow or fails.

A "fresh process" is simulated by new objects (built from another seed, so nothing matches by accident),
a new ``Checkpointer`` and a new store object on the same directories. Every comparison is bitwise.
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from prefect_recovery import CheckpointStore
from prefect_recovery.core import CheckpointNotFoundError, RegionUnavailableError, Store, open_region
from prefect_recovery.training.async_saver import SaveFailedError
from prefect_recovery.training.checkpointer import LIGHT_SUFFIX, PREEMPTED_EXIT_CODE, Checkpointer, Preempted
from prefect_recovery.training.sampling import ResumableRandomSampler
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps, Milestones, Timebox
from prefect_recovery.training.state_io import load_state

SYNC_EVERY_STEP = CheckpointSchedule(triggers=[EveryNSteps(every=1)], asynchronous=False)
MANUAL = CheckpointSchedule(triggers=[], asynchronous=False)  # saves only when asked


# -- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def keep_torch_settings() -> Iterator[None]:
    """Restores change global torch settings (threads, deterministic flags); undo them after each test."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    dtype = torch.get_default_dtype()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(dtype)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore.default(tmp_path / "store")


def reopen(store: CheckpointStore) -> CheckpointStore:
    """A new store object on the same directories (what a new process would build)."""
    return CheckpointStore.default(Path(store.regions[0].url).parent.parent)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Nested structures equal, tensors bitwise (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def assert_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(a[k], b[k]) for k in a), "the fresh object already equals the saved one"


def bn_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3)
    )


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int, scheduler: Any = None) -> None:
    model.train()
    for _ in range(n):
        x = torch.randn(16, 6)
        y = torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def save_then_restore(store: CheckpointStore, lineage: str, saved: dict[str, Any], fresh: dict[str, Any], **kw: Any):
    """Save ``saved`` (Checkpointer keyword objects) once, then restore into ``fresh`` with a new store object."""
    with Checkpointer(store, lineage, schedule=MANUAL, **saved, **kw) as ckpt:
        assert ckpt.resumed_from is None
        ckpt.step(3)
        info = ckpt.save()
    with Checkpointer(reopen(store), lineage, schedule=MANUAL, **fresh, **kw) as again:
        assert again.resumed_from == {"version": info.version, "step": 3}
        assert again.step_count == 3
    return info


# -- round trip of each component ------------------------------------------------------------------------
def test_model_with_batchnorm_buffers_round_trips(store):
    model = bn_model(0)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    assert int(model[1].num_batches_tracked) == 3
    fresh = bn_model(1)
    assert_differs(model.state_dict(), fresh.state_dict())

    save_then_restore(store, "model", {"model": model}, {"model": fresh})

    assert_same(model.state_dict(), fresh.state_dict())  # running_mean/var and num_batches_tracked included
    model.eval(), fresh.eval()
    x = torch.randn(4, 6)
    assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95), weight_decay=0.02),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_optimizer_round_trips_and_the_next_step_is_identical(store, make_optimizer):
    model = bn_model(0)
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer, 3)
    assert optimizer.state_dict()["state"], "the optimizer should have per-parameter state by now"
    fresh_model = bn_model(1)
    fresh_optimizer = make_optimizer(fresh_model.parameters())

    save_then_restore(
        store, "opt", {"model": model, "optimizer": optimizer}, {"model": fresh_model, "optimizer": fresh_optimizer}
    )

    assert_same(optimizer.state_dict(), fresh_optimizer.state_dict())
    # one more identical step on both: identical parameters and optimizer state afterwards
    torch.manual_seed(5)
    train_steps(model, optimizer, 1)
    torch.manual_seed(5)
    train_steps(fresh_model, fresh_optimizer, 1)
    assert_same(model.state_dict(), fresh_model.state_dict())
    assert_same(optimizer.state_dict(), fresh_optimizer.state_dict())


def test_lr_scheduler_round_trips(store):
    def build(seed: int):
        model = bn_model(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=20)
        return model, optimizer, scheduler

    model, optimizer, scheduler = build(0)
    train_steps(model, optimizer, 4, scheduler)
    fresh_model, fresh_optimizer, fresh_scheduler = build(1)
    assert fresh_scheduler.get_last_lr() != scheduler.get_last_lr()

    save_then_restore(
        store,
        "sched",
        {"model": model, "optimizer": optimizer, "scheduler": scheduler},
        {"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler},
    )

    assert_same(scheduler.state_dict(), fresh_scheduler.state_dict())
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    for _ in range(3):  # the schedule continues where it was
        optimizer.step(), scheduler.step()
        fresh_optimizer.step(), fresh_scheduler.step()
        assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_grad_scaler_round_trips_on_cpu(store):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_factor=4.0, growth_interval=3)
    for _ in range(4):  # 3 finite steps grow the scale once, then the tracker counts again
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 4)).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.is_enabled()
    assert scaler.get_scale() == 2.0**12 and scaler.state_dict()["_growth_tracker"] == 1
    fresh = torch.amp.GradScaler("cpu")
    assert fresh.state_dict() != scaler.state_dict()

    save_then_restore(store, "scaler", {"scaler": scaler}, {"scaler": fresh})

    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == scaler.get_scale() == 2.0**12


def make_loader(seed: int, *, batched_sampler: bool) -> StatefulDataLoader:
    dataset = TensorDataset(torch.arange(40).float(), torch.arange(40) % 7)
    if batched_sampler:  # the example's layout: the sampler yields whole batches, no collation
        sampler = ResumableRandomSampler(40, seed=seed, batch_size=6)
        return StatefulDataLoader(dataset, batch_size=None, sampler=sampler)
    return StatefulDataLoader(dataset, batch_size=6, sampler=ResumableRandomSampler(40, seed=seed))


def take(iterator: Iterator[Any], n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("batched_sampler", [True, False], ids=["sampler-batches", "loader-batches"])
@pytest.mark.parametrize("consumed", [3, 7, 9], ids=["mid-epoch", "last-batch-of-epoch", "second-epoch"])
def test_data_loader_position_round_trips(store, batched_sampler, consumed):
    loader = make_loader(11, batched_sampler=batched_sampler)

    def batches_forever(dl: StatefulDataLoader) -> Iterator[Any]:
        while True:
            yield from dl

    it = batches_forever(loader)
    take(it, consumed)
    with Checkpointer(store, "data", data=loader, schedule=MANUAL) as ckpt:
        ckpt.save()
    expected = take(it, 12)  # crosses at least one epoch boundary (7 batches per epoch)

    fresh = make_loader(11, batched_sampler=batched_sampler)
    with Checkpointer(reopen(store), "data", data=fresh, schedule=MANUAL) as again:
        assert again.resumed_from is not None
    got = take(batches_forever(fresh), 12)

    assert_same(got, expected)


def test_rng_states_round_trip(store):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(5), torch.rand(5), random.gauss(0, 1), np.random.randn(3)
    with Checkpointer(store, "rng", schedule=MANUAL) as ckpt:
        ckpt.save()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(4), np.random.randn(3), torch.rand(6))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process starts elsewhere

    with Checkpointer(reopen(store), "rng", schedule=MANUAL):
        pass
    got = (random.random(), random.gauss(0, 1), np.random.rand(4), np.random.randn(3), torch.rand(6))

    assert got[:2] == expected[:2]
    assert np.array_equal(got[2], expected[2]) and np.array_equal(got[3], expected[3])
    assert torch.equal(got[4], expected[4])


def test_first_run_is_seeded_from_seed(store):
    with Checkpointer(store, "seeded-a", seed=1234, schedule=MANUAL) as ckpt:
        first = (random.random(), float(np.random.rand()), torch.rand(3))
        assert ckpt.resumed_from is None
    with Checkpointer(store, "seeded-b", seed=1234, schedule=MANUAL):
        second = (random.random(), float(np.random.rand()), torch.rand(3))

    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_counters_round_trip(store):
    with Checkpointer(store, "counters", schedule=MANUAL) as ckpt:
        ckpt.step(41)
        ckpt.step()
        ckpt.epoch = 7
        info = ckpt.save()
    assert info.step == 42

    with Checkpointer(reopen(store), "counters", schedule=MANUAL) as again:
        assert (again.step_count, again.epoch) == (42, 7)
        assert again.resumed_from == {"version": info.version, "step": 42}


def test_step_n_saves_when_it_crosses_a_scheduled_step(store):
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=5), Milestones(steps=[10])], asynchronous=False)
    with Checkpointer(store, "accumulate", model=bn_model(0), schedule=schedule) as ckpt:
        for _ in range(4):
            ckpt.step(3)  # e.g. three micro-batches per call: counts 3, 6, 9, 12

    # step 5 was completed inside the call that ended at 6, steps 10 (both triggers) inside the one ending at 12
    assert [info.step for info in store.list("accumulate")] == [6, 12]


class EmaTracker:
    """A user object with its own state (what ``extras`` is for)."""

    def __init__(self, value: float = 0.0):
        self.value = value
        self.history = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        self.history = state["history"]


def test_extras_round_trip(store):
    tracker = EmaTracker(0.125)
    tracker.history = torch.tensor([1.5, -2.0, 3.25])
    best = {"best_loss": 0.3125, "best_step": 17, "tag": "run-7", "flags": [True, None]}
    with Checkpointer(store, "extras", extras={"ema": tracker, "best": best}, schedule=MANUAL) as ckpt:
        ckpt.save()

    fresh_tracker = EmaTracker()
    with Checkpointer(reopen(store), "extras", extras={"ema": fresh_tracker, "best": None}, schedule=MANUAL) as again:
        restored_best = again.extras["best"]

    assert fresh_tracker.value == 0.125
    assert torch.equal(fresh_tracker.history, torch.tensor([1.5, -2.0, 3.25]))
    assert restored_best == best


def test_determinism_settings_recorded_and_reapplied(store):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with Checkpointer(store, "det", seed=5, schedule=MANUAL) as ckpt:
        ckpt.step()
        ckpt.save()
    state, _manifest = load_state(store.core, lineage="det")
    assert state["determinism"]["num_threads"] == 1
    assert state["determinism"]["deterministic_algorithms"] is True
    assert state["determinism"]["seed"] == 5

    # the next process starts with other settings
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    with Checkpointer(reopen(store), "det", seed=5, schedule=MANUAL) as again:
        assert again.resumed_from is not None
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()


def test_restore_of_a_component_the_checkpoint_lacks_is_refused(store):
    model = bn_model(0)
    with Checkpointer(store, "partial", model=model, schedule=MANUAL) as ckpt:
        ckpt.save()
    fresh = bn_model(1)
    with pytest.raises(CheckpointNotFoundError, match="optimizer"):
        Checkpointer(
            reopen(store),
            "partial",
            model=fresh,
            optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1),
            schedule=MANUAL,
        ).restore()


def test_a_full_resume_continues_bit_identically(store):
    """Save every 3 steps; 'crash' after step 7; a fresh process resumes from step 6 and ends
    exactly where an uninterrupted run ends (weights, optimizer, scheduler, scaler, data, RNG)."""

    def run(lineage: str, stop_at: int, seed_objects: int) -> tuple[dict[str, Any], list[float]]:
        model = bn_model(seed_objects)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
        dataset = TensorDataset(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), torch.arange(50) % 3)
        # the loader's own generator: iter(loader) must not draw from the global torch RNG (as in examples/workload.py)
        loader = StatefulDataLoader(
            dataset, batch_size=8, sampler=ResumableRandomSampler(50, seed=3), generator=torch.Generator()
        )
        losses = []
        schedule = CheckpointSchedule(triggers=[EveryNSteps(every=3)], max_in_flight=2)
        with Checkpointer(
            reopen(store),
            lineage,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            data=loader,
            schedule=schedule,
            seed=42,
        ) as ckpt:
            batches = iter(loader)
            while ckpt.step_count < stop_at:
                try:
                    x, y = next(batches)
                except StopIteration:
                    ckpt.epoch += 1
                    batches = iter(loader)
                    continue
                x = x + 0.01 * torch.from_numpy(np.random.randn(*x.shape).astype(np.float32))  # numpy RNG
                if random.random() < 0.5:  # python RNG
                    x = x.flip(0).flip(0) * 1.0
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)  # dropout: torch RNG
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                losses.append(float(loss.detach()))
                ckpt.step()
            final = ckpt.capture()
        return final, losses

    reference, reference_losses = run("uninterrupted", 15, seed_objects=0)
    run("crashed", 7, seed_objects=0)  # saved at 3 and 6; step 7 is lost with the process
    resumed, resumed_losses = run("crashed", 15, seed_objects=1)

    assert reopen(store).core.list("crashed")[1].step == 6
    assert resumed_losses == reference_losses[6:]
    assert_same(reference, resumed)


# -- what the manifest says ---------------------------------------------------------------------------------
def test_manifest_names_durable_components_and_never_stores_gradients(store):
    model = bn_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loader = make_loader(0, batched_sampler=True)
    next(iter(loader))
    train_steps(model, optimizer, 2, scheduler)
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with Checkpointer(
        store,
        "manifest",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu"),
        data=loader,
        extras={"note": "hello"},
        schedule=MANUAL,
        owner="rank-0",
    ) as ckpt:
        ckpt.step(2)
        ckpt.save()

    manifest, _holders = store.core.resolve("manifest")
    components = {c.name: c for c in manifest.components}
    durable = {"model", "optimizer", "scheduler", "scaler", "data", "extras", "rng", "determinism", "counters"}
    assert set(components) == durable | {"gradients"}
    assert all(components[name].durable and components[name].owner == "rank-0" for name in durable)
    assert components["gradients"].durable is False
    # every stored tensor belongs to a durable component, and none of them is a gradient
    assert {entry.name.split("/", 1)[0] for entry in manifest.entries} <= durable
    assert all(entry.component in durable for entry in manifest.entries if entry.kind == "tensor")
    assert not any("grad" in part for entry in manifest.entries for part in entry.name.split("/"))
    stored, _ = load_state(store.core, lineage="manifest")
    stored_tensors = [t for t in _tensors(stored)]
    for grad in grads:
        assert not any(t.shape == grad.shape and torch.equal(t, grad) for t in stored_tensors)
    assert manifest.metadata["tier"] == "heavy" and manifest.metadata["complete"] is True
    assert manifest.metadata["trigger"] == "manual"


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def test_light_saves_go_to_the_first_region_only_and_hold_light_components(store):
    model = bn_model(0)
    optimizer = torch.optim.AdamW(model.parameters())
    train_steps(model, optimizer, 1)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4), EveryNSteps(every=2, tier="light")])
    with Checkpointer(store, "tiers", model=model, optimizer=optimizer, schedule=schedule) as ckpt:
        for _ in range(6):
            ckpt.step()
    core = reopen(store).core

    heavy, light = core.list("tiers"), core.list("tiers" + LIGHT_SUFFIX)
    assert [info.step for info in heavy] == [4]
    assert [info.step for info in light] == [2, 6]
    region_a, region_b = core.regions
    assert all(info.regions == [region_a.name] for info in light)
    assert heavy[0].regions == [region_a.name, region_b.name]
    assert region_b.list("lineages") == ["tiers"]  # nothing of the light lineage in the second region

    manifest, _ = core.resolve("tiers" + LIGHT_SUFFIX)
    light_parts = {"model", "rng", "counters", "determinism"}  # default light_components present here
    assert {entry.name.split("/", 1)[0] for entry in manifest.entries} <= light_parts
    assert {c.name for c in manifest.components if c.durable} == light_parts
    assert manifest.metadata["tier"] == "light" and manifest.metadata["complete"] is False
    heavy_manifest, _ = core.resolve("tiers")
    assert any(entry.name.startswith("optimizer/") for entry in heavy_manifest.entries)


def test_restore_ignores_light_checkpoints(store):
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4), EveryNSteps(every=1, tier="light")])
    model = bn_model(0)
    with Checkpointer(store, "ignore-light", model=model, schedule=schedule) as ckpt:
        for _ in range(6):  # heavy at 4; light at 1, 2, 3, 5, 6
            ckpt.step()
    heavy_model = load_state(store.core, lineage="ignore-light")[0]["model"]

    fresh = bn_model(1)
    with Checkpointer(reopen(store), "ignore-light", model=fresh, schedule=MANUAL) as again:
        assert again.step_count == 4
        assert again.resumed_from == {"version": 1, "step": 4}
    assert_same(fresh.state_dict(), heavy_model)


def test_only_light_checkpoints_means_a_fresh_start(store):
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=1, tier="light")], asynchronous=False)
    with Checkpointer(store, "light-only", model=bn_model(0), schedule=schedule) as ckpt:
        ckpt.step(), ckpt.step()
    assert len(store.list("light-only" + LIGHT_SUFFIX)) == 2

    with Checkpointer(reopen(store), "light-only", model=bn_model(1), seed=0, schedule=MANUAL) as again:
        assert again.resumed_from is None
        assert again.step_count == 0


# -- time-based saves with an injected clock -------------------------------------------------------------------
def test_timebox_with_injected_clock(store):
    now = [1000.0]
    schedule = CheckpointSchedule(triggers=[Timebox(seconds=10, tier="light"), Timebox(seconds=25)])
    times = [5.0, 10.0, 20.0, 24.9, 25.0, 30.0, 35.0, 44.9, 50.0]  # seconds of work after steps 1..9
    with Checkpointer(store, "clock", model=bn_model(0), schedule=schedule, clock=lambda: now[0]) as ckpt:
        for at in times:
            now[0] = 1000.0 + at
            ckpt.step()

    heavy = store.list("clock")
    light = store.list("clock" + LIGHT_SUFFIX)
    # light at t=10 and t=20 (10 s after the previous light save); heavy at t=25 resets both tiers;
    # light again at t=35; heavy at t=50, 25 s after the previous heavy one
    assert [(i.step, i.metadata["trigger"]) for i in heavy] == [(5, "timebox"), (9, "timebox")]
    assert [(i.step, i.metadata["trigger"]) for i in light] == [(2, "timebox"), (3, "timebox"), (7, "timebox")]


def test_milestone_saves_synchronously(store):
    schedule = CheckpointSchedule(triggers=[Milestones(names=["epoch_end"])])
    with Checkpointer(store, "milestone", model=bn_model(0), schedule=schedule) as ckpt:
        ckpt.step(3)
        assert ckpt.milestone("not-listed") is None
        info = ckpt.milestone("epoch_end")
        # committed when milestone() returns, no flush needed
        assert info is not None and info.step == 3
        assert [i.version for i in reopen(store).list("milestone")] == [info.version]
        assert info.metadata["trigger"] == "milestone:epoch_end"


# -- SIGTERM: an emergency checkpoint at the next step boundary ------------------------------------------------
def test_sigterm_makes_an_emergency_checkpoint_at_the_next_step(store):
    previous = signal.getsignal(signal.SIGTERM)
    model = bn_model(0)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=100)])
    with pytest.raises(Preempted) as raised, Checkpointer(store, "preempted", model=model, schedule=schedule) as ckpt:
        ckpt.step(6)
        # the handler only flags the signal; without it, SIGTERM would end this test process
        assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is ckpt
        signal.raise_signal(signal.SIGTERM)
        assert ckpt.preempted
        assert store.list("preempted") == []  # nothing written from inside the signal handler
        ckpt.step()  # the next step boundary writes the checkpoint, then stops the run
        pytest.fail("step() returned after SIGTERM")

    assert raised.value.code == PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM
    info = raised.value.info
    assert info is not None and info.step == 7 and info.metadata["trigger"] == "emergency"
    assert [(i.step, i.metadata["trigger"]) for i in reopen(store).list("preempted")] == [(7, "emergency")]
    assert signal.getsignal(signal.SIGTERM) is previous  # the previous handler is back
    fresh = bn_model(1)
    with Checkpointer(reopen(store), "preempted", model=fresh, schedule=MANUAL) as again:
        assert again.step_count == 7
    assert_same(fresh.state_dict(), model.state_dict())


# -- the background writer: slow disks, failing disks --------------------------------------------------------
class SlowDiskStore(Store):
    """Test double for a slow disk: each commit waits until the test opens ``gate``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def commit(self, *args: Any, **kwargs: Any):
        self.entered.release()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().commit(*args, **kwargs)


class FlakyDiskStore(Store):
    """Test double for a disk that fails once: commit number ``fail_on`` raises like an unreachable region."""

    def __init__(self, *args: Any, fail_on: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fail_on = fail_on
        self.calls = 0

    def commit(self, *args: Any, **kwargs: Any):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RegionUnavailableError("region-a", "simulated I/O error while writing")
        return super().commit(*args, **kwargs)


def regions(tmp_path: Path, n: int = 2) -> list[Any]:
    out = []
    for i in range(n):
        path = tmp_path / f"region-{i}"
        path.mkdir()
        out.append(open_region(str(path)))
    return out


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_backpressure_skip_drops_saves_while_the_writer_is_busy(tmp_path):
    core = SlowDiskStore(regions(tmp_path))
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=1)], max_in_flight=1, on_backpressure="skip")
    model = bn_model(0)
    with Checkpointer(core, "skip", model=model, schedule=schedule) as ckpt:
        ckpt.step()  # save 1 takes the only slot and blocks in the slow disk
        assert core.entered.acquire(timeout=60)
        for _ in range(3):
            ckpt.step()  # steps 2-4: the slot is taken, so these saves are skipped, without blocking
        core.gate.set()
        ckpt.flush()
        ckpt.step()  # step 5: the slot is free again
    assert [info.step for info in core.list("skip")] == [1, 5]
    assert ckpt._saver.skipped == 3


def test_backpressure_wait_blocks_step_until_the_slot_frees(tmp_path):
    core = SlowDiskStore(regions(tmp_path))
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=1)], max_in_flight=1, on_backpressure="wait")
    model = torch.nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    returned = threading.Event()
    with Checkpointer(core, "wait", model=model, schedule=schedule) as ckpt:
        ckpt.step()  # save 1: snapshot taken, writer blocked in the slow disk
        assert core.entered.acquire(timeout=60)
        with torch.no_grad():
            model.weight.fill_(2.0)  # training goes on and changes the weights in place

        def second_step() -> None:
            ckpt.step()
            returned.set()

        worker = threading.Thread(target=second_step, daemon=True)
        worker.start()
        assert not returned.wait(0.5), "step() returned although the only save slot was taken"
        assert core.list("wait") == []
        core.gate.set()
        worker.join(60)
        assert returned.is_set()
        ckpt.flush()

    infos = core.list("wait")
    assert [info.step for info in infos] == [1, 2]
    first = load_state(core, lineage="wait", version=infos[0].version)[0]["model"]["weight"]
    second = load_state(core, lineage="wait", version=infos[1].version)[0]["model"]["weight"]
    assert torch.equal(first, torch.ones(3, 3))  # the snapshot, not the weights at write time
    assert torch.equal(second, torch.full((3, 3), 2.0))


def test_failed_async_save_surfaces_on_next_step_and_previous_version_stays_latest(tmp_path):
    core = FlakyDiskStore(regions(tmp_path), fail_on=2)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=2)])
    model = bn_model(0)
    ckpt = Checkpointer(core, "flaky", model=model, schedule=schedule)
    with ckpt:
        ckpt.step(), ckpt.step()  # save at step 2 commits
        ckpt.flush()
        ckpt.step(), ckpt.step()  # save at step 4 fails in the background
        wait_until(lambda: core.calls == 2 and ckpt._saver.in_flight == 0, "the failing save to finish")
        with pytest.raises(SaveFailedError, match="still the latest"):
            ckpt.step()
        assert [info.step for info in core.list("flaky")] == [2]
        assert core.resolve("flaky")[0].step == 2
        # one failed save does not stop the writer: later saves commit
        ckpt.step(), ckpt.step()  # steps 5 and 6 (the step() that raised did not count)
        ckpt.flush()
    assert [info.step for info in core.list("flaky")] == [2, 6]


def test_failed_async_save_surfaces_on_close(tmp_path):
    core = Store(regions(tmp_path, 1))
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=2)])
    checkpointer = Checkpointer(core, "vanishing", model=bn_model(0), schedule=schedule)
    with pytest.raises(SaveFailedError, match="step 4"), checkpointer as ckpt:
        ckpt.step(), ckpt.step()
        ckpt.flush()
        assert [info.step for info in core.list("vanishing")] == [2]
        shutil.rmtree(core.regions[0].root)  # the disk goes away
        ckpt.step(), ckpt.step()  # the save at step 4 fails in the background; close() reports it


def test_flush_reports_a_failed_save_too(tmp_path):
    core = FlakyDiskStore(regions(tmp_path), fail_on=1)
    with Checkpointer(core, "flush", model=bn_model(0), schedule=CheckpointSchedule.every(1)) as ckpt:
        ckpt.step()
        with pytest.raises(SaveFailedError):
            ckpt.flush()
        assert core.list("flush") == []
