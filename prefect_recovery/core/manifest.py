"""The manifest: the commit record of one checkpoint version (FORMAT.md, "Manifest").

A manifest is a pydantic model serialized as canonical JSON. It carries the digest of its own
canonical body (``manifest_digest``), so bit rot that still parses is caught even when signing
is off. Decoding checks, in order: size, JSON, format name and version, schema (which validates
every entry name and digest), the self digest, and that lineage/version match where the file
was found. No blob is read before all of that passed.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from .digest import HashAlgorithm, check_digest, hash_bytes
from .errors import ManifestError, ManifestSignatureError
from .layout import check_entry_name, check_lineage
from .records import parse_record
from .signing import Keyring

FORMAT_NAME = "prefect-recovery/manifest"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkRef(_Strict):
    """One content-addressed blob holding ``size`` consecutive bytes of an entry."""

    digest: str
    size: int = Field(ge=0)

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_digest(value)


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


class ManifestBody(_Strict):
    format: Literal["prefect-recovery/manifest"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
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

    @field_validator("lineage")
    @classmethod
    def _lineage(cls, value: str) -> str:
        return check_lineage(value)

    @model_validator(mode="after")
    def _unique_names(self) -> ManifestBody:
        names = [entry.name for entry in self.entries]
        if len(names) != len(set(names)):
            raise ValueError("duplicate entry names")
        # A blob named twice must be named with one size: readers check the size they are
        # given against the object before they allocate, and must not be able to pick another.
        sizes: dict[str, int] = {}
        for entry in self.entries:
            for chunk in entry.chunks:
                if sizes.setdefault(chunk.digest, chunk.size) != chunk.size:
                    raise ValueError(
                        f"blob {chunk.digest} is named with two sizes ({sizes[chunk.digest]} and {chunk.size})"
                    )
        return self

    def blob_digests(self) -> list[str]:
        """Every blob this manifest names, each once, in entry order."""
        seen: dict[str, None] = {}
        for entry in self.entries:
            for chunk in entry.chunks:
                seen.setdefault(chunk.digest, None)
        return list(seen)

    def state_digest(self) -> str:
        """Digest of the saved state alone (entries and tree): equal states, equal digests,
        whatever the lineage, version, time or metadata."""
        payload = {
            "entries": [entry.model_dump(mode="json", exclude={"component"}) for entry in self.entries],
            "tree": self.tree,
        }
        return hash_bytes(canonical_json(payload), self.hash_algorithm)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


class Manifest(ManifestBody):
    manifest_digest: str
    signature: Signature | None = None

    @classmethod
    def build(cls, body: ManifestBody, keyring: Keyring | None = None) -> Manifest:
        """The manifest of ``body``: its self digest and, with a signing key, its signature."""
        payload = body.model_dump(mode="json")
        canonical = canonical_json(payload)
        signature = keyring.sign(canonical) if keyring is not None else None
        return cls(**payload, manifest_digest=hash_bytes(canonical, body.hash_algorithm), signature=signature)

    def body_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"manifest_digest", "signature"})

    def encode(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude_none=False))


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
        format_version=FORMAT_VERSION,
        model=Manifest,
        max_bytes=MAX_MANIFEST_BYTES,
        fail=fail,
    )
    try:
        canonical = canonical_json(manifest.body_payload())
    except (UnicodeError, ValueError, TypeError, RecursionError) as exc:  # cannot be hashed: damage
        raise fail(f"manifest cannot be serialized canonically ({type(exc).__name__}: {exc})") from None
    expected = hash_bytes(canonical, manifest.hash_algorithm)
    if expected != manifest.manifest_digest:
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
