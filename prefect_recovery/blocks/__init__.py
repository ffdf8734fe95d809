"""Prefect blocks of prefect-recovery."""

from .checkpoint_store import CheckpointStore, Region, open_store, recovery_home, shared_store, store_block_name

__all__ = ["CheckpointStore", "Region", "open_store", "recovery_home", "shared_store", "store_block_name"]
