"""Replay verification (``replay_check``, ``sample_segment``, the ``replay-check`` flow and CLI command).

Lineages are written once per module through the real code paths, in a private home, against the session's
Prefect server: the example pipeline (40 steps, heavy checkpoints every 10, light every 5, crossing an epoch at
step 32), a registered pipeline whose training bumps a model buffer by unseeded noise every step
(``helpers/replay_pipeline.py``), and the same training registered without a replay hook. Replays must
write nothing: every test that replays compares the home's files and the journal before and after.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLI, REPO
from helpers import replay_pipeline
from helpers.snapshot import snapshot

from prefect_recovery import CheckpointStore
from prefect_recovery.blocks.checkpoint_store import HOME_ENV
from prefect_recovery.core.journal import Journal
from prefect_recovery.examples.pipeline import example_pipeline
from prefect_recovery.flows.audit import audit
from prefect_recovery.flows.registry import PIPELINES, REPLAY_HOOKS
from prefect_recovery.flows.replay import replay_check, replay_check_flow, sample_segment
from prefect_recovery.tasks.errors import RecoveryError, ReplayError
from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps, Milestones

TESTS = Path(__file__).resolve().parent
EXAMPLE, NOISY, HOOKLESS = "replay-example", "replay-noisy", "replay-hookless"
SCHEDULE = CheckpointSchedule(
    triggers=[EveryNSteps(every=10), EveryNSteps(every=5, tier="light"), Milestones(names=["train_end", "final"])]
)


@pytest.fixture(scope="module")
def home(prefect_server, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("replay-home")
    previous = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    try:
        example_pipeline(lineage=EXAMPLE, steps=40, seed=3, schedule=SCHEDULE)
        replay_pipeline.noisy_pipeline(lineage=NOISY, steps=12, seed=1)
        replay_pipeline.hookless_pipeline(lineage=HOOKLESS, steps=8, seed=1)
    finally:
        if previous is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = previous
    return home


def store_of(home: Path) -> CheckpointStore:
    return CheckpointStore.default(home)


def by_step(home: Path, lineage: str, trigger: str = "every_n_steps") -> dict[int, int]:
    """step -> version of the lineage's heavy checkpoints with ``trigger``."""
    return {
        info.step: info.version
        for info in store_of(home).list(lineage)
        if info.metadata.get("tier") == "heavy" and info.metadata.get("trigger") == trigger
    }


class Unchanged:
    """Asserts that nothing under ``home`` (files, journals) changed inside the block."""

    def __init__(self, home: Path, *lineages: str):
        self.home, self.lineages = home, lineages

    def __enter__(self) -> Unchanged:
        self.files = snapshot(self.home)
        self.events = {name: Journal(store_of(self.home).core, name).events() for name in self.lineages}
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            assert snapshot(self.home) == self.files, "the replay wrote into the store"
            for name, events in self.events.items():
                assert Journal(store_of(self.home).core, name).events() == events, f"the replay journaled in {name}"


# -- the example pipeline is deterministic -----------------------------------------------------------------------
def test_example_pipeline_segments_replay_deterministically(home):
    store = store_of(home)
    heavy = by_step(home, EXAMPLE)
    assert sorted(heavy) == [10, 20, 30, 40], store.list(EXAMPLE)
    [train_end] = by_step(home, EXAMPLE, "milestone:train_end").values()
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()

    with Unchanged(home, EXAMPLE):
        report = replay_check(store, EXAMPLE, heavy[10], heavy[20])
        across_epoch = replay_check(store, EXAMPLE, heavy[10], heavy[40])  # 32 batches per epoch
        to_milestone = replay_check(store, EXAMPLE, heavy[30], train_end)

    manifest, _holders = store.core.resolve(EXAMPLE, heavy[20])
    assert report.deterministic, report
    assert report.pipeline == "example-pipeline" and report.lineage == EXAMPLE
    assert (report.from_version, report.from_step, report.to_version, report.to_step) == (heavy[10], 10, heavy[20], 20)
    assert report.steps_replayed == 10
    assert report.entries_compared == len(manifest.entries) > 10
    assert report.entries_differing == 0 and report.differing == [] and report.first_difference is None
    assert report.notes == [] and report.seconds > 0
    assert across_epoch.deterministic and across_epoch.steps_replayed == 30, across_epoch
    assert to_milestone.deterministic and to_milestone.to_step == 40, to_milestone
    # the caller's RNG and settings are put back
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before


