"""The manifest: the commit record of one checkpoint version (FORMAT.md, "Manifest").

A manifest is a pydantic model serialized as canonical JSON. It carries the digest of its own
canonical body (``manifest_digest``), so bit rot that still parses is caught even when signing
is off. Decoding checks, in order: size, JSON, format name and version, schema (which validates
every entry name and digest), the self digest, and that lineage/version match where the file
was found. No blob is read before all of that passed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import blake3
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_serializer, model_validator

from .digest import HashAlgorithm, check_digest, hash_bytes
from .errors import ManifestError, ManifestSignatureError
from .layout import check_entry_name, check_lineage
from .records import parse_record
from .signing import Keyring
from .state_tree import check_tensor_entry, check_tree

FORMAT_NAME = "prefect-recovery/manifest"
FORMAT_VERSION = 1
# Version 2 is the paged form (FORMAT.md, "Entry pages"): the root lists entry pages instead of
# entries. Only manifests that use pages carry it, so every manifest a reader of version 1 could
# read stays version 1; a version-1 reader refuses a paged root by its version instead of
# reading it as a checkpoint with no entries.
PAGED_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, PAGED_FORMAT_VERSION)
MAX_MANIFEST_BYTES = 64 * 2**20
PAGE_FORMAT_NAME = "prefect-recovery/entry-page"
PAGE_FORMAT_VERSION = 1
MAX_PAGE_BYTES = 64 * 2**20


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Longest chain of delta parents a chunk may name (FORMAT.md, "Delta chunks"): a read
# resolves at most this many blobs for one chunk, and the writer starts a full chunk after it.
MAX_DELTA_CHAIN = 8
# The most a zstd frame can expand: a 128 KiB block of one repeated byte is a 4-byte RLE block.
# A chunk claiming more decoded bytes per stored byte is refused by the schema, so an unsigned
# manifest cannot make a reader allocate much more than the blobs the consistency rule checked.
MAX_EXPANSION = 2**15
# Most stored forms one chunk may name (one per distinct codec of the store's regions).
MAX_FORMS = 4


class ChunkRef(_Strict):
    """One content-addressed blob holding ``size`` consecutive bytes of an entry.

    ``digest`` names the blob: the digest of the bytes as stored. A raw chunk (no codec, no
    parent; every checkpoint written before codecs) stores its bytes as they are, so the blob's
    digest and size are the chunk's. A chunk stored with a ``codec`` and/or as a delta against a
    ``parent`` records the blob's ``stored_size`` and the ``decoded_digest`` of the chunk's bytes
    (FORMAT.md, "Codecs" and "Delta chunks"); a load checks the blob, then the decoded bytes.
    """

    digest: str
    size: int = Field(ge=0)
    codec: Literal["zstd", "bytegroup-zstd"] | None = None
    # Element width of a ``bytegroup-zstd`` chunk (the byte planes it was grouped into).
    width: Literal[2, 4, 8] | None = None
    stored_size: int | None = Field(default=None, ge=0)
    decoded_digest: str | None = None
    # Delta chunk: the stored bytes decode to ``chunk XOR parent`` (same size).
    parent: ChunkRef | None = None
    # Other stored forms of the same chunk, for regions with other codecs (FORMAT.md, "Region
    # codecs"): each one a reference without ``forms``, of this chunk's size and content digest.
    forms: list[ChunkRef] | None = Field(default=None, min_length=1, max_length=MAX_FORMS - 1)

    @field_validator("digest", "decoded_digest")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        return None if value is None else check_digest(value)

    @model_validator(mode="after")
    def _stored_form(self) -> ChunkRef:
        if self.forms is not None:
            self._check_forms(self.forms)
        if self.codec is None and self.parent is None:
            if self.stored_size is not None or self.decoded_digest is not None or self.width is not None:
                raise ValueError("a raw chunk names no stored_size, decoded_digest or width")
            return self
        if self.stored_size is None or self.decoded_digest is None:
            raise ValueError("a chunk with a codec or a parent names its stored_size and decoded_digest")
        if self.codec is None and self.stored_size != self.size:
            raise ValueError("a delta chunk without a codec stores exactly its size")
        if self.size > MAX_EXPANSION * max(self.stored_size, 1):
            raise ValueError(f"a chunk of {self.size} bytes cannot decode from {self.stored_size} stored bytes")
        if (self.codec == "bytegroup-zstd") != (self.width is not None):
            raise ValueError("width is named by bytegroup-zstd chunks, and only by them")
        if self.width is not None and self.size % self.width:
            raise ValueError(
                f"a bytegroup-zstd chunk of {self.size} bytes is no whole number of {self.width}-byte elements"
            )
        if self.parent is not None:
            if self.parent.forms is not None:
                raise ValueError("a delta chunk's parent names one stored form (no forms)")
            if self.parent.size != self.size:
                raise ValueError("a delta chunk's parent has the chunk's size")
            if self.chain_length() > MAX_DELTA_CHAIN:
                raise ValueError(f"a delta chain longer than {MAX_DELTA_CHAIN}")
        return self

    def _check_forms(self, forms: list[ChunkRef]) -> None:
        digests = {self.digest}
        for form in forms:
            if form.forms is not None:
                raise ValueError("a stored form names no further forms")
            if form.size != self.size or form.content_digest != self.content_digest:
                raise ValueError("every stored form of a chunk has its size and content digest")
            if form.digest in digests:
                raise ValueError("the stored forms of a chunk are distinct blobs")
            digests.add(form.digest)

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # A raw chunk serializes as {digest, size} exactly as before codecs existed, so the
        # manifest and state digests of every earlier checkpoint are unchanged.
        return {key: value for key, value in handler(self).items() if value is not None}

    @property
    def blob_size(self) -> int:
        """Bytes of the blob ``digest`` names (what a region holds)."""
        return self.size if self.stored_size is None else self.stored_size

    @property
    def content_digest(self) -> str:
        """Digest of the chunk's bytes (decoded), whatever form they are stored in."""
        return self.digest if self.decoded_digest is None else self.decoded_digest

    @property
    def stored_raw(self) -> bool:
        return self.codec is None and self.parent is None

    def chain_length(self) -> int:
        """Blobs a read of this chunk resolves (1 for a chunk with no parent)."""
        length, ref = 1, self.parent
        while ref is not None:
            length, ref = length + 1, ref.parent
        return length

    def stored_forms(self) -> list[ChunkRef]:
        """Each stored form of this chunk, the primary first, as references without ``forms``."""
        if self.forms is None:
            return [self]
        return [self.model_copy(update={"forms": None}), *self.forms]

    def form_blobs(self) -> list[tuple[str, int]]:
        """(digest, blob size) of this form's blob and of every delta parent's, nearest first:
        what a region needs to serve the chunk in this form (``forms`` not included)."""
        found, ref = [], self
        while ref is not None:
            found.append((ref.digest, ref.blob_size))
            ref = ref.parent
        return found

    def blobs(self) -> list[tuple[str, int]]:
        """(digest, blob size) of this chunk's blob and of every delta parent's, nearest first,
        then the same for each other stored form: all of them must stay (GC, retention, verify
        and export count each)."""
        if self.forms is None:
            return self.form_blobs()
        return [pair for form in self.stored_forms() for pair in form.form_blobs()]


