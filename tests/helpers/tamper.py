"""Damage stored objects the way bit rot or an attacker would (tests of the store and the fault suite)."""

from __future__ import annotations

from pathlib import Path

from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.manifest import canonical_json


def flip_byte(path: Path, offset: int = 0, mask: int = 0xFF) -> None:
    """XOR one byte of a file with ``mask`` (0x01 flips a single bit)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def reseal(raw: dict) -> bytes:
    """A manifest with its ``manifest_digest`` recomputed, so only deeper checks can reject it."""
    body = {k: v for k, v in raw.items() if k not in ("manifest_digest", "signature")}
    return canonical_json({**raw, "manifest_digest": hash_bytes(canonical_json(body))})


def manifest_path(region: Path, lineage: str, version: int) -> Path:
    """Where a local region keeps version ``version`` of ``lineage``'s manifest."""
    from prefect_recovery.core.layout import manifest_key

    return region / manifest_key(lineage, version)


def raw_manifest(region: Path, lineage: str, version: int) -> dict:
    """A local region's manifest copy as stored (JSON), to edit and write back."""
    import json

    return json.loads(manifest_path(region, lineage, version).read_bytes())


def read_entry(store, lineage: str, version: int | None = None, name: str = "w") -> tuple[int, bytes]:
    """(version, bytes of entry ``name``) of a version read through the core store's verified load path."""
    manifest, holders = store.resolve(lineage, version)
    buffers = {entry.name: bytearray(entry.size) for entry in manifest.entries}
    store.read_entries_into([(e, memoryview(buffers[e.name])) for e in manifest.entries], prefer=holders)
    return manifest.version, bytes(buffers[name])
