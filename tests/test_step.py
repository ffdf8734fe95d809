"""``@step``: idempotent pipeline steps whose results live in the store (prefect_recovery/tasks/step.py).

Every test runs real in-process Prefect flows against the session-wide server (``prefect_server``) and a real
``CheckpointStore`` under the test's own ``PREFECT_RECOVERY_HOME``. Steps count their executions in ``CALLS``, so
a test sees exactly which step code ran; a reused step must not run its code and must finish as a Completed state
named "Cached" (checked through ``return_state=True`` and, once, through Prefect's API).
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.step_values import same
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import State

from prefect_recovery import CheckpointStore
from prefect_recovery.core.errors import (
    BlobUnavailableError,
    QuorumNotMetError,
    RegionUnavailableError,
    StorageFullError,
)
from prefect_recovery.core.journal import Journal, JournalEvent
from prefect_recovery.core.layout import blob_key
from prefect_recovery.tasks.errors import StepInputError, StepResultError
from prefect_recovery.tasks.pipeline_run import PipelineRun, current_run
from prefect_recovery.tasks.step import is_transient, retry_transient, step

pytestmark = pytest.mark.usefixtures("prefect_server")

PIPELINE = "step-test-pipeline"
CALLS: list[str] = []  # one entry per execution of a step's code
FAILURES: dict[str, int] = {}  # how many more times a flaky step fails before it succeeds


@pytest.fixture(autouse=True)
def _reset_counters() -> None:
    CALLS.clear()
    FAILURES.clear()


# -- running steps inside a pipeline run -------------------------------------------------------------------------
def run_pipeline(lineage: str, body: Callable[[], Any]) -> tuple[Any, str]:
    """One flow run opening a ``PipelineRun`` on ``lineage`` around ``body``; returns (body's value, run id)."""

    @flow(name=PIPELINE)
    def pipeline() -> tuple[Any, str]:
        with PipelineRun(CheckpointStore.default(), lineage, pipeline=PIPELINE, parameters={}) as run:
            value = body()
            run.finish()
        return value, run.run_id

    return pipeline()


def journal(lineage: str) -> Journal:
    return Journal(CheckpointStore.default().core, lineage)


def events_of(lineage: str, kind: str, run_id: str | None = None) -> list[JournalEvent]:
    return [e for e in journal(lineage).events() if e.kind == kind and (run_id is None or e.run_id == run_id)]


def step_results(lineage: str) -> list[Any]:
    """The step results a lineage holds in the store (versions of ``<lineage>.steps``)."""
    return CheckpointStore.default().list(f"{lineage}.steps")


# -- steps used below ---------------------------------------------------------------------------------------------
@step(retry_delay_seconds=0)
def load_numbers(n: int) -> torch.Tensor:
    CALLS.append("load-numbers")
    return torch.arange(n, dtype=torch.float32)


@step(retry_delay_seconds=0)
def scale(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    CALLS.append("scale")
    return x * factor


@step(retry_delay_seconds=0)
def summarize(x: torch.Tensor) -> dict[str, float]:
    CALLS.append("summarize")
    return {"sum": float(x.sum()), "max": float(x.max())}


def three_steps(n: int = 5) -> tuple[list[State[Any]], Any]:
    """load-numbers -> scale -> summarize, each called with return_state=True."""
    states = [load_numbers(n, return_state=True)]
    states.append(scale(states[-1].result(), return_state=True))
    states.append(summarize(states[-1].result(), return_state=True))
    return states, states[-1].result()


def task_run_states(flow_run_id: str, expected: int, timeout: float = 30) -> dict[str, str]:
    """Task name -> state name of a flow run's task runs, as Prefect's API reports them (events arrive late)."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            found = {run.name.rsplit("-", 1)[0]: run.state_name for run in runs}  # names are "<task>-<3 hex>"
            if len(found) >= expected and all(state not in (None, "Pending", "Running") for state in found.values()):
                return found
            time.sleep(0.5)
    return found


# -- reuse within a lineage ---------------------------------------------------------------------------------------
def test_a_second_run_of_the_lineage_reuses_finished_steps_without_running_them():
    (states, summary), first_run = run_pipeline("lin", three_steps)
    assert CALLS == ["load-numbers", "scale", "summarize"]
    assert [s.name for s in states] == ["Completed"] * 3
    assert summary == {"sum": 20.0, "max": 8.0}

    (states, again), second_run = run_pipeline("lin", three_steps)

    assert first_run != second_run, "two flow runs, two run ids: the flow-run id is not part of the cache key"
    assert CALLS == ["load-numbers", "scale", "summarize"], "a reused step ran its code again"
    assert all(s.is_completed() for s in states)
    assert [s.name for s in states] == ["Cached"] * 3
    assert [s.message for s in states] == [f"reused from lin.steps v{v}" for v in (1, 2, 3)]
    assert again == summary
    reused = events_of("lin", "step_completed", second_run)
    assert [(e.data["step"], e.data["reused"]) for e in reused] == [
        ("load-numbers", True),
        ("scale", True),
        ("summarize", True),
    ]
    assert events_of("lin", "step_started", second_run) == []
    assert len(step_results("lin")) == 3, "a reused step stored its result again"
    history = journal("lin").history()
    assert history.status == "finished" and history.runs == [first_run, second_run]

    # Prefect's own record of the second flow run says the same.
    assert task_run_states(second_run, expected=3) == {
        "load-numbers": "Cached",
        "scale": "Cached",
        "summarize": "Cached",
    }


def test_another_lineage_does_not_reuse():
    run_pipeline("lin-a", three_steps)
    assert CALLS == ["load-numbers", "scale", "summarize"]

    (states, _summary), _run = run_pipeline("lin-b", three_steps)

    assert CALLS == ["load-numbers", "scale", "summarize"] * 2
    assert [s.name for s in states] == ["Completed"] * 3
    assert len(step_results("lin-a")) == len(step_results("lin-b")) == 3


def test_changed_inputs_run_the_step_again():
    base = torch.linspace(-1, 1, 64, dtype=torch.float32)
    flipped = base.clone()
    flipped.view(torch.uint8)[17] ^= 0x01  # one bit of one byte
    as_double = base.to(torch.float64)

    def body(x: torch.Tensor, **kwargs: Any) -> Callable[[], State[Any]]:
        return lambda: scale(x, return_state=True, **kwargs)

    cases = [
        ("first run", body(base), "Completed"),
        ("same tensor, a fresh copy", body(base.clone()), "Cached"),
        ("same value as a keyword", body(base.clone(), factor=2), "Cached"),
        ("one bit of the tensor changed", body(flipped), "Completed"),
        ("same values, another dtype", body(as_double), "Completed"),
        ("another scalar input", body(base, factor=3), "Completed"),
        ("back to the first input", body(base), "Cached"),
    ]
    for what, call, expected in cases:
        before = len(CALLS)
        state, _run = run_pipeline("lin", call)
        assert state.name == expected, what
        assert len(CALLS) == before + (expected == "Completed"), what
    assert torch.equal(state.result(), base * 2)


def _shared_v1(x: int) -> int:
    CALLS.append("v1")
    return x + 1


def _shared_v2(x: int) -> int:
    CALLS.append("v2")
    return 1 + x  # same result, different code


shared_v1 = step(_shared_v1, name="shared", retry_delay_seconds=0)
shared_v2 = step(_shared_v2, name="shared", retry_delay_seconds=0)


def test_changed_code_runs_the_step_again():
    assert shared_v1.name == shared_v2.name == "shared"
    assert run_pipeline("lin", lambda: shared_v1(1, return_state=True))[0].name == "Completed"
    state, _run = run_pipeline("lin", lambda: shared_v2(1, return_state=True))

    assert state.name == "Completed" and state.result() == 2
    assert CALLS == ["v1", "v2"]
    codes = [e.data["code"] for e in events_of("lin", "step_completed")]
    assert len(codes) == 2 and codes[0] != codes[1]
    # each version of the code keeps its own result
    assert run_pipeline("lin", lambda: shared_v1(1, return_state=True))[0].name == "Cached"
    assert run_pipeline("lin", lambda: shared_v2(1, return_state=True))[0].name == "Cached"
    assert CALLS == ["v1", "v2"]


# -- results: bit-exact, verified on read -------------------------------------------------------------------------
def rich_value() -> dict[Any, Any]:
    generator = torch.Generator().manual_seed(3)
    nan_payload = torch.tensor([0x7FF8000000000123, -0x0008000000000001], dtype=torch.int64).view(torch.float64)
    return {
        "f32": torch.randn(4, 3, generator=generator),
        "bf16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=generator).to(torch.float16),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(3, generator=generator, dtype=torch.complex64),
        "specials": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324]),
        "nan_payloads": nan_payload,
        "transposed": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "tuple": (1, "two", 3.0, None, b"\x00\xff", (torch.ones(2),)),
        "list": [True, [1, 2], {"nested": torch.zeros(1, dtype=torch.int16)}],
        7: {"int key": -0.0, "nan": float("nan"), "tiny": 5e-324, "big": 2**62, "text": "žluťoučký"},
        "bytes": bytes(range(256)),
        "none": None,
    }


@step(retry_delay_seconds=0)
def make_rich(seed: int) -> dict[Any, Any]:
    CALLS.append("make-rich")
    return rich_value()


def test_results_round_trip_bit_exactly():
    first, _run = run_pipeline("lin", lambda: make_rich(0, return_state=True))
    assert first.name == "Completed" and same(first.result(), rich_value())

    second, _run = run_pipeline("lin", lambda: make_rich(0, return_state=True))

    assert second.name == "Cached" and CALLS == ["make-rich"]
    value = second.result()
    assert same(value, rich_value()), "the stored result came back different"
    assert isinstance(value["tuple"], tuple) and isinstance(value["tuple"][5], tuple)
    assert isinstance(value["list"], list) and list(value) == list(rich_value())
    assert math.copysign(1.0, value[7]["int key"]) == -1.0


def result_blobs(home: Path, lineage: str, region: str) -> list[Path]:
    store = CheckpointStore.default()
    [info] = step_results(lineage)
    manifest, _holders = store.core.resolve(f"{lineage}.steps", info.version)
    paths = [home / "regions" / region / blob_key(chunk.digest) for entry in manifest.entries for chunk in entry.chunks]
    assert paths and all(path.is_file() for path in paths)
    return paths


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def test_a_result_corrupt_in_one_region_is_read_from_the_other(recovery_home):
    run_pipeline("lin", lambda: make_rich(0, return_state=True))
    for blob in result_blobs(recovery_home, "lin", "region-a"):
        flip_a_byte(blob)

    state, _run = run_pipeline("lin", lambda: make_rich(0, return_state=True))

    assert state.name == "Cached" and CALLS == ["make-rich"]
    assert same(state.result(), rich_value())


def test_a_result_corrupt_in_every_region_is_a_clear_error(recovery_home):
    run_pipeline("lin", lambda: make_rich(0, return_state=True))
    for region in ("region-a", "region-b"):
        for blob in result_blobs(recovery_home, "lin", region):
            flip_a_byte(blob)

    with pytest.raises(BlobUnavailableError, match=r"no intact copy of blob .* in any region.*corrupt"):
        run_pipeline("lin", lambda: make_rich(0))

    assert CALLS == ["make-rich"], "a damaged result must not be silently replaced"
    assert journal("lin").history().status == "failed"


# -- retries: transient errors only -------------------------------------------------------------------------------
@step(retries=3, retry_delay_seconds=0)
def flaky(kind: str) -> str:
    CALLS.append("flaky")
    if FAILURES.get(kind, 0) > 0:
        FAILURES[kind] -= 1
        if kind == "connection":
            raise ConnectionError("connection reset by the object store")
        if kind == "timeout":
            raise TimeoutError("the region took too long")
        raise OSError(errno.EAGAIN, "resource temporarily unavailable")
    return f"ok after {len(CALLS)}"


@pytest.mark.parametrize("kind", ["connection", "timeout", "eagain"])
def test_a_transient_error_is_retried_and_the_run_still_finishes(kind):
    FAILURES[kind] = 2

    state, run_id = run_pipeline("lin", lambda: flaky(kind, return_state=True))

    assert state.is_completed() and state.result() == "ok after 3"
    assert CALLS == ["flaky"] * 3
    started = events_of("lin", "step_started", run_id)
    assert [e.data["attempt"] for e in started] == [1, 2, 3]
    assert len({e.data["cache_key"] for e in started}) == 1
    failures = events_of("lin", "failure", run_id)
    assert [(f.data["attempt"], f.data["final"], f.data["step"]) for f in failures] == [
        (1, False, "flaky"),
        (2, False, "flaky"),
    ]
    assert all(type(f.data["error"]) is str and f.data["error"] for f in failures)
    history = journal("lin").history()
    assert history.status == "finished" and history.failed_step is None
    assert history.completed_steps["flaky"]["reused"] is False


def test_a_transient_error_that_persists_fails_the_run_after_the_retries():
    FAILURES["connection"] = 100

    with pytest.raises(ConnectionError, match="connection reset by the object store"):
        run_pipeline("lin", lambda: flaky("connection"))

    assert CALLS == ["flaky"] * 4  # the first attempt and 3 retries
    failures = events_of("lin", "failure")
    assert [(f.data.get("attempt"), f.data["final"]) for f in failures] == [
        (1, False),
        (2, False),
        (3, False),
        (4, True),
        (None, True),  # the run's own failure
    ]
    assert failures[-1].data["scope"] == "run" and failures[-1].data["step"] == "flaky"
    history = journal("lin").history()
    assert history.status == "failed" and history.failed_step == "flaky"
    assert step_results("lin") == []


@step  # the default retry policy: 3 retries with backoff, for transient errors only
def strict(kind: str) -> int:
    CALLS.append("strict")
    if kind == "value":
        raise ValueError("learning rate must be positive, got -0.1")
    if kind == "input":
        raise StepInputError("dataset /data/x.safetensors has no y_train")
    raise TypeError("expected a tensor, got str")


def test_the_default_retry_policy_is_backoff_with_jitter_for_transient_errors_only():
    assert strict.retries == 3
    assert strict.retry_delay_seconds == [2, 4, 8]
    assert strict.retry_jitter_factor == 0.5
    assert strict.retry_condition_fn is retry_transient
    transient = [
        ConnectionError("reset"),
        TimeoutError("slow"),
        OSError(errno.ECONNRESET, "reset"),
        OSError(errno.EIO, "i/o"),
        RegionUnavailableError("region-a", "down"),
        QuorumNotMetError("only 1 of 2 regions", {}),
    ]
    permanent = [
        ValueError("bad"),
        TypeError("bad"),
        StepInputError("bad"),
        StepResultError("bad"),
        StorageFullError("region-a", "full"),
        OSError(errno.ENOENT, "missing"),
        KeyError("x"),
    ]
    assert [is_transient(exc) for exc in transient] == [True] * len(transient)
    assert [is_transient(exc) for exc in permanent] == [False] * len(permanent)


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("value", ValueError, "learning rate must be positive, got -0.1"),
        ("input", StepInputError, "dataset /data/x.safetensors has no y_train"),
        ("type", TypeError, "expected a tensor, got str"),
    ],
)
def test_a_bad_input_fails_at_once_with_its_own_message(kind, error, message):
    started = time.monotonic()
    with pytest.raises(error) as raised:
        run_pipeline("lin", lambda: strict(kind))

    assert str(raised.value) == message
    assert CALLS == ["strict"], "a bad input was retried"
    assert time.monotonic() - started < 30
    [step_failure, run_failure] = events_of("lin", "failure")
    assert step_failure.data["final"] is True and step_failure.data["attempt"] == 1
    assert step_failure.data["error"] == f"{type(raised.value).__name__}: {message}"
    assert run_failure.data["scope"] == "run" and run_failure.data["step"] == "strict"
    assert journal("lin").history().failed_step == "strict"


# -- what cannot be stored ----------------------------------------------------------------------------------------
@step(retry_delay_seconds=0)
def unstorable(kind: str) -> Any:
    CALLS.append("unstorable")
    return object() if kind == "object" else {"ok": torch.ones(1), "handle": {1, 2}}


@pytest.mark.parametrize("kind", ["object", "set"])
def test_a_result_that_cannot_be_stored_without_pickle_is_a_step_result_error(kind):
    with pytest.raises(StepResultError, match=r"step 'unstorable'.*without pickle"):
        run_pipeline("lin", lambda: unstorable(kind))

    assert CALLS == ["unstorable"], "an unstorable result is not a transient error: no retry"
    assert step_results("lin") == []
    history = journal("lin").history()
    assert history.status == "failed"
    assert "unstorable" in (history.failed_step, history.interrupted_step), "the journal lost which step failed"
    assert "unstorable" not in history.completed_steps


@step(retry_delay_seconds=0)
def takes_anything(value: Any) -> int:
    CALLS.append("takes-anything")
    return 1


def test_an_input_that_cannot_be_digested_is_a_step_result_error():
    with pytest.raises(StepResultError, match=r"cannot digest the inputs of step 'takes-anything'"):
        run_pipeline("lin", lambda: takes_anything(object()))
    assert CALLS == []


# -- ignore= ------------------------------------------------------------------------------------------------------
class Handle:
    """Something a step takes but must not key on (a client, a logger, a store)."""


@step(ignore=["handle"], retry_delay_seconds=0)
def with_handle(handle: Handle, x: int) -> int:
    CALLS.append("with-handle")
    return x * 10


def test_ignored_parameters_are_left_out_of_the_input_digest():
    assert run_pipeline("lin", lambda: with_handle(Handle(), 1, return_state=True))[0].name == "Completed"
    state, _run = run_pipeline("lin", lambda: with_handle(Handle(), 1, return_state=True))
    assert state.name == "Cached" and state.result() == 10
    assert run_pipeline("lin", lambda: with_handle(Handle(), 2, return_state=True))[0].name == "Completed"
    assert CALLS == ["with-handle", "with-handle"]


def test_ignoring_an_unknown_parameter_is_a_type_error():
    def fn(x: int, store: Any) -> int:
        return x

    with pytest.raises(TypeError, match=r"step 'fn': ignore names unknown parameters \['nope', 'stroe'\]"):
        step(ignore=["stroe", "store", "nope"])(fn)
    step(ignore=["store"])(fn)  # a known name is fine


# -- outside a PipelineRun ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs to the API")
def test_outside_a_pipeline_run_a_step_is_a_plain_task(recovery_home):
    @flow(name="plain-flow")
    def plain() -> State[Any]:
        assert current_run() is None
        return load_numbers(3, return_state=True)

    first, second = plain(), plain()

    assert first.name == second.name == "Completed"
    assert torch.equal(second.result(), torch.arange(3, dtype=torch.float32))
    assert CALLS == ["load-numbers", "load-numbers"], "no cache outside a PipelineRun"
    assert torch.equal(load_numbers(2), torch.arange(2, dtype=torch.float32))  # no flow at all
    assert CALLS == ["load-numbers"] * 3
    assert not recovery_home.exists() or CheckpointStore.default().lineages() == [], "no journal, no results"


def test_a_step_fed_by_a_plain_task_is_keyed_by_the_value_it_got():
    """A plain Prefect task's result handed to a step is digested by value like any other input."""

    @task
    def plus_one(x: int) -> int:
        return x + 1

    def body() -> State[Any]:
        return load_numbers(plus_one(2), return_state=True)

    assert run_pipeline("lin", body)[0].name == "Completed"
    assert run_pipeline("lin", body)[0].name == "Cached"
    assert CALLS == ["load-numbers"]
