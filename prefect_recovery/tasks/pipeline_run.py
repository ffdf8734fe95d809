"""One run of a pipeline on a lineage: its journal record, its claim on the lineage, its steps.

``PipelineRun`` is a context manager a pipeline flow opens around its steps:

* on entry it *claims* the lineage: no other live run or recovery may hold it (DESIGN.md
  invariant 7: two recoveries at once, one proceeds), then it journals ``run_started`` with the
  parameters, seed, environment, code digest, input provenance and this process's identity;
* ``@step`` tasks called inside it find it through a context variable, journal themselves and
  keep their results in the store under ``<lineage>.steps``;
* on exit it journals ``run_finished`` or a final ``failure``.

A recovery (``flows.recover``) opens a ``RecoveryPlan`` first; the run it starts then re-runs
steps from ``from_step`` on, and ``run.resume_point()`` names the checkpoint the recovery
selected: the flow passes it to its training step, which passes it to
``Checkpointer(..., resume_from=...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import platform
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any, Literal
from uuid import UUID

from pydantic import JsonValue

from ..core.digest import hash_bytes
from ..core.errors import CheckpointNotFoundError
from ..core.journal import EventKind, Journal, JournalEvent
from ..core.layout import STEPS_SUFFIX, check_base_lineage, check_lineage
from ..core.lineage_history import Claim, open_claims
from ..core.liveness import is_alive, process_identity
from ..core.models import CheckpointInfo
from ..core.store import Store, core_store
from ..training.context import ResumePoint, reset_hooks, set_hooks
from .code import code_modules, digest_of
from .errors import LineageBusyError

ENVIRONMENT_PACKAGES = ("torch", "numpy", "prefect", "prefect-recovery", "torchdata", "safetensors", "blake3")


def environment() -> dict[str, JsonValue]:
    """What a bit-identical resume depends on: interpreter, libraries, threads, CUDA."""
    versions: dict[str, JsonValue] = {}
    for package in ENVIRONMENT_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env: dict[str, JsonValue] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }
    try:
        import torch

        from ..training.determinism import execution_fingerprint

        env["torch_threads"] = torch.get_num_threads()
        env["cuda_available"] = bool(torch.cuda.is_available())
        env["execution"] = execution_fingerprint()  # which kernels this process computes with
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return env


def environment_differences(
    recorded: Mapping[str, Any], now: Mapping[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """How this environment (``now``, default ``environment()``) differs from a run's recorded
    ``environment()`` in what a bit-identical result depends on: ``(problems, warnings)``.
    Problems: another Python, another version of a package the run recorded, no CUDA where the run
    had it. Warnings: another torch thread count (a checkpoint restores its own). The one answer
    for the recovery's preflight and the replay check's notes."""
    now = environment() if now is None else now
    problems: list[str] = []
    warnings: list[str] = []
    if recorded.get("python") != now["python"]:
        problems.append(f"Python {now['python']} here, the run used {recorded.get('python')}")
    packages_then = recorded.get("packages") if isinstance(recorded.get("packages"), dict) else {}
    packages_now = now["packages"] if isinstance(now["packages"], dict) else {}
    for package, version in sorted(packages_then.items()):
        if package in packages_now and packages_now[package] != version:
            problems.append(f"{package} {packages_now[package]} installed, the run used {version}")
    if recorded.get("cuda_available") and not now.get("cuda_available"):
        problems.append("the run used CUDA and no CUDA device is available here")
    if "torch_threads" in recorded and recorded["torch_threads"] != now.get("torch_threads"):
        warnings.append(
            f"torch uses {now.get('torch_threads')} threads here, the run used {recorded['torch_threads']} "
            "(the checkpoint restores its own setting)"
        )
    warnings += _kernel_differences(recorded.get("execution"), now.get("execution"))
    return problems, warnings


# Fields of the execution fingerprint that a checkpoint cannot restore and that change how results round.
_KERNEL_FIELDS = ("cpu", "cpu_capability", "float32_matmul_precision", "mkldnn_enabled", "mkl_cnr")


def _kernel_differences(recorded: Any, now: Any) -> list[str]:
    """Warnings for a process that computes with other kernels than the run did (another CPU, instruction set or
    kernel-selecting environment variable): the resumed training may round differently, so a result that is
    not bit-identical to an uninterrupted run's would be explained, not a surprise (docs/DETERMINISM.md)."""
    from ..training.determinism import fingerprint_differences

    differences = fingerprint_differences(recorded, now)
    shown = {name: values for name, values in differences.items()
             if name in _KERNEL_FIELDS or name.startswith("environment.")}  # fmt: skip
    return [
        f"this process computes with {name}={values[1]!r}, the run used {values[0]!r}: the resumed training may "
        "round differently from an uninterrupted run (not bit-identical)"
        for name, values in shown.items()
    ]


