"""Scrub a store: every manifest parsed, every blob re-hashed in every region; optional repair.

Repair only ever copies from a copy that was just verified, and is idempotent: a second run
finds nothing to do. Only committed (consistent) versions are replicated; a manifest below
quorum is a save that never committed, reported as a note and left for garbage collection.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .digest import hash_bytes
from .errors import RegionError
from .layout import blob_key, manifest_key
from .models import Problem, VerifyReport
from .store import Store


def verify_store(store: Store, *, repair: bool = False, lineage: str | None = None) -> VerifyReport:
    problems: list[Problem] = []
    notes: list[str] = []
    reachable, down = store.reachable_regions()
    for region, cause in down.items():
        problems.append(Problem(region=region, object="/", kind="unreachable region", detail=cause))
    up = [region.name for region in reachable]

    blobs: dict[str, int] = {}
    # Regions each blob must be in: every reachable one, unless only single-region
    # (placement "primary") manifests name it, which need it where they are.
    blob_regions: dict[str, set[str]] = {}
    versions = 0
    lineages = [lineage] if lineage else store.lineages()
    for name in lineages:
        for version in store.versions(name):
            versions += 1
            key = manifest_key(name, version)
            copies = store.manifest_copies(name, version, up)
            manifest, holders = copies.best(store.region_names)
            committed = manifest is not None and len(holders) >= store.quorum_for(manifest)
            for region, cause in copies.invalid.items():
                if region in copies.raw:  # present but unusable
                    problems.append(Problem(region=region, object=key, kind="unreadable manifest", detail=cause))
            if not committed:
                held = ", ".join(holders) or "no region"
                notes.append(
                    f"{name} v{version}: uncommitted manifest in {held} (below write_quorum "
                    f"{store.write_quorum}); not a checkpoint, left for garbage collection"
                )
                continue
            expected = set(up) if manifest.placement == "all" else set(holders)
            for chunk_entry in manifest.entries:
                for chunk in chunk_entry.chunks:
                    blobs[chunk.digest] = chunk.size
                    blob_regions.setdefault(chunk.digest, set()).update(expected)
            good = copies.raw[holders[0]]
            for region in up:
                if region in holders or region not in expected:
                    continue
                bad = region in copies.raw
                problem = Problem(
                    region=region,
                    object=key,
                    kind="unreadable manifest" if bad else "missing",
                    detail=copies.invalid.get(region, "manifest missing (region lagged this save)"),
                )
                if not bad:
                    problems.append(problem)
                if repair:
                    target = store._region(region)
                    try:
                        if bad:
                            target.delete(key)
                        target.put_if_absent(key, good)
                        for entry in problems:
                            if entry.region == region and entry.object == key:
                                entry.repaired = True
                    except RegionError as exc:
                        problem.detail += f"; repair failed: {exc}"

    bytes_checked = [0]

    def scrub(digest: str) -> list[Problem]:
        size = blobs[digest]
        key = blob_key(digest)
        found: list[Problem] = []
        healthy: bytes | None = None
        for region in reachable:
            if region.name not in blob_regions[digest]:
                continue
            try:
                data = region.get(key)
            except RegionError as exc:
                kind = "missing" if "does not exist" in str(exc) else "corrupt"
                found.append(Problem(region=region.name, object=key, kind=kind, detail=str(exc)))
                continue
            bytes_checked[0] += len(data)
            if len(data) != size or hash_bytes(data, digest.split(":", 1)[0]) != digest:  # type: ignore[arg-type]
                found.append(
                    Problem(
                        region=region.name,
                        object=key,
                        kind="corrupt",
                        detail=f"{len(data)} bytes whose digest does not match the name",
                    )
                )
            elif healthy is None:
                healthy = data
        if repair and found:
            for problem in found:
                if healthy is None:
                    problem.detail += "; no intact copy in any region to repair from"
                    continue
                target = store._region(problem.region)
                try:
                    target.delete(key)
                    target.put_if_absent(key, healthy)
                    problem.repaired = True
                except RegionError as exc:
                    problem.detail += f"; repair failed: {exc}"
        return found

    with ThreadPoolExecutor(store.io_threads) as pool:
        for found in pool.map(scrub, sorted(blobs)):
            problems.extend(found)

    return VerifyReport(
        healthy=not any(not p.repaired for p in problems),
        regions=store.region_names,
        lineages=len(lineages),
        versions=versions,
        blobs=len(blobs),
        bytes_checked=bytes_checked[0],
        problems=problems,
        notes=notes,
    )
