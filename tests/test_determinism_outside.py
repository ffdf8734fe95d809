"""Issue 18 tried from outside, as an ML engineer with their own training loop would (not the shipped example).

* **Other threads and the global generators, strict mode on.** A thread that is not the training draws from
  or seeds Python's ``random``, NumPy's legacy generator or torch's default generator in the middle of a
  step. Python and NumPy are served privately (the run equals a quiet one, the draw is recorded with its
  thread); a torch seeding call (``manual_seed``, ``seed``, ``fork_rng``'s restore) is refused and named with
  the step, the generator, the thread and the caller. A plain torch draw on another thread is the documented
  limit (docs/DETERMINISM.md): unseen while it happens, and ``history --against`` names ``rng/torch`` first.
  Two trainings in two threads of one process are named with the other thread. A torch draw in an
  ``on_commit`` hook under asynchronous saves (the writer thread) is served privately, or named (dropout).
* **Private generators** (``torch.Generator``, NumPy ``Generator``/``RandomState``, ``random.Random``) passed
  as ``extras`` resume where they were.
* **``history --against``** (CLI, ``--json``, and ``first_divergence``): two runs that differ first in a
  hyperparameter, one RNG draw, the data order, or the weights only late are reported at the right step with
  the right first cause; identical runs as identical; runs of different lengths, a lineage that does not
  exist, one with a single checkpoint and two without a common checkpoint get clear answers; two pipeline
  runs whose input file changed are told apart by the input, not only by the weights.
* **``replay-check``** of a registered pipeline whose run another thread disturbed with a torch draw: the
  segment that held the draw is not deterministic and ``rng/torch`` is named first; the next one replays.
* **Kill and resume in real processes** (SIGKILL) of a loop with its own private generators (``torch``,
  NumPy and Python, passed as ``extras``), a shuffling ``StatefulDataLoader`` with random augmentation in 0
  or 2 worker processes and a thread count the launcher set: bit-identical to the uninterrupted run at each
  kill point (before the first checkpoint, right after one, mid-epoch, at an epoch boundary), and the
  resumed process trains on the checkpoint's thread count.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

if __name__ != "__main__":
    from helpers.step_values import differing_leaves

from prefect_recovery import CheckpointStore, DeterminismError
from prefect_recovery.core.errors import CheckpointNotFoundError
from prefect_recovery.training.checkpointer import Checkpointer
from prefect_recovery.training.divergence import first_divergence
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps, Milestones

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
    during_step: Callable[[int, torch.nn.Module], None] | None = None,
    strict: bool = True,
    lr: float = 0.1,
    steps: int = STEPS,
    every: int = 4,
    resume: Any = None,
) -> tuple[dict[str, Any], Checkpointer]:
    """A user's loop: dropout (torch's global RNG), Python and NumPy draws in the training thread."""
    store = CheckpointStore.default(home)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=every)], asynchronous=False)
    ckpt = Checkpointer(store, lineage, model=model, optimizer=optimizer, schedule=schedule, seed=5,
                        strict_determinism=strict, resume_from=resume)  # fmt: skip
    with ckpt:
        while ckpt.step_count < steps:
            scale = 1.0 + random.random() + float(np.random.rand())
            loss = model(torch.randn(4, 8) * scale).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            if during_step is not None:
                during_step(ckpt.step_count, model)
            optimizer.step()
            ckpt.step()
    return store.load_checkpoint(lineage=lineage), ckpt


def in_thread(work: Callable[[], Any]) -> None:
    thread = threading.Thread(target=work, name="metrics-exporter")
    thread.start()
    thread.join()


def at_step(step: int, work: Callable[[], Any]) -> Callable[[int, torch.nn.Module], None]:
    """Run ``work`` on another thread in the middle of training step ``step`` (1-based)."""
    return lambda done, _model: in_thread(work) if done == step - 1 else None


def fork_rng_draw() -> None:
    with torch.random.fork_rng():  # a library "not disturbing" the global RNG, from its own thread
        torch.rand(3)


# -- other threads, strict mode --------------------------------------------------------------------
PRIVATE = {  # served from the drawing thread's own generator: the training cannot see them
    "random.random": ("python", lambda: random.random()),
    "random.seed": ("python", lambda: random.seed(1)),
    "random.shuffle": ("python", lambda: random.shuffle([1, 2, 3])),
    "np.random.rand": ("numpy", lambda: np.random.rand(3)),
    "np.random.seed": ("numpy", lambda: np.random.seed(1)),
    "np.random.permutation": ("numpy", lambda: np.random.permutation(5)),
}
TORCH_SEEDING = {  # refused and named: torch's default generator cannot be confined to a thread
    "torch.manual_seed": ("manual_seed", lambda: torch.manual_seed(1)),
    "torch.seed": ("seed", lambda: torch.seed()),
    "torch.random.fork_rng": ("set_rng_state", fork_rng_draw),
}


@pytest.mark.parametrize("action", list(PRIVATE))
def test_python_and_numpy_use_on_another_thread_leaves_a_strict_run_unchanged(tmp_path: Path, action: str) -> None:
    generator, work = PRIVATE[action]
    quiet, _ = train(tmp_path, "quiet")
    noisy, ckpt = train(tmp_path, "noisy", during_step=at_step(6, work))
    assert differing_leaves(quiet, noisy) == []
    # (other threads of this process, Prefect's among them, may be recorded too: only the exporter's are ours)
    ours = [i for i in ckpt.rng_interference if i.thread == "metrics-exporter"]
    assert ours and {i.generator for i in ours} == {generator}, ckpt.rng_interference
    assert all(i.caller.startswith(__file__) for i in ours), ours


@pytest.mark.parametrize("action", list(TORCH_SEEDING))
def test_torch_seeding_on_another_thread_is_named_in_strict_mode(tmp_path: Path, action: str) -> None:
    function, work = TORCH_SEEDING[action]
    with pytest.raises(DeterminismError) as raised:
        train(tmp_path, "strict", during_step=at_step(6, work))
    message = str(raised.value)
    assert "during step 6 of strict" in message, message
    assert f"torch global RNG ({function}) used by thread 'metrics-exporter'" in message, message
    assert f"at {__file__}:" in message, message  # the user's line, not torch's or contextlib's
    assert "torch.Generator" in message  # the fix


def test_torch_seeding_on_another_thread_cannot_reset_the_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without strict mode the call is refused (the training's generator is not re-seeded) and warned about."""
    quiet, _ = train(tmp_path, "quiet", strict=False)
    seeded, ckpt = train(tmp_path, "seeded", strict=False, during_step=at_step(6, lambda: torch.manual_seed(0)))
    assert differing_leaves(quiet, seeded) == []
    torch_uses = [(i.generator, i.function, i.thread) for i in ckpt.rng_interference if i.generator == "torch"]
    assert torch_uses == [("torch", "manual_seed", "metrics-exporter")]
    assert "during step 6 of seeded: torch global RNG (manual_seed) used by thread 'metrics-exporter'" in caplog.text
    # once the Checkpointer is closed, torch.manual_seed from any thread is the plain one again
    in_thread(lambda: torch.manual_seed(77))
    assert torch.initial_seed() == 77


