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
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, overload

from prefect import Flow

from ..core.errors import RecoveryError

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
        entry.load()
    for module in filter(None, (part.strip() for part in os.environ.get("PREFECT_RECOVERY_PIPELINES", "").split(","))):
        importlib.import_module(module)


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
