"""Export a checkpoint to files other tools read: ``tensors.safetensors`` + ``state.json``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import save_file

from ..core.store import Store
from .encoding import encode_state
from .state_io import load_state

_SUPPORTED = set(SAFETENSORS_DTYPES.values())


def export_checkpoint(store: Store, *, lineage: str, version: int | None, to: Path) -> dict[str, Any]:
    """Write the tensors as safetensors and everything else as JSON; return a summary.

    A torch.distributed (DCP) checkpoint is exported whole: every rank's shards joined.

    ``state.json`` holds the state tree in FORMAT.md's node format; ``{"tensor": NAME}`` leaves
    name keys of ``tensors.safetensors``. A dtype safetensors lacks (complex32, sub-byte ints,
    ...) is stored there as its raw uint8 bytes and listed under ``raw_tensors`` with its
    real dtype and shape. ``bytes`` leaves are inlined as base64 under ``bytes``.
    """
    state, manifest = load_state(store, lineage=lineage, version=version)
    tree = manifest.tree
    distributed = _is_dcp(tree)
    if distributed:
        # A torch.distributed (DCP) checkpoint's tree names only DCP's metadata: its items, read
        # whole here (every rank's shards joined), are the state, exported like any other.
        from ..distributed.dcp import load_full_state  # torch.distributed, loaded on use

        state = load_full_state(store, lineage, manifest.version)
        tree = encode_state(state).tree
    tensors: dict[str, torch.Tensor] = {}
    raw: dict[str, dict[str, Any]] = {}
    blobs: dict[str, str] = {}

    def collect(node: Any, value: Any) -> None:
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag == "tensor":
                if value.dtype in _SUPPORTED:
                    tensors[body] = value.contiguous()
                else:
                    tensors[body] = value.reshape(-1).view(torch.uint8).clone()
                    raw[body] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
            elif tag == "bytes":
                blobs[body] = base64.b64encode(value).decode("ascii")
            elif tag == "dict":
                for key, child in body:
                    collect(child, value[key])
            elif tag in ("list", "tuple"):
                for index, child in enumerate(body):
                    collect(child, value[index])

    collect(tree, state)
    to.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(to / "tensors.safetensors"), metadata={"lineage": lineage, "version": str(manifest.version)})
    document = {
        "lineage": lineage,
        "version": manifest.version,
        "step": manifest.step,
        "manifest_digest": manifest.manifest_digest,
        "metadata": manifest.metadata,
        "tree": tree,
        "distributed": distributed,
        "raw_tensors": raw,
        "bytes": blobs,
    }
    (to / "state.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return {
        "lineage": lineage,
        "version": manifest.version,
        "step": manifest.step,
        "distributed": distributed,
        "tensors": len(tensors),
        "raw_tensors": sorted(raw),
        "directory": str(to),
        "files": [str(to / "tensors.safetensors"), str(to / "state.json")],
    }


def _is_dcp(tree: Any) -> bool:
    """Whether ``tree`` marks a DCP checkpoint (FORMAT.md, "Distributed (DCP) checkpoints")."""
    pairs = tree.get("dict") if isinstance(tree, dict) else None
    if not (isinstance(pairs, list) and ["format", "prefect-recovery/dcp"] in pairs):
        return False  # the common case decides without importing torch.distributed
    from ..distributed.dcp import dcp_tree

    return tree == dcp_tree()
