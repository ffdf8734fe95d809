"""Torch state <-> manifest entries (FORMAT.md, "State tree").

A state is a nested dict/list/tuple of tensors, Python scalars, str, bytes and None. Encoding
plans the write: each tensor becomes an entry of raw contiguous little-endian bytes with its
dtype and shape (safetensors-style), each ``bytes`` value an opaque entry, and the structure a
JSON tree whose leaves point at entry names. Decoding rebuilds the structure from JSON and
fills freshly allocated tensors with verified bytes. Nothing on the load path unpickles.

Tree nodes (JSON): ``null``, ``true``/``false``, integers and strings stand for themselves;
``{"float": "<float.hex()>"}`` keeps every float bit-exact (NaN, inf, -0.0 included);
``{"dict": [[key, node], ...]}`` keeps key order and int keys; ``{"list": [...]}``,
``{"tuple": [...]}``; ``{"tensor": "<entry name>"}`` and ``{"bytes": "<entry name>"}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import torch

from ..core.errors import InvalidNameError, ManifestError
from ..core.manifest import Entry, Manifest
from ..core.store import EntryPlan

MAX_TREE_DEPTH = 256

# Every dtype this torch build can store as raw bytes, by its name without the "torch." prefix.
# Quantized dtypes carry scale/zero-point outside their bytes, so they are left out.
DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype) and not str(value).startswith(("torch.q", "torch.quint"))
}


class UnsupportedValueError(TypeError):
    """A state leaf of a type that cannot be checkpointed without pickle."""


@dataclass
class EncodedState:
    tree: Any
    entries: list[EntryPlan]
    tensors: dict[str, torch.Tensor]  # keeps snapshot buffers alive until the write is done


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _path_part(key: str | int) -> str:
    if isinstance(key, int):
        return f"#{key}"
    part = quote(key, safe="-_.~@+=,:")
    if part in ("", ".", ".."):
        part = "".join(f"%{ord(c):02X}" for c in key) or "%00"  # never an empty or dot component
    return part


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode_state(
    state: Any,
    *,
    copy: bool = False,
    snapshot: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    components: Mapping[str, str] | None = None,
) -> EncodedState:
    """Plan ``state`` as entries.

    Args:
        state: The nested state.
        copy: Snapshot every tensor (``clone``) so training may go on while it is written.
        snapshot: Instead of ``clone``, copy each tensor (by entry name) into a buffer this
            callable returns; reusing buffers spares the page faults of fresh allocations.
        components: Maps top-level keys to component names (default: the key itself).
    """
    entries: list[EntryPlan] = []
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(value: Any, path: tuple[str, ...], depth: int) -> Any:
        name = "/".join(path) or "root"
        if depth > MAX_TREE_DEPTH:
            raise UnsupportedValueError(f"state nested deeper than {MAX_TREE_DEPTH} at {name!r}")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return {"float": float(value).hex()}
        if isinstance(value, torch.Tensor):
            if value.is_quantized or value.is_sparse or value.layout != torch.strided:
                raise UnsupportedValueError(
                    f"{name!r}: only dense tensors can be stored (got {value.layout}, "
                    f"quantized={value.is_quantized}); convert it with .to_dense()/.dequantize()"
                )
            tensor = value.detach()
            if tensor.is_conj():
                tensor = tensor.resolve_conj()
            if tensor.is_neg():
                tensor = tensor.resolve_neg()
            if snapshot is not None:
                tensor = snapshot(name, tensor)
            elif tensor.device.type != "cpu":
                tensor = tensor.to("cpu")
            elif copy:
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            tensor = tensor.contiguous()
            tensors[name] = tensor
            entries.append(
                EntryPlan(
                    name=name,
                    kind="tensor",
                    data=tensor_bytes(tensor),
                    dtype=_dtype_name(tensor.dtype),
                    shape=list(tensor.shape),
                    component=(components or {}).get(path[0], path[0]) if path else None,
                )
            )
            return {"tensor": name}
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            entries.append(
                EntryPlan(
                    name=name,
                    kind="bytes",
                    data=memoryview(data),
                    component=path[0] if path else None,
                )
            )
            return {"bytes": name}
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                raise UnsupportedValueError(f"{name!r}: the state contains a reference cycle")
            seen.add(id(value))
            try:
                if isinstance(value, dict):
                    items = []
                    for key, item in value.items():
                        if isinstance(key, bool) or not isinstance(key, (str, int)):
                            raise UnsupportedValueError(
                                f"{name!r}: dict keys must be str or int, got {type(key).__name__}"
                            )
                        items.append([key, visit(item, (*path, _path_part(key)), depth + 1)])
                    return {"dict": items}
                nodes = [visit(item, (*path, _path_part(i)), depth + 1) for i, item in enumerate(value)]
                return {"tuple" if isinstance(value, tuple) else "list": nodes}
            finally:
                seen.discard(id(value))
        raise UnsupportedValueError(
            f"{name!r}: cannot checkpoint a {type(value).__module__}.{type(value).__qualname__} "
            "without pickle; store tensors, numbers, str, bytes, None, or dict/list/tuple of them"
        )

    tree = visit(state, (), 0)
    return EncodedState(tree=tree, entries=entries, tensors=tensors)


def _select(manifest: Manifest, keys: Iterable[str] | None) -> list[Entry]:
    if keys is None:
        return list(manifest.entries)
    prefixes = [_key_path(k) for k in keys]
    return [
        entry for entry in manifest.entries if any(entry.name == p or entry.name.startswith(p + "/") for p in prefixes)
    ]


def allocate(entry: Entry) -> tuple[torch.Tensor | bytearray, memoryview]:
    """An empty destination for ``entry`` and a writable byte view of it."""
    if entry.kind == "bytes":
        buffer = bytearray(entry.size)
        return buffer, memoryview(buffer)
    dtype = DTYPES.get(entry.dtype or "")
    if dtype is None:
        raise ManifestError(
            f"entry {entry.name!r} has dtype {entry.dtype!r}, which this torch ({torch.__version__}) cannot represent"
        )
    numel = math.prod(entry.shape or [])
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != entry.size:
        raise ManifestError(
            f"entry {entry.name!r}: shape {entry.shape} of {entry.dtype} is {numel * itemsize} "
            f"bytes but the manifest says {entry.size}"
        )
    tensor = torch.empty(entry.shape or [], dtype=dtype)
    return tensor, tensor_bytes(tensor) if numel else memoryview(bytearray())


def decode_tree(tree: Any, values: Mapping[str, Any], *, keys: Iterable[str] | None = None) -> Any:
    """Rebuild the nested structure; with ``keys`` keep only those subtrees (and their parents)."""
    prefixes = None if keys is None else [_key_path(k) for k in keys]
    MISSING = object()

    def wanted(path: str) -> str:
        """'all' inside a selected subtree, 'some' on the way to one, else 'none'."""
        if prefixes is None or any(path == p or path.startswith(p + "/") for p in prefixes):
            return "all"
        if any(p.startswith(path + "/") or not path for p in prefixes):
            return "some"
        return "none"

    def build(node: Any, path: str, depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise ManifestError(f"state tree nested deeper than {MAX_TREE_DEPTH}")
        mode = wanted(path)
        if mode == "none":
            return MISSING
        if node is None or isinstance(node, (bool, int, str)):
            return node if mode == "all" else MISSING
        if not isinstance(node, dict) or len(node) != 1:
            raise ManifestError(f"malformed state tree node {str(node)[:80]!r}")
        ((tag, body),) = node.items()
        if tag == "float":
            try:
                return float.fromhex(body) if mode == "all" else MISSING
            except (TypeError, ValueError):
                raise ManifestError(f"malformed float {body!r} in state tree") from None
        if tag in ("tensor", "bytes"):
            if not isinstance(body, str):
                raise ManifestError("malformed leaf reference in state tree")
            if mode != "all":
                return MISSING
            if body not in values:
                raise ManifestError(f"state tree refers to entry {body!r}, which the manifest lacks")
            value = values[body]
            return bytes(value) if tag == "bytes" else value
        join = (lambda part: f"{path}/{part}") if path else (lambda part: part)
        if tag == "dict":
            result = {}
            if not isinstance(body, list):
                raise ManifestError("malformed dict node in state tree")
            for pair in body:
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or isinstance(pair[0], bool)
                    or not isinstance(pair[0], (str, int))
                ):
                    raise ManifestError("malformed dict node in state tree")
                child = build(pair[1], join(_path_part(pair[0])), depth + 1)
                if child is not MISSING:
                    result[pair[0]] = child
            return result
        if tag in ("list", "tuple"):
            if not isinstance(body, list):
                raise ManifestError(f"malformed {tag} node in state tree")
            items = [build(child, join(_path_part(i)), depth + 1) for i, child in enumerate(body)]
            items = [None if item is MISSING else item for item in items]
            return tuple(items) if tag == "tuple" else items
        raise ManifestError(f"unknown node type {tag!r} in state tree")

    result = build(tree, "", 0)
    return None if result is MISSING else result


def _key_path(key: str) -> str:
    """A user's key ('model' or 'model/fc.weight') as an entry-name prefix."""
    return "/".join(_path_part(part) for part in key.split("/")) if key else ""


def selected_entries(manifest: Manifest, keys: Iterable[str] | None) -> list[Entry]:
    selected = _select(manifest, keys)
    if keys is not None and not selected:
        available = sorted({entry.name.split("/", 1)[0] for entry in manifest.entries})
        raise InvalidNameError(f"no entries match keys {list(keys)}; top-level keys: {available}")
    return selected
