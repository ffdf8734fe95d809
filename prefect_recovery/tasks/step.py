"""``@step``: an idempotent pipeline step, a Prefect task whose results live in the store.

Inside a ``PipelineRun`` a step's cache key is

    blake3(lineage, step name, digest of its inputs, digest of its code)

and never the flow-run id, so a later run of the same lineage (a recovery, or a plain re-run)
finds the result of a step that already finished and returns it without running the step's
code; the task run then shows as **Cached** in the Prefect UI. Results are stored through the
CheckpointStore as versions of the lineage ``<lineage>.steps`` (every region, write quorum,
verified on read, no pickle: tensors, numbers, str, bytes, None and dict/list/tuple of them).

Retries default to exponential backoff with jitter, for transient errors only
(``is_transient``); a bad input (``StepInputError``, ``ValueError``, ``TypeError``...) fails at
once with its own message.

Outside a ``PipelineRun`` a step is a plain Prefect task (no cache, no journal).
"""

from __future__ import annotations

import errno
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from prefect import Task, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from ..core.digest import hash_bytes
from ..core.errors import (
    CheckpointNotFoundError,
    QuorumNotMetError,
    RegionError,
    StorageFullError,
)
from ..core.manifest import canonical_json
from ..core.models import CheckpointInfo
from ..training import first_calls
from ..training.context import ResumePoint
from ..training.encoding import UnsupportedValueError, encode_state
from ..training.state_io import load_state, save_state
from .code import code_modules, digest_of, module_name
from .errors import StepInputError, StepResultError
from .pipeline_run import PipelineRun, current_run

R = TypeVar("R")


class _StepCode:
    """Every ``@step`` defined in this process, by step name, and the digest of its code
    (``code_modules``, computed on first use: the modules a step refers to may define names after
    the step is decorated).

    Two pipelines may each define a step of the same name (both a ``train``): every definition is
    kept, and the one a journaled step ran is told apart by its defining module, which the step's
    recorded ``code_modules`` name. Defining the same function again (a re-import) replaces it.
    """

    def __init__(self) -> None:
        self.functions: dict[str, list[Callable[..., Any]]] = {}

    def add(self, name: str, func: Callable[..., Any]) -> None:
        identity = (func.__module__, func.__qualname__)
        kept = [f for f in self.functions.get(name, []) if (f.__module__, f.__qualname__) != identity]
        self.functions[name] = [*kept, func]

    def definition(self, name: str, recorded_modules: Mapping[str, Any] | None = None) -> Callable[..., Any] | None:
        """The definition of step ``name`` that ran with ``recorded_modules`` (the one defined in a
        module they name); the only definition when there is one; None when none or ambiguous."""
        definitions = self.functions.get(name, [])
        if recorded_modules is not None:
            matching = [f for f in definitions if f.__module__ in recorded_modules or _defined_in(f, recorded_modules)]
            if len(matching) == 1:
                return matching[0]
        return definitions[0] if len(definitions) == 1 else None

    def modules(self, name: str, recorded_modules: Mapping[str, Any] | None = None) -> dict[str, str] | None:
        func = self.definition(name, recorded_modules)
        return None if func is None else _modules_of(func)

    def digest(self, name: str, recorded_modules: Mapping[str, Any] | None = None) -> str | None:
        units = self.modules(name, recorded_modules)
        return None if units is None else digest_of(units)

    def __contains__(self, name: object) -> bool:
        return name in self.functions

    def __iter__(self) -> Iterator[str]:
        return iter(self.functions)

    def __len__(self) -> int:
        return len(self.functions)


def _defined_in(func: Callable[..., Any], recorded_modules: Mapping[str, Any]) -> bool:
    """Whether the module that defines ``func`` is among ``recorded_modules`` under its file-derived name."""
    module = sys.modules.get(func.__module__)
    return module is not None and module_name(module) in recorded_modules


@functools.cache
def _modules_of(fn: Callable[..., Any]) -> dict[str, str]:
    return code_modules(fn)


# Every step defined in this process, by name (preflight's drift check, recover's --from-step).
STEP_CODE = _StepCode()


class StepTask(Task[..., Any]):
    """The Prefect task of a ``@step``: a reused step's call returns the value the step returned
    the first time, like a step that ran (its task run still shows **Cached** in the UI)."""

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        value = super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)
        if not return_state and isinstance(value, State):
            return value.result()
        return value


