"""The global RNGs belong to the training thread while a Checkpointer is open (training/rng_guard.py).

Other threads that draw from Python's ``random`` or NumPy's legacy global generator (real libraries
here: tenacity's jitter, the standard library's own helpers, plain user threads) are served from a
private generator, so the checkpointed RNG state and the training it drives do not depend on
timing. Strict mode names the step and the generator when the Checkpointer's own work (a commit
hook, an event) moves one, torch's included, instead of letting the run diverge silently.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.step_values import differing_leaves

from prefect_recovery import CheckpointStore, DeterminismError
from prefect_recovery.core.errors import CheckpointNotFoundError
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps

STEPS = 12


@pytest.fixture(autouse=True)
def keep_torch_settings() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(
    home: Path,
    lineage: str,
    *,
    during_step: Callable[[int], None] | None = None,
    on_commit: Callable[[Any], None] | None = None,
    strict: bool | None = None,
    asynchronous: bool = False,
) -> tuple[dict[str, Any], Checkpointer]:
    """A tiny model whose training uses all three global RNGs; returns its final checkpoint."""
    store = CheckpointStore.default(home)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4)], asynchronous=asynchronous)
    ckpt = Checkpointer(
        store, lineage, model=model, optimizer=optimizer, schedule=schedule, seed=3, on_commit=on_commit,
        strict_determinism=strict,
    )  # fmt: skip
    with ckpt:
        while ckpt.step_count < STEPS:
            scale = 1.0 + random.random() + float(np.random.rand())  # the training's own draws
            x = torch.randn(4, 8) * scale
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            if during_step is not None:
                during_step(ckpt.step_count)
            optimizer.step()
            ckpt.step()
    return store.load(lineage=lineage), ckpt


def in_thread(work: Callable[[], None], name: str = "noisy-neighbour") -> None:
    thread = threading.Thread(target=work, name=name)
    thread.start()
    thread.join()


def background_draws() -> None:
    """What real background code does with the global generators."""
    from tenacity import Retrying, stop_after_attempt, wait_random_exponential

    random.random()
    random.randint(0, 10)
    random.choice([1, 2, 3])
    random.gauss(0, 1)
    random.getrandbits(32)
    random.shuffle([1, 2, 3, 4])
    random.seed(99)  # a library re-seeding "its" generator
    attempts = iter([ConnectionError("flaky"), None])
    for attempt in Retrying(wait=wait_random_exponential(multiplier=0.001, max=0.01), stop=stop_after_attempt(3)):
        with attempt:  # a retried call: tenacity draws its jitter from the global random
            error = next(attempts)
            if error is not None:
                raise error
    np.random.rand(3)
    np.random.seed(5)
    np.random.shuffle(np.arange(5))


def test_other_threads_cannot_move_the_training_rngs(tmp_path: Path) -> None:
    quiet, _ = train(tmp_path / "a", "run")
    noisy, ckpt = train(tmp_path / "b", "run", during_step=lambda step: in_thread(background_draws))
    assert differing_leaves(quiet, noisy) == []
    # the draws were served privately and recorded, naming the thread and the code that drew
    assert ckpt.rng_interference, "no interference recorded"
    seen = {(i.generator, i.thread) for i in ckpt.rng_interference}
    assert {("python", "noisy-neighbour"), ("numpy", "noisy-neighbour")} <= seen
    assert any("tenacity" in i.caller for i in ckpt.rng_interference), ckpt.rng_interference
    assert any(i.caller.startswith(__file__) for i in ckpt.rng_interference)


def test_the_writer_thread_and_hooks_on_it_cannot_move_them(tmp_path: Path) -> None:
    """An asynchronous save's commit hook runs on the checkpoint writer thread."""
    quiet, _ = train(tmp_path / "a", "run")
    noisy, _ = train(tmp_path / "b", "run", on_commit=lambda info: background_draws(), asynchronous=True)
    assert differing_leaves(quiet, noisy) == []


def test_without_a_checkpointer_the_generators_are_plain(tmp_path: Path) -> None:
    train(tmp_path, "run")  # installs and, on exit, removes the guard
    random.seed(1)
    expected = [random.Random(1).random() for _ in range(1)]
    drawn: list[float] = []
    in_thread(lambda: drawn.append(random.random()))
    assert drawn == expected, "after the Checkpointer closed, other threads must share the global RNG again"
    assert type(random._inst) is random.Random  # type: ignore[attr-defined]


