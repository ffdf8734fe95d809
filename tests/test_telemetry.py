"""Telemetry: Prefect events read back from a real Prefect server, Prometheus metrics read back from the text
file and the HTTP endpoint, and timeline PNGs read back with Pillow.

Stores are real local regions (a region whose directory is gone stands for "a region is down");
checkpoints are real torch states saved and restored through ``training.state_io``; the journal is written
with the core ``Journal``. Nothing is mocked; the one test without matplotlib hides it from ``import`` the
way an environment without the ``plot`` extra would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers.prefect_events import read_lineage_events
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from prefect_recovery import telemetry
from prefect_recovery.cli import app
from prefect_recovery.core import EntryPlan, Journal, QuorumNotMetError, Store, open_region
from prefect_recovery.core.observe import StoreEvent
from prefect_recovery.telemetry import (
    MetricsObserver,
    default_observers,
    emit_audit_problem,
    emit_recovery_finished,
    emit_recovery_started,
    prefect_event_observer,
)
from prefect_recovery.telemetry.plot import DPI, FIGSIZE, PlotUnavailableError, plot_timeline, timeline
from prefect_recovery.training.state_io import load_state, save_state

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def local_store(tmp_path: Path, *extra, write_quorum: int = 1, observers=()) -> Store:
    for name in ("region-a", "region-b"):
        (tmp_path / name).mkdir(exist_ok=True)
    regions = [open_region(str(tmp_path / "region-a"), name="a"), open_region(str(tmp_path / "region-b"), name="b")]
    return Store([*regions, *extra], write_quorum=write_quorum, observers=observers, straggler_grace=5)


def unmounted(tmp_path: Path):
    """A region that is down: a local region whose directory is gone (an unmounted volume)."""
    return open_region(str(tmp_path / "unmounted-volume"), name="down")


def small_state(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=generator), "step": seed}


# -- Prefect events ------------------------------------------------------------------------------------------
def related_ids(event, role: str) -> set[str]:
    return {resource.id for resource in event.related if resource.role == role}


def test_store_and_recovery_events_reach_the_prefect_server(prefect_server, tmp_path):
    lineage = f"ev-{uuid.uuid4().hex[:8]}"
    store = local_store(tmp_path, observers=[prefect_event_observer])
    info = save_state(store, small_state(), lineage=lineage, step=40, metadata={"tier": "heavy", "trigger": "timebox"})
    _state, manifest = load_state(store, lineage=lineage)
    emit_recovery_started(lineage, run_id="r-1", checkpoint={"version": info.version, "step": 40},
                          failed_step="train", preflight="strict", regions=store.region_names)  # fmt: skip
    emit_recovery_finished(lineage, info.version + 1, True, run_id="r-1", final_digest="blake3:00",
                           reused_steps=["load"])  # fmt: skip
    emit_audit_problem(lineage, info.version, "b", "missing", "manifest missing in region b")

    names = {
        "prefect-recovery.checkpoint.committed",
        "prefect-recovery.restore.completed",
        "prefect-recovery.recovery.started",
        "prefect-recovery.recovery.finished",
        "prefect-recovery.audit.problem",
    }
    events = read_lineage_events(lineage, names)

    committed = events["prefect-recovery.checkpoint.committed"]
    assert committed.resource.id == f"prefect-recovery.lineage.{lineage}"
    assert committed.resource["prefect.resource.name"] == lineage
    assert committed.resource["prefect-recovery.tier"] == "heavy"
    assert committed.resource["prefect-recovery.trigger"] == "timebox"
    assert committed.payload["version"] == info.version
    assert committed.payload["step"] == 40
    assert committed.payload["bytes"] == info.total_bytes >= 64 * 32 * 4
    assert committed.payload["regions"] == {"a": "ok", "b": "ok"}
    assert related_ids(committed, "region") == {"prefect-recovery.region.a", "prefect-recovery.region.b"}
    assert related_ids(committed, "checkpoint") == {f"prefect-recovery.checkpoint.{lineage}.{info.version}"}

    restored = events["prefect-recovery.restore.completed"]
    assert restored.payload["version"] == manifest.version == info.version
    assert restored.payload["bytes"] == info.total_bytes
    assert restored.payload["step"] == 40

    started = events["prefect-recovery.recovery.started"]
    assert started.payload["failed_step"] == "train"
    assert started.payload["version"] == info.version and started.payload["step"] == 40
    finished = events["prefect-recovery.recovery.finished"]
    assert finished.resource["prefect-recovery.outcome"] == "ok"
    assert finished.payload["ok"] is True and finished.payload["version"] == info.version + 1
    assert finished.payload["reused_steps"] == ["load"]
    problem = events["prefect-recovery.audit.problem"]
    assert problem.resource["prefect-recovery.kind"] == "missing"
    assert problem.payload == {
        "lineage": lineage,
        "version": info.version,
        "region": "b",
        "kind": "missing",
        "detail": "manifest missing in region b",
    }


def test_a_failed_save_is_an_event_and_still_raises(prefect_server, tmp_path):
    lineage = f"fail-{uuid.uuid4().hex[:8]}"
    store = local_store(tmp_path, unmounted(tmp_path), write_quorum=3, observers=[prefect_event_observer])
    with pytest.raises(QuorumNotMetError):
        save_state(store, small_state(), lineage=lineage, step=5)
    failed = read_lineage_events(lineage, {"prefect-recovery.save.failed"})["prefect-recovery.save.failed"]
    assert failed.resource["prefect-recovery.outcome"] == "failed"
    assert failed.payload["version"] is None and failed.payload["step"] == 5
    assert "QuorumNotMetError" in failed.payload["error"]
    assert "down" in failed.payload["regions"]


def test_events_without_a_prefect_api_cost_nothing_and_never_fail_a_save(tmp_path):
    """No PREFECT_API_URL and no run: no event, and no temporary Prefect server started for one."""
    script = f"""
