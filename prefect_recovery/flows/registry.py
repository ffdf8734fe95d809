"""Which pipeline flows ``recover`` may resume, by flow name.

The journal records the *name* of the pipeline a run belonged to; recovery looks that name
up here and never imports code named by the store (a tampered journal must not choose what
runs). Pipelines register with ``register_pipeline`` when their module is imported; modules
are imported from the ``prefect_recovery.pipelines`` entry-point group of installed packages
and from ``PREFECT_RECOVERY_PIPELINES`` (comma-separated module names), both set by the user.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Any

from prefect import Flow

from ..core.errors import RecoveryError

PIPELINES: dict[str, Flow[..., Any]] = {}


def register_pipeline(pipeline: Flow[..., Any]) -> Flow[..., Any]:
    """Let ``recover`` resume runs of ``pipeline`` (usable as a decorator above ``@flow``)."""
    PIPELINES[pipeline.name] = pipeline
    return pipeline


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
