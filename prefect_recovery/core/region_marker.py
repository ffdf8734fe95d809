"""Region markers: a region is created on purpose, and an empty mount is not mistaken for a new region.

``prefect-recovery init --region URL`` (``init_region``) creates a local region's directory and
writes ``prefect-recovery-region.json`` at its root (FORMAT.md, "Region marker"). A save never
creates a local region's root: a missing directory is refused, so an unmounted disk is not
silently replaced by the root disk.

An unmounted disk's *mount point* still exists, though: an empty directory on the root disk.
``guard_empty_mounts`` tells it apart from a new region when a store is opened: a local region
whose root is empty (no marker, no ``blobs/`` or ``lineages/``) while another region of the same
store holds checkpoints or a marker is expected to hold data, so it is treated as down
(``UnmountedRegionIO``): nothing is written onto it, repair does not copy the store onto the root
disk, and every report says to mount the disk or, for a region that really is new, to run
``prefect-recovery init``. A store whose regions are all empty is new, and its empty directories
are used as they are (``mkdir -p`` is enough to start).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from .errors import CheckpointError, RegionError, RegionUnavailableError
from .region_common import PutOutcome
from .region_local import LocalRegionIO
from .region_object import RegionIO

logger = logging.getLogger("prefect_recovery.region")

MARKER_KEY = "prefect-recovery-region.json"
MARKER_FORMAT = "prefect-recovery-region"
DATA_ROOTS = ("blobs", "lineages")  # the layout's top-level folders (FORMAT.md, "Layout")

RegionState = Literal["missing", "marked", "data", "empty", "unknown"]


def marker_record() -> bytes:
    """A new marker's bytes: its format, a random region id and when it was written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("prefect-recovery")
    except PackageNotFoundError:  # running from a source tree
        __version__ = "unknown"
    record = {
        "format": MARKER_FORMAT,
        "format_version": 1,
        "region_id": uuid.uuid4().hex,
        "created_at": datetime.now(UTC).isoformat(),
        "created_by": f"prefect-recovery {__version__}",
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def init_region(region: RegionIO) -> bool:
    """Create ``region`` (its directory, for a local one) and its marker; True when the marker is new.

    Idempotent: an existing marker is never rewritten. A bucket is not created (that needs rights
    a checkpoint writer should not have): it must exist.
    """
    if isinstance(region, LocalRegionIO):
        try:
            region.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegionUnavailableError(
                region.name, f"cannot create directory {region.root} ({exc.strerror or type(exc).__name__})"
            ) from None
    return region.put_if_absent(MARKER_KEY, marker_record()) is PutOutcome.CREATED


def local_state(region: LocalRegionIO) -> RegionState:
    """What a local region's root holds (a few ``stat`` calls)."""
    root = region.root
    try:
        if not root.is_dir():
            return "missing"
        if (root / MARKER_KEY).is_file():
            return "marked"
        if any((root / name).exists() for name in DATA_ROOTS):
            return "data"
        return "empty"
    except OSError:
        return "unknown"


def _remote_state(region: RegionIO) -> RegionState:
    try:
        names = set(region.list(""))
    except CheckpointError:
        return "unknown"  # down: no evidence either way
    if MARKER_KEY in names:
        return "marked"
    return "data" if names & set(DATA_ROOTS) else "empty"


class UnmountedRegionIO(LocalRegionIO):
    """A local region that looks like an empty mount point: every operation says so, nothing is written."""

    def __init__(self, region: LocalRegionIO, holders: Sequence[str]):
        super().__init__(region.url, region._storage_options, region.name)
        self.root = region.root
        self.reason = (
            f"directory {self.root} is empty and has no region marker, while {', '.join(holders)} "
            "holds this store's checkpoints: if it is a mount point, mount the disk; if it is a new region, run "
            f"`prefect-recovery init --region {self.root}`"
        )

    def _refuse(self, *_args: object, **_kwargs: object) -> None:
        raise RegionUnavailableError(self.name, self.reason)

    put_if_absent = get = read_into = size = exists = list = walk = list_info = delete = probe = _refuse  # type: ignore[assignment]

    def temp_files(self) -> list[str]:
        self._refuse()
        return []


def guard_empty_mounts(regions: Sequence[RegionIO]) -> list[RegionIO]:
    """``regions``, with each local one that looks like an empty mount point replaced by an
    ``UnmountedRegionIO`` (see the module docstring). Remote regions are listed only when a local
    region is empty and no local one shows the store is in use."""
    states: dict[int, RegionState] = {
        index: local_state(region) for index, region in enumerate(regions) if isinstance(region, LocalRegionIO)
    }
    empty = [index for index, state in states.items() if state == "empty"]
    if not empty:
        return list(regions)
    holders = [regions[index].name for index, state in states.items() if state in ("marked", "data")]
    if not holders:
        for index, region in enumerate(regions):
            if index in states:
                continue
            try:
                state = _remote_state(region)
            except RegionError:
                state = "unknown"
            if state in ("marked", "data"):
                holders.append(region.name)
                break
    if not holders:
        return list(regions)  # a new store: its empty directories are its new regions
    guarded = list(regions)
    for index in empty:
        region = regions[index]
        assert isinstance(region, LocalRegionIO)
        guarded[index] = UnmountedRegionIO(region, holders)
        logger.warning("region %s: %s", region.name, guarded[index].reason)  # type: ignore[union-attr]
    return guarded


__all__ = [
    "MARKER_KEY",
    "UnmountedRegionIO",
    "guard_empty_mounts",
    "init_region",
    "local_state",
    "marker_record",
]
