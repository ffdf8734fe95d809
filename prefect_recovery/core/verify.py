"""Scrub a store (FORMAT.md, "Verify and repair"): every manifest parsed and its signature
checked in every region, every blob's presence checked, a ``read_data`` fraction of the blobs
read and re-hashed (like ``restic check --read-data-subset``); optional repair; optionally
(``decode``) every compressed or delta chunk decoded and checked against its decoded digest.

Repair only ever copies from a copy that was just verified (a manifest that parsed and whose
signature checked, a blob whose bytes hashed to its name), and is idempotent: a second run
finds nothing to do. Only committed (consistent) versions are replicated; a manifest below
quorum is a save that never committed, reported as a note and left for garbage collection,
unless the lineage's journal records its commit (``checkpoint_committed``, verified on a signing
store): then it is a checkpoint that lost manifest copies after its commit (e.g. one copy lost
with ``write_quorum`` equal to the number of regions), and repair re-replicates it.
"""

from __future__ import annotations

import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from .digest import hash_bytes
from .errors import (
    BlobUnavailableError,
    InvalidArgumentError,
    JournalError,
    ManifestError,
    ObjectNotFoundError,
    RegionError,
)
from .journal import Journal
from .layout import blob_key, journal_key, journal_prefix, manifest_key, manifests_prefix
from .manifest import ChunkRef, Manifest, canonical_json
from .models import CheckpointAudit, Problem, VerifyReport
from .progress import advance
from .region_codecs import (
    collect_parents,
    expected_blob_regions,
    parent_sources,
    rebuild_blob,
    rebuild_sources,
)
from .region_object import RegionIO
from .store import Store
from .store_listing import STALLED


def _signature_status(store: Store, manifest: Manifest) -> str:
    if store.keyring is not None:
        return f"verified (key {manifest.signature.key_id})" if manifest.signature else "unsigned (accepted)"
    return "signed, not checked (no key configured)" if manifest.signature else "unsigned"


def _signing_status(store: Store) -> str:
    keyring = store.keyring
    if keyring is None:
        return "off: manifests are not signed and signatures are not checked"
    signer = f"signs with {keyring.signing_key.key_id!r}" if keyring.signing_key else "does not sign"
    unsigned = "accepts unsigned manifests" if keyring.accept_unsigned else "rejects unsigned manifests"
    return f"on: {signer}, verifies keys {sorted(keyring.keys)}, {unsigned}"


def _journaled_commits(store: Store, lineage: str) -> tuple[dict[int, str | None], str | None]:
    """Versions the lineage's journal records as committed -> the manifest_digest the event names
    (None for events written before it was recorded), and why the journal could not be read, if so.
    ``Journal.events`` returns only verified events on a signing store: a forged record of a commit
    never makes a crashed save's manifest a checkpoint."""
    try:
        events = Journal(store, lineage).events()
    except (JournalError, RegionError) as exc:
        return {}, str(exc)
    found: dict[int, str | None] = {}
    for event in events:
        version, digest = event.data.get("version"), event.data.get("manifest_digest")
        if event.kind == "checkpoint_committed" and isinstance(version, int) and not isinstance(version, bool):
            found[version] = digest if isinstance(digest, str) else None
    return found, None


def _journal_problems(store: Store, lineage: str) -> list[Problem]:
    """The journal of ``lineage`` read as history, recover and retention read it (``Journal.read``):
    a committed event with no intact copy in any region (a hole) stops them, so it is a problem."""
    try:
        found = Journal(store, lineage).read()
    except (JournalError, RegionError) as exc:
        return [
            Problem(region="*", object=journal_prefix(lineage), kind="journal hole", detail=str(exc), lineage=lineage)
        ]
    return [
        Problem(
            region=region,
            object=journal_key(lineage, seq),
            kind="journal hole",
            detail=f"event {seq} has no intact copy in any region ({cause}): history, recover and retention of the "
            "lineage stop here. Put back an intact copy (a backup's), or move the file out of "
            f"lineages/{lineage}/journal/ if it is not an event of this lineage",
            lineage=lineage,
        )
        for seq, causes in found.lost.items()
        for region, cause in causes.items()
    ]


