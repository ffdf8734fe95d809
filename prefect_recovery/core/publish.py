"""Arbiter-first, create-only publication of a numbered object in several regions.

Manifests (numbered by version) and journal events (numbered by seq) are committed the same
way (FORMAT.md, "Write protocol", steps 4-7):

1. write the object for number ``n`` create-only to the first region, in configured order,
   that accepts it (the *arbiter*); if ``n`` already exists there another writer owns it, so
   take the next number and repeat;
2. write it create-only to the other regions in parallel; a failure, or different bytes under
   that number, makes a region lagging;
3. it counts once ``quorum`` regions hold it; otherwise the copies this call created are
   deleted again, so nothing claims a commit that did not happen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import QuorumNotMetError, RegionError, VersionConflictError
from .region_common import PutOutcome
from .region_object import RegionIO

MAX_ATTEMPTS = 32


@dataclass
class Published:
    number: int
    holders: list[str]
    lagging: dict[str, str] = field(default_factory=dict)


def publish(
    regions: Sequence[RegionIO],
    *,
    what: str,
    first: int,
    key_of: Callable[[int], str],
    encode: Callable[[int], bytes],
    next_free: Callable[[], int],
    quorum: int,
) -> Published:
    """Publish ``encode(n)`` under ``key_of(n)`` for the first ``n >= first`` this writer wins.

    ``what`` names the object in errors (e.g. ``"save of lineage 'x'"``); ``next_free()``
    re-lists the highest number taken, after losing a race. Raises QuorumNotMetError (naming
    each region's cause) or VersionConflictError.
    """
    order = [region.name for region in regions]
    causes: dict[str, str] = {}
    number = first
    for _attempt in range(MAX_ATTEMPTS):
        data = encode(number)
        key = key_of(number)
        arbiter: RegionIO | None = None
        lost = False
        for region in regions:
            if region.name in causes:
                continue
            try:
                outcome = region.put_if_absent(key, data)
            except RegionError as exc:
                causes[region.name] = str(exc)
                continue
            # EXISTED with our own bytes: an earlier attempt of this very write landed (a retried
            # PUT whose first answer was lost), so this writer owns the number.
            lost = outcome is PutOutcome.EXISTED and not _holds(region, key, data)
            arbiter = None if lost else region
            break
        if lost:
            number = max(number + 1, next_free())
            continue
        if arbiter is None:
            raise QuorumNotMetError(f"{what} not committed: no region accepted it", causes)
        return _replicate(regions, order, what, number, key, data, arbiter, causes, quorum)
    raise VersionConflictError(f"{what}: other writers took {MAX_ATTEMPTS} numbers in a row; retry")


def _holds(region: RegionIO, key: str, data: bytes) -> bool:
    try:
        return region.get(key, max_bytes=len(data)) == data
    except RegionError:
        return False


def _replicate(
    regions: Sequence[RegionIO],
    order: list[str],
    what: str,
    number: int,
    key: str,
    data: bytes,
    arbiter: RegionIO,
    causes: dict[str, str],
    quorum: int,
) -> Published:
    created = [arbiter]
    holders = [arbiter.name]
    others = [r for r in regions if r is not arbiter and r.name not in causes]

    def put(region: RegionIO) -> tuple[RegionIO, PutOutcome | None, str | None]:
        try:
            outcome = region.put_if_absent(key, data)
            if outcome is PutOutcome.EXISTED and region.get(key, max_bytes=len(data)) != data:
                return region, None, f"number {number} was taken there by another writer"
        except RegionError as exc:
            return region, None, str(exc)
        return region, outcome, None

    if others:
        with ThreadPoolExecutor(len(others), thread_name_prefix="publish") as pool:
            for region, outcome, cause in pool.map(put, others):
                if cause is not None:
                    causes[region.name] = cause
                    continue
                holders.append(region.name)
                if outcome is PutOutcome.CREATED:
                    created.append(region)
    if len(holders) < quorum:
        for region in created:  # withdraw: nothing may claim a commit that did not happen
            try:
                region.delete(key)
            except RegionError:
                pass  # a leftover below quorum is ignored by every reader
        raise QuorumNotMetError(
            f"{what} not committed: it reached {len(holders)} of {len(regions)} regions, write_quorum is {quorum}",
            causes,
        )
    holders.sort(key=order.index)
    return Published(number, holders, causes)