def test_a_torch_draw_on_another_thread_is_the_documented_limit(tmp_path: Path) -> None:
    """docs/DETERMINISM.md: no Python hook sees a foreign ``torch.rand``; strict mode cannot raise. What the user
    has is the diagnosis afterwards: ``history --against`` names torch's generator before the weights."""
    train(tmp_path, "quiet")
    train(tmp_path, "drawn", during_step=at_step(6, lambda: torch.rand(3)))  # strict, and no error
    found = first_divergence(CheckpointStore.default(tmp_path).core, "quiet", "drawn")
    assert found is not None and (found.step, found.compared) == (8, 1)
    assert found.first_cause == "rng/torch", found.differing


@pytest.mark.parametrize("strict", [False, True], ids=["warned", "strict"])
def test_two_trainings_in_threads_of_one_process_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, strict: bool
) -> None:
    """A flow that submits two training tasks to Prefect's thread-pool task runner: both threads own the global
    generators, so one training's draws move the other's. Named with the other thread: a warning (the runs do
    differ from a solo run), or ``DeterminismError`` at the first step in strict mode."""
    solo, _ = train(tmp_path, "solo", strict=False)
    opened, draw, drawn, finish = (threading.Event() for _ in range(4))

    def other_training() -> None:
        with Checkpointer(CheckpointStore.default(tmp_path), "sweep-b", seed=1):
            opened.set()
            if draw.wait(30):
                random.random()  # its own training's draw, from the shared generator
                drawn.set()
            finish.wait(30)

    def in_step_6(done: int, _model: torch.nn.Module) -> None:
        if done == 5:
            draw.set()
            assert drawn.wait(30)

    thread = threading.Thread(target=other_training, name="sweep-b-trainer")
    thread.start()
    try:
        assert opened.wait(30)
        if strict:
            with pytest.raises(DeterminismError, match=r"during step 1 of sweep-a: thread\(s\) 'sweep-b-trainer' also"):
                train(tmp_path, "sweep-a", strict=True)
            return
        shared, _ = train(tmp_path, "sweep-a", strict=False, during_step=in_step_6)
    finally:
        draw.set()
        drawn.set()
        finish.set()
        thread.join()
    assert any(path.startswith("/rng/python") for path in differing_leaves(solo, shared))
    assert "thread(s) 'sweep-b-trainer' also train with a Checkpointer open in this process" in caplog.text
    assert caplog.text.count("also train with a Checkpointer open") == 1  # once, not at every step