def _replace(region: RegionIO, key: str, good: bytes) -> None:
    """Make ``region`` hold ``good`` under ``key``: delete what is there (a damaged copy, or a
    link in its place; never a directory), write create-only, and read it back. Raises
    RegionError unless the copy now reads back intact: a repair counts only then."""
    region.delete(key)
    region.put_if_absent(key, good)
    try:
        back = region.get(key, max_bytes=len(good))
    except RegionError as exc:
        raise RegionError(region.name, f"the repaired copy of {key} does not read back ({exc})") from None
    if back != good:
        raise RegionError(region.name, f"the repaired copy of {key} does not read back intact")


def verify_store(
    store: Store,
    *,
    repair: bool = False,
    lineage: str | None = None,
    read_data: float = 1.0,
    seed: int | None = None,
    decode: bool = False,
) -> VerifyReport:
    """Scrub ``store`` (one ``lineage`` or all) and return what was found and repaired.

    Args:
        repair: Re-copy missing, corrupt or forged copies from a verified healthy copy.
        lineage: Only this lineage (default: all).
        read_data: Fraction of the blobs read and re-hashed in every region that should hold
            them; the others are only checked for presence and size. 1.0 reads everything.
        seed: Seed of the sample (default: a new one per run, so successive audits cover
            different blobs).
        decode: Also decode every chunk stored with a codec or as a delta (its delta parents
            too) and check the result against its ``decoded_digest``, after any repair: finds a
            blob that hashes right but decodes wrong (a writer bug, a forged manifest), which
            the hash check cannot see and a load would only find when it fails. Such a chunk is
            reported ``corrupt`` in region ``*`` (every region holds those same bytes, so there
            is nothing to repair from). Costs a decode of every such chunk.
    """
    if not 0.0 <= read_data <= 1.0:
        raise InvalidArgumentError(f"read_data is a fraction between 0 and 1, got {read_data}")
    problems: list[Problem] = []
    notes: list[str] = []
    reachable, down = store.reachable_regions()
    for region, cause in down.items():
        problems.append(Problem(region=region, object="/", kind="unreachable region", detail=cause))
    up = [region.name for region in reachable]

    # Blobs to check, each as (digest, size) named: a manifest that names a blob with another
    # size than the others (a forged or buggy one) gets its own check and its own problems,
    # instead of making an honest version's intact blob look corrupt (or hiding its lie).
    blobs: dict[tuple[str, int], int] = {}
    pages: set[tuple[str, int]] = set()  # entry pages (FORMAT.md, "Entry pages"): always read and hashed
    # Regions each blob must be in: every reachable one, unless only single-region
    # (placement "primary") manifests name it, which need it where they are.
    blob_regions: dict[tuple[str, int], set[str]] = {}
    # The versions naming each blob, with the regions each expects it in: a chunk with several
    # forms expects a form only where a region's codec selects it, so a blob one version expects
    # in a region (a forged manifest, say) is never the fault of another that does not.
    blob_rows: dict[tuple[str, int], list[tuple[CheckpointAudit, set[str]]]] = {}
    # Chunks that only decoding checks (codec or delta), by their reference: what decode reads.
    coded: dict[bytes, tuple[ChunkRef, list[CheckpointAudit]]] = {}
    # Blob of a stored form of a chunk with several forms -> (chunk, form, dtype), to rebuild it.
    rebuild: dict[tuple[str, int], tuple[ChunkRef, ChunkRef, str | None]] = {}
    parents: dict[str, dict[str, ChunkRef]] = {}  # delta parents of those forms, by content (to rebuild them)
    codec_of = {name: store.codec_of(name) for name in store.region_names}
    rows: list[CheckpointAudit] = []
    versions = 0
    lineages = [lineage] if lineage else store.lineages()
    if not lineage:
        for stray in store.stray_entries():
            notes.append(f"{stray} is not a lineage name: not the store's, skipped (remove it if it is not yours)")
    for name in lineages:
        journaled: tuple[dict[int, str | None], str | None] | None = None  # read once, when needed
        listed, unlisted = store.version_listing(name)
        for region, cause in unlisted.items():
            if region in up and cause != STALLED:  # answers, but its manifests of this lineage cannot be listed
                problems.append(
                    Problem(
                        region=region,
                        object=manifests_prefix(name),
                        kind="unreadable listing",
                        detail=f"{cause}; the lineage's checkpoints in this region cannot be seen until it is fixed",
                        lineage=name,
                    )
                )
        if up:
            problems += _journal_problems(store, name)
        for version in listed:
            versions += 1
            key = manifest_key(name, version)
            copies = store.manifest_copies(name, version, up)
            manifest, holders = copies.best(store.region_names)
            forged = copies.unsigned_or_forged
            for region, cause in copies.invalid.items():
                if (region in copies.raw or region in copies.foreign) and region not in forged:  # present, unusable
                    problems.append(
                        Problem(
                            region=region,
                            object=key,
                            kind="unreadable manifest",
                            detail=cause,
                            lineage=name,
                            version=version,
                        )
                    )
            for region, error in forged.items():
                problems.append(
                    Problem(
                        region=region,
                        object=key,
                        kind="bad signature",
                        detail=str(error),
                        lineage=name,
                        version=version,
                    )
                )
            if manifest is None and forged:
                for problem in problems:
                    if problem.object == key and problem.kind == "bad signature":
                        problem.detail += "; no copy in any region verifies, so nothing to repair from"
                continue
            committed = store.is_committed(copies, manifest, holders, len(down))
            held = ", ".join(holders) or "no region"
            if not committed and manifest is not None and manifest.placement == "all":
                if journaled is None:
                    journaled = _journaled_commits(store, name)
                recorded, unreadable = journaled
                if version in recorded and recorded[version] in (None, manifest.manifest_digest):
                    committed = True
                    notes.append(
                        f"{name} v{version}: held by {held} only, below write_quorum {store.write_quorum}, but the "
                        "lineage's journal records its commit: a checkpoint that lost manifest copies, "
                        + ("re-replicated from a verified copy" if repair else "`verify --repair` re-replicates it")
                    )
                elif unreadable is not None:
                    notes.append(
                        f"{name} v{version}: below write_quorum and the lineage's journal cannot be read to tell a "
                        f"lost copy from a crashed save ({unreadable}); left as it is"
                    )
            if not committed:
                notes.append(
                    f"{name} v{version}: uncommitted manifest in {held} (below write_quorum "
                    f"{store.write_quorum}); not a checkpoint, left for garbage collection"
                )
                continue
            assert manifest is not None
            expected = set(store.region_names) if manifest.placement == "all" else set(holders)
            row = CheckpointAudit(
                lineage=name,
                version=version,
                step=manifest.step,
                created_at=manifest.created_at,
                trigger=str(manifest.metadata.get("trigger")) if "trigger" in manifest.metadata else None,
                tier=str(manifest.metadata.get("tier")) if "tier" in manifest.metadata else None,
                bytes=manifest.total_bytes,
                signature=_signature_status(store, manifest),
                regions={},
                copies=0,
                under_replicated=False,
            )
            rows.append(row)
            # A paged manifest's entry pages are blobs like the others (checked, always read in
            # full, repaired from a verified copy); the blobs they name are read through them.
            named = [(page.digest, page.size) for page in manifest.pages or ()]
            pages.update(named)
            try:
                entries = store.manifest_entries(manifest, prefer=holders)
            except ManifestError as exc:
                entries = []
                problems.append(
                    Problem(
                        region=holders[0],
                        object=key,
                        kind="unreadable manifest",
                        detail=f"its entries cannot be read, so the blobs they name were not checked: {exc}",
                        lineage=name,
                        version=version,
                    )
                )
            # Blobs as stored, delta parents too; of a chunk with several stored forms (regions
            # with different codecs), each region is expected to hold the form its codec selects.
            where = {pair: expected & set(up) for pair in named}
            where |= expected_blob_regions(entries, expected & set(up), codec_of)
            rebuild.update(rebuild_sources(entries))
            collect_parents(entries, parents)
            for pair, regions in where.items():
                blobs[pair] = pair[1]
                blob_regions.setdefault(pair, set()).update(regions)
                if not blob_rows.get(pair) or blob_rows[pair][-1][0] is not row:
                    blob_rows.setdefault(pair, []).append((row, set()))
                blob_rows[pair][-1][1].update(regions)
            if decode:
                for entry in entries:
                    for chunk in entry.chunks:
                        for form in chunk.stored_forms():
                            if form.stored_raw:  # a raw form's blob digest is its content's: hashed above
                                continue
                            rows_of = coded.setdefault(canonical_json(form.model_dump(mode="json")), (form, []))[1]
                            if not rows_of or rows_of[-1] is not row:
                                rows_of.append(row)
            good = copies.raw[holders[0]]
            for region in store.region_names:
                if region in down:
                    row.regions[region] = "unreachable"
                    continue
                if region in holders:
                    row.regions[region] = "ok"
                    continue
                if region not in expected:
                    row.regions[region] = "-"
                    continue
                bad = region in copies.raw or region in copies.foreign
                status = "bad signature" if region in forged else "corrupt" if bad else "missing"
                row.regions[region] = status
                if not bad:
                    detail = copies.invalid.get(region, "manifest missing (region lagged this save)")
                    problems.append(
                        Problem(region=region, object=key, kind="missing", detail=detail, lineage=name, version=version)
                    )
                if repair:
                    try:
                        _replace(store._region(region), key, good)
                    except RegionError as exc:
                        for problem in problems:
                            if problem.region == region and problem.object == key:
                                problem.detail += f"; repair failed: {exc}"
                        continue
                    row.regions[region] = "repaired"
                    for problem in problems:
                        if problem.region == region and problem.object == key:
                            problem.repaired = True

    # Every chunk with several forms by its content: a lost delta parent is read through its other forms.
    by_content = {chunk.content_digest: chunk for chunk, _form, _dtype in rebuild.values()}
    # A lost delta parent no kept form names as its own: rebuilt from a kept chunk of its content,
    # or from another region's chain holding that content (retention may have removed the rest).
    for pair, source in parent_sources(parents, by_content).items():
        rebuild.setdefault(pair, source)
    ordered = sorted(blobs)
    sample_size = math.ceil(read_data * len(ordered))
    to_read = set(random.Random(seed).sample(ordered, sample_size)) | pages
    bytes_checked = [0]
    lock = threading.Lock()

    def read_verified(region: RegionIO, pair: tuple[str, int]) -> bytes | None:
        """The blob's bytes from ``region`` if they hash to its name (and have the size named)."""
        digest, size = pair
        data = region.get(blob_key(digest), max_bytes=size)
        with lock:
            bytes_checked[0] += len(data)
        if len(data) == size and hash_bytes(data, digest.split(":", 1)[0]) == digest:  # type: ignore[arg-type]
            return data
        return None

    def scrub(pair: tuple[str, int]) -> list[Problem]:
        digest, size = pair
        key = blob_key(digest)
        found: list[Problem] = []
        healthy: bytes | None = None
        intact: list[RegionIO] = []
        for region in reachable:
            if region.name not in blob_regions[pair]:
                continue
            try:
                if pair in to_read:
                    data = read_verified(region, pair)
                    if data is None:
                        found.append(
                            Problem(
                                region=region.name,
                                object=key,
                                kind="corrupt",
                                detail="its bytes do not hash to its name",
                            )
                        )
                        continue
                    healthy = healthy or data
                else:
                    present = region.size(key)
                    if present is None:
                        raise ObjectNotFoundError(region.name, f"{key} does not exist")
                    if present != size:
                        found.append(
                            Problem(
                                region=region.name,
                                object=key,
                                kind="corrupt",
                                detail=f"{present} bytes, its manifest says {size}",
                            )
                        )
                        continue
            except RegionError as exc:
                kind = "missing" if isinstance(exc, ObjectNotFoundError) else "corrupt"
                found.append(Problem(region=region.name, object=key, kind=kind, detail=str(exc)))
                continue
            intact.append(region)
        if repair and found:
            # Never repair from an unverified copy: a size-checked one is read and hashed first.
            for source in intact:
                if healthy is not None:
                    break
                try:
                    healthy = read_verified(source, pair)
                except RegionError:
                    continue
            rebuilt = ""
            if healthy is None and pair in rebuild:
                # No region holds this form of the chunk: rebuild it from another form's verified
                # content (FORMAT.md, "Region codecs"), kept only if it hashes to its name.
                chunk, form, _dtype = rebuild[pair]
                try:
                    healthy = rebuild_blob(chunk, form, store.read_chunk_into, by_content)
                except BlobUnavailableError as exc:
                    rebuilt = f"; no other stored form to rebuild it from ({exc})"
                else:
                    rebuilt = (
                        "; rebuilt from another stored form of its chunk"
                        if healthy is not None
                        else "; re-encoding its chunk gives other bytes (another zstandard version?): "
                        "the other stored forms still serve it"
                    )
            for problem in found:
                if healthy is None:
                    problem.detail += rebuilt or "; no intact copy in any region to repair from"
                    continue
                problem.detail += rebuilt
                try:
                    _replace(store._region(problem.region), key, healthy)
                    problem.repaired = True
                except RegionError as exc:
                    problem.detail += f"; repair failed: {exc}"
        return found

    with ThreadPoolExecutor(store.io_threads) as pool:
        for done, (pair, found) in enumerate(zip(ordered, pool.map(scrub, ordered), strict=True), 1):
            advance("verify", done, len(ordered))  # the CLI's progress bar, on a terminal
            problems.extend(found)
            for problem in found:
                named_by = [row for row, regions in blob_rows[pair] if problem.region in regions]
                named_by = named_by or [row for row, _ in blob_rows[pair]]
                problem.lineage, problem.version = named_by[0].lineage, named_by[0].version
                for row in named_by:
                    current = row.regions.get(problem.region)
                    if problem.repaired:
                        if current == "ok":
                            row.regions[problem.region] = "repaired"
                    elif current in ("ok", "repaired"):
                        row.regions[problem.region] = problem.kind

    if coded:
        problems.extend(_decode_problems(store, list(coded.values()), {p.object for p in problems if not p.repaired}))

    for row in rows:
        row.copies = sum(status in ("ok", "repaired") for status in row.regions.values())
        should = sum(status != "-" for status in row.regions.values())
        row.under_replicated = row.copies < should

    return VerifyReport(
        healthy=not any(not p.repaired for p in problems),
        regions=store.region_names,
        lineages=len(lineages),
        versions=versions,
        blobs=len({digest for digest, _ in blobs}),
        blobs_read=len({digest for digest, _ in to_read & set(blobs)}),
        bytes_checked=bytes_checked[0],
        signing=_signing_status(store),
        problems=problems,
        checkpoints=rows,
        notes=notes,
    )


