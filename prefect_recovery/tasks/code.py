"""What code a step or a pipeline runs, as digests: for the step cache key and preflight's drift check.

A step's code is more than its function: a model class, a data transform or a helper in the
pipeline's own modules changes what it computes. ``code_modules(fn)`` is the digest of ``fn``'s
source plus the source of every *user module* it can reach: its own module, and every module
that module (transitively) refers to through a module-level name (``import mymodels``,
``from mymodels import GRU``). User modules are those outside the standard library and
installed packages (site-packages) and outside prefect-recovery itself, except a package of it
that ships pipeline code (its examples), which says so with ``__pipeline_code__ = True`` in its
``__init__``. A change anywhere in them gives a new digest: a finished step whose code changed
runs again, and preflight names the modules that changed.
"""

from __future__ import annotations

import functools
import inspect
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.digest import hash_bytes
from ..core.manifest import canonical_json

FUNCTION_KEY = "<function>"


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots |= {str(Path(p).resolve()) for p in roots}
    return tuple(sorted(roots))


def module_name(module: types.ModuleType) -> str:
    """The importable name (``python -m pkg.mod`` and ``python pkg/mod.py`` run as ``__main__``)."""
    name = module.__name__
    if name == "__main__":
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.name:
            return spec.name
        file = getattr(module, "__file__", None)
        return Path(file).stem if file else name
    return name


def _ships_pipeline_code(name: str) -> bool:
    """Whether module ``name`` is in a package marked ``__pipeline_code__ = True`` (or is one)."""
    parts = name.split(".")
    return any(
        getattr(sys.modules.get(".".join(parts[:end])), "__pipeline_code__", False) is True
        for end in range(1, len(parts) + 1)
    )


def is_user_module(module: types.ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return False
    name = module_name(module)
    # prefect-recovery's own modules are the library, not the pipeline; a package of it that ships
    # a pipeline (its examples) is pipeline code like the user's.
    if name.split(".")[0] == "prefect_recovery" and not _ships_pipeline_code(name):
        return False
    resolved = str(Path(file).resolve())
    return not any(resolved.startswith(root + "/") for root in _library_roots())


def _source_digest(module: types.ModuleType) -> str:
    try:
        return hash_bytes(Path(module.__file__).read_bytes())  # type: ignore[arg-type]
    except OSError:
        return hash_bytes(repr(sorted(vars(module))).encode())


def _referenced_modules(module: types.ModuleType) -> list[types.ModuleType]:
    found = []
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            found.append(value)
            continue
        try:
            owner = getattr(value, "__module__", None)
        except Exception:  # a proxy object whose attribute access fails: not code we can name
            continue
        if isinstance(owner, str) and owner in sys.modules and (inspect.isclass(value) or callable(value)):
            found.append(sys.modules[owner])
    return found


def _function_source(fn: Callable[..., Any]) -> bytes:
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = fn.__code__
        return code.co_code + repr(code.co_consts).encode()


def code_modules(fn: Callable[..., Any]) -> dict[str, str]:
    """``{"<function>": digest of fn's source, module name: digest of its file, ...}`` for the
    user modules ``fn`` can reach (see the module docstring)."""
    units = {FUNCTION_KEY: hash_bytes(_function_source(fn))}
    start = sys.modules.get(getattr(fn, "__module__", "") or "")
    pending = [start] if start is not None else []
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module is None or not is_user_module(module):
            continue
        name = module_name(module)
        if name in seen:
            continue
        seen.add(name)
        units[name] = _source_digest(module)
        pending.extend(_referenced_modules(module))
    return units


def digest_of(units: dict[str, str]) -> str:
    return hash_bytes(canonical_json(units))


def changed_units(recorded: dict[str, Any], now: dict[str, str]) -> list[str]:
    """Human names of what differs: ``mymodels.py`` (changed), ``+new_mod`` / ``-old_mod``."""
    changes = []
    for name in sorted(set(recorded) | set(now)):
        label = "the function itself" if name == FUNCTION_KEY else f"module {name}"
        if name not in now:
            changes.append(f"{label} (no longer used)")
        elif name not in recorded:
            changes.append(f"{label} (new)")
        elif recorded[name] != now[name]:
            changes.append(f"{label} (changed)")
    return changes


__all__ = ["FUNCTION_KEY", "changed_units", "code_modules", "digest_of", "is_user_module", "module_name"]