class ShardInfo(_Strict):
    """Where this entry sits in a tensor sharded over ranks (room for torch.distributed)."""

    global_shape: list[int]
    offsets: list[int]
    rank: int | None = None


class Entry(_Strict):
    """One stored leaf: a tensor (raw little-endian bytes) or an opaque bytes value."""

    name: str
    kind: Literal["tensor", "bytes"]
    size: int = Field(ge=0)
    chunks: list[ChunkRef]
    dtype: str | None = None
    shape: list[int] | None = None
    component: str | None = None
    shard: ShardInfo | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_entry_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> Entry:
        if sum(chunk.size for chunk in self.chunks) != self.size:
            raise ValueError(f"entry {self.name!r}: chunk sizes do not add up to size {self.size}")
        if self.kind == "tensor":
            if self.dtype is None or self.shape is None:
                raise ValueError(f"tensor entry {self.name!r} needs dtype and shape")
            if any(dim < 0 for dim in self.shape):
                raise ValueError(f"tensor entry {self.name!r} has a negative dimension")
            check_tensor_entry(self.name, self.dtype, self.shape, self.size)
        return self


class Component(_Strict):
    """A top-level part of the state (``model``, ``optimizer``...) and who owns it."""

    name: str
    durable: bool = True
    owner: str = "user"


