"""What a manifest's state tree and tensor entries must be for a loader to rebuild them
(FORMAT.md, "State tree"), checked when the manifest is decoded.

A tree the loader cannot decode (a float that is no ``float.hex()``, a leaf naming an entry the
manifest lacks or one of the other kind) or a tensor entry whose dtype is unknown or whose
shape disagrees with its size is a damaged manifest copy: listing, resolve and verify treat it
like any other (another region's copy is read, "latest" falls back). Core knows no torch: the
dtypes are torch's names, with their element sizes, written out here.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from typing import Any

# torch's storable dtypes (quantized ones left out) by the name the manifest records, with
# their element size in bytes. A writer refuses a tensor of any other dtype (training/encoding.py).
DTYPE_SIZES: dict[str, int] = {
    "bfloat16": 2,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
    "bits8": 1,
    "bool": 1,
    "complex128": 16,
    "complex32": 4,
    "complex64": 8,
    "float16": 2,
    "float32": 4,
    "float4_e2m1fn_x2": 1,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int1": 1,
    "int2": 1,
    "int3": 1,
    "int4": 1,
    "int5": 1,
    "int6": 1,
    "int7": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint1": 1,
    "uint2": 1,
    "uint3": 1,
    "uint4": 1,
    "uint5": 1,
    "uint6": 1,
    "uint7": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
}

# How deep the tree's JSON may nest (pydantic validates JSON values up to about 255 levels): a dict
# node costs 3 levels, a list or tuple 2.
MAX_TREE_DEPTH = 250
DICT_LEVELS, SEQUENCE_LEVELS = 3, 2
_NAN = re.compile(r"nan:[0-9a-fA-F]{16}")


def check_tensor_entry(name: str, dtype: str | None, shape: list[int] | None, size: int) -> None:
    """ValueError unless ``dtype`` is a known dtype and ``shape`` of it holds ``size`` bytes."""
    itemsize = DTYPE_SIZES.get(dtype or "")
    if itemsize is None:
        raise ValueError(f"tensor entry {name!r} has dtype {dtype!r}, which is no storable dtype")
    expected = math.prod(shape or []) * itemsize
    if expected != size:
        raise ValueError(f"tensor entry {name!r}: shape {shape} of {dtype} is {expected} bytes, not its size {size}")


def decode_float(text: str) -> float:
    """A float node's value (``float.hex()``, or ``nan:<16 hex digits>``); ValueError if malformed."""
    if text.startswith("nan:"):
        if not _NAN.fullmatch(text):
            raise ValueError(f"malformed NaN {text[:40]!r} in state tree")
        return struct.unpack(">d", bytes.fromhex(text[4:]))[0]
    return float.fromhex(text)


def is_dict_pair(pair: Any) -> bool:
    """A dict node's ``[key, value]`` item, its key a str or int (never a bool)."""
    return (
        isinstance(pair, list) and len(pair) == 2 and not isinstance(pair[0], bool) and isinstance(pair[0], (str, int))
    )


def check_tree(tree: Any, kinds: Mapping[str, str] | None) -> None:
    """ValueError unless ``tree`` is a state tree the loader can rebuild; with ``kinds`` (entry
    name -> "tensor"/"bytes") every leaf must name an entry of its kind."""
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise ValueError("state tree nested too deeply")
        if node is None or isinstance(node, (bool, int, str)):
            continue
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError(f"malformed state tree node {str(node)[:80]!r}")
        ((tag, body),) = node.items()
        if tag == "float":
            try:
                decode_float(body)
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"malformed float {str(body)[:40]!r} in state tree") from None
        elif tag in ("tensor", "bytes"):
            if not isinstance(body, str):
                raise ValueError("malformed leaf reference in state tree")
            if kinds is not None and kinds.get(body) != tag:
                found = kinds.get(body)
                raise ValueError(
                    f"state tree refers to {tag} entry {body[:80]!r}, which the manifest "
                    + ("lacks" if found is None else f"lists as {found}")
                )
        elif tag == "dict":
            if not isinstance(body, list):
                raise ValueError("malformed dict node in state tree")
            for pair in body:
                if not is_dict_pair(pair):
                    raise ValueError("malformed dict node in state tree")
                stack.append((pair[1], depth + DICT_LEVELS))
        elif tag in ("list", "tuple"):
            if not isinstance(body, list):
                raise ValueError(f"malformed {tag} node in state tree")
            stack.extend((child, depth + SEQUENCE_LEVELS) for child in body)
        else:
            raise ValueError(f"unknown node type {str(tag)[:40]!r} in state tree")