def test_the_training_thread_keeps_seeding_and_state_round_trips(tmp_path: Path) -> None:
    store = CheckpointStore.default(tmp_path)
    with Checkpointer(store, "run", seed=1):
        random.seed(7)
        first = [random.random(), random.randint(0, 100), random.choice("abc")]
        random.seed(7)
        assert [random.random(), random.randint(0, 100), random.choice("abc")] == first
        state = random.getstate()
        a = random.random()
        random.setstate(state)
        assert random.random() == a
        np.random.seed(2)
        x = np.random.rand(2)
        np.random.seed(2)
        assert np.array_equal(np.random.rand(2), x)


def test_strict_mode_names_the_step_and_generator_a_hook_moved(tmp_path: Path) -> None:
    def drawing_hook(info: Any) -> None:
        torch.rand(1)  # e.g. a hook that samples; torch's default generator cannot be confined

    with pytest.raises(DeterminismError, match=r"torch global RNG changed .* at step 4 of run"):
        train(tmp_path / "strict", "run", on_commit=drawing_hook, strict=True)


def test_a_hook_on_the_training_thread_cannot_move_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without strict mode, what the Checkpointer's own work drew (a synchronous save's hook) is put back."""

    def drawing_hook(info: Any) -> None:
        torch.rand(1)
        random.random()
        np.random.rand()

    quiet, _ = train(tmp_path / "a", "run")
    hooked, _ = train(tmp_path / "b", "run", on_commit=drawing_hook, strict=False)
    assert differing_leaves(quiet, hooked) == []
    assert (
        "the python, numpy, torch global RNG changed during the Checkpointer's heavy save (every_n_steps) at step 4"
        in caplog.text
    )


def test_strict_mode_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_RECOVERY_STRICT_DETERMINISM", "1")
    with pytest.raises(DeterminismError, match="python"):
        train(tmp_path, "run", on_commit=lambda info: random.seed(4))
    # a quiet run passes strict mode, with background draws served privately
    monkeypatch.setenv("PREFECT_RECOVERY_STRICT_DETERMINISM", "true")
    train(tmp_path / "quiet", "run", during_step=lambda step: in_thread(background_draws))


def test_history_against_names_the_first_step_and_cause_of_a_divergence(tmp_path: Path) -> None:
    """Two runs of the same parameters: one had its torch RNG moved by something in step 6 (between the
    checkpoints at steps 4 and 8). `history --against` names step 8 and the RNG before the weights."""
    from typer.testing import CliRunner

    from prefect_recovery.cli import app

    def interfere(step: int) -> None:
        if step == 5:  # inside the 6th step, after the training's own draws: a stray draw
            torch.rand(1)

    train(tmp_path, "quiet")
    train(tmp_path, "again")
    train(tmp_path, "moved", during_step=interfere)
    store_args = [
        "--region",
        str(tmp_path / "regions" / "region-a"),
        "--region",
        str(tmp_path / "regions" / "region-b"),
    ]

    same = CliRunner().invoke(app, ["history", "--lineage", "quiet", "--against", "again", *store_args, "--json"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.output)["identical"] is True

    result = CliRunner().invoke(app, ["history", "--lineage", "quiet", "--against", "moved", *store_args, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)["first_divergence"]
    assert (found["step"], found["identical_before"]) == (8, 1)
    assert found["first_cause"].startswith("rng"), found
    assert any(name.startswith("model/") for name in found["differing"])

    human = CliRunner().invoke(app, ["history", "--lineage", "quiet", "--against", "moved", *store_args])
    assert "first differ at step 8" in human.output and "rng" in human.output


def test_a_checkpointer_whose_restore_fails_releases_the_guard(tmp_path: Path) -> None:
    """A restore that raises inside ``with Checkpointer(...)`` (a version that does not exist, a
    blob with no intact copy) must leave the global generators shared, as a closed one does."""
    store = CheckpointStore.default(tmp_path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointNotFoundError), Checkpointer(store, "run", model=model, seed=1, resume_version=99):
        pass
    random.seed(1)
    drawn: list[float] = []
    in_thread(lambda: drawn.append(random.random()))
    assert drawn == [random.Random(1).random()], "a failed restore left the RNG guard installed"
    assert type(random._inst) is random.Random  # type: ignore[attr-defined]
