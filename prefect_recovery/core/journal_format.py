"""The journal's event format: what one event file holds and how untrusted bytes become an event
(FORMAT.md, "Journal").

An event is ``lineages/<lineage>/journal/<seq>.json``: a ``JournalEventBody`` (lineage, seq,
kind, run id, time, data), its ``event_digest`` over the canonical body, and on a signing store
a ``signature`` over the same bytes (core/signing.py, context ``JOURNAL_SIGNATURE_CONTEXT``).
``decode_event`` is the one gate between bytes read from a region and an event anyone acts on.

Events are ordered by ``seq`` only. ``time`` is the writer's wall clock, recorded for people,
never used for ordering (clocks of different machines disagree).

Apart from the journal's I/O (core/journal.py) because the format is a pure function of bytes:
the history fold (core/lineage_history.py), the fuzz tests and the audit check events without
touching a store, and the on-disk format changes only with FORMAT.md.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from .digest import HashAlgorithm, algorithm_of, check_digest, hash_bytes
from .errors import JournalError, JournalSignatureError
from .layout import check_lineage
from .manifest import Signature, canonical_json
from .records import parse_record
from .signing import JOURNAL_SIGNATURE_CONTEXT, Keyring

FORMAT_NAME = "prefect-recovery/journal-event"
FORMAT_VERSION = 1
MAX_EVENT_BYTES = 2**20
MAX_RUN_ID_CHARS = 256

EventKind = Literal[
    "run_started",
    "step_started",
    "step_completed",
    "checkpoint_committed",
    "failure",
    "recovery_started",
    "recovery_finished",
    "run_finished",
]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
_STEP_KINDS = ("step_started", "step_completed")


class JournalEventBody(BaseModel):
    """Every field of an event except its digest (what ``event_digest`` is computed over)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: Literal["prefect-recovery/journal-event"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    lineage: str
    seq: int = Field(ge=1, lt=10**12)
    kind: EventKind
    run_id: str = Field(min_length=1, max_length=MAX_RUN_ID_CHARS)
    time: str = Field(max_length=64, description="ISO 8601 UTC; informational only, never used for ordering.")
    data: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("lineage")
    @classmethod
    def _lineage(cls, value: str) -> str:
        return check_lineage(value)


class JournalEvent(JournalEventBody):
    """One immutable journal record. ``event_digest`` covers every other field but ``signature``;
    ``signature`` (signing stores only, absent otherwise) signs the same bytes."""

    event_digest: str
    signature: Signature | None = None

    @field_validator("event_digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_digest(value)

    @classmethod
    def build(
        cls, body: JournalEventBody, algorithm: HashAlgorithm = "blake3", keyring: Keyring | None = None
    ) -> JournalEvent:
        payload = body.model_dump(mode="json")
        canonical = canonical_json(payload)
        signature = keyring.sign(canonical, context=JOURNAL_SIGNATURE_CONTEXT) if keyring is not None else None
        return cls(**payload, event_digest=hash_bytes(canonical, algorithm), signature=signature)

    def body_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"event_digest", "signature"})

    def encode(self) -> bytes:
        # An unsigned event has no signature field at all: the bytes of journals written before
        # signing existed, and of unsigned stores, stay exactly as they were.
        return canonical_json(self.model_dump(mode="json", exclude={"signature"} if self.signature is None else None))


def decode_event(
    data: bytes,
    expect_lineage: str | None = None,
    expect_seq: int | None = None,
    *,
    region: str | None = None,
    key: str | None = None,
    keyring: Keyring | None = None,
) -> JournalEvent:
    """Parse and check untrusted event bytes; raise JournalError on any doubt.

    Checks, in order: size (at most 1 MiB), JSON, ``format`` and ``format_version``, schema,
    ``event_digest`` against the canonical body, then lineage and seq against the location the
    bytes were found under (so an event copied into another lineage or seq is rejected), then,
    with a ``keyring``, the signature (``JournalSignatureError``): an unsigned event only when the
    keyring ``accept_unsigned``.
    """

    def fail(message: str) -> JournalError:
        return JournalError(message, region=region, key=key)

    def bad_signature(message: str) -> JournalSignatureError:
        return JournalSignatureError(message, region=region, key=key)

    event = parse_record(
        data,
        what="journal event",
        format_name=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        model=JournalEvent,
        max_bytes=MAX_EVENT_BYTES,
        fail=fail,
    )
    try:
        canonical = canonical_json(event.body_payload())
        expected = hash_bytes(canonical, algorithm_of(event.event_digest))
    except (ValueError, RecursionError) as exc:
        raise fail(f"journal event cannot be canonicalized: {exc}") from None
    if expected != event.event_digest:
        raise fail(
            "journal event content does not match its event_digest (bit rot or tampering); "
            "a healthy copy in another region is used when there is one"
        )
    if expect_lineage is not None and event.lineage != expect_lineage:
        raise fail(f"journal event belongs to lineage {event.lineage!r}, found under {expect_lineage!r}")
    if expect_seq is not None and event.seq != expect_seq:
        raise fail(f"journal event says seq {event.seq}, found as seq {expect_seq}")
    if keyring is not None:
        keyring.check(
            canonical, event.signature, fail=bad_signature, context=JOURNAL_SIGNATURE_CONTEXT, what="journal event"
        )
    return event
