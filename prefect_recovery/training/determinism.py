"""RNG states and determinism settings: captured into every checkpoint, restored on resume.

DESIGN.md invariant 6: seeds, RNG states (Python, NumPy, torch CPU, every CUDA device), thread
counts and deterministic-algorithm flags are part of the checkpoint.
"""

from __future__ import annotations

import functools
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from . import first_calls
from .encoding import DTYPES


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer, and make the math
    libraries' first calls on this thread (``first_calls``: a racing first call rounds differently)."""
    first_calls.settle()
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


# A training thread's own generators (the private ones DETERMINISM.md recommends) passed as
# ``Checkpointer(extras={"noise": generator})``: saved as their state, restored into the same object.
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    return str(value) if isinstance(value, int) and not -(2**63) <= value < 2**63 else value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"ndarray", "dtype"}:
        return np.asarray(value["ndarray"], dtype=value["dtype"])
    if isinstance(value, dict):
        return {key: _from_jsonable(item) for key, item in value.items()}
    return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value


# The private generator types an extra may be: saved as their state and restored in place.
GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def is_generator(obj: Any) -> bool:
    """A private random generator (its state is its thread's, or in a distributed job its rank's, own)."""
    return isinstance(obj, GENERATOR_TYPES)


def extra_state(obj: Any) -> Any:
    """What a checkpoint holds for one of ``Checkpointer(extras=...)``: ``state_dict()``, the state of a
    private generator (``torch.Generator``, ``numpy.random.Generator``/``RandomState``, ``random.Random``),
    or the plain value itself."""
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if isinstance(obj, torch.Generator):
        return {"torch_generator": obj.get_state()}
    if isinstance(obj, np.random.Generator):
        return {"numpy_generator": _jsonable(obj.bit_generator.state)}
    if isinstance(obj, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = obj.get_state(legacy=True)  # type: ignore[misc]
        return {"numpy_random_state": [kind, torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                                       int(pos), int(has_gauss), float(cached)]}  # fmt: skip
    if isinstance(obj, random.Random):
        return {"python_random": obj.getstate()}
    return obj


def load_extra_state(target: Any, value: Any) -> bool:
    """Restore ``value`` (from ``extra_state``) into ``target`` in place; False when ``target`` is a plain
    value, which the caller replaces instead."""
    if hasattr(target, "load_state_dict"):
        target.load_state_dict(value)
    elif isinstance(target, torch.Generator):
        target.set_state(value["torch_generator"])
    elif isinstance(target, np.random.Generator):
        target.bit_generator.state = _from_jsonable(value["numpy_generator"])
    elif isinstance(target, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = value["numpy_random_state"]
        target.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    elif isinstance(target, random.Random):
        version, internal, gauss = value["python_random"]
        target.setstate((version, tuple(internal), gauss))
    else:
        return False
    return True


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


# Environment variables that change which numerical kernels run (thread pools, instruction sets, the BLAS's
# reproducibility mode): a process started with another value can round differently with the same state.
NUMERIC_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "ONEDNN_", "DNNL_", "OPENBLAS_", "TORCH_CPU")


@functools.cache
def _cpu_model() -> str:
    """The CPU's vendor, family, model and stepping (from /proc/cpuinfo; the platform's name elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    parts = [fields.get("vendor_id", ""), fields.get("model name", "")]
    parts += [f"{name} {fields[name]}" for name in ("cpu family", "model", "stepping") if name in fields]
    return ", ".join(part for part in parts if part)


# mkl_cbwr_get's answers (mkl_service.h): the code branch MKL keeps run to run, 1 when CNR is off.
_MKL_CBWR_BRANCHES = {
    1: "off", 2: "auto", 3: "compatible", 4: "sse2", 6: "ssse3", 7: "sse4_1", 8: "sse4_2", 9: "avx", 10: "avx2",
    11: "avx512_mic", 12: "avx512", 13: "avx512_mic_e1", 14: "avx512_e1",
}  # fmt: skip
_MKL_CBWR_STRICT = 0x10000


@functools.cache
def _mkl_cbwr_get() -> Any:
    """MKL's ``mkl_cbwr_get``: exported as ``mkl_serv_cbwr_get`` by PyTorch's CPU build (MKL linked in), as
    ``mkl_cbwr_get`` by a build against a shared MKL; None without MKL."""
    import ctypes

    candidates = [os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"), None]
    for path in candidates:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("mkl_serv_cbwr_get", "mkl_cbwr_get"):
            function = getattr(library, name, None)
            if function is not None:
                function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
                return function
    return None


def mkl_cnr() -> str | None:
    """MKL's conditional numerical reproducibility mode in this process: ``"off"`` (MKL's default: results
    may differ from run to run), a branch such as ``"auto"`` (``+strict`` when strict), or None when
    torch does not compute with MKL. Fixed at MKL's first computation (``prefect_recovery.reproducible_kernels``
    asks for ``auto`` at import)."""
    if not torch.backends.mkl.is_available():
        return None
    get = _mkl_cbwr_get()
    if get is None:
        return None
    mode = get(-1)  # MKL_CBWR_ALL: the branch and the strict flag
    branch = _MKL_CBWR_BRANCHES.get(mode & ~_MKL_CBWR_STRICT, str(mode & ~_MKL_CBWR_STRICT))
    return branch + ("+strict" if mode & _MKL_CBWR_STRICT else "")


def execution_fingerprint() -> dict[str, Any]:
    """What decides *how* this process computes (not *what*): the CPU, the instruction set ATen dispatches to,
    thread pools, matmul precision and the kernel-selecting environment variables.

    Not restored on resume (a checkpoint cannot move a process to another CPU); recorded with every checkpoint
    so that ``history --against`` can say, when two runs of the same state diverge by rounding, whether their
    processes computed differently. Cheap: the CPU model is read once per process.
    """
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        affinity = None
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_allowed": affinity,
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "mkl_cnr": mkl_cnr(),
        "environment": {
            name: value for name, value in sorted(os.environ.items()) if name.startswith(NUMERIC_ENV_PREFIXES)
        },
    }


def fingerprint_differences(a: Any, b: Any) -> dict[str, list[Any]]:
    """``{field: [value in a, value in b]}`` for each field of two recorded fingerprints that differs
    (environment variables as ``environment.NAME``); empty when either was not recorded."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return {}
    flat_a, flat_b = _flatten(a), _flatten(b)
    return {name: [flat_a.get(name), flat_b.get(name)] for name in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(name) != flat_b.get(name)}  # fmt: skip


def _flatten(fingerprint: dict[str, Any]) -> dict[str, Any]:
    flat = {name: value for name, value in fingerprint.items() if name != "environment"}
    environment = fingerprint.get("environment")
    if isinstance(environment, dict):
        flat |= {f"environment.{name}": value for name, value in environment.items()}
    return flat