def running_flow_code() -> dict[str, str] | None:
    """``code_modules`` of the flow this code runs in (its function and the user modules it
    reaches), or None outside a flow run."""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
    except Exception:  # outside Prefect
        return None
    if context is None or context.flow is None:
        return None
    return code_modules(context.flow.fn)


def current_run_id() -> str:
    """The Prefect flow-run id when inside a flow run, else a fresh uuid."""
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:  # outside Prefect, or no API: the journal does not need Prefect
        pass
    return uuid.uuid4().hex


def state_digest(store: Any, lineage: str, version: int | None = None) -> str:
    """The digest of a checkpoint's state alone (every entry's name, dtype, shape and bytes;
    not its time, regions or metadata): equal for two runs that trained bit-identically.

    ``version`` defaults to the lineage's latest consistent checkpoint.
    """
    core = core_store(store)
    manifest, _holders = core.resolve(lineage, version)
    return core.state_digest(manifest)


def file_input(path: str) -> dict[str, JsonValue]:
    """Provenance of an input file for ``run_started``: its URL, size and content digest."""
    import fsspec

    with fsspec.open(path, "rb") as handle:
        data = handle.read()
    return {"uri": path, "size": len(data), "digest": hash_bytes(data)}


# -- liveness of claims -----------------------------------------------------------------------
def orchestrator_says_alive(run_id: str) -> bool | None:
    """Ask the Prefect API whether flow run ``run_id`` is still in a non-final state.

    Used only for claims whose process ran on another machine; None when Prefect does not
    know the run (another server, or a run outside Prefect). A subflow whose parent run is final
    (Crashed with it) is not alive.
    """
    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        return None
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and not state.is_final() and run.parent_task_run_id is not None:
                # A subflow (the pipeline run a recovery started) stays Running when its process is killed:
                # only the parent flow run is marked Crashed. A final parent means the subflow is gone too.
                parent = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
                if parent.state is not None and parent.state.is_final():
                    return False
    except Exception:  # no API, unknown run: the answer is "unknown", not an error
        return None
    return None if state is None else not state.is_final()


def claim_alive(claim: Claim) -> bool | None:
    alive = is_alive(claim.process)
    return alive if alive is not None else orchestrator_says_alive(claim.run_id)


def describe_claim(claim: Claim, alive: bool | None) -> str:
    what = "run" if claim.kind == "run_started" else "recovery"
    process = claim.process if isinstance(claim.process, dict) else {}
    where = f"pid {process.get('pid')} on {process.get('host')}" if process else "an unknown process"
    if is_alive(claim.process) is not None:  # this machine checked the process itself
        state = "is still running"
    elif alive:
        # Only Prefect's word: a lost host's run stays Running there until something marks it final, so say what
        # ends the wait rather than "wait for it to finish".
        state = (
            "is Running in Prefect, and its host cannot be checked from here: if that host is lost, the zombie "
            "detector (`prefect-recovery automations install`) marks the run Crashed once its heartbeats stop, or "
            "set its state to Crashed in the Prefect UI; then recover again"
        )
    else:
        state = "may still be running (its host cannot be checked from here, and Prefect does not know the run)"
    return f"{what} {claim.run_id} ({where}, journal seq {claim.seq}) {state}"