# The region a chunk that does not decode is reported in: every region holds the same (intact) bytes.
EVERY_REGION = "*"


def _decode_problems(
    store: Store, chunks: list[tuple[ChunkRef, list[CheckpointAudit]]], damaged: set[str]
) -> list[Problem]:
    """Decode each chunk (with its delta parents) the way a load does, and report those whose
    intact blobs do not give back their ``decoded_digest``. A chunk that cannot be read because a
    blob has no intact copy is the blob check's to report; it is reported here only when that
    check did not (``damaged``: the keys it reported and could not repair; a sampled scrub
    reads only some blobs)."""

    def check(item: tuple[ChunkRef, list[CheckpointAudit]]) -> BlobUnavailableError | None:
        chunk = item[0]
        try:
            store.read_chunk_into(chunk, memoryview(bytearray(chunk.size)))
        except BlobUnavailableError as exc:
            return exc
        return None

    found: dict[str, Problem] = {}
    # Decoded on the store's read threads ("ckpt-" names keep their scratch buffers, as a load's do).
    with ThreadPoolExecutor(store.io_threads, thread_name_prefix="ckpt-verify") as pool:
        for done, ((_, rows), error) in enumerate(zip(chunks, pool.map(check, chunks), strict=True), 1):
            advance("decode", done, len(chunks))
            if error is None:
                continue
            key = blob_key(error.digest)
            regional = [where for where in error.causes if where in store.region_names]
            if key in found or (regional and key in damaged):
                continue
            causes = "; ".join(f"{where}: {cause}" for where, cause in error.causes.items())
            found[key] = Problem(
                region=", ".join(regional) if regional else EVERY_REGION,
                object=key,
                kind="corrupt",
                detail=f"{causes}; "
                + (
                    "no intact copy to decode"
                    if regional
                    else "every region holds these same bytes, so nothing can repair them: load an earlier version"
                ),
                lineage=rows[0].lineage,
                version=rows[0].version,
            )
            for row in rows if not regional else ():  # no copy of these versions loads
                row.regions = {
                    name: "corrupt" if status in ("ok", "repaired") else status for name, status in row.regions.items()
                }
    return list(found.values())
