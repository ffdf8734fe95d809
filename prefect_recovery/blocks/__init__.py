"""Prefect blocks of prefect-recovery."""

from .checkpoint_store import CheckpointStore, Region, recovery_home

__all__ = ["CheckpointStore", "Region", "recovery_home"]