def live_claims(events: list[JournalEvent], exclude: set[str]) -> list[tuple[Claim, bool | None]]:
    """Open claims not in ``exclude`` whose process is alive (True) or cannot be checked (None)."""
    found = []
    for claim in open_claims(events):
        if claim.run_id in exclude:
            continue
        alive = claim_alive(claim)
        if alive is not False:
            found.append((claim, alive))
    return found


def claim_lineage(
    journal: Journal,
    kind: Literal["run_started", "recovery_started"],
    *,
    run_id: str,
    data: dict[str, JsonValue],
    exclude: set[str],
) -> JournalEvent:
    """Journal ``kind`` for ``run_id`` unless another live run or recovery holds the lineage.

    Check, append, check again: of two claims racing, the one with the lower seq wins and the
    other withdraws (appends its end event) and raises LineageBusyError. Nothing is written when
    the first check already finds a holder.
    """
    lineage = journal.lineage
    busy = live_claims(journal.events(), exclude | {run_id})
    if busy:
        raise LineageBusyError(_busy_message(lineage, busy))
    event = journal.append(kind, run_id=run_id, data={**data, "process": process_identity()})
    earlier = [(c, alive) for c, alive in live_claims(journal.events(), exclude | {run_id}) if c.seq < event.seq]
    if earlier:
        end: EventKind = "failure" if kind == "run_started" else "recovery_finished"
        journal.append(end, run_id=run_id, data={"final": True, "status": "aborted", "error": "lineage busy"})
        raise LineageBusyError(_busy_message(lineage, earlier))
    return event


def _busy_message(lineage: str, busy: list[tuple[Claim, bool | None]]) -> str:
    holders = "; ".join(describe_claim(claim, alive) for claim, alive in busy)
    return (
        f"lineage {lineage!r} is held by another live run or recovery: {holders}. "
        "Wait for it to finish (or stop it) and try again; nothing was changed."
    )


# -- recovery plan and the current run --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecoveryPlan:
    """What a recovery asks of the pipeline run it starts."""

    lineage: str
    recovery_run: str
    resume_version: int | None = None
    from_step: str | None = None


_current_run: contextvars.ContextVar[PipelineRun | None] = contextvars.ContextVar("pipeline_run", default=None)
_current_plan: contextvars.ContextVar[RecoveryPlan | None] = contextvars.ContextVar("recovery_plan", default=None)


def current_run() -> PipelineRun | None:
    """The PipelineRun whose block this code runs in, if any."""
    return _current_run.get()


@contextlib.contextmanager
def recovery_plan(plan: RecoveryPlan) -> Iterator[RecoveryPlan]:
    token = _current_plan.set(plan)
    try:
        yield plan
    finally:
        _current_plan.reset(token)