_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EIO}


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the network, a region or the disk hiccupped, not the input."""
    if isinstance(exc, (StepInputError, StorageFullError)):
        return False
    if isinstance(exc, (RegionError, QuorumNotMetError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def retry_transient(task_: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    try:
        state.result()
    except BaseException as exc:  # the failure the state holds
        return is_transient(exc)
    return False


def code_digest(fn: Callable[..., Any]) -> str:
    """Digest of the code ``fn`` runs: its source and the user modules it can reach (tasks/code.py)."""
    return digest_of(code_modules(fn))


def value_digest(value: Any, *, what: str = "value") -> str:
    """Digest of a value's content: tensors by dtype, shape and bytes; pydantic models by JSON."""

    def plain(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return {"__model__": type(item).__qualname__, "fields": item.model_dump(mode="json")}
        if isinstance(item, dict):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(plain(inner) for inner in item)
        return item

    try:
        encoded = encode_state(plain(value))
    except UnsupportedValueError as exc:
        raise StepResultError(f"cannot digest {what}: {exc}") from None
    parts = [canonical_json(encoded.tree)]
    parts += [
        canonical_json([entry.name, entry.dtype, entry.shape, hash_bytes(entry.data)]) for entry in encoded.entries
    ]
    return hash_bytes(b"\n".join(parts))


def cache_key(lineage: str, step_name: str, input_digest: str, code: str) -> str:
    return hash_bytes(canonical_json({"lineage": lineage, "step": step_name, "inputs": input_digest, "code": code}))


def stored_result(run: PipelineRun, step_name: str, key: str) -> tuple[Any, CheckpointInfo] | None:
    """The newest stored result of ``step_name`` with ``key``, verified; None when there is none."""
    try:
        infos = run.store.list(run.steps_lineage)
    except CheckpointNotFoundError:
        return None
    for info in reversed(infos):
        if info.metadata.get("cache_key") == key and info.metadata.get("step") == step_name:
            state, _manifest = load_state(run.store, lineage=run.steps_lineage, version=info.version)
            return state["result"], info
    return None


def step(
    fn: Callable[..., R] | None = None,
    *,
    name: str | None = None,
    ignore: Iterable[str] = (),
    retries: int = 3,
    retry_delay_seconds: Any = None,
    retry_jitter_factor: float | None = 0.5,
    retry_condition_fn: Any = None,
    **task_options: Any,
) -> Any:
    """Make ``fn`` an idempotent pipeline step (a Prefect task).

    Args:
        name: Step name (default: the function name with ``-`` for ``_``); part of the cache key.
        ignore: Parameters left out of the input digest (e.g. the store, a logger). An argument
            that is a ``ResumePoint`` (``run.resume_point()``) is always left out.
        retries: Retries for transient errors (default 3).
        retry_delay_seconds: Default: exponential backoff from 2 s (2, 4, 8 s...).
        retry_jitter_factor: Random spread of each delay (default 0.5).
        retry_condition_fn: Default: ``retry_transient``.
        task_options: Anything else ``@prefect.task`` accepts (tags, timeout_seconds, ...).
    """

    def decorate(func: Callable[..., R]) -> Task[..., R]:
        step_name = name or func.__name__.replace("_", "-")
        STEP_CODE.add(step_name, func)
        signature = inspect.signature(func)
        skipped = set(ignore)
        unknown = skipped - set(signature.parameters)
        if unknown:
            raise TypeError(f"step {step_name!r}: ignore names unknown parameters {sorted(unknown)}")

        @functools.wraps(func)
        def run_step(*args: Any, **kwargs: Any) -> Any:
            # Before any step's code (a data step's too, not only training's Checkpointer): MKL's vector math
            # set up on this one thread, since its racing first parallel call rounds differently (issue 18).
            first_calls.settle()
            run = current_run()
            if run is None:
                return func(*args, **kwargs)
            modules = _modules_of(func)
            code = digest_of(modules)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            # A resume point says where training starts, not what the step computes: a recovery
            # passes another version than the first attempt did, and the cache key must not change.
            inputs = {
                key: value
                for key, value in bound.arguments.items()
                if key not in skipped and not isinstance(value, ResumePoint)
            }
            input_digest = value_digest(inputs, what=f"the inputs of step {step_name!r}")
            key = cache_key(run.lineage, step_name, input_digest, code)
            logger = get_run_logger()
            if not run.forced(step_name):
                found = stored_result(run, step_name, key)
                if found is not None:
                    result, info = found
                    run.append(
                        "step_completed",
                        step=step_name,
                        reused=True,
                        cache_key=key,
                        code=code,
                        input_digest=input_digest,
                        output_digest=info.metadata.get("output_digest"),
                        result_version=info.version,
                    )
                    where = f"{run.steps_lineage} v{info.version}"
                    logger.info("step %s already finished in this lineage: reusing its result (%s)", step_name, where)
                    return Completed(name="Cached", data=result, message=f"reused from {where}")
            from prefect.runtime import task_run

            attempt = int(task_run.run_count or 1)
            run.append(
                "step_started",
                step=step_name,
                cache_key=key,
                code=code,
                code_modules=modules,
                input_digest=input_digest,
                attempt=attempt,
            )
            try:
                result = func(*args, **kwargs)
                # Storing the result is part of the step: a result that cannot be stored fails it.
                output_digest = value_digest(result, what=f"the result of step {step_name!r}")
                metadata = {"step": step_name, "cache_key": key, "output_digest": output_digest, "run": run.run_id}
                try:
                    info = save_state(run.store, {"result": result}, lineage=run.steps_lineage, metadata=metadata)
                except UnsupportedValueError as exc:
                    raise StepResultError(f"step {step_name!r} returned a value that cannot be stored: {exc}") from None
            except BaseException as exc:
                final = not (is_transient(exc) and attempt <= retries)
                if final:
                    run.failed_step = step_name
                run.append(
                    "failure",
                    step=step_name,
                    final=final,
                    attempt=attempt,
                    error=f"{type(exc).__name__}: {exc}"[:2000],
                )
                raise
            run.append(
                "step_completed",
                step=step_name,
                reused=False,
                cache_key=key,
                code=code,
                code_modules=modules,
                input_digest=input_digest,
                output_digest=output_digest,
                result_version=info.version,
            )
            return result

        options = {
            "name": step_name,
            "cache_policy": NO_CACHE,  # the cache is ours: lineage-scoped and held in the store
            "persist_result": False,
            "retries": retries,
            "retry_delay_seconds": retry_delay_seconds
            if retry_delay_seconds is not None
            else exponential_backoff(backoff_factor=2),
            "retry_jitter_factor": retry_jitter_factor,
            "retry_condition_fn": retry_condition_fn or retry_transient,
            **task_options,
        }
        return StepTask(run_step, **options)

    return decorate(fn) if fn is not None else decorate


__all__ = [
    "STEP_CODE",
    "StepTask",
    "cache_key",
    "code_digest",
    "is_transient",
    "retry_transient",
    "step",
    "value_digest",
]
