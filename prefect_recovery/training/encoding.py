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
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import torch

from ..core.errors import InvalidNameError, ManifestError
from ..core.manifest import Entry, Manifest
from ..core.state_tree import DICT_LEVELS, DTYPE_SIZES, MAX_TREE_DEPTH, SEQUENCE_LEVELS, decode_float, is_dict_pair
from ..core.store_writer import EntryPlan

# How deep the state tree's JSON may nest (FORMAT.md, "State tree"; core/state_tree.py checks it on read).
MAX_JSON_DEPTH = MAX_TREE_DEPTH
_DICT_LEVELS, _SEQUENCE_LEVELS = DICT_LEVELS, SEQUENCE_LEVELS

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
    if key == "":
        return "%"  # quote() never yields a lone '%', so this cannot collide
    part = quote(key, safe="-_.~@+=,:")
    if part in (".", ".."):
        part = part.replace(".", "%2E")  # never a '.' or '..' path component
    return part


def _check_utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValueError(
            f"{where!r}: string {text[:40]!r} is not valid Unicode (lone surrogates); store it as bytes instead"
        ) from None


def encode_float(value: float) -> str:
    """``float.hex()`` for numbers and infinities; ``nan:<IEEE bits>`` keeps a NaN's sign and payload."""
    if math.isnan(value):
        return "nan:" + struct.pack(">d", value).hex()
    return float(value).hex()


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor reinterpreted as an integer dtype of the same element size.

    torch cannot copy or make contiguous some dtypes (uint1..7, int1..7); their bits can be
    copied through an integer view, which any tensor layout allows.
    """
    size = tensor.element_size()
    return tensor.view(_SAME_SIZE_INT[size]) if size in _SAME_SIZE_INT else tensor


def contiguous_copy(tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of ``tensor`` (into ``out`` when given), for every dtype."""
    if out is None:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    raw_view(out).copy_(raw_view(tensor))
    return out


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
        if depth > MAX_JSON_DEPTH:
            raise UnsupportedValueError(
                f"state nested deeper than allowed at {name!r} (at most about "
                f"{MAX_JSON_DEPTH // _DICT_LEVELS} levels of dicts); flatten it"
            )
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            _check_utf8(value, name)
            return str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return {"float": encode_float(value)}
        if isinstance(value, torch.Tensor):
            if value.is_quantized or value.is_sparse or value.layout != torch.strided:
                raise UnsupportedValueError(
                    f"{name!r}: only dense tensors can be stored (got {value.layout}, "
                    f"quantized={value.is_quantized}); convert it with .to_dense()/.dequantize()"
                )
            if _dtype_name(value.dtype) not in DTYPE_SIZES:
                raise UnsupportedValueError(f"{name!r}: tensors of dtype {value.dtype} cannot be stored")
            tensor = value.detach()
            if tensor.is_conj():
                tensor = tensor.resolve_conj()
            if tensor.is_neg():
                tensor = tensor.resolve_neg()
            if snapshot is not None:
                tensor = snapshot(name, tensor)
            elif copy or tensor.device.type != "cpu" or not tensor.is_contiguous():
                tensor = contiguous_copy(tensor)
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
                        if isinstance(key, str):
                            _check_utf8(key, name)
                        items.append([key, visit(item, (*path, _path_part(key)), depth + _DICT_LEVELS)])
                    return {"dict": items}
                nodes = [visit(item, (*path, _path_part(i)), depth + _SEQUENCE_LEVELS) for i, item in enumerate(value)]
                return {"tuple" if isinstance(value, tuple) else "list": nodes}
            finally:
                seen.discard(id(value))
        raise UnsupportedValueError(
            f"{name!r}: cannot checkpoint a {type(value).__module__}.{type(value).__qualname__} "
            "without pickle; store tensors, numbers, str, bytes, None, or dict/list/tuple of them"
        )

    tree = visit(state, (), 0)
    return EncodedState(tree=tree, entries=entries, tensors=tensors)


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


Key = str | Sequence[str | int]


def _segments(key: Key) -> tuple[str | int, ...]:
    """A user's key ('model', 'optimizer/state/0' or ('optimizer', 'state', 0)) as path segments."""
    if isinstance(key, str):
        return tuple(part for part in key.split("/") if part) if key else ()
    return tuple(key)


def _same(node_key: str | int, wanted: str | int) -> bool:
    return node_key == wanted or str(node_key) == str(wanted)


class _Selection:
    """Which parts of a state tree a partial load asks for (all of it when ``keys`` is None)."""

    def __init__(self, keys: Iterable[Key] | None):
        self.keys = None if keys is None else [_segments(key) for key in keys]
        self.matched: set[int] = set()

    def mode(self, path: tuple[str | int, ...]) -> str:
        """'all' inside a selected subtree, 'some' on the way to one, else 'none'."""
        if self.keys is None:
            return "all"
        mode = "none"
        for index, key in enumerate(self.keys):
            common = min(len(key), len(path))
            if all(_same(path[i], key[i]) for i in range(common)):
                if len(key) <= len(path):
                    if len(key) == len(path):
                        self.matched.add(index)
                    return "all"
                mode = "some"
        return mode

    def check_all_matched(self, tree: Any) -> None:
        if self.keys is None:
            return
        missing = ["/".join(map(str, key)) for index, key in enumerate(self.keys) if index not in self.matched and key]
        if missing:
            top = [str(pair[0]) for pair in tree.get("dict", [])] if isinstance(tree, dict) else []
            raise InvalidNameError(f"no part of the state matches keys {missing}; top-level keys: {top}")