class Signature(_Strict):
    """A manifest's signature over its canonical body (core/signing.py): algorithm, key id, value (base64)."""

    algorithm: str
    key_id: str
    value: str


class PageRef(_Strict):
    """One entry page a paged (version 2) manifest lists: a content-addressed blob holding
    ``entries`` consecutive entries of the manifest (FORMAT.md, "Entry pages")."""

    digest: str
    size: int = Field(ge=1, le=MAX_PAGE_BYTES)
    entries: int = Field(ge=1)
    # Bytes of state the page's entries hold: the manifest's size is known without its pages.
    entry_bytes: int = Field(ge=0)
    # The torch.distributed ranks whose writer wrote the page's entries (empty: no rank, such
    # as a single writer's state or a coordinator's metadata); a rank restoring its shards reads
    # the pages of its rank and those of no rank.
    ranks: list[int] = Field(default_factory=list)
    first: str
    last: str

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_digest(value)

    @field_validator("first", "last")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_entry_name(value)


class EntryPage(_Strict):
    """The stored form of one entry page: canonical JSON, checked like a manifest (records.py)."""

    format: Literal["prefect-recovery/entry-page"] = PAGE_FORMAT_NAME
    format_version: Literal[1] = PAGE_FORMAT_VERSION
    entries: list[Entry] = Field(min_length=1)


def encode_page(encoded_entries: list[bytes]) -> bytes:
    """The canonical JSON of an ``EntryPage`` from its entries' canonical JSON (sorted keys:
    ``entries`` < ``format`` < ``format_version``); equal to ``canonical_json`` of the model."""
    return (
        b'{"entries":['
        + b",".join(encoded_entries)
        + b'],"format":"'
        + PAGE_FORMAT_NAME.encode()
        + b'","format_version":'
        + str(PAGE_FORMAT_VERSION).encode()
        + b"}"
    )


def decode_page(data: bytes, ref: PageRef, *, region: str | None = None, key: str | None = None) -> list[Entry]:
    """The entries of a page whose bytes already hashed to ``ref.digest``; ManifestError unless
    it parses strictly and agrees with what the (signed) root says of it."""

    def fail(message: str) -> ManifestError:
        return ManifestError(message, region=region, key=key)

    page = parse_record(
        data,
        what="entry page",
        format_name=PAGE_FORMAT_NAME,
        format_version=PAGE_FORMAT_VERSION,
        model=EntryPage,
        max_bytes=MAX_PAGE_BYTES,
        fail=fail,
    )
    entries = page.entries
    ranks = sorted({e.shard.rank for e in entries if e.shard is not None and e.shard.rank is not None})
    if (
        len(entries) != ref.entries
        or entries[0].name != ref.first
        or entries[-1].name != ref.last
        or sum(e.size for e in entries) != ref.entry_bytes
        or not set(ranks) <= set(ref.ranks)
    ):
        raise fail(f"entry page {ref.digest} does not hold what its manifest lists for it")
    return entries


def check_entries(entries: Sequence[Entry]) -> None:
    """What one manifest's entries must satisfy, in either form; ValueError if they do not."""
    names = {entry.name for entry in entries}
    if len(names) != len(entries):
        raise ValueError("duplicate entry names")
    # A blob named twice must be named with one size: readers check the size they are
    # given against the object before they allocate, and must not be able to pick another.
    sizes: dict[str, int] = {}
    for entry in entries:
        for chunk in entry.chunks:
            for digest, size in chunk.blobs():
                if sizes.setdefault(digest, size) != size:
                    raise ValueError(f"blob {digest} is named with two sizes ({sizes[digest]} and {size})")


def entry_blob_sizes(entries: Iterable[Entry]) -> dict[str, int]:
    """Every blob ``entries`` name (delta parents included), each once in entry order, with the
    size the blob has in a region."""
    sizes: dict[str, int] = {}
    for entry in entries:
        for chunk in entry.chunks:
            for digest, size in chunk.blobs():
                sizes.setdefault(digest, size)
    return sizes


