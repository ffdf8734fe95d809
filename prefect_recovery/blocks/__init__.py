"""Prefect blocks of prefect-recovery."""

from .checkpoint_store import CheckpointStore, Region, open_store, recovery_home

__all__ = ["CheckpointStore", "Region", "open_store", "recovery_home"]
