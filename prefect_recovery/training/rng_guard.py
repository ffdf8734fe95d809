"""The global random generators belong to the training thread while a Checkpointer is open.

A checkpoint captures Python's ``random``, NumPy's legacy global ``RandomState`` and torch's
default CPU generator (DESIGN.md invariant 6). Any *other* thread that draws from them (a
websocket's ping payload, retry jitter, a heartbeat, a user's logging thread, a dependency
added next year) moves the state the next checkpoint captures, at a moment that depends on
timing, and a resumed run then differs from one that never failed. A fixed list of "modules
known to do that" cannot keep up, so the guard confines the generators by *thread* instead:

- **Python** ``random``: the module's shared instance is re-classed to ``ThreadConfinedRandom``,
  whose primitives (``random``, ``getrandbits``, ``seed``, ``getstate``, ``setstate``,
  ``gauss``) serve a thread that is not an owner from a private per-thread generator. Every
  other method (``randint``, ``choice``, ``shuffle``, ``uniform``, ...) is built on those, and
  the module-level names bound to the shared instance are re-bound, so ``random.X()`` from
  any module is covered.
- **NumPy**: the legacy module-level functions (``np.random.rand``, ``np.random.shuffle``, ...)
  are re-bound the same way; other threads get a private ``RandomState``.
- **torch**: the default CPU generator lives in C++ and cannot be confined from Python: a draw
  (``torch.rand``, dropout) on another thread moves it unseen. What *can* be seen is another thread
  seeding or setting it (``torch.manual_seed``, ``torch.seed``, ``torch.set_rng_state``, and so
  ``torch.random.fork_rng``'s restore): such a call is not applied (it would reset the training's
  generator) and is recorded; the next ``step()`` warns, or raises in strict mode, since a thread
  that seeds the shared generator most likely draws from it too. On a thread the Checkpointer runs
  user code on itself (a commit hook on the checkpoint writer), a thread-local torch function mode
  (``confine_torch``) serves draws that take ``generator=`` privately and names the others. The
  Checkpointer also compares the three generators before and after its own work on the training
  thread (``OwnWork``), so a save, a commit hook or an event that draws from them is undone, or
  named in strict mode. Two threads that both own the generators (two trainings in one process)
  are named at the next ``step()``.

Owners are the threads inside an open ``Checkpointer``; with no owner the generators behave
as usual. A Python or NumPy draw from another thread is served privately (so it cannot change
the training) and recorded as an ``Interference`` in ``Checkpointer.rng_interference``; a torch
seeding call from another thread is refused and reported: a warning, or in strict mode a
``DeterminismError`` naming the step, the generator, the thread and the caller.
Not covered: code that bound a function before the guard was installed
(``from random import random``, ``from torch import manual_seed``), ``numpy.random.mtrand._rand``
used directly, and torch draws on a thread the Checkpointer does not run (a user's or a library's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("prefect_recovery.checkpointer")


@dataclass(frozen=True)
class Interference:
    """A draw from a guarded global generator by a thread that does not own it."""

    generator: str  # "python", "numpy" or "torch"
    function: str  # e.g. "getrandbits", "rand", "manual_seed"
    thread: str  # the drawing thread's name
    caller: str  # "file:line" of the code that drew
    # Served from the thread's private generator (False: it reached, or tried to reset, the training's own).
    confined: bool = True

    def describe(self) -> str:
        return f"{self.generator} global RNG ({self.function}) used by thread {self.thread!r} at {self.caller}"


_lock = threading.Lock()
_owners: dict[int, int] = {}  # thread ident -> how many open Checkpointers it holds
_owner_names: dict[int, str] = {}  # thread ident -> its name, to say which other thread shares the generators
_shared_reported: set[int] = set()  # id() of Checkpointers already warned that another thread also owns them
_seen: list[Interference] = []
_private = threading.local()
_installed: dict[str, Any] = {}


def _foreign() -> bool:
    return bool(_owners) and threading.get_ident() not in _owners


def _record(generator: str, function: str, *, confined: bool = True) -> None:
    frame = sys._getframe(2)
    torch = sys.modules.get("torch")
    torch_dir = os.path.dirname(torch.__file__) + os.sep if torch is not None and torch.__file__ else None
    # skip frames inside random.py / torch / our wrappers so the caller is the code that asked
    while frame.f_back is not None and (
        frame.f_code.co_filename in (random.__file__, __file__, contextlib.__file__)
        or frame.f_code.co_filename.endswith(_TORCH_RANDOM)
        or (torch_dir is not None and frame.f_code.co_filename.startswith(torch_dir))
    ):
        frame = frame.f_back
    entry = Interference(
        generator,
        function,
        threading.current_thread().name,
        f"{frame.f_code.co_filename}:{frame.f_lineno}",
        confined,
    )
    with _lock:
        if len(_seen) < 1000:
            _seen.append(entry)


def _private_random() -> random.Random:
    generator = getattr(_private, "python", None)
    if generator is None:
        generator = _private.python = random.Random(os.urandom(16))
    return generator


def _private_numpy() -> np.random.RandomState:
    generator = getattr(_private, "numpy", None)
    if generator is None:
        generator = _private.numpy = np.random.RandomState(int.from_bytes(os.urandom(4), "little"))
    return generator


class ThreadConfinedRandom(random.Random):
    """``random.Random`` whose primitives serve non-owner threads from a private generator."""

    def random(self) -> float:
        if _foreign():
            _record("python", "random")
            return _private_random().random()
        return super().random()

    def getrandbits(self, k: int) -> int:
        if _foreign():
            _record("python", "getrandbits")
            return _private_random().getrandbits(k)
        return super().getrandbits(k)

    def seed(self, a: Any = None, version: int = 2) -> None:
        if _foreign():
            _record("python", "seed")
            return _private_random().seed(a, version)
        return super().seed(a, version)

    def getstate(self) -> Any:
        if _foreign():
            return _private_random().getstate()
        return super().getstate()

    def setstate(self, state: Any) -> None:
        if _foreign():
            _record("python", "setstate")
            return _private_random().setstate(state)
        return super().setstate(state)

    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        if _foreign():  # gauss caches a second value on the instance: keep it off the shared one
            _record("python", "gauss")
            return _private_random().gauss(mu, sigma)
        return super().gauss(mu, sigma)


def _numpy_dispatcher(name: str, shared: Any) -> Any:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if _foreign():
            if name not in ("get_state",):
                _record("numpy", name)
            return getattr(_private_numpy(), name)(*args, **kwargs)
        return shared(*args, **kwargs)

    dispatch.__name__ = name
    dispatch.__doc__ = getattr(shared, "__doc__", None)
    dispatch.__wrapped__ = shared  # type: ignore[attr-defined]
    return dispatch


# Module functions of numpy.random that use the shared RandomState without being its bound
# methods, and the RandomState method a private generator answers them with.
_NUMPY_MODULE_FUNCTIONS = {"seed": "seed", "ranf": "random_sample", "sample": "random_sample"}


# torch's Python-level functions that reset the default CPU generator; each takes effect for every thread.
_TORCH_SETTERS = ("manual_seed", "seed", "set_rng_state")
_TORCH_RANDOM = os.path.join("torch", "random.py")  # fork_rng's restore is reported at its caller


def _private_torch() -> Any:
    generator = getattr(_private, "torch", None)
    if generator is None:
        import torch

        generator = _private.torch = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


# torch functions and Tensor methods that draw from the default generator unless given ``generator=``, and
# those that cannot be given one (confine_torch serves the first kind privately and reports the second).
_TORCH_DRAWS = frozenset(
    [
        "rand",
        "randn",
        "randint",
        "randperm",
        "rand_like",
        "randn_like",
        "randint_like",
        "normal",
        "bernoulli",
        "multinomial",
        "poisson",
        "normal_",
        "uniform_",
        "bernoulli_",
        "random_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
        "sparse_",
    ]
)
_TORCH_UNCONFINABLE = frozenset(
    [
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "native_dropout",
        "rrelu",
        "rrelu_",
        "gumbel_softmax",
        "fractional_max_pool2d",
        "fractional_max_pool3d",
    ]
)
_confine_mode: Any = None


def _torch_confining_mode() -> Any:
    """A ``TorchFunctionMode`` (thread-local, like every torch function mode) that serves the calling thread's
    torch draws from its private generator."""
    global _confine_mode
    if _confine_mode is None:
        from torch.overrides import TorchFunctionMode

        class ConfineTorch(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = dict(kwargs or {})
                name = getattr(func, "__name__", "")
                if name in _TORCH_DRAWS and kwargs.get("generator") is None:
                    try:
                        result = func(*args, **{**kwargs, "generator": _private_torch()})
                    except (TypeError, RuntimeError) as exc:  # no generator= here (or another device's): not
                        if "generator" not in str(exc):  # served privately, so reported like dropout below
                            raise
                    else:
                        _record("torch", name)
                        return result
                    _record("torch", name, confined=False)
                elif name in _TORCH_UNCONFINABLE:
                    _record("torch", name, confined=False)
                return func(*args, **kwargs)

        _confine_mode = ConfineTorch
    return _confine_mode()


@contextlib.contextmanager
def confine_torch() -> Any:
    """Run code (a commit hook on the checkpoint-writer thread) so that its torch draws cannot move the
    training's generator: a draw that takes ``generator=`` is served from this thread's private generator,
    one that cannot (dropout...) is reported at the next ``step()`` (``DeterminismError`` in strict mode).
    On a thread that owns the generators (a synchronous save's hook) it does nothing: ``OwnWork`` brackets
    that one."""
    if not _foreign() or "torch" not in sys.modules:
        yield
        return
    with _torch_confining_mode():
        yield


def _torch_setter(name: str, shared: Any) -> Any:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        if not _foreign():
            return shared(*args, **kwargs)
        # Another thread resetting the one default generator would reset the training's randomness:
        # refused (there is no per-thread default generator to send it to) and reported at the next step.
        _record("torch", name, confined=False)
        generator = _private_torch()
        if name == "manual_seed":
            return generator.manual_seed(*args, **kwargs)
        if name == "seed":
            return generator.seed()
        return None

    dispatch.__name__ = name
    dispatch.__doc__ = getattr(shared, "__doc__", None)
    dispatch.__wrapped__ = shared  # type: ignore[attr-defined]
    return dispatch


def _install() -> None:
    """Re-class Python's shared Random and re-bind the module-level names (once per process)."""
    instance = random._inst  # type: ignore[attr-defined]
    _installed["python_class"] = instance.__class__
    instance.__class__ = ThreadConfinedRandom
    python_names = {}
    for name in dir(random):
        bound = getattr(random, name)
        if getattr(bound, "__self__", None) is instance:
            python_names[name] = bound
            setattr(random, name, getattr(instance, name))
    _installed["python_names"] = python_names

    shared = np.random.mtrand._rand
    numpy_names: dict[tuple[Any, str], Any] = {}
    for module in (np.random, np.random.mtrand):
        for name in dir(module):
            bound = getattr(module, name)
            private_name = _NUMPY_MODULE_FUNCTIONS.get(name)
            if getattr(bound, "__self__", None) is shared or private_name is not None:
                numpy_names[(module, name)] = bound
                setattr(module, name, _numpy_dispatcher(private_name or name, bound))
    _installed["numpy_names"] = numpy_names

    torch_names: dict[tuple[Any, str], Any] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        for module in (torch, torch.random):
            for name in _TORCH_SETTERS:
                bound = getattr(module, name, None)
                if bound is not None:
                    torch_names[(module, name)] = bound
                    setattr(module, name, _torch_setter(name, bound))
    _installed["torch_names"] = torch_names


def _uninstall() -> None:
    random._inst.__class__ = _installed.pop("python_class")  # type: ignore[attr-defined]
    for name, bound in _installed.pop("python_names").items():
        setattr(random, name, bound)
    for (module, name), bound in _installed.pop("numpy_names").items():
        setattr(module, name, bound)
    for (module, name), bound in _installed.pop("torch_names").items():
        setattr(module, name, bound)


def claim() -> None:
    """Make the calling thread an owner of the global generators (nests)."""
    with _lock:
        if not _owners and not _installed:
            _install()
        ident = threading.get_ident()
        _owners[ident] = _owners.get(ident, 0) + 1
        _owner_names[ident] = threading.current_thread().name


def release() -> None:
    """Undo one ``claim`` of the calling thread; the last release restores the plain generators."""
    with _lock:
        ident = threading.get_ident()
        count = _owners.get(ident, 0) - 1
        if count > 0:
            _owners[ident] = count
        else:
            _owners.pop(ident, None)
            _owner_names.pop(ident, None)
        if not _owners and _installed:
            _uninstall()


def take_interference() -> list[Interference]:
    """The foreign draws recorded since the last call (and forget them)."""
    with _lock:
        seen = list(_seen)
        _seen.clear()
    return seen


class DeterminismError(RuntimeError):
    """Something other than the training moved a global RNG a checkpoint captures (strict mode)."""


def collect(checkpointer: Any, where: str) -> None:
    """Take the foreign uses recorded since the last call into ``checkpointer.rng_interference``.

    Python and NumPy draws (and torch draws under ``confine_torch``) were served privately and are only
    kept. What reached torch's shared generator is warned about, or ``DeterminismError`` in strict mode,
    naming ``where`` (the step): a seeding call from another thread (refused, but that thread most likely
    draws from the generator too, which no hook sees) and a draw that could not be given a private
    generator (dropout in a commit hook). So is a second thread that owns the generators.
    """
    seen = take_interference()
    checkpointer.rng_interference += seen
    _check_sole_owner(checkpointer, where)
    shared = [entry for entry in seen if not entry.confined]
    if not shared:
        return
    what = "; ".join(entry.describe() for entry in shared[:3]) + (" ..." if len(shared) > 3 else "")
    seeding = [entry for entry in shared if entry.function in _TORCH_SETTERS]
    why = []
    if seeding:
        why.append("the seeding call was not applied, but a thread that seeds the shared generator most likely "
                   "draws from it too, which no hook sees")  # fmt: skip
    if len(seeding) < len(shared):
        why.append("a draw that takes no generator= moved the training's generator")
    message = (
        f"{where} of {checkpointer.lineage}: {what}. torch's default generator is shared by every thread; "
        f"{'; '.join(why)}, so the training's randomness changes at a timing-dependent moment. Give that code "
        "its own torch.Generator (torch.rand(..., generator=g))."
    )
    if checkpointer.strict_determinism:
        raise DeterminismError("strict determinism: " + message)
    logger.warning(message)


def _check_sole_owner(checkpointer: Any, where: str) -> None:
    """Two trainings in two threads of one process (a thread-pool task runner running two training tasks
    at once) both own the global generators: their draws interleave at timing-dependent moments."""
    me = threading.get_ident()
    with _lock:  # only asked of an owner: step() called from another thread is not a second training
        others = sorted(name for ident, name in _owner_names.items() if ident != me) if me in _owners else []
    if not others or (id(checkpointer) in _shared_reported and not checkpointer.strict_determinism):
        return
    message = (
        f"{where} of {checkpointer.lineage}: thread(s) {', '.join(map(repr, others))} also train with a "
        "Checkpointer open in this process. The global generators (Python random, NumPy, torch) are shared by "
        "every thread that owns them, so the trainings' draws interleave at timing-dependent moments and neither "
        "run can be repeated or resumed bit-identically. Run each training in its own process (a process-based "
        "task runner, separate flow runs), or draw only from private generators passed as extras."
    )
    if checkpointer.strict_determinism:
        raise DeterminismError("strict determinism: " + message)
    with _lock:
        if len(_shared_reported) > 10000:  # ids of closed Checkpointers: bounded, a repeat warning is harmless
            _shared_reported.clear()
        _shared_reported.add(id(checkpointer))
    logger.warning(message)


class OwnWork:
    """The Checkpointer's own work on the training thread (a save, with its hooks and events).

    Draws other threads made since the last call are collected (they were served privately).
    Every global generator (torch's too) is compared before and after: the Checkpointer, its
    commit hooks and the events they send must leave the training's randomness where it was,
    or the next checkpoint would not match a run without them. A generator that moved is put
    back (and logged); in strict mode the Checkpointer raises ``DeterminismError`` instead.
    """

    def __init__(self, checkpointer: Any, what: str):
        self.checkpointer = checkpointer
        self.what = what
        self.before: dict[str, Any] = {}

    def __enter__(self) -> OwnWork:
        collect(self.checkpointer, f"before the Checkpointer's {self.what} at step {self.checkpointer.step_count}")
        self.before = _states()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        moved = _moved(self.before)
        if not moved:
            return
        _put_back(self.before, moved)
        ckpt = self.checkpointer
        where = f"the Checkpointer's {self.what} at step {ckpt.step_count} of {ckpt.lineage}"
        if ckpt.strict_determinism and exc_type is None:
            raise DeterminismError(
                f"strict determinism: the {', '.join(moved)} global RNG changed during {where} (a commit hook, "
                "an event or another thread drew from it); the training's randomness would no longer match a "
                "run without it. Use a private generator there (random.Random, np.random.default_rng, "
                "torch.Generator)."
            )
        logger.warning("the %s global RNG changed during %s; put back", ", ".join(moved), where)


def _states() -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _moved(before: dict[str, Any]) -> list[str]:
    now = _states()
    moved = []
    if now["python"] != before["python"]:
        moved.append("python")
    old, new = before["numpy"], now["numpy"]
    if not (np.array_equal(old[1], new[1]) and old[2:] == new[2:]):
        moved.append("numpy")
    if not bool((now["torch"] == before["torch"]).all()):
        moved.append("torch")
    return moved


def _put_back(before: dict[str, Any], moved: list[str]) -> None:
    import torch

    if "python" in moved:
        random.setstate(before["python"])
    if "numpy" in moved:
        np.random.set_state(before["numpy"])
    if "torch" in moved:
        torch.set_rng_state(before["torch"])