def test_sample_segment_picks_consecutive_heavy_checkpoints_with_a_step_gap(home):
    store = store_of(home)
    heavy = by_step(home, EXAMPLE)
    expected = {(heavy[10], heavy[20]), (heavy[20], heavy[30]), (heavy[30], heavy[40])}
    picks = {sample_segment(store, EXAMPLE, random.Random(seed)) for seed in range(30)}
    assert picks <= expected and len(picks) > 1, picks
    # the train_end milestone sits at step 40 like the last every-10 checkpoint: no gap, never picked;
    # light, steps and final versions never are either
    assert sample_segment(store, EXAMPLE + ".light", random.Random(0)) is None
    assert sample_segment(store, EXAMPLE + ".steps", random.Random(0)) is None
    [run_id] = {e.run_id for e in Journal(store.core, EXAMPLE).events() if e.kind == "run_started"}
    assert sample_segment(store, EXAMPLE, random.Random(1), run_id=run_id) in expected
    assert sample_segment(store, EXAMPLE, random.Random(1), run_id="another-run") is None
    assert sample_segment(store, "no-such-lineage", random.Random(1)) is None


# -- non-deterministic training is caught, and the first differing tensor named --------------------------------------
def test_unseeded_noise_in_training_is_reported_with_the_first_differing_tensor(home):
    store = store_of(home)
    heavy = by_step(home, NOISY)
    assert sorted(heavy) == [4, 8, 12], store.list(NOISY)

    with Unchanged(home, NOISY):
        report = replay_check(store, NOISY, heavy[4], heavy[8])

    assert not report.deterministic and report.pipeline == replay_pipeline.NOISY
    diff = report.first_difference
    assert diff is not None, report
    assert (diff.name, diff.kind, diff.dtype, diff.shape) == ("model/noise", "tensor", "float32", [3])
    assert diff.elements == 3 and diff.elements_differing == 3
    assert diff.max_abs_diff is not None and 0 < diff.max_abs_diff < 4 * 1.0  # four steps of noise in [0, 1)
    # only the noise differs: weights, optimizer, RNG and counters replayed bit for bit
    assert report.entries_differing == 1 and report.differing == ["model/noise"]
    manifest, _holders = store.core.resolve(NOISY, heavy[8])
    assert report.entries_compared == len(manifest.entries)


# -- errors ----------------------------------------------------------------------------------------------------------
def test_bad_requests_raise_replay_errors_that_say_what_to_do(home):
    store = store_of(home)
    heavy = by_step(home, EXAMPLE)
    [final] = by_step(home, EXAMPLE, "milestone:final").values()
    light = [info.version for info in store.list(EXAMPLE + ".light")]

    with Unchanged(home, EXAMPLE, HOOKLESS):
        cases = {
            "same": (EXAMPLE, heavy[20], heavy[20]),
            "backwards": (EXAMPLE, heavy[30], heavy[10]),
            "missing": (EXAMPLE, heavy[10], 999),
            "light": (EXAMPLE + ".light", light[0], light[1]),
            "final": (EXAMPLE, heavy[40], final),
            "hookless": (HOOKLESS, *sorted(by_step(home, HOOKLESS).values())[:2]),
        }
        errors = {}
        for case, (lineage, v1, v2) in cases.items():
            with pytest.raises(ReplayError) as caught:
                replay_check(store, lineage, v1, v2)
            errors[case] = str(caught.value)

    assert f"--from {heavy[20]} must be an earlier version than --to {heavy[20]}" in errors["same"]
    assert "prefect-recovery ls --lineage" in errors["same"]
    assert "must be an earlier version" in errors["backwards"]
    assert "--to 999" in errors["missing"] and "no consistent version 999" in errors["missing"]
    assert "light-tier checkpoint" in errors["light"]
    assert f"use heavy versions of lineage {EXAMPLE!r}: [{heavy[10]}, {heavy[20]}," in errors["light"]
    assert "final checkpoint" in errors["final"] and "compare training checkpoints" in errors["final"]
    assert f"pipeline {replay_pipeline.HOOKLESS!r}" in errors["hookless"]
    assert "register_pipeline(flow, replay=hook)" in errors["hookless"]
    # the hookless pipeline was registered with one argument and still is, for recover
    assert replay_pipeline.HOOKLESS in PIPELINES and replay_pipeline.HOOKLESS not in REPLAY_HOOKS


def test_lineages_without_a_registered_pipeline_run_are_refused(recovery_home):
    store = CheckpointStore.default()
    for lineage in ("no-journal", "unknown-pipeline"):
        for step in (1, 2):
            store.save_checkpoint({"w": torch.full((2,), float(step))}, lineage=lineage, step=step,
                                  metadata={"tier": "heavy"})  # fmt: skip
    Journal(store.core, "unknown-pipeline").append(
        "run_started", run_id="r1", data={"pipeline": "no-such-pipeline", "parameters": {}}
    )

    with pytest.raises(ReplayError, match="has no pipeline run in its journal"):
        replay_check(store, "no-journal", 1, 2)
    with pytest.raises(ReplayError) as caught:
        replay_check(store, "unknown-pipeline", 1, 2)
    assert "'no-such-pipeline', which is not registered here" in str(caught.value)
    assert "PREFECT_RECOVERY_PIPELINES" in str(caught.value)


