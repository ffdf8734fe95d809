"""Errors of pipeline steps and recovery: raised by the tasks and flows layers, never by the core
(whose errors are in ``core/errors.py``); all are ``CheckpointError``s."""

from __future__ import annotations

from ..core.errors import CheckpointError


class RecoveryError(CheckpointError):
    """Base of the errors of pipeline steps and recovery (the flows layer)."""


class StepInputError(RecoveryError, ValueError):
    """A step got an input it cannot use; retrying would not help, so it fails at once."""


class StepResultError(RecoveryError, TypeError):
    """A step's inputs or result cannot be digested or stored without pickle."""


class LineageBusyError(RecoveryError):
    """Another live run or recovery holds the lineage; this one stops without changing anything."""


class PreflightError(RecoveryError):
    """Preflight checks failed in strict mode; the message lists each failure and how to fix it."""

    def __init__(self, message: str, results: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.results = results or []


class ReplayError(RecoveryError):
    """A replay check cannot run: bad versions, a light-tier or final checkpoint, or a pipeline
    that is not registered here or has no replay hook; the message says what to use instead."""