def state_digest_of(entries: Iterable[Entry], tree: JsonValue, algorithm: HashAlgorithm) -> str:
    """Digest of a saved state (its entries in order and its tree), whatever the manifest's form:
    the canonical JSON of ``{"entries": [...], "tree": ...}`` hashed as it is built, so a paged
    manifest and a single-file one of the same state give the same digest (and a chunk counts
    by its decoded digest, so codecs and delta parents do not change it either)."""
    hasher = blake3.blake3() if algorithm == "blake3" else hashlib.sha256()
    hasher.update(b'{"entries":[')
    for index, entry in enumerate(entries):
        if index:
            hasher.update(b",")
        dumped = entry.model_dump(mode="json", exclude={"component"})
        # The state, not how it is stored: a chunk counts by its decoded bytes, so one state
        # saved raw, compressed or as a delta has one digest (raw chunks dump as before).
        dumped["chunks"] = [{"digest": c.content_digest, "size": c.size} for c in entry.chunks]
        hasher.update(canonical_json(dumped))
    hasher.update(b'],"tree":' + canonical_json(tree) + b"}")
    return f"{algorithm}:{hasher.hexdigest()}"


class ManifestBody(_Strict):
    format: Literal["prefect-recovery/manifest"] = FORMAT_NAME
    format_version: Literal[1, 2] = FORMAT_VERSION
    lineage: str
    version: int = Field(ge=1)
    step: int | None = None
    created_at: str
    hash_algorithm: HashAlgorithm = "blake3"
    byte_order: Literal["little"] = "little"
    placement: Literal["all", "primary"] = "all"
    entries: list[Entry]
    tree: JsonValue = None
    components: list[Component] = Field(default_factory=list)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    writer: dict[str, JsonValue] = Field(default_factory=dict)
    # Paged form only (format_version 2): the entry pages, in entry order; ``entries`` is empty.
    # Absent (None) in version 1, and left out of its JSON, so version-1 bytes are unchanged.
    pages: list[PageRef] | None = None

    @field_validator("lineage")
    @classmethod
    def _lineage(cls, value: str) -> str:
        return check_lineage(value)

    @model_validator(mode="after")
    def _unique_names(self) -> ManifestBody:
        if self.format_version == PAGED_FORMAT_VERSION:
            if self.pages is None or not self.pages or self.entries:
                raise ValueError("a paged manifest (format_version 2) lists pages and no entries")
            digests = [page.digest for page in self.pages]
            if len(digests) != len(set(digests)):
                raise ValueError("a paged manifest lists one page twice")
            check_tree(self.tree, None)  # its entries are in its pages: the leaves' names are not checked
            return self
        if self.pages is not None:
            raise ValueError("pages are listed only by paged manifests (format_version 2)")
        check_entries(self.entries)
        check_tree(self.tree, {entry.name: entry.kind for entry in self.entries})
        return self

    @property
    def paged(self) -> bool:
        """Whether the entries are in entry pages (read them with ``Store.manifest_entries``)."""
        return self.pages is not None

    def _check_single_file(self, what: str) -> None:
        if self.pages is not None:
            raise ManifestError(
                f"{what} of a paged manifest needs its entry pages: use Store.manifest_entries / Store.state_digest"
            )

    def blob_digests(self) -> list[str]:
        """Every blob this manifest names, each once, in entry order (single-file form; a paged
        manifest's are its pages' digests and those its pages name: ``Store.manifest_blobs``)."""
        self._check_single_file("blob_digests")
        return list(entry_blob_sizes(self.entries))

    def state_digest(self) -> str:
        """Digest of the saved state alone (entries and tree): equal states, equal digests,
        whatever the lineage, version, time or metadata (single-file form; ``Store.state_digest``
        reads a paged manifest's pages and gives the same digest for the same state)."""
        self._check_single_file("state_digest")
        return state_digest_of(self.entries, self.tree, self.hash_algorithm)

    @property
    def total_bytes(self) -> int:
        if self.pages is not None:
            return sum(page.entry_bytes for page in self.pages)
        return sum(entry.size for entry in self.entries)

    def body_dump(self) -> dict[str, Any]:
        """The body as JSON values; ``pages`` only in the paged form (version-1 bytes unchanged)."""
        exclude = {"manifest_digest", "signature"} if isinstance(self, Manifest) else set()
        if self.pages is None:
            exclude.add("pages")
        return self.model_dump(mode="json", exclude=exclude)