import time
from prefect.server.api.server import SubprocessASGIServer
from prefect_recovery.core import EntryPlan, Store, open_region
from prefect_recovery.telemetry import default_observers, prefect_event_observer
from prefect_recovery.telemetry.events import events_enabled
observers = default_observers()
assert observers == [prefect_event_observer], observers
store = Store([open_region({str(tmp_path / "r")!r})], observers=observers)
started = time.monotonic()
info = store.commit("plain", [EntryPlan(name="w", kind="bytes", data=memoryview(b"x" * 1000))], step=1)
print(events_enabled(), info.version, round(time.monotonic() - started, 3), len(SubprocessASGIServer._instances))
"""
    (tmp_path / "r").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_RECOVERY_METRICS"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    enabled, version, seconds, servers = out.stdout.split()
    assert (enabled, version, servers) == ("False", "1", "0")
    assert float(seconds) < 5


# -- Prometheus metrics --------------------------------------------------------------------------------------
def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_metrics_textfile_and_http_endpoint_after_save_restore_and_failures(tmp_path):
    prom = tmp_path / "textfile" / "prefect_recovery.prom"
    observer = MetricsObserver(textfile=prom)
    store = local_store(tmp_path, unmounted(tmp_path), observers=[observer])  # quorum 1: "down" is left lagging
    info = save_state(store, small_state(), lineage="run", step=10)
    light = save_state(store.derive(store.regions[:1], write_quorum=1, placement="primary"), {"rng": 1},
                       lineage="run.light", step=12)  # fmt: skip
    load_state(store, lineage="run")
    strict = local_store(tmp_path, unmounted(tmp_path), write_quorum=3, observers=[observer])
    with pytest.raises(QuorumNotMetError):
        save_state(strict, small_state(1), lineage="run", step=20)

    found = samples(prom.read_text())
    assert value(found, "prefect_recovery_checkpoint_bytes_total", lineage="run", tier="heavy", operation="save") == (
        info.total_bytes
    )
    assert value(found, "prefect_recovery_checkpoint_bytes_total", lineage="run", tier="light", operation="save") == (
        light.total_bytes
    )
    assert value(found, "prefect_recovery_checkpoint_bytes_total", lineage="run", tier="heavy",
                 operation="restore") == info.total_bytes  # fmt: skip
    ops = "prefect_recovery_operations_total"
    assert value(found, ops, lineage="run", tier="heavy", operation="save", outcome="success") == 1
    assert value(found, ops, lineage="run", tier="heavy", operation="save", outcome="failure") == 1
    assert value(found, ops, lineage="run", tier="heavy", operation="restore", outcome="success") == 1
    regions = "prefect_recovery_region_operations_total"
    assert value(found, regions, region="a", operation="save", outcome="success") == 2  # heavy + light
    assert value(found, regions, region="b", operation="save", outcome="success") == 1
    assert value(found, regions, region="down", operation="save", outcome="failure") == 2  # lagging, then failed
    assert value(found, regions, region="a", operation="restore", outcome="success") == 1
    assert value(found, "prefect_recovery_save_duration_seconds_count", lineage="run", tier="heavy") == 2
    assert value(found, "prefect_recovery_restore_duration_seconds_count", lineage="run", tier="heavy") == 1
    assert value(found, "prefect_recovery_last_checkpoint_step", lineage="run", tier="heavy") == 10
    assert value(found, "prefect_recovery_throughput_bytes_per_second", lineage="run", tier="heavy",
                 operation="save") > 0  # fmt: skip

    port = observer.serve(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            served = samples(response.read().decode())
    finally:
        observer.close()
    assert served == found


def test_metrics_label_base_lineages_and_bound_their_number():
    observer = MetricsObserver(max_lineages=2)
    for lineage in ("exp-1", "exp-1.light", "exp-1.steps", "exp-2", "exp-3", "exp-4.light"):
        observer(StoreEvent("checkpoint_committed", lineage, 1, 0, 100, 0.01, {"a": "ok"}))
    from prometheus_client import generate_latest

    found = samples(generate_latest(observer.registry).decode())
    saved = {
        (dict(labels)["lineage"], dict(labels)["tier"]): count
        for (name, labels), count in found.items()
        if name == "prefect_recovery_checkpoint_bytes_total"
    }
    assert saved == {
        ("exp-1", "heavy"): 100,
        ("exp-1", "light"): 100,
        ("exp-1", "steps"): 100,
        ("exp-2", "heavy"): 100,
        ("_other", "heavy"): 100,
        ("_other", "light"): 100,
    }


def test_default_observers_add_one_process_wide_metrics_observer_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(telemetry, "_metrics", None)
    monkeypatch.delenv("PREFECT_RECOVERY_METRICS_PORT", raising=False)
    monkeypatch.delenv("PREFECT_RECOVERY_METRICS_FILE", raising=False)
    assert default_observers() == [prefect_event_observer]
    prom = tmp_path / "metrics.prom"
    monkeypatch.setenv("PREFECT_RECOVERY_METRICS_FILE", str(prom))
    first, second = default_observers(), default_observers()
    assert isinstance(first[1], MetricsObserver) and first[1] is second[1]
    store = local_store(tmp_path, observers=first)
    store.commit("env-run", [EntryPlan(name="w", kind="bytes", data=memoryview(b"y" * 4096))], step=3)
    found = samples(prom.read_text())  # rewritten after the event
    assert value(found, "prefect_recovery_checkpoint_bytes_total", lineage="env-run", tier="heavy",
                 operation="save") == 4096  # fmt: skip


# -- timeline plot -------------------------------------------------------------------------------------------
def crashed_and_recovered(tmp_path: Path, lineage: str = "train") -> Store:
    """Run A checkpoints (heavy and light) and fails; recovery 1 resumes it as run B, which is killed (no end
    recorded); recovery 2 resumes it as run C, which finishes."""
    store = local_store(tmp_path)
    light_store = store.derive(store.regions[:1], write_quorum=1, placement="primary")
    journal = Journal(store, lineage)

    def checkpoint(step: int, tier: str, trigger: str, run_id: str) -> None:
        target, name = (store, lineage) if tier == "heavy" else (light_store, lineage + ".light")
        data = memoryview(f"{tier}-{step}".encode() * 64)
        info = target.commit(name, [EntryPlan(name="w", kind="bytes", data=data)], step=step,
                             metadata={"tier": tier, "trigger": trigger})  # fmt: skip
        if tier == "heavy":
            journal.append("checkpoint_committed", run_id=run_id, data={"version": info.version, "step": step})

    journal.append("run_started", run_id="A", data={"pipeline": "example"})
    journal.append("step_started", run_id="A", data={"step": "train"})
    for step in (10, 20, 30, 40):
        checkpoint(step, "light" if step % 20 else "heavy", "every_n_steps", "A")
    journal.append("failure", run_id="A", data={"step": "train", "final": True})
    journal.append("recovery_started", run_id="R1", data={"checkpoint": {"version": 2, "step": 40}})
    journal.append("run_started", run_id="B", data={"pipeline": "example", "recovery_run": "R1"})
    journal.append("recovery_finished", run_id="R1", data={"status": "completed"})
    checkpoint(50, "light", "timebox", "B")
    checkpoint(60, "heavy", "every_n_steps", "B")  # then B is killed: nothing more from it
    journal.append("recovery_started", run_id="R2", data={"checkpoint": {"version": 3, "step": 60}})
    journal.append("run_started", run_id="C", data={"pipeline": "example", "recovery_run": "R2"})
    checkpoint(80, "heavy", "milestone:final", "C")
    journal.append("run_finished", run_id="C")
    journal.append("recovery_finished", run_id="R2", data={"status": "completed"})
    return store


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)) == (1000, 500)


def test_plot_timeline_draws_checkpoints_failures_and_recoveries(tmp_path):
    store = crashed_and_recovered(tmp_path)
    data = timeline(store, "train")
    assert [(p.step, p.tier, p.trigger) for p in data.checkpoints] == [
        (10, "light", "every_n_steps"),
        (20, "heavy", "every_n_steps"),
        (30, "light", "every_n_steps"),
        (40, "heavy", "every_n_steps"),
        (50, "light", "timebox"),
        (60, "heavy", "every_n_steps"),
        (80, "heavy", "milestone:final"),
    ]
    assert [label for _at, label, _final in data.failures] == ["failure in train"]
    assert [run_id for _at, run_id in data.crashes] == ["B"]
    assert [run_id for _at, run_id in data.run_starts] == ["A", "B", "C"]
    assert [(end is not None, status) for _start, end, status in data.recoveries] == [
        (True, "completed"),
        (True, "completed"),
    ]
    path = plot_timeline(store, "train", tmp_path / "out" / "timeline.png")
    assert path == tmp_path / "out" / "timeline.png"
    assert_png(path)


def test_plot_without_matplotlib_says_which_extra_to_install(tmp_path, monkeypatch):
    store = crashed_and_recovered(tmp_path)
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import` sees where matplotlib is not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailableError, match=r"pip install 'prefect-recovery\[plot\]'"):
        plot_timeline(store, "train", tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()


def test_ls_plot_writes_the_timeline(tmp_path):
    crashed_and_recovered(tmp_path)
    regions = ["--region", str(tmp_path / "region-a"), "--region", str(tmp_path / "region-b")]
    out = tmp_path / "ls-timeline.png"
    result = CliRunner().invoke(app, ["ls", "--lineage", "train", *regions, "--plot", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert_png(out)
    listed = json.loads(result.stdout)
    assert [info["step"] for info in listed] == [20, 40, 60, 80]
    assert "written to" in result.stderr and str(out) in result.stderr.replace("\n", "")

    refused = CliRunner().invoke(app, ["ls", *regions, "--plot", str(tmp_path / "x.png")])
    assert refused.exit_code == 2 and "--lineage" in refused.output
