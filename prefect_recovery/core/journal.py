"""The lineage journal: an append-only log of what happened to a lineage (FORMAT.md, "Journal").

DESIGN.md invariant 8: the store is the source of truth. Every run, step, checkpoint, failure
and recovery of a lineage is recorded here as an immutable, create-only event file
(``lineages/<lineage>/journal/<seq>.json``), replicated over the store's regions. The journal
replaces nothing in Prefect's database and reads nothing from it: Prefect orchestrates and
displays, while recovery decides from the journal alone, so it works even when Prefect never
saw the crash (a SIGKILL, a lost node, a server restart).

Appending mirrors the manifest commit protocol (``Store._commit_manifest``): the event takes
``seq`` = one more than the highest seq any region lists, is written create-only to the
*arbiter* (the first region, in configured order, that accepts the write; if the seq already
exists there another writer owns it and the append retries with the next seq), then to the
other regions in parallel. It counts when ``write_quorum`` regions hold it; below that, the
copies it created are deleted again and ``QuorumNotMetError`` is raised. Seqs are monotonic,
not dense: a withdrawn or lost append leaves a gap.

On a signing store (``Store.keyring``) every event is signed like a manifest, with the same keys,
and a copy whose signature does not verify is a damaged copy: recovery, history and retention
act only on verified events, so someone who can write the journal's files but holds no key
cannot steer them (FORMAT.md, "Journal"). What one event is, and how its bytes are checked,
lives in core/journal_format.py; this module is the I/O: listing, appending, reading with the
quorum rule.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from pydantic import BaseModel, Field, JsonValue, ValidationError

from .errors import ForeignObjectError, JournalError, JournalSignatureError, ObjectNotFoundError, RegionError
from .journal_format import (
    _STEP_KINDS,
    EVENT_KINDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_EVENT_BYTES,
    MAX_RUN_ID_CHARS,
    EventKind,
    JournalEvent,
    JournalEventBody,
    decode_event,
)
from .layout import check_lineage, journal_key, journal_prefix, seq_from_journal_name
from .lineage_history import LineageHistory, fold_journal
from .publish import publish
from .store import Store

# Stray files under event names skipped from the top when numbering an append (as for manifests).
MAX_STRAY_SEQS = 32

__all__ = [
    "EVENT_KINDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_EVENT_BYTES",
    "MAX_RUN_ID_CHARS",
    "EventKind",
    "Journal",
    "JournalError",
    "JournalEvent",
    "JournalEventBody",
    "JournalRead",
    "decode_event",
]


class JournalRead(BaseModel):
    """What one read of a journal found: the committed events and what it had to leave out."""

    events: list[JournalEvent] = Field(description="Committed events, by seq.")
    unreachable: dict[str, str] = Field(
        default_factory=dict, description="Regions that could not be listed, with the reason."
    )
    skipped_copies: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="seq -> region -> why that copy was not used (corrupt, unreadable, other)."
    )
    uncommitted: list[int] = Field(
        default_factory=list, description="Seqs held by fewer than write_quorum regions: appends that never counted."
    )
    lost: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="Committed seqs with no intact copy anywhere: region -> cause."
    )
    stray: dict[int, dict[str, str]] = Field(
        default_factory=dict,
        description="seq -> region -> what it is: names listed where no append wrote an event (an empty file, a "
        "directory or an object store's prefix, a symbolic link or other non-regular file, a copy withdrawn since "
        "the listing). Never events, never holes; also in skipped_copies when the seq has an event.",
    )
    bad_signatures: dict[int, dict[str, str]] = Field(
        default_factory=dict,
        description="seq -> region -> why: copies whose signature is missing, unknown or wrong (signing stores); "
        "also in skipped_copies, lost or uncommitted. Never acted upon.",
    )


class Journal:
    """The append-only event log of one lineage, replicated over a store's regions.

    This is the source of truth for what happened to the lineage (DESIGN.md invariant 8); it
    replaces nothing in Prefect's database and never consults it.
    """

    def __init__(self, store: Store, lineage: str):
        self.store = store
        self.lineage = check_lineage(lineage)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.lineage!r}, regions={self.store.region_names})"

    # -- listing ------------------------------------------------------------------------------
    def _listing(self) -> tuple[dict[int, list[str]], dict[str, str]]:
        found: dict[int, list[str]] = {}
        unreachable: dict[str, str] = {}
        prefix = journal_prefix(self.lineage)
        for region in self.store.regions:
            try:
                names = region.list(prefix)
            except RegionError as exc:
                unreachable[region.name] = str(exc)
                continue
            for name in names:
                seq = seq_from_journal_name(name)
                if seq is not None:
                    found.setdefault(seq, []).append(region.name)
        return dict(sorted(found.items())), unreachable

    def seqs(self) -> dict[int, list[str]]:
        """Every seq any reachable region lists (committed or not), with the regions listing it."""
        return self._listing()[0]

    def _stray_copy(self, seq: int, name: str) -> str | None:
        """Why the copy of ``seq`` in region ``name`` cannot be an event any append wrote (an empty file,
        a directory, a link: appends write whole non-empty files, create-only), or None."""
        region = next(region for region in self.store.regions if region.name == name)
        try:
            head = region.get(journal_key(self.lineage, seq), max_bytes=0)  # one byte at most
        except (ForeignObjectError, ObjectNotFoundError) as exc:
            return f"not a journal event ({exc})"
        except RegionError:
            return None  # cannot tell now: counts as taken
        return None if head else "not a journal event (an empty file)"

    def next_seq(self) -> int:
        """One more than the highest seq any reachable region lists, not counting stray files at the top
        (at most ``MAX_STRAY_SEQS`` of them): a stray empty ``999999999999.json`` must not exhaust the seqs."""
        listed = self._listing()[0]
        top = sorted(listed, reverse=True)
        for index, seq in enumerate(top):
            if index == MAX_STRAY_SEQS or not all(self._stray_copy(seq, name) for name in listed[seq]):
                return seq + 1
        return 1

    # -- writing ------------------------------------------------------------------------------
    def append(self, kind: EventKind, *, run_id: str, data: dict[str, JsonValue] | None = None) -> JournalEvent:
        """Append one event and return it once ``write_quorum`` regions hold it.

        ``step_started`` and ``step_completed`` need ``data["step"]`` (the step's name); a
        ``failure`` names its step the same way when it has one. Raises JournalError for an
        invalid event (nothing written), QuorumNotMetError when too few regions took it (the
        copies it created are withdrawn), VersionConflictError when other writers took
        ``core.publish.MAX_ATTEMPTS`` seqs in a row.
        """
        if kind not in EVENT_KINDS:
            raise JournalError(f"unknown journal event kind {kind!r}; use one of {list(EVENT_KINDS)}")
        payload = dict(data or {})
        if kind in _STEP_KINDS and not (isinstance(payload.get("step"), str) and payload["step"]):
            raise JournalError(f"a {kind} event needs data['step'], the step's name")
        time = datetime.now(UTC).isoformat(timespec="microseconds")
        algorithm = self.store.hash_algorithm

        def build(seq: int) -> tuple[JournalEvent, bytes]:
            try:
                body = JournalEventBody(
                    lineage=self.lineage, seq=seq, kind=kind, run_id=run_id, time=time, data=payload
                )
                event = JournalEvent.build(body, algorithm, keyring)
                encoded = event.encode()
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise JournalError(f"invalid {kind} event at {where}: {first['msg']}") from None
            except (ValueError, RecursionError) as exc:  # NaN/Infinity, or nested too deeply
                raise JournalError(f"{kind} event data is not plain JSON: {exc}") from None
            if len(encoded) > MAX_EVENT_BYTES:
                raise JournalError(
                    f"{kind} event is {len(encoded)} bytes, larger than the {MAX_EVENT_BYTES} limit; "
                    "store large data as a checkpoint and journal its version"
                )
            return event, encoded

        keyring = self.store.keyring
        if keyring is not None and keyring.signing_key is None and not keyring.accept_unsigned:
            raise JournalError(
                f"{kind} event of lineage {self.lineage!r} refused: this store checks signatures but has no signing "
                "key, so every reader would reject the event; set the store's signing key (or accept_unsigned)"
            )
        build(1)  # reject a bad event before listing or writing anything
        built: dict[int, JournalEvent] = {}

        def encode(seq: int) -> bytes:
            built[seq], encoded = build(seq)
            return encoded

        published = publish(
            self.store.regions,
            what=f"{kind} event of lineage {self.lineage!r}",
            first=self.next_seq(),
            key_of=lambda seq: journal_key(self.lineage, seq),
            encode=encode,
            next_free=self.next_seq,
            quorum=self.store.write_quorum,
        )
        return built[published.number]

    # -- reading ------------------------------------------------------------------------------
    def read(self, *, after: int = 0) -> JournalRead:
        """Read every committed event with ``seq > after`` and report what was left out.

        For each seq listed by any region, every listed copy is read and checked
        (``decode_event``). The copy held by most regions wins (ties: the earliest region);
        corrupt or unreadable copies are skipped when another region has a valid one. A seq
        counts as committed when its holders (regions with the winning copy, plus regions whose
        copy is damaged, since a create-only file exists only because an append wrote it) reach
        ``write_quorum`` minus the regions that could not be listed (at least 1): an unreachable
        region may hold the missing copies, and hiding committed events during a region outage
        would make recovery act on a truncated history. Held by fewer: an append that never
        counted (withdrawn, or still in flight), skipped.
        """
        region_names = self.store.region_names
        listed, unreachable = self._listing()
        if len(unreachable) == len(region_names):
            raise JournalError(
                f"cannot read the journal of lineage {self.lineage!r}: no region is reachable ("
                + "; ".join(f"{name}: {cause}" for name, cause in unreachable.items())
                + ")"
            )
        required = max(1, self.store.write_quorum - len(unreachable))
        jobs = [(seq, name) for seq, names in listed.items() if seq > after for name in names]
        regions = {region.name: region for region in self.store.regions}

        keyring = self.store.keyring

        def fetch(job: tuple[int, str]) -> tuple[int, str, JournalEvent | Exception | str]:
            seq, name = job
            key = journal_key(self.lineage, seq)
            try:
                data = regions[name].get(key, max_bytes=MAX_EVENT_BYTES)
                if not data:  # appends write whole non-empty files: a stray, not a damaged event
                    return seq, name, f"not a journal event (an empty file at {key})"
                return seq, name, decode_event(data, self.lineage, seq, region=name, key=key, keyring=keyring)
            except (ForeignObjectError, ObjectNotFoundError) as exc:
                # A directory or link in an event's place (never ours), an object store's "directory" (a
                # prefix listed like a name), or a copy withdrawn since the listing: no event to count.
                return seq, name, f"not a journal event ({exc})"
            except (RegionError, JournalError) as exc:
                return seq, name, exc

        valid: dict[int, dict[str, JournalEvent]] = {}
        damaged: dict[int, dict[str, str]] = {}
        forged: dict[int, dict[str, str]] = {}
        strays: dict[int, dict[str, str]] = {}
        if jobs:
            workers = max(1, min(len(jobs), self.store.io_threads * len(region_names)))
            with ThreadPoolExecutor(workers, thread_name_prefix="journal-get") as pool:
                for seq, name, result in pool.map(fetch, jobs):
                    if isinstance(result, JournalEvent):
                        valid.setdefault(seq, {})[name] = result
                    elif isinstance(result, str):
                        strays.setdefault(seq, {})[name] = result
                    else:
                        damaged.setdefault(seq, {})[name] = str(result)
                        if isinstance(result, JournalSignatureError):
                            forged.setdefault(seq, {})[name] = str(result)

        found = JournalRead(events=[], unreachable=unreachable, bad_signatures=forged, stray=strays)
        for seq in sorted({seq for seq, _ in jobs}):
            copies = valid.get(seq, {})
            bad = damaged.get(seq, {})
            groups: dict[str, list[str]] = {}
            for name in region_names:
                if name in copies:
                    groups.setdefault(copies[name].event_digest, []).append(name)
            if not groups:
                if len(bad) >= required:
                    found.lost[seq] = bad
                elif bad:
                    found.uncommitted.append(seq)
                continue  # only stray files under this seq: no event, no hole (found.stray)
            holders = max(groups.values(), key=len)  # max keeps the first of equal lengths
            skipped = {**strays.get(seq, {}), **bad}
            for name, event in copies.items():
                if name not in holders:
                    skipped[name] = f"a different event (digest {event.event_digest}) under the same seq"
            if len(holders) + len(bad) < required:
                found.uncommitted.append(seq)
                continue
            if skipped:
                found.skipped_copies[seq] = skipped
            found.events.append(copies[holders[0]])
        return found

    def events(self, *, after: int = 0) -> list[JournalEvent]:
        """The committed events with ``seq > after``, in seq order.

        Raises JournalError when a committed event has no intact copy in any region (a history
        with a hole must not be replayed) or when no region is reachable.
        """
        found = self.read(after=after)
        if found.lost:
            seq, causes = next(iter(found.lost.items()))
            detail = "; ".join(f"{region}: {cause}" for region, cause in causes.items())
            if seq in found.bad_signatures:
                raise JournalSignatureError(
                    f"journal of lineage {self.lineage!r}: event {seq} has no copy whose signature verifies in any "
                    f"region ({detail}). A signing store never acts on an event it cannot verify: someone wrote the "
                    "journal without the store's key (or it was written before signing was turned on: set "
                    "accept_unsigned while migrating). Nothing was done; check the files named here."
                )
            raise JournalError(
                f"journal of lineage {self.lineage!r}: event {seq} has no intact copy in any region ({detail}). "
                "A history with a hole is not replayed, so nothing was done: if a file named here is not an event "
                f"of this lineage, move it out of lineages/{self.lineage}/journal/; if it is a damaged event, put "
                "back an intact copy (another region's or a backup's)."
            )
        return found.events

    def history(self) -> LineageHistory:
        """What the journal says happened to the lineage (``fold_journal`` of its events)."""
        return fold_journal(self.events())