class Manifest(ManifestBody):
    manifest_digest: str
    signature: Signature | None = None

    @classmethod
    def build(cls, body: ManifestBody, keyring: Keyring | None = None) -> Manifest:
        """The manifest of ``body``: its self digest and, with a signing key, its signature."""
        payload = body.body_dump()
        canonical = canonical_json(payload)
        signature = keyring.sign(canonical) if keyring is not None else None
        return cls(**payload, manifest_digest=hash_bytes(canonical, body.hash_algorithm), signature=signature)

    def body_payload(self) -> dict[str, Any]:
        return self.body_dump()

    def encode(self) -> bytes:
        exclude = {"pages"} if self.pages is None else set()
        return canonical_json(self.model_dump(mode="json", exclude_none=False, exclude=exclude))


def _stored_body(data: bytes) -> bytes | None:
    """The canonical JSON of the stored values other than ``manifest_digest`` and ``signature``:
    the bytes the digest and the signature cover when the manifest was stored as the writer
    stores it (``Manifest.encode``). Parsed and serialized by the json module alone (the bytes
    already passed ``parse_record``'s strict checks): half the cost of dumping the pydantic
    model again, and it authenticates the very values the model was parsed from."""
    try:
        raw = json.loads(data)
        raw.pop("manifest_digest", None)
        raw.pop("signature", None)
        return canonical_json(raw)
    except (UnicodeError, ValueError, TypeError, RecursionError, AttributeError):
        return None


def decode_manifest(
    data: bytes,
    *,
    expect_lineage: str | None = None,
    expect_version: int | None = None,
    region: str | None = None,
    key: str | None = None,
    keyring: Keyring | None = None,
) -> Manifest:
    """Parse and check untrusted manifest bytes; raise ManifestError on any doubt.

    With a ``keyring`` the signature is checked too (``ManifestSignatureError``), before the
    caller can read any blob the manifest names.
    """

    def fail(message: str) -> ManifestError:
        return ManifestError(message, region=region, key=key)

    def bad_signature(message: str) -> ManifestSignatureError:
        return ManifestSignatureError(message, region=region, key=key)

    manifest = parse_record(
        data,
        what="manifest",
        format_name=FORMAT_NAME,
        format_version=FORMAT_VERSIONS,
        model=Manifest,
        max_bytes=MAX_MANIFEST_BYTES,
        fail=fail,
    )
    canonical = _stored_body(data)
    if canonical is None or hash_bytes(canonical, manifest.hash_algorithm) != manifest.manifest_digest:
        # Not the stored values as written: the canonical form of the parsed model decides, as
        # it always has (a manifest stored in another layout of the same values still loads).
        try:
            canonical = canonical_json(manifest.body_payload())
        except (UnicodeError, ValueError, TypeError, RecursionError) as exc:  # cannot be hashed: damage
            raise fail(f"manifest cannot be serialized canonically ({type(exc).__name__}: {exc})") from None
        if hash_bytes(canonical, manifest.hash_algorithm) != manifest.manifest_digest:
            raise fail(
                "manifest content does not match its manifest_digest (bit rot or tampering); "
                "`prefect-recovery verify --repair` restores it from a healthy region"
            )
    if expect_lineage is not None and manifest.lineage != expect_lineage:
        raise fail(f"manifest belongs to lineage {manifest.lineage!r}, found under {expect_lineage!r}")
    if expect_version is not None and manifest.version != expect_version:
        raise fail(f"manifest says version {manifest.version}, found as version {expect_version}")
    if sys.byteorder != manifest.byte_order:
        raise fail(f"manifest holds {manifest.byte_order}-endian tensors; this host is {sys.byteorder}")
    if keyring is not None:
        keyring.check(canonical, manifest.signature, fail=bad_signature)
    return manifest