HOOK_DRAWS: dict[str, Callable[[], Any]] = {
    "randperm": lambda: torch.randperm(8),  # e.g. a hook that logs a random sample of the weights
    "normal_": lambda: torch.empty(4).normal_(),
    "dropout": lambda: torch.nn.functional.dropout(torch.ones(4), 0.5),  # takes no generator=
}


def train_with_async_hook(store: CheckpointStore, lineage: str, draw: Callable[[], Any] | None) -> Checkpointer:
    hook_ran = threading.Event()

    def hook(_info: Any) -> None:
        if draw is not None and not hook_ran.is_set():  # once, after the commit at step 4
            draw()
        hook_ran.set()

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4)])  # asynchronous: hooks run on the writer
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, schedule=schedule, seed=5,
                      on_commit=hook, strict_determinism=True) as ckpt:  # fmt: skip
        while ckpt.step_count < STEPS:
            loss = model(torch.randn(4, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            if ckpt.step_count == 4:  # the save at step 4 was handed to the writer: its hook runs before step 5
                assert hook_ran.wait(30)
            optimizer.step()
            ckpt.step()
    return ckpt


@pytest.mark.parametrize("draw", ["randperm", "normal_"])
def test_an_asynchronous_commit_hook_drawing_from_torch_cannot_move_the_training(tmp_path: Path, draw: str) -> None:
    """CHECKPOINTING.md: what the Checkpointer's hooks move, torch's generator included, cannot change the training.
    Under asynchronous saves the hook runs on the checkpoint-writer thread; its draws are served privately."""
    store = CheckpointStore.default(tmp_path)
    train_with_async_hook(store, "quiet", None)
    ckpt = train_with_async_hook(store, "hooked", HOOK_DRAWS[draw])
    assert differing_leaves(store.load_checkpoint(lineage="quiet"), store.load_checkpoint(lineage="hooked")) == []
    torch_uses = [i for i in ckpt.rng_interference if i.generator == "torch"]
    assert [(i.function, i.thread, i.confined) for i in torch_uses] == [(draw, "checkpoint-writer", True)]
    assert torch_uses[0].caller.startswith(__file__), torch_uses


def test_an_asynchronous_commit_hook_using_dropout_is_named_in_strict_mode(tmp_path: Path) -> None:
    """Dropout takes no generator: it cannot be served privately, so strict mode names it at the next step."""
    with pytest.raises(DeterminismError) as raised:
        train_with_async_hook(CheckpointStore.default(tmp_path), "hooked", HOOK_DRAWS["dropout"])
    message = str(raised.value)
    assert "during step 5 of hooked: torch global RNG (dropout) used by thread 'checkpoint-writer'" in message


# -- history --against -----------------------------------------------------------------------------
def history(home: Path, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from prefect_recovery.cli import app

    regions = [arg for name in ("region-a", "region-b") for arg in ("--region", str(home / "regions" / name))]
    result = CliRunner().invoke(app, ["history", *args, *regions])
    return result.exit_code, result.output


def nudge_weights(step: int) -> Callable[[int, torch.nn.Module], None]:
    def nudge(done: int, model: torch.nn.Module) -> None:
        if done == step - 1:
            with torch.no_grad():
                model[2].bias.add_(1e-3)  # e.g. a bad all-reduce; no RNG or data involved

    return nudge


def extra_draw(done: int, _model: torch.nn.Module) -> None:
    if done == 5:
        np.random.rand()  # one more NumPy draw in the training thread, in step 6


DIFFERING_RUNS: dict[str, tuple[dict[str, Any], int, str]] = {
    # run's arguments, the step of the first differing checkpoint, what the first cause starts with
    "hyperparameter": ({"lr": 0.2}, 4, "optimizer/param_groups/0/lr"),
    "one-rng-draw": ({"during_step": extra_draw}, 8, "rng/numpy"),
    "late-weights": ({"during_step": nudge_weights(10)}, 12, "model/"),
}


@pytest.mark.parametrize("case", list(DIFFERING_RUNS))
def test_history_against_names_the_first_step_and_what_differed_first(tmp_path: Path, case: str) -> None:
    arguments, step, cause = DIFFERING_RUNS[case]
    train(tmp_path, "reference")
    train(tmp_path, "other", **arguments)
    code, output = history(tmp_path, "--lineage", "reference", "--against", "other", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["identical"] is False
    found = report["first_divergence"]
    assert (found["step"], found["identical_before"]) == (step, step // 4 - 1), found
    assert found["first_cause"].startswith(cause), found
    if case != "late-weights":  # a cause is listed before the weights it changed
        assert any(name.startswith("model/") for name in found["differing"]), found
    else:  # nothing but the weights (and what they computed since) differs
        assert not any(name.startswith(("rng", "data", "counters", "optimizer")) for name in found["differing"]), found
    code, human = history(tmp_path, "--lineage", "reference", "--against", "other")
    assert code == 0 and f"first differ at step {step}" in human and cause in human, human


def test_history_against_a_different_data_order(tmp_path: Path) -> None:
    """The loader's own generator differs (another shuffle seed): the data position is the first cause."""
    from torch.utils.data import TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    store = CheckpointStore.default(tmp_path)
    for lineage, shuffle_seed in (("reference", 1), ("reshuffled", 2)):
        torch.manual_seed(5)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = TensorDataset(torch.arange(24.0).reshape(8, 3))
        loader = StatefulDataLoader(
            data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(shuffle_seed)
        )
        schedule = CheckpointSchedule(triggers=[EveryNSteps(every=2)], asynchronous=False)
        with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, schedule=schedule,
                          seed=5, strict_determinism=True) as ckpt:  # fmt: skip
            for (x,) in loader:
                optimizer.zero_grad()
                model(x).mean().backward()
                optimizer.step()
                ckpt.step()
    code, output = history(tmp_path, "--lineage", "reference", "--against", "reshuffled", "--json")
    assert code == 0, output
    found = json.loads(output)["first_divergence"]
    assert (found["step"], found["identical_before"]) == (2, 0), found
    assert found["first_cause"].startswith("data/"), found


def test_history_against_identical_runs_and_runs_of_different_lengths(tmp_path: Path) -> None:
    train(tmp_path, "reference")
    train(tmp_path, "again")
    train(tmp_path, "shorter", steps=8)
    code, output = history(tmp_path, "--lineage", "reference", "--against", "again", "--json")
    assert code == 0 and json.loads(output) == {
        "lineage": "reference",
        "against": "again",
        "identical": True,
        "first_divergence": None,
    }
    code, human = history(tmp_path, "--lineage", "reference", "--against", "again")
    assert code == 0 and "every checkpoint identical" in human, human

    # the checkpoints both have are identical: the report says that one run stops earlier, not that they differ
    code, human = history(tmp_path, "--lineage", "reference", "--against", "shorter")
    assert code == 0, human
    assert "the 2 checkpoint(s) both have are identical; shorter ends at step 8" in " ".join(human.split()), human
    code, output = history(tmp_path, "--lineage", "shorter", "--against", "reference", "--json")
    found = json.loads(output)["first_divergence"]
    assert (found["step"], found["versions"], found["identical_before"]) == (12, [None, 3], 2), found
    assert (found["ended_at"], found["differing"], found["run_differences"]) == (8, [], {}), found


def test_history_against_a_missing_lineage_a_single_checkpoint_and_other_schedules(tmp_path: Path) -> None:
    train(tmp_path, "reference")
    for missing in (["--lineage", "reference", "--against", "no-such-run"], ["--lineage", "nope", "--against", "nah"]):
        code, output = history(tmp_path, *missing, "--json")
        assert code != 0, output
        assert "has no checkpoint in this store" in output, output
    with pytest.raises(CheckpointNotFoundError, match="'no-such-run' has no checkpoint"):
        first_divergence(CheckpointStore.default(tmp_path).core, "reference", "no-such-run")
    code, output = history(tmp_path, "--lineage", "reference", "--against", "reference.light")
    assert code != 0 and "the light tier of lineage 'reference'" in " ".join(output.split()), output

    train(tmp_path, "one", steps=4)
    train(tmp_path, "one-again", steps=4)
    code, output = history(tmp_path, "--lineage", "one", "--against", "one-again", "--json")
    assert code == 0 and json.loads(output)["identical"] is True, output

    train(tmp_path, "every-5", every=5, steps=10)
    code, output = history(tmp_path, "--lineage", "reference", "--against", "every-5")
    assert code != 0, output
    assert "no checkpoint at the same step and trigger to compare" in " ".join(output.split()), output


# -- replay-check of a run another thread disturbed ------------------------------------------------------
REPLAYED = "outside-disturbed-pipeline"


def disturbed_training(store: Any, lineage: str, *, resume: Any = None, stop: int | None = None) -> dict[str, Any]:
    """The training of a pipeline in which, during step 6 of the original run, a metrics thread drew from
    torch's default generator (the limit no guard sees); a replay (``stop``) runs the same code without it."""
    disturb = None if stop is not None else at_step(6, lambda: torch.rand(2))
    schedule = CheckpointSchedule(triggers=[] if stop is not None else [EveryNSteps(every=4)], asynchronous=False)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    where = {"resume_version": resume} if isinstance(resume, int) else {"resume_from": resume}
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, schedule=schedule, seed=5,
                      handle_sigterm=False, **where) as ckpt:  # fmt: skip
        while ckpt.step_count < (stop or STEPS):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            if disturb is not None:
                disturb(ckpt.step_count, model)
            optimizer.step()
            ckpt.step()
        return ckpt.capture("heavy")


def replay_disturbed(segment: Any) -> dict[str, Any]:
    return disturbed_training(segment.store, segment.lineage, resume=segment.from_version, stop=segment.to_step)


def _disturbed_pipeline(home: str, lineage: str) -> None:
    from prefect_recovery.tasks.pipeline_run import PipelineRun

    store = CheckpointStore.default(Path(home))
    with PipelineRun(store, lineage, pipeline=REPLAYED, parameters={"home": home, "lineage": lineage}) as run:
        disturbed_training(store, lineage, resume=run.resume_point())


def test_replay_check_names_the_segment_and_the_generator_another_thread_moved(
    prefect_server: None, tmp_path: Path
) -> None:
    from prefect import flow

    from prefect_recovery.flows.registry import PIPELINES, REPLAY_HOOKS, register_pipeline

    register_pipeline(flow(name=REPLAYED)(_disturbed_pipeline), replay=replay_disturbed)
    try:
        check_disturbed_replay(tmp_path)
    finally:  # the registry is process-wide: leave it as other test files expect it
        PIPELINES.pop(REPLAYED, None)
        REPLAY_HOOKS.pop(REPLAYED, None)


def check_disturbed_replay(tmp_path: Path) -> None:
    from prefect_recovery.flows.replay import describe, replay_check

    _disturbed_pipeline(str(tmp_path), "disturbed")
    store = CheckpointStore.default(tmp_path)
    versions = {info.step: info.version for info in store.core.list("disturbed")}
    assert sorted(versions) == [4, 8, 12], versions
    # steps 5 to 8 held the foreign draw: not reproducible, and torch's generator is named before the weights
    report = replay_check(store, "disturbed", versions[4], versions[8])
    assert not report.deterministic, describe(report)
    assert report.first_difference is not None and report.first_difference.name == "rng/torch", report.differing
    assert any(name.startswith("model/") for name in report.differing), report.differing
    # the checkpoint at step 8 captured the moved generator: from there on the training replays exactly
    assert replay_check(store, "disturbed", versions[8], versions[12]).deterministic

    from typer.testing import CliRunner

    from prefect_recovery.cli import app

    regions = [arg for name in ("region-a", "region-b") for arg in ("--region", str(tmp_path / "regions" / name))]
    command = ["replay-check", "--lineage", "disturbed", "--from", str(versions[4]), "--to", str(versions[8])]
    result = CliRunner().invoke(app, [*command, *regions, "--json"])
    assert result.exit_code == 1, result.output
    shown = json.loads(result.output)
    assert (shown["deterministic"], shown["from_step"], shown["to_step"]) == (False, 4, 8), shown
    assert shown["first_difference"]["name"] == "rng/torch", shown
    result = CliRunner().invoke(app, [*command, *regions])
    assert result.exit_code == 1 and "NOT deterministic" in result.output and "rng/torch" in result.output


def test_history_against_names_an_input_file_that_changed_between_two_pipeline_runs(
    prefect_server: None, tmp_path: Path
) -> None:
    """Same parameters, but the corpus file was rewritten between the runs: the weights differ from the first
    checkpoint on, and the report says why (the input's content), not just which tensors."""
    from prefect_recovery import file_input
    from prefect_recovery.tasks.pipeline_run import PipelineRun

    store = CheckpointStore.default(tmp_path)
    corpus = tmp_path / "corpus.txt"

    def pipeline_run(lineage: str) -> None:
        parameters = {"lineage": lineage, "corpus": str(corpus), "lr": 0.1}
        with PipelineRun(store, lineage, pipeline="outside-input-pipeline", parameters=parameters,
                         inputs={"corpus": file_input(str(corpus))}) as run:  # fmt: skip
            scale = float(len(corpus.read_text()))
            nudge = lambda _step, model: model[0].weight.data.mul_(scale / 3)  # noqa: E731  the data's effect
            train(tmp_path, lineage, during_step=nudge, resume=run.resume_point())
            run.finish()

    corpus.write_text("abc")
    pipeline_run("monday")
    pipeline_run("monday-again")
    corpus.write_text("abcd")
    pipeline_run("tuesday")
    core = store.core
    assert first_divergence(core, "monday", "monday-again") is None
    found = first_divergence(core, "monday", "tuesday")
    assert found is not None and found.step == 4 and found.first_cause.startswith("model/"), found
    assert set(found.runs) == {"inputs.corpus.digest", "inputs.corpus.size"}, found.runs
    assert found.runs["inputs.corpus.size"] == [3, 4]
    code, human = history(tmp_path, "--lineage", "monday", "--against", "tuesday")
    assert code == 0 and "their runs were started differently: inputs.corpus.digest" in " ".join(human.split())


# -- kill and resume in real processes ---------------------------------------------------------------
SAMPLES, BATCH, EPOCHS = 20, 4, 3  # 5 batches an epoch, 15 steps


class Augmented(Dataset):
    """Random augmentation from the three global generators, drawn where a sample is fetched (a worker)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(SAMPLES, 6, generator=generator)
        self.y = torch.randint(0, 3, (SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * torch.randn(6) + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return self.x[index] + noise, self.y[index]


def pipeline(home: Path, lineage: str, workers: int, kill_at: str | None, report: Path) -> None:
    """A user's training script (run as ``python this_file.py ...``). ``kill_at``: ``step:N`` SIGKILLs the
    process after the N-th ``ckpt.step()``, ``epoch:E`` after the E-th ``end_epoch()``."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from prefect_recovery import seed_everything

    if os.environ.get("LAUNCHER_THREADS"):  # what a launcher (torchrun: OMP_NUM_THREADS=1) would do
        torch.set_num_threads(int(os.environ["LAUNCHER_THREADS"]))
    seed_everything(11)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    options: dict[str, Any] = json.loads(os.environ.get("LOADER_OPTIONS", "{}"))  # persistent_workers...
    loader = StatefulDataLoader(Augmented(), batch_size=BATCH, shuffle=True, num_workers=workers, **options)
    # the training thread's own generators, as DETERMINISM.md recommends: saved and restored as extras
    noise, mixing, coin = torch.Generator().manual_seed(7), np.random.default_rng(8), random.Random(9)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=3), Milestones(names=["epoch_end"])])  # asynchronous
    store = CheckpointStore.default(home)
    threads: list[int] = []
    extras = {"noise": noise, "mixing": mixing, "coin": coin}
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, data=loader, schedule=schedule, seed=11,
                      extras=extras, strict_determinism=True) as ckpt:  # fmt: skip
        threads.append(torch.get_num_threads())
        for _epoch in range(ckpt.epoch, EPOCHS):
            for x, y in loader:
                x = x + 0.01 * torch.randn(x.shape, generator=noise) * float(mixing.random())
                if coin.random() < 0.5:
                    x = x.flip(0)
                    y = y.flip(0)
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                ckpt.step()
                if kill_at == f"step:{ckpt.step_count}":
                    os.kill(os.getpid(), signal.SIGKILL)
            ckpt.end_epoch()
            if kill_at == f"epoch:{ckpt.epoch}":
                os.kill(os.getpid(), signal.SIGKILL)
    report.write_text(json.dumps({"threads": threads, "resumed_from": ckpt.resumed_from}))


