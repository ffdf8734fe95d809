"""What an enclosing pipeline run asks of every ``Checkpointer`` on its lineage.

A ``PipelineRun`` (tasks layer, Prefect) opens ``training_hooks`` around its steps; a
``Checkpointer`` built inside on the same lineage picks them up without the user passing them:

* ``resume_version``: the checkpoint a recovery selected (``recover --checkpoint V``), restored
  on entry instead of the latest;
* ``on_commit``: called with every committed heavy checkpoint, so the lineage's journal records it.

The training layer defines the context so it need not know Prefect (layers import downward only).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainingHooks:
    lineage: str
    resume_version: int | None = None
    on_commit: Callable[[Any], None] | None = None


_hooks: contextvars.ContextVar[TrainingHooks | None] = contextvars.ContextVar("training_hooks", default=None)


def active_hooks(lineage: str) -> TrainingHooks | None:
    """The hooks of the enclosing pipeline run, when it runs ``lineage``."""
    hooks = _hooks.get()
    return hooks if hooks is not None and hooks.lineage == lineage else None


@contextlib.contextmanager
def training_hooks(hooks: TrainingHooks) -> Iterator[TrainingHooks]:
    token = _hooks.set(hooks)
    try:
        yield hooks
    finally:
        _hooks.reset(token)


def set_hooks(hooks: TrainingHooks | None) -> contextvars.Token[TrainingHooks | None]:
    return _hooks.set(hooks)


def reset_hooks(token: contextvars.Token[TrainingHooks | None]) -> None:
    _hooks.reset(token)


__all__ = ["TrainingHooks", "active_hooks", "reset_hooks", "set_hooks", "training_hooks"]