def _walk(tree: Any, selection: _Selection, leaf: Callable[..., Any], depth: int = 0) -> Any:
    """Rebuild ``tree`` keeping what ``selection`` wants; ``leaf(tag, entry_name, path)`` gives leaves."""
    MISSING = _MISSING

    def build(node: Any, path: tuple[str | int, ...], depth: int) -> Any:
        if depth > MAX_JSON_DEPTH:
            raise ManifestError("state tree nested too deeply")
        mode = selection.mode(path)
        if mode == "none":
            return MISSING
        if node is None or isinstance(node, (bool, int, str)):
            return node if mode == "all" else MISSING
        if not isinstance(node, dict) or len(node) != 1:
            raise ManifestError(f"malformed state tree node {str(node)[:80]!r}")
        ((tag, body),) = node.items()
        if tag == "float":
            if mode != "all":
                return MISSING
            try:
                return decode_float(body)
            except (TypeError, ValueError, AttributeError, struct.error):
                raise ManifestError(f"malformed float {body!r} in state tree") from None
        if tag in ("tensor", "bytes"):
            if not isinstance(body, str):
                raise ManifestError("malformed leaf reference in state tree")
            return leaf(tag, body, path) if mode == "all" else MISSING
        if tag == "dict":
            if not isinstance(body, list):
                raise ManifestError("malformed dict node in state tree")
            result = {}
            for pair in body:
                if not is_dict_pair(pair):
                    raise ManifestError("malformed dict node in state tree")
                child = build(pair[1], (*path, pair[0]), depth + _DICT_LEVELS)
                if child is not MISSING:
                    result[pair[0]] = child
            return result
        if tag in ("list", "tuple"):
            if not isinstance(body, list):
                raise ManifestError(f"malformed {tag} node in state tree")
            items = [build(child, (*path, index), depth + _SEQUENCE_LEVELS) for index, child in enumerate(body)]
            items = [None if item is _MISSING else item for item in items]
            return tuple(items) if tag == "tuple" else items
        raise ManifestError(f"unknown node type {tag!r} in state tree")

    result = build(tree, (), depth)
    return None if result is _MISSING else result


_MISSING = object()


def selected_entries(
    manifest: Manifest, keys: Iterable[Key] | None, entries: Sequence[Entry] | None = None
) -> list[tuple[Entry, tuple[str | int, ...] | None]]:
    """The entries a (partial) load must read, in manifest order, each with its path in the
    state (None for an entry the tree does not reach); unknown keys are an error.

    ``entries``: the manifest's entries as ``Store.manifest_entries`` read them (needed for a
    paged manifest, whose root lists pages); default ``manifest.entries``."""
    selection = _Selection(keys)
    paths: dict[str, tuple[str | int, ...]] = {}
    _walk(manifest.tree, selection, lambda tag, name, path: paths.setdefault(name, path))
    selection.check_all_matched(manifest.tree)
    listed = manifest.entries if entries is None else entries
    if keys is None:
        return [(entry, paths.get(entry.name)) for entry in listed]
    return [(entry, paths[entry.name]) for entry in listed if entry.name in paths]


def find_target(into: Any, path: tuple[str | int, ...] | None) -> Any:
    """The object at ``path`` inside a caller's nested state, or None."""
    if path is None:
        return None
    node = into
    for part in path:
        if (isinstance(node, Mapping) and part in node) or (
            isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node)
        ):
            node = node[part]
        else:
            return None
    return node


def reusable(target: Any, entry: Entry) -> bool:
    """Can ``entry`` be read straight into ``target`` (a CPU tensor of the same dtype and shape)?"""
    return (
        isinstance(target, torch.Tensor)
        and target.device.type == "cpu"
        and target.layout == torch.strided
        and target.is_contiguous()
        and not target.requires_grad
        and entry.kind == "tensor"
        and _dtype_name(target.dtype) == entry.dtype
        and list(target.shape) == entry.shape
    )


def decode_tree(tree: Any, values: Mapping[str, Any], *, keys: Iterable[Key] | None = None) -> Any:
    """Rebuild the nested structure; with ``keys`` keep only those subtrees (and their parents)."""

    def leaf(tag: str, name: str, path: tuple[str | int, ...]) -> Any:
        if name not in values:
            raise ManifestError(f"state tree refers to entry {name!r}, which the manifest lacks")
        value = values[name]
        if (tag == "bytes") == isinstance(value, torch.Tensor):
            raise ManifestError(
                f"state tree names entry {name!r} as {tag}, but the manifest lists it as "
                f"{'a tensor' if isinstance(value, torch.Tensor) else 'bytes'}"
            )
        return bytes(value) if tag == "bytes" else value

    return _walk(tree, _Selection(keys), leaf)
