"""Which pipeline flows ``recover`` may resume, by flow name.

The journal records the *name* of the pipeline a run belonged to; recovery looks that name
up here and never imports code named by the store (a tampered journal must not choose what
runs). Pipelines register with ``register_pipeline`` when their module is imported; modules
are imported from the ``prefect_recovery.pipelines`` entry-point group of installed packages
and from ``PREFECT_RECOVERY_PIPELINES`` (comma-separated module names), both set by the user.

A pipeline may also register a *replay hook* (``register_pipeline(flow, replay=fn)``): ``fn``
gets a ``flows.replay.ReplaySegment`` (store, lineage, from/to versions and steps, the run's
recorded parameters) and returns the state its training holds at the segment's end step,
without saving anything. ``prefect-recovery replay-check`` uses it to check determinism.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, overload

from prefect import Flow

from ..tasks.errors import RecoveryError

PIPELINES: dict[str, Flow[..., Any]] = {}
# Flow name -> replay hook: (ReplaySegment) -> the training state at the segment's end step.
REPLAY_HOOKS: dict[str, Callable[..., Any]] = {}


@overload
def register_pipeline(pipeline: Flow[..., Any], *, replay: Callable[..., Any] | None = None) -> Flow[..., Any]: ...


@overload
def register_pipeline(
    pipeline: None = None, *, replay: Callable[..., Any] | None = None
) -> Callable[[Flow[..., Any]], Flow[..., Any]]: ...


def register_pipeline(pipeline: Flow[..., Any] | None = None, *, replay: Callable[..., Any] | None = None) -> Any:
    """Let ``recover`` resume runs of ``pipeline``; with ``replay``, let ``replay-check`` re-run its training.

    Usable as ``@register_pipeline`` or ``@register_pipeline(replay=fn)`` above ``@flow``, or
    called as ``register_pipeline(flow)`` / ``register_pipeline(flow, replay=fn)``.
    """

    def register(flow: Flow[..., Any]) -> Flow[..., Any]:
        PIPELINES[flow.name] = flow
        if replay is not None:
            REPLAY_HOOKS[flow.name] = replay
        return flow

    return register if pipeline is None else register(pipeline)


def _load_modules() -> None:
    for entry in entry_points(group="prefect_recovery.pipelines"):
        try:
            entry.load()
        except ImportError as exc:
            raise RecoveryError(
                f"the `prefect_recovery.pipelines` entry point {entry.name!r} = {entry.value!r} cannot be "
                f"imported ({type(exc).__name__}: {exc}); reinstall the package that declares it"
            ) from None
    for module in filter(None, (part.strip() for part in os.environ.get("PREFECT_RECOVERY_PIPELINES", "").split(","))):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module != exc.name and not module.startswith(exc.name + "."):
                raise  # the pipeline module was found; something it imports is missing: its own traceback
            searched = [entry or os.getcwd() for entry in sys.path]
            raise RecoveryError(
                f"PREFECT_RECOVERY_PIPELINES names module {module!r}, which cannot be imported from this "
                f"process (working directory {os.getcwd()}; searched {searched}). Run from the directory "
                "that holds it, add that directory to PYTHONPATH, or install its package."
            ) from None


def resolve_pipeline(name: str) -> Flow[..., Any]:
    if name not in PIPELINES:
        _load_modules()
    try:
        return PIPELINES[name]
    except KeyError:
        raise RecoveryError(
            f"the lineage was written by pipeline {name!r}, which is not registered here "
            f"(known: {sorted(PIPELINES)}). Import its module through PREFECT_RECOVERY_PIPELINES "
            "or a `prefect_recovery.pipelines` entry point, and decorate it with register_pipeline."
        ) from None


def replay_hook(name: str) -> Callable[..., Any] | None:
    """The replay hook pipeline ``name`` registered, or None (``resolve_pipeline`` first)."""
    resolve_pipeline(name)
    return REPLAY_HOOKS.get(name)
