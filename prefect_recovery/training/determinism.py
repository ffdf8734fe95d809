"""RNG states and determinism settings: captured into every checkpoint, restored on resume.

DESIGN.md invariant 6: seeds, RNG states (Python, NumPy, torch CPU, every CUDA device), thread
counts and deterministic-algorithm flags are part of the checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .encoding import DTYPES


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global RNG states, as tensors and plain values (no pickle needed)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("the checkpoint holds CUDA RNG states but CUDA is not available here")
        torch.cuda.set_rng_state_all(state["cuda"])


def capture_settings(seed: int | None) -> dict[str, Any]:
    """Settings that change results: recorded so a resume runs under the same ones."""
    return {
        "seed": seed,
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def apply_settings(settings: dict[str, Any]) -> None:
    torch.set_num_threads(int(settings["num_threads"]))
    torch.use_deterministic_algorithms(
        bool(settings["deterministic_algorithms"]), warn_only=bool(settings["deterministic_warn_only"])
    )
    torch.set_default_dtype(DTYPES[settings["default_dtype"]])
    torch.backends.cudnn.deterministic = bool(settings["cudnn_deterministic"])
    torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
