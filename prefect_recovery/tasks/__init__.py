"""Prefect tasks: the ``@step`` task factory (step.py) and the pipeline run it works in
(pipeline_run.py), the recovery's preflight checks (preflight.py), and ready-made storage tasks
(storage.py: save, load, verify, audit) for flows that do not use ``@step``."""

from .storage import StoreUnhealthyError, audit_store, load_checkpoint, save_checkpoint, verify_store

__all__ = ["StoreUnhealthyError", "audit_store", "load_checkpoint", "save_checkpoint", "verify_store"]