class PipelineRun:
    """Journal and claim of one pipeline run on a lineage; the context ``@step`` tasks use."""

    def __init__(
        self,
        store: Any,
        lineage: str,
        *,
        pipeline: str,
        parameters: dict[str, JsonValue],
        inputs: dict[str, JsonValue] | None = None,
        code_digest: str | None = None,
        run_id: str | None = None,
    ):
        self.checkpoint_store = store  # the CheckpointStore block (or a core Store)
        self.store: Store = core_store(store)
        self.lineage = check_base_lineage(lineage)  # exp.steps / exp.light are derived, never run by hand
        self.steps_lineage = f"{lineage}{STEPS_SUFFIX}"
        self.journal = Journal(self.store, lineage)
        check_lineage(self.steps_lineage)  # the derived name must be valid too (lineage <= 122 chars)
        self.pipeline = pipeline
        self.parameters = parameters
        self.inputs = inputs or {}
        self.code_digest = code_digest
        self.run_id = run_id or current_run_id()
        plan = _current_plan.get()
        self.plan = plan if plan is not None and plan.lineage == lineage else None
        self._forcing = False
        self.failed_step: str | None = None
        self._token: contextvars.Token[PipelineRun | None] | None = None
        self._hooks_token: contextvars.Token[ResumePoint | None] | None = None
        self.finished: dict[str, JsonValue] | None = None

    # -- what a recovery asked ----------------------------------------------------------------
    @property
    def resume_version(self) -> int | None:
        return self.plan.resume_version if self.plan else None

    def resume_point(self) -> ResumePoint:
        """Where this run's training starts: hand it to the training step as an argument and on to
        ``Checkpointer(..., resume_from=...)``. Its ``version`` is the checkpoint a recovery selected
        (None on a plain run: the latest consistent one); its ``on_commit`` journals every committed
        heavy checkpoint. ``@step`` leaves it out of the cache key, so the training step of a
        recovery has the cache key of its first attempt."""
        return ResumePoint(lineage=self.lineage, version=self.resume_version, on_commit=self.checkpoint_committed)

    def forced(self, step_name: str) -> bool:
        """True for ``from_step`` and every step after it: they run even when a result is stored."""
        if self.plan and self.plan.from_step == step_name:
            self._forcing = True
        return self._forcing

    # -- journal ------------------------------------------------------------------------------
    def append(self, kind: EventKind, **data: JsonValue) -> JournalEvent:
        return self.journal.append(kind, run_id=self.run_id, data=data)

    def checkpoint_committed(self, info: CheckpointInfo) -> None:
        self.append(
            "checkpoint_committed",
            version=info.version,
            step=info.step,
            trigger=info.metadata.get("trigger"),
            tier=info.metadata.get("tier"),
            regions=list(info.regions),
            # names the exact manifest, so `verify --repair` can re-replicate it if copies are lost
            manifest_digest=info.manifest_digest,
        )

    def __enter__(self) -> PipelineRun:
        modules = running_flow_code()
        if self.code_digest is None and modules is not None:
            self.code_digest = digest_of(modules)
        data: dict[str, JsonValue] = {
            "pipeline": self.pipeline,
            "parameters": self.parameters,
            "environment": environment(),
            "code_digest": self.code_digest,
            "code_modules": modules,  # type: ignore[dict-item]
            "inputs": self.inputs,
        }
        exclude = set()
        if self.plan is not None:
            data["recovery_run"] = self.plan.recovery_run
            data["resume_version"] = self.plan.resume_version
            data["from_step"] = self.plan.from_step
            exclude.add(self.plan.recovery_run)
        claim_lineage(self.journal, "run_started", run_id=self.run_id, data=data, exclude=exclude)
        self._token = _current_run.set(self)
        # Deprecated path (removed in 0.4): a Checkpointer built inside the run without
        # `resume_from=run.resume_point()` still finds the resume point here, and warns.
        self._hooks_token = set_hooks(self.resume_point())
        return self

    def finish(self, **outputs: JsonValue) -> None:
        """Journal ``run_finished`` (optional: leaving the ``with`` block without an error does it).

        ``final_version`` (default: the lineage's latest consistent checkpoint) and
        ``final_digest`` (default: that checkpoint's state digest) are recorded, so
        ``recover`` and ``demo`` report a finished lineage from the store alone.
        """
        if self.finished is not None:
            return
        if outputs.get("final_version") is None:
            try:
                outputs["final_version"] = self.store.resolve(self.lineage)[0].version
            except CheckpointNotFoundError:  # a pipeline without checkpoints
                outputs["final_version"] = None
        if outputs.get("final_digest") is None and isinstance(outputs.get("final_version"), int):
            outputs["final_digest"] = state_digest(self.store, self.lineage, int(outputs["final_version"]))
        self.append("run_finished", **outputs)
        self.finished = dict(outputs)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._hooks_token is not None:
            reset_hooks(self._hooks_token)
            self._hooks_token = None
        if self._token is not None:
            _current_run.reset(self._token)
            self._token = None
        if exc is None:
            self.finish()
        if exc is not None:
            self.append(
                "failure",
                scope="run",
                final=True,
                step=self.failed_step,
                error=f"{type(exc).__name__}: {exc}"[:2000],
            )