def run_pipeline(home: Path, lineage: str, workers: int, kill_at: str | None = None, **env: str) -> dict[str, Any]:
    report = home / f"{lineage}.json"
    command = [sys.executable, __file__, str(home), lineage, str(workers), kill_at or "", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    if kill_at:
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        return {}
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, str], dict[str, Any]]:
    """The final state of an uninterrupted run, once per worker count and loader options."""
    finals: dict[tuple[int, str], dict[str, Any]] = {}

    def final(workers: int, options: str) -> dict[str, Any]:
        if (workers, options) not in finals:
            home = tmp_path_factory.mktemp(f"reference-{workers}")
            run_pipeline(home, "reference", workers, LAUNCHER_THREADS="1", LOADER_OPTIONS=options)
            finals[workers, options] = CheckpointStore.default(home).load_checkpoint(lineage="reference")
        return finals[workers, options]

    return final


PERSISTENT = json.dumps({"persistent_workers": True})  # workers (and their RNGs) live across epochs


@pytest.mark.parametrize(
    ("workers", "kill_at", "options"),
    [
        (2, "step:2", "{}"),  # before the first checkpoint: restarts from scratch
        (2, "step:3", "{}"),  # right after the first (asynchronous) save was handed to the writer
        (2, "step:7", "{}"),  # mid-epoch 1, checkpoints at steps 5 (epoch_end) and 6 (if written) behind it
        (2, "epoch:2", PERSISTENT),  # at the boundary between epochs 1 and 2 (step 10, after its epoch_end save)
        (0, "step:7", "{}"),
    ],
    ids=["workers2-step2", "workers2-step3", "workers2-step7", "persistent-workers2-epoch2", "workers0-step7"],
)
def test_a_killed_user_loop_resumes_bit_identically(
    tmp_path: Path, uninterrupted: Callable[[int, str], dict[str, Any]], workers: int, kill_at: str, options: str
) -> None:
    reference = uninterrupted(workers, options)
    run_pipeline(tmp_path, "killed", workers, kill_at, LAUNCHER_THREADS="1", LOADER_OPTIONS=options)
    # a fresh process, with the machine's default thread count
    resumed = run_pipeline(tmp_path, "killed", workers, LOADER_OPTIONS=options)
    store = CheckpointStore.default(tmp_path)
    final = store.load_checkpoint(lineage="killed")
    assert final["counters"]["step"] == 15
    if resumed["resumed_from"] is not None:
        assert differing_leaves(reference, final) == []
        assert resumed["threads"] == [1], resumed  # the checkpoint's thread count, not this process's default
    else:  # killed before a checkpoint committed: a fresh start, under this process's own thread count
        assert differing_leaves(reference, final) == ["/determinism/num_threads"]
    if kill_at == "step:2":
        assert resumed["resumed_from"] is None
    if kill_at == "step:7":  # from the epoch_end save at step 5, or the one at step 6 if its write finished
        assert resumed["resumed_from"]["step"] in (5, 6), resumed
    if kill_at == "epoch:2":  # the epoch_end milestone is saved synchronously
        assert resumed["resumed_from"]["step"] == 10, resumed


if __name__ == "__main__":
    home, lineage, workers, kill_at, report = sys.argv[1:6]
    pipeline(Path(home), lineage, int(workers), kill_at or None, Path(report))
