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
