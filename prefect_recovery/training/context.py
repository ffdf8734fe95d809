"""Where a pipeline run's training starts: the ``ResumePoint`` a run hands its training step.

A ``PipelineRun`` (tasks layer, Prefect) says where the training of its lineage starts with
``run.resume_point()``; the flow passes it to the training step as an argument and the step passes
it on to ``Checkpointer(..., resume_from=...)``:

* ``version``: the checkpoint a recovery selected (``recover --checkpoint V``), restored on entry
  instead of the latest; None on a plain run (the lineage's latest consistent checkpoint);
* ``on_commit``: called with every committed heavy checkpoint, so the lineage's journal records it.

It is a value, not context: a step sees it in its arguments (``@step`` leaves it out of the cache
key, so a step re-run by a recovery keeps the key of its first attempt), and it can be logged,
tested or built by hand.

Deprecated (0.2, removed in 0.4): a ``Checkpointer`` built inside a ``PipelineRun`` without
``resume_from`` still finds the run's resume point through a context variable, with a
``DeprecationWarning`` naming ``resume_from=run.resume_point()``.

The training layer defines the value so it need not know Prefect (layers import downward only).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where the training of ``lineage`` starts in this run, and whom it tells about commits.

    Attributes:
        lineage: The lineage the pipeline run trains.
        version: The checkpoint to restore (a recovery's choice); None: the latest consistent one.
        on_commit: Called with the ``CheckpointInfo`` of every committed heavy checkpoint (the
            run's journal records it).
    """

    lineage: str
    version: int | None = None
    on_commit: Callable[[Any], None] | None = None

    def __repr__(self) -> str:  # shown in Prefect's task-run parameters and logs: no callable noise
        return f"ResumePoint(lineage={self.lineage!r}, version={self.version!r})"


# The old name of the context a PipelineRun opened (same fields).
TrainingHooks = ResumePoint

_implicit: contextvars.ContextVar[ResumePoint | None] = contextvars.ContextVar("implicit_resume_point", default=None)


def active_hooks(lineage: str) -> ResumePoint | None:
    """The resume point an enclosing pipeline run of ``lineage`` published implicitly (deprecated
    path: a Checkpointer given no ``resume_from``)."""
    hooks = _implicit.get()
    return hooks if hooks is not None and hooks.lineage == lineage else None


@contextlib.contextmanager
def training_hooks(hooks: ResumePoint) -> Iterator[ResumePoint]:
    token = _implicit.set(hooks)
    try:
        yield hooks
    finally:
        _implicit.reset(token)


def set_hooks(hooks: ResumePoint | None) -> contextvars.Token[ResumePoint | None]:
    return _implicit.set(hooks)


def reset_hooks(token: contextvars.Token[ResumePoint | None]) -> None:
    _implicit.reset(token)


__all__ = ["ResumePoint", "TrainingHooks", "active_hooks", "reset_hooks", "set_hooks", "training_hooks"]
