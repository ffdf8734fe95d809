"""A chunk's stored form: how the writer stores one chunk, and how a read gets its bytes back.

A chunk is stored raw, encoded with a codec (core/codecs.py), or as a delta: the XOR of its
bytes with a parent chunk's (an earlier checkpoint's chunk of the same entry and offset),
encoded (FORMAT.md, "Codecs" and "Delta chunks"). A fine-tune at a small learning rate keeps
the sign and exponent of almost every weight and moment, so the XOR's high byte planes are
nearly all zeros and compress far below the chunk.

The blob is named by the digest of its stored bytes, so every region, verify, repair, GC and
export treat blobs as opaque bytes; only reads (and the writer) decode. A read verifies the
blob against its name (failing over to the next region, like a raw read), decodes within the
declared size, applies the parent (resolved the same way, at most ``MAX_DELTA_CHAIN`` deep),
and checks the result against the chunk's ``decoded_digest`` before anyone sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import codecs
from .codecs import CodecError, CodecName
from .digest import PARALLEL_HASH_BYTES, HashAlgorithm, hash_bytes, hasher_digest, new_hasher
from .errors import BlobUnavailableError
from .manifest import MAX_DELTA_CHAIN, ChunkRef, Entry

# Reads one blob, verified against its digest, into a buffer of its stored size (failing over
# between regions); StoreReads.read_blob_into.
ReadBlob = Callable[[str, memoryview], object]
# Fills a buffer with a chunk's decoded bytes (the writer's parent reads: resolve_into, or the
# bytes the writer kept from the previous save).
ReadChunk = Callable[[ChunkRef, memoryview], object]


def _algorithm(digest: str) -> HashAlgorithm:
    return digest.split(":", 1)[0]  # type: ignore[return-value]


def resolve_into(read_blob: ReadBlob, chunk: ChunkRef, out: memoryview) -> None:
    """Fill ``out`` (``chunk.size`` bytes) with the chunk's decoded, verified bytes: from its
    primary stored form, or, when that has no intact copy in any region, from the next of its
    ``forms`` (regions with different codecs; FORMAT.md, "Region codecs")."""
    if chunk.forms is None:
        _resolve_form(read_blob, chunk, out)
        return
    first: BlobUnavailableError | None = None
    for form in chunk.stored_forms():
        try:
            _resolve_form(read_blob, form, out)
            return
        except BlobUnavailableError as exc:
            first = first or exc
    assert first is not None
    raise first


def _resolve_form(read_blob: ReadBlob, chunk: ChunkRef, out: memoryview) -> None:
    if chunk.stored_raw:
        read_blob(chunk.digest, out)  # verified against the digest, which is the content's
        return
    if chunk.chain_length() > MAX_DELTA_CHAIN:  # the schema refuses these; never recurse unbounded
        raise BlobUnavailableError(chunk.digest, {"manifest": f"delta chain longer than {MAX_DELTA_CHAIN}"})
    hasher = None
    if chunk.codec is None:  # a delta stored without a codec: the blob is the XOR itself
        read_blob(chunk.digest, out)
    else:
        # The blob lands in this thread's reused buffer (fresh memory per chunk costs page
        # faults); it is decoded before a parent is resolved, so a chain can share it.
        stored = codecs.scratch("blob", chunk.blob_size)
        read_blob(chunk.digest, stored)
        # Without a parent the decoded bytes are the chunk's: hashed as they are decoded.
        if chunk.parent is None and len(out) < PARALLEL_HASH_BYTES:
            hasher = new_hasher(_algorithm(chunk.content_digest))
        try:
            codecs.decode_into(stored, chunk.codec, chunk.width, out, hasher)
        except CodecError as exc:
            # The blob hashed to its name, so every region holds these same bytes: no failover.
            raise BlobUnavailableError(
                chunk.digest, {"every region": f"intact blob does not decode to its chunk ({exc})"}
            ) from None
    if chunk.parent is not None:
        base = bytearray(chunk.size)
        _resolve_form(read_blob, chunk.parent, memoryview(base))
        codecs.xor_into(out, base)
    algorithm = _algorithm(chunk.content_digest)
    got = hasher_digest(hasher, algorithm) if hasher is not None else hash_bytes(out, algorithm)
    if got != chunk.content_digest:
        raise BlobUnavailableError(
            chunk.digest,
            {"every region": f"decoded bytes do not match decoded_digest {chunk.content_digest} (corrupt)"},
        )


@dataclass(frozen=True)
class StoredChunk:
    """One chunk ready to write: its manifest reference and the blob's bytes (None: the blob
    already exists, as the unchanged parent chunk it is)."""

    ref: ChunkRef
    data: bytes | memoryview | None


def prepare(
    data: memoryview,
    *,
    codec: CodecName,
    dtype: str | None,
    algorithm: HashAlgorithm,
    parent: ChunkRef | None = None,
    read_parent: ReadChunk | None = None,
    min_saving: float = codecs.DEFAULT_MIN_SAVING,
    known: Callable[[str, int], ChunkRef | None] | None = None,
    content: str | None = None,
) -> StoredChunk:
    """How to store ``data``: raw, encoded, or as a delta against ``parent`` (kept only when it
    is at least ``min_saving`` smaller than the chunk encoded alone would be). ``known(content
    digest, size)`` may name a stored form of the same content written before (the writer's last
    save): it is named again, not encoded again. ``content``: the digest of ``data`` when the
    caller hashed it already (one chunk prepared in several codecs is hashed once)."""
    content = content or hash_bytes(data, algorithm)
    if parent is not None and parent.content_digest == content and parent.size == len(data):
        return StoredChunk(parent, None)  # unchanged since the parent: name the same blob(s)
    earlier = known(content, len(data)) if known is not None else None
    if earlier is not None and earlier.content_digest == content and earlier.size == len(data):
        return StoredChunk(earlier, None)  # e.g. a frozen layer, saved again: no encode, no write
    encoded = codecs.encode(data, codec, dtype, min_saving=min_saving)
    alone = len(encoded.data)
    usable = parent is not None and read_parent is not None and parent.size == len(data)
    if usable and parent.chain_length() < MAX_DELTA_CHAIN:  # type: ignore[union-attr]
        base = bytearray(len(data))
        try:
            read_parent(parent, memoryview(base))  # type: ignore[arg-type,misc]
        except BlobUnavailableError:
            usable = False  # no intact parent anywhere: store this chunk whole
        if usable:
            delta = memoryview(bytearray(data))
            codecs.xor_into(delta, base)
            # A delta is worth a parent read at every load only if it saves; "none" still
            # compresses the XOR (its zero planes are the point).
            delta_codec: CodecName = "auto" if codec == "none" else codec
            coded = codecs.encode(delta, delta_codec, dtype, min_saving=0.0)
            if len(coded.data) <= (1.0 - min_saving) * alone:
                return StoredChunk(
                    ChunkRef(
                        digest=hash_bytes(coded.data, algorithm),
                        size=len(data),
                        codec=coded.codec,
                        width=coded.width,  # type: ignore[arg-type]
                        stored_size=len(coded.data),
                        decoded_digest=content,
                        parent=parent,
                    ),
                    coded.data,
                )
    if encoded.codec is None:
        return StoredChunk(ChunkRef(digest=content, size=len(data)), data)
    return StoredChunk(
        ChunkRef(
            digest=hash_bytes(encoded.data, algorithm),
            size=len(data),
            codec=encoded.codec,
            width=encoded.width,  # type: ignore[arg-type]
            stored_size=alone,
            decoded_digest=content,
        ),
        encoded.data,
    )


def parents_of(entry_size: int, dtype: str | None, base: Entry | None, chunk_bytes: int) -> Sequence[ChunkRef | None]:
    """The parent of each chunk of an entry about to be written: the base entry's chunk at the
    same offset, when the base has the same size, dtype and chunking."""
    count = -(-entry_size // chunk_bytes) if entry_size else 0
    if base is None or base.size != entry_size or base.dtype != dtype or len(base.chunks) != count:
        return [None] * count
    if any(chunk.size != min(chunk_bytes, entry_size - i * chunk_bytes) for i, chunk in enumerate(base.chunks)):
        return [None] * count
    return list(base.chunks)
