"""Parsing of untrusted stored records (manifests, journal events): the checks they share.

In order: size, strict JSON (UTF-8, no NaN/Infinity, no duplicate keys, no lone surrogates),
``format`` and ``format_version``, then the pydantic schema in strict mode (no ``"2"`` for
``2``, no ``2.0`` for an int, no ``"yes"`` for a bool). Each record type then checks its own digest and location.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

Record = TypeVar("Record", bound=BaseModel)


# Longest piece of a record quoted in an error: a crafted record (a 4,096-character name, a path 250
# levels deep) must not make every log line, event and verify problem that names it that long.
MAX_QUOTED_CHARS = 200


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` cut to about ``limit`` characters (its start and end kept, the middle elided)."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[: limit - tail]}...({len(text) - limit} characters)...{text[-tail:]}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with a duplicate, which value counts would depend on
    the parser, so a signed record could say one thing to us and another to someone else."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key {key!r}")
        found[key] = value
    return found


def strict_json(data: bytes) -> Any:
    """Parse stored JSON strictly: UTF-8, no NaN/Infinity, no duplicate keys, no lone surrogates
    (they parse, but cannot be encoded again, so the record could never be hashed or checked)."""
    raw = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    # Round-trip the text: a "\ud800" escape gives a str that UTF-8 cannot encode.
    json.dumps(raw, ensure_ascii=False).encode("utf-8")
    return raw


def parse_record(
    data: bytes,
    *,
    what: str,
    format_name: str,
    format_version: int | tuple[int, ...],
    model: type[Record],
    max_bytes: int,
    fail: Callable[[str], Exception],
) -> Record:
    """Validate ``data`` as a ``model``; raise ``fail(message)`` on any doubt."""
    if len(data) > max_bytes:
        raise fail(f"{what} is {len(data)} bytes, larger than the {max_bytes} limit")
    try:
        raw = strict_json(data)
    except RecursionError:  # valid JSON, but nested deeper than any record of ours
        raise fail(f"{what} is nested too deeply") from None
    except (UnicodeError, ValueError) as exc:
        raise fail(f"{what} is not valid JSON (truncated or corrupt?): {clip(str(exc))}") from None
    if not isinstance(raw, dict) or raw.get("format") != format_name:
        raise fail(f"not a prefect-recovery {what} (missing or wrong 'format')")
    version = raw.get("format_version")
    known = format_version if isinstance(format_version, tuple) else (format_version,)
    if version not in known or isinstance(version, bool):
        readable = " and ".join(str(v) for v in known)
        raise fail(
            f"unknown {what} format_version {clip(repr(version))}; this prefect-recovery reads version "
            f"{readable}. Upgrade prefect-recovery."
        )
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise fail(f"{what} failed schema validation at {clip(where)}: {clip(first['msg'])}") from None
    except RecursionError:
        raise fail(f"{what} is nested too deeply") from None