# -- Prefect flow ------------------------------------------------------------------------------------------------------
def test_replay_check_flow_reports_and_fails_on_a_difference(home, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(home))
    heavy, noisy = by_step(home, EXAMPLE), by_step(home, NOISY)

    result = replay_check_flow(lineage=EXAMPLE, from_version=heavy[20], to_version=heavy[30])
    assert result["deterministic"] is True and result["steps_replayed"] == 10

    with pytest.raises(ReplayError, match=r"NOT deterministic.*model/noise"):
        replay_check_flow(lineage=NOISY, from_version=noisy[8], to_version=noisy[12])
    kept = replay_check_flow(lineage=NOISY, from_version=noisy[8], to_version=noisy[12], fail_on_difference=False)
    assert kept["deterministic"] is False and kept["first_difference"]["name"] == "model/noise"


def test_the_audit_samples_one_segment_and_fails_on_a_non_deterministic_one(home, monkeypatch):
    """``audit(replay=True)``: one randomly chosen segment per run is replayed and reported; a lineage that
    cannot be replayed (no hook) is noted and skipped; a non-deterministic segment fails the audit run."""
    monkeypatch.setenv(HOME_ENV, str(home))
    with Unchanged(home, EXAMPLE):
        report = audit(lineage=EXAMPLE, replay=True, apply_retention=False, seed=5)
    replay = report["replay"]
    assert replay["lineage"] == EXAMPLE and replay["deterministic"] is True
    assert replay["from_version"] < replay["to_version"] and replay["steps_replayed"] > 0, replay

    hookless = audit(lineage=HOOKLESS, replay=True, apply_retention=False)
    assert hookless["replay"] is None
    assert any(f"replay check of {HOOKLESS} not possible" in note for note in hookless["notes"]), hookless["notes"]

    with pytest.raises(RecoveryError, match=r"non-deterministic segment.*model/noise"):
        audit(lineage=NOISY, replay=True, apply_retention=False)


# -- the command line -------------------------------------------------------------------------------------------------
def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        HOME_ENV: str(home),
        "PREFECT_RECOVERY_PIPELINES": "helpers.replay_pipeline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([*CLI, "replay-check", *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def payload(result: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (rc={result.returncode}):\nstdout: {result.stdout}\nstderr: {result.stderr}")


def in_process(home: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """The same command through typer's runner in this process (spares a process start)."""
    from typer.testing import CliRunner

    from prefect_recovery.cli import app

    monkeypatch.setenv(HOME_ENV, str(home))
    result = CliRunner().invoke(app, ["replay-check", *args])
    return result.exit_code, result.stdout


def test_cli_exit_codes_and_json(home, monkeypatch):
    heavy, noisy = by_step(home, EXAMPLE), by_step(home, NOISY)

    with Unchanged(home, EXAMPLE, NOISY):
        # as a user runs it: a new process that finds the noisy pipeline through PREFECT_RECOVERY_PIPELINES
        differs = cli(home, "--lineage", NOISY, "--from", str(noisy[4]), "--to", str(noisy[12]), "--json")
        bad = cli(home, "--lineage", EXAMPLE, "--from", str(heavy[20]), "--to", str(heavy[10]), "--json")
        same_code, same_out = in_process(
            home, monkeypatch, "--lineage", EXAMPLE, "--from", str(heavy[10]), "--to", str(heavy[20]), "--json"
        )
        human_code, human_out = in_process(home, monkeypatch, "--lineage", NOISY, "--from", str(noisy[4]), "--to",
                                           str(noisy[8]))  # fmt: skip

    assert differs.returncode == 1, differs.stderr
    report = payload(differs)
    assert report["deterministic"] is False and report["steps_replayed"] == 8
    first = report["first_difference"]
    assert (first["name"], first["dtype"], first["shape"], first["elements_differing"]) == ("model/noise", "float32",
                                                                                             [3], 3)  # fmt: skip
    assert first["max_abs_diff"] > 0 and report["differing"] == ["model/noise"]

    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert set(payload(bad)) == {"error"} and "must be an earlier version" in payload(bad)["error"]
    assert "Traceback" not in bad.stdout + bad.stderr

    assert same_code == 0, same_out
    report = json.loads(same_out)
    assert report["deterministic"] is True and report["first_difference"] is None
    assert (report["from_step"], report["to_step"], report["entries_differing"]) == (10, 20, 0)

    assert human_code == 1, human_out
    assert "NOT deterministic" in human_out and "model/noise" in human_out, human_out
