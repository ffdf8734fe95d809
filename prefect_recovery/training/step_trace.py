"""A per-step record of what training computed, to name the step where two runs first differ.

Checkpoints show a divergence only at the next save: issue 18's rounding difference (about 1e-6 in the
weights, docs/DETERMINISM.md) surfaced at step 10 and could have come from any of steps 1-10.
With ``PREFECT_RECOVERY_STEP_TRACE=DIR`` set, every ``Checkpointer.step()`` appends one JSON line to
``DIR/<lineage>-<pid>.jsonl``: the step, a digest of each parameter and of its gradient (and of a
``TensorDataset``'s tensors), the thread that stepped and its floating-point control bits, and how many
threads the process runs. The first line also
holds what the process computes with (``execution_fingerprint``), the shared libraries it has loaded, and
the store it saves to, so two traces of the same seed can be paired. ``first_difference(a, b)`` names the
first step, and its parameters and gradients, where two traces differ.

A diagnostic, off by default: it hashes the model (and copies GPU tensors to the host) at every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

from ..core.digest import hash_bytes

ENV = "PREFECT_RECOVERY_STEP_TRACE"


def _tensor_digest(tensor: Any) -> str:
    import torch

    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hash_bytes(memoryview(data.view(torch.uint8).numpy()))  # no copy of the bytes


def _loaded_libraries() -> list[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line and "/" in line})
    except OSError:  # not Linux
        return []


@functools.cache
def _fegetenv() -> Any:
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("m")).fegetenv
    except (OSError, AttributeError):
        return None


def _mxcsr_control() -> str | None:
    """The calling thread's SSE control bits (rounding mode, flush-to-zero, denormals-are-zero, exception
    masks; default 0x1f80): a library built with -ffast-math sets FTZ/DAZ in whichever thread loads it."""
    fegetenv = _fegetenv()
    if fegetenv is None:
        return None
    environment = ctypes.create_string_buffer(32)  # glibc x86-64 fenv_t: the x87 environment, then MXCSR
    if fegetenv(environment) != 0:
        return None
    return hex(int.from_bytes(environment.raw[28:32], "little") & ~0x3F)  # without the sticky status flags


def _os_threads() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


class StepTrace:
    """Appends one record per training step to ``DIR/<lineage>-<pid>.jsonl``."""

    def __init__(self, directory: str | os.PathLike[str], lineage: str, model: Any, data: Any, context: dict[str, Any]):
        self.path = Path(directory) / f"{lineage}-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parameters = list(model.named_parameters()) if hasattr(model, "named_parameters") else []
        # A TensorDataset's tensors (the data every batch is cut from): a change under the training shows here.
        # Any other loader's dataset is not traced.
        dataset = getattr(getattr(data, "loader", data), "dataset", None)
        self.dataset = list(getattr(dataset, "tensors", ()))
        self._context: dict[str, Any] | None = context

    @classmethod
    def from_environment(cls, lineage: str, model: Any, data: Any, context: dict[str, Any]) -> StepTrace | None:
        directory = os.environ.get(ENV)
        return cls(directory, lineage, model, data, context) if directory else None

    def record(self, step: int) -> None:
        import torch  # the trace is written only where training runs

        record: dict[str, Any] = {
            "step": step,
            "time": time.time(),
            "thread": threading.current_thread().name,
            "python_threads": threading.active_count(),
            "os_threads": _os_threads(),
            "torch_threads": torch.get_num_threads(),
            "mxcsr": _mxcsr_control(),
            "parameters": {name: _tensor_digest(p) for name, p in self.parameters},
            "gradients": {name: _tensor_digest(p.grad) for name, p in self.parameters if p.grad is not None},
            "dataset": [_tensor_digest(tensor) for tensor in self.dataset],
        }
        if self._context is not None:  # once per process: what it computes with and where it saves
            from .determinism import execution_fingerprint

            record.update(self._context, execution=execution_fingerprint(), libraries=_loaded_libraries())
            self._context = None
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def first_difference(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first step both traces recorded whose parameters, gradients or dataset tensors differ: ``{"step":
    n, "gradients": [names], "parameters": [names], "dataset": [indexes]}`` (gradients differing first
    means that step's forward/backward computed differently; parameters only, its optimizer step; the
    dataset, that the data changed under the training). None: no difference."""
    theirs = {record["step"]: record for record in b}
    for mine in a:
        other = theirs.get(mine["step"])
        if other is None:
            continue
        found = {
            kind: sorted(name for name in mine[kind] if mine[kind][name] != other[kind].get(name))
            for kind in ("gradients", "parameters")
        }
        mine_data, other_data = mine.get("dataset", []), other.get("dataset", [])
        # a tensor only one trace has (two datasets of different shapes) counts as differing
        found["dataset"] = [
            i for i in range(max(len(mine_data), len(other_data))) if mine_data[i : i + 1] != other_data[i : i + 1]
        ]
        if found["gradients"] or found["parameters"] or found["dataset"]:
            return {"step": mine["step"], **found}
    return None
