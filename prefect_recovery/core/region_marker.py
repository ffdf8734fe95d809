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
``prefect-recovery init``. A store none of whose regions holds checkpoints yet (empty, or only
marked) is new: its empty directories are marked on first use and used (``mkdir -p`` is enough to
start), by as many processes at once as like (``guard_empty_mounts``).
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


def _local_data(region: LocalRegionIO, state: RegionState) -> bool:
    """Whether a local region in ``state`` holds any of the layout's folders (a marked one may not yet)."""
    if state != "marked":
        return state == "data"
    try:
        return any((region.root / name).exists() for name in DATA_ROOTS)
    except OSError:
        return False  # no evidence


def _remote_listing(region: RegionIO) -> tuple[bool, bool]:
    """(marked, holds data) of a remote region, from one listing of its root; (False, False) when down."""
    try:
        names = set(region.list(""))
    except CheckpointError:
        return False, False  # down: no evidence either way
    return MARKER_KEY in names, bool(names & set(DATA_ROOTS))


def guard_empty_mounts(regions: Sequence[RegionIO]) -> list[RegionIO]:
    """``regions``, with each local one that looks like an empty mount point replaced by an
    ``UnmountedRegionIO`` (see the module docstring).

    A store none of whose regions holds data yet (they are empty or hold only a marker) is new, or
    is being created by another process at this very moment: its empty local regions are marked
    here (``init_region``: create-only, so a marker another process wrote first counts as done)
    before this process writes anything. Every process thus marks all of a new store's local
    regions before its first write, so a region found empty while another one holds *data* is an
    empty mount point, never a sibling that a concurrent first use has not reached yet: several
    processes may start using a new store at the same instant without ``prefect-recovery init``.
    Remote regions are listed only when some local region is empty and no local one holds data."""
    states: dict[int, RegionState] = {
        index: local_state(region) for index, region in enumerate(regions) if isinstance(region, LocalRegionIO)
    }
    empty = [index for index, state in states.items() if state == "empty"]
    if not empty:
        return list(regions)
    holders = [
        regions[index].name
        for index, state in states.items()
        if _local_data(regions[index], state)  # type: ignore[arg-type]
    ]
    if not holders:
        for index, region in enumerate(regions):
            if index not in states and _remote_listing(region)[1]:
                holders.append(region.name)
                break
    if not holders:  # a new store (or one another process is creating): its empty directories are its regions
        for index in empty:
            try:
                init_region(regions[index])
            except RegionError as exc:  # not writable: the save reports the region, as before
                logger.warning("region %s: cannot write its marker (%s)", regions[index].name, exc)
        return list(regions)
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
