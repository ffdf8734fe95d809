"""Fault injection for tests/test_faults.py: a wrapping fsspec filesystem, a syscall tracer, a saver.

``faulty://`` (``FaultyFileSystem``) is a real fsspec filesystem over a local directory that
behaves like an object store: no directories of its own, and ``pipe_file(mode="create")`` is
atomic and create-only (the bytes go to an invisible ``.faulty-upload-*`` file first and are
``link()``-ed to the final name, so a failed or cut-off PUT leaves nothing under the final name,
like an abandoned multipart upload). ``open_region("faulty:///abs/path")`` builds a plain
``RegionIO`` over it, so the store runs its object-store code path (retries included) against
it. Each test configures what goes wrong with ``Rule``s on a ``Faults`` controller, matched by
operation and path glob:

* ``raise``: raise an error instead of doing the operation (ConnectionRefusedError, a 503, a 403...);
* ``partial``: write part of a PUT, then raise (``atomic=False``: the torn part stays under the
  final name, like a backend without atomic uploads);
* ``after``: do the operation, then raise (a lost answer: the PUT landed, the client saw a timeout);
* ``delay`` / ``block`` / ``barrier``: sleep, wait for a ``threading.Event`` or a ``threading.Barrier``;
* ``kill``: SIGKILL this process before, in the middle of (``mid``) or after the operation.

Every call is logged (``Faults.calls``), so tests count attempts and reads.

``SyscallTracer`` wraps ``os.open/write/fsync/link/unlink/mkdir/close`` (the calls
``LocalRegionIO`` makes) for paths under some roots: it records their order, can kill the
process at the k-th one, and can emulate a disk with ``free_bytes`` left (short writes, then
ENOSPC). ``crash_image`` replays a recorded prefix on a model of what is durable (data after
``fsync(file)``, directory entries after ``fsync(dir)``) to build what a power loss at that point
could leave on disk.

Run as a script, it is the subprocess saver of the fault suite:

``killsaves CONFIG.json``
    One run per config entry, each in a freshly forked child of this (single-threaded) process:
    commit ``state_for(tag)`` to the regions, with a SIGKILL armed at the ``index``-th I/O
    operation (``layer: fs``: faulty:// PUT/DELETE; ``layer: os``: the syscalls above). One JSON
    line per run: ``{"status": "killed"|"finished"|"error", "ops": [...], "version": ...}``.
``skewsave SKEW_SECONDS CONFIG.json``
    Commit one version (and append one journal event) with this process's wall clock moved by
    SKEW_SECONDS (``datetime.datetime.now`` is shifted before prefect_recovery is imported;
    ``faketime`` is not installed here).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOL = "faulty"
UPLOAD_PREFIX = ".faulty-upload-"
CHUNK = 1024
WRITES = ("pipe_file", "rm_file")


# -- errors a cloud SDK raises ---------------------------------------------------------------------
class ServiceUnavailable(Exception):
    """A 5xx answer, shaped like an SDK error: ``status_code`` carries the HTTP status."""

    def __init__(self, status_code: int = 503, message: str = "Service Unavailable"):
        super().__init__(f"{status_code} {message}")
        self.status_code = status_code


class Forbidden(PermissionError):
    """A 403 answer (s3fs/gcsfs raise PermissionError for it)."""

    def __init__(self, message: str = "403 Forbidden: the credentials lost access to the bucket"):
        super().__init__(errno.EACCES, message)
        self.status_code = 403


def connection_refused() -> BaseException:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def service_unavailable() -> BaseException:
    return ServiceUnavailable(503)


def forbidden() -> BaseException:
    return Forbidden()


def disk_full() -> BaseException:
    return OSError(errno.ENOSPC, "No space left on device")


def timed_out() -> BaseException:
    return TimeoutError("timed out waiting for the answer")


def connection_reset() -> BaseException:
    return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


# -- rules and the controller ----------------------------------------------------------------------
@dataclass
class Rule:
    """What goes wrong for the calls matching ``op`` (name, tuple of names or "*") and ``path``."""

    op: str | tuple[str, ...] = "*"
    path: str = "*"
    action: str = "raise"  # raise | partial | after | delay | block | barrier | kill
    error: Callable[[], BaseException] | None = None
    times: int | None = None  # fire at most this often (None: every time)
    skip: int = 0  # let this many matching calls through first
    per_path: bool = False  # count skip/times for each path separately
    delay: float = 0.0
    event: threading.Event | None = None
    barrier: threading.Barrier | None = None
    fraction: float = 0.5  # partial / kill mid: share of the data written first
    atomic: bool = True  # partial: a failed PUT leaves nothing (object-store semantics)
    phase: str = "before"  # kill: before | mid | after
    enabled: bool = True
    seen: Counter = field(default_factory=Counter)
    fired: Counter = field(default_factory=Counter)

    def matches(self, op: str, path: str) -> bool:
        ops = (self.op,) if isinstance(self.op, str) else self.op
        return self.enabled and ("*" in ops or op in ops) and fnmatch.fnmatchcase(path, self.path)

    def make_error(self) -> BaseException:
        return (self.error or connection_refused)()


@dataclass
class Call:
    op: str
    path: str
    outcome: str  # "ok", an exception type name, or "fault:<action>"


class Faults:
    """The rules of one test and the log of every call the faulty filesystem served."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.rules: list[Rule] = []
        self.log: list[Call] = []
        self._lock = threading.Lock()

    def add(self, rule: Rule | None = None, /, **kwargs: Any) -> Rule:
        rule = rule or Rule(**kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule, releasing whatever waits on one of them."""
        with self._lock:
            rules, self.rules = self.rules, []
        for rule in rules:
            if rule.event is not None:
                rule.event.set()
            if rule.barrier is not None:
                rule.barrier.abort()

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    def pick(self, op: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(op, path):
                    continue
                counter = path if rule.per_path else ""
                rule.seen[counter] += 1
                if rule.seen[counter] <= rule.skip:
                    continue
                if rule.times is not None and rule.fired[counter] >= rule.times:
                    continue
                rule.fired[counter] += 1
                return rule
        return None

    def record(self, op: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append(Call(op, path, outcome))

    def calls(self, op: str | Iterable[str] = "*", path: str = "*", outcome: str | None = None) -> list[Call]:
        ops = {op} if isinstance(op, str) else set(op)
        with self._lock:
            return [
                call
                for call in self.log
                if ("*" in ops or call.op in ops)
                and fnmatch.fnmatchcase(call.path, path)
                and (outcome is None or call.outcome == outcome)
            ]


CONTROLLERS: dict[str, Faults] = {"default": Faults()}


def controller(name: str = "default") -> Faults:
    if name not in CONTROLLERS:
        CONTROLLERS[name] = Faults(name)
    return CONTROLLERS[name]


def new_controller() -> Faults:
    return controller(uuid.uuid4().hex)


def drop_controller(faults: Faults) -> None:
    faults.clear()
    CONTROLLERS.pop(faults.name, None)


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


# -- the filesystem -------------------------------------------------------------------------------
class FaultyFileSystem(AbstractFileSystem):
    """An object-store-like fsspec filesystem over local paths, with injected faults."""

    protocol = PROTOCOL
    root_marker = "/"
    cachable = False

    def __init__(self, faults: str = "default", **kwargs: Any):
        super().__init__(**kwargs)
        self.faults = controller(faults)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        path = path.rstrip("/")
        return path or "/"

    # every operation goes through here
    def _run(self, op: str, path: str, fn: Callable[[], Any]) -> Any:
        rule = self.faults.pick(op, path)
        if rule is not None:
            action = rule.action
            if action == "raise":
                self.faults.record(op, path, "fault:raise")
                raise rule.make_error()
            if action == "delay":
                time.sleep(rule.delay)
            elif action == "block":
                assert rule.event is not None
                rule.event.wait(timeout=rule.delay or 60)
            elif action == "barrier":
                assert rule.barrier is not None
                rule.barrier.wait(timeout=rule.delay or 30)
            elif action == "kill" and rule.phase == "before":
                _kill_self()
            elif action in ("partial", "after", "kill"):
                pass  # handled by the operation itself (PUTs) or below
            else:
                raise AssertionError(f"unknown action {action!r}")
        try:
            result = fn(rule) if op in WRITES else fn()
        except BaseException as exc:
            self.faults.record(op, path, type(exc).__name__)
            raise
        if rule is not None and rule.action == "after":
            self.faults.record(op, path, "fault:after")
            raise rule.make_error()
        if rule is not None and rule.action == "kill":  # phase "after" (and "mid" of a non-PUT)
            _kill_self()
        self.faults.record(op, path, "ok")
        return result

    @staticmethod
    def _hidden(name: str) -> bool:
        return name.rsplit("/", 1)[-1].startswith(UPLOAD_PREFIX)

    def ls(self, path: str, detail: bool = False, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)

        def go() -> list[Any]:
            if not os.path.isdir(path):
                if os.path.isfile(path):
                    return [self._info(path)] if detail else [path]
                raise FileNotFoundError(path)
            names = sorted(n for n in os.listdir(path) if not self._hidden(n))
            full = [f"{path.rstrip('/')}/{n}" for n in names]
            return [self._info(p) for p in full] if detail else full

        return self._run("ls", path, go)

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kw: Any):
        path = self._strip_protocol(path)

        def go() -> Any:
            found = []
            for dirpath, _dirs, files in os.walk(path):
                found.extend(f"{dirpath}/{f}" for f in files if not self._hidden(f))
            found.sort()
            return {p: self._info(p) for p in found} if detail else found

        return self._run("find", path, go)

    def _info(self, path: str) -> dict[str, Any]:
        st = os.stat(path)
        kind = "directory" if os.path.isdir(path) else "file"
        return {"name": path, "size": st.st_size if kind == "file" else 0, "type": kind}

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return self._run("info", path, lambda: self._info(path))

    def size(self, path: str) -> int:
        path = self._strip_protocol(path)

        def go() -> int:
            if self._hidden(path) or os.path.isdir(path):
                raise FileNotFoundError(path)
            return os.stat(path).st_size

        return self._run("size", path, go)

    def exists(self, path: str, **kwargs: Any) -> bool:
        path = self._strip_protocol(path)
        return self._run("exists", path, lambda: not self._hidden(path) and os.path.isfile(path))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)

        def go() -> bytes:
            if self._hidden(path) or os.path.isdir(path):
                raise FileNotFoundError(path)
            with open(path, "rb") as handle:
                data = handle.read()
            return data[start:end]

        return self._run("cat_file", path, go)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        data = bytes(value)

        def go(rule: Rule | None = None) -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # object stores have no directories
            if rule is not None and rule.action not in ("partial", "kill"):
                rule = None  # the other actions happen around the PUT, not inside it
            if rule is not None and rule.action == "kill" and rule.phase != "mid":
                rule = None
            cut = None if rule is None else int(len(data) * rule.fraction)
            if rule is not None and rule.action == "partial" and not rule.atomic:
                # a backend without atomic uploads: the torn object stays under its final name
                with open(path, "xb" if mode == "create" else "wb") as handle:
                    handle.write(data[:cut])
                raise rule.make_error()
            upload = f"{os.path.dirname(path)}/{UPLOAD_PREFIX}{uuid.uuid4().hex}"
            try:
                with open(upload, "xb") as handle:
                    if rule is not None:
                        handle.write(data[:cut])
                        handle.flush()
                        if rule.action == "kill":
                            _kill_self()  # phase "mid": an upload cut off by the client's death
                        raise rule.make_error()  # "partial": the connection broke mid-upload
                    handle.write(data)
                if mode == "create":
                    os.link(upload, path)  # atomic, and FileExistsError if the object exists
                else:
                    os.replace(upload, path)
                    upload = ""
            finally:
                if upload:
                    try:
                        os.unlink(upload)
                    except FileNotFoundError:
                        pass

        return self._run("pipe_file", path, go)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)

        def go(rule: Rule | None = None) -> None:
            if os.path.isdir(path):
                raise FileNotFoundError(path)
            os.unlink(path)

        return self._run("rm_file", path, go)

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


def faulty_url(path: Path | str) -> str:
    return f"{PROTOCOL}://{Path(path).absolute()}"


def region(path: Path | str, faults: Faults | str = "default", attempts: int | None = None):
    """A plain ``RegionIO`` over ``faulty://path`` (``attempts``: its retry budget, first try included)."""
    from prefect_recovery.core import open_region

    name = faults if isinstance(faults, str) else faults.name
    io = open_region(faulty_url(path), {"faults": name})
    assert type(io).__name__ == "RegionIO", io
    if attempts is not None:
        io.retry_attempts = attempts
    return io


# -- syscalls of local regions ---------------------------------------------------------------------
class SyscallTracer:
    """Wrap the ``os`` calls ``LocalRegionIO`` makes, for paths under ``roots`` only.

    Records the order of state-changing calls (``create`` = ``os.open(O_CREAT)``, ``write``,
    ``fsync``, ``link``, ``unlink``, ``mkdir``), serialized under one lock so the record is a
    true order. ``on_op(index, op, phase)`` runs before and after each (it may raise or kill).
    ``free_bytes``: bytes the disk can still take; a write past it is short, the next raises
    ENOSPC (None: unlimited).
    """

    NAMES = ("open", "write", "fsync", "link", "unlink", "mkdir", "close")

    def __init__(
        self,
        roots: Iterable[Path | str],
        on_op: Callable[[int, tuple, str], None] | None = None,
        free_bytes: int | None = None,
    ):
        self.roots = [os.path.abspath(os.fspath(r)) for r in roots]
        self.on_op = on_op
        self.free_bytes = free_bytes
        self.ops: list[tuple] = []
        self._fds: dict[int, tuple[str, bool]] = {}
        self._lock = threading.RLock()
        self._real: dict[str, Any] = {}

    def _mine(self, path: Any) -> str | None:
        try:
            text = os.path.abspath(os.fspath(path))
        except TypeError:
            return None
        return text if any(text == r or text.startswith(r + os.sep) for r in self.roots) else None

    def _do(self, op: tuple, fn: Callable[[], Any]) -> Any:
        index = len(self.ops)
        if self.on_op:
            self.on_op(index, op, "before")
        result = fn()
        if op[0] == "write":
            op = (*op[:2], op[2][:result])  # what was really written
        self.ops.append(op)
        if self.on_op:
            self.on_op(index, op, "after")
        return result

    def install(self) -> SyscallTracer:
        real = self._real = {name: getattr(os, name) for name in self.NAMES}

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            mine = self._mine(path) if dir_fd is None else None
            if mine is None:
                return real["open"](path, flags, mode, dir_fd=dir_fd)
            with self._lock:
                if flags & os.O_CREAT:
                    fd = self._do(("create", mine), lambda: real["open"](path, flags, mode))
                else:
                    fd = real["open"](path, flags, mode)
                self._fds[fd] = (mine, bool(flags & getattr(os, "O_DIRECTORY", 0)))
                return fd

        def write(fd, data):
            with self._lock:
                if fd not in self._fds:
                    return real["write"](fd, data)
                view = memoryview(data).cast("B")
                if self.free_bytes is not None:
                    if self.free_bytes <= 0:
                        raise disk_full()
                    view = view[: self.free_bytes]
                path = self._fds[fd][0]
                written = self._do(("write", path, bytes(view)), lambda: real["write"](fd, view))
                if self.free_bytes is not None:
                    self.free_bytes -= written
                return written

        def fsync(fd):
            with self._lock:
                if fd not in self._fds:
                    return real["fsync"](fd)
                path, is_dir = self._fds[fd]
                return self._do(("fsync", path, is_dir), lambda: real["fsync"](fd))

        def link(src, dst, *args, **kwargs):
            mine = self._mine(dst)
            if mine is None or args or kwargs:
                return real["link"](src, dst, *args, **kwargs)
            with self._lock:
                return self._do(("link", self._mine(src), mine), lambda: real["link"](src, dst))

        def unlink(path, *, dir_fd=None):
            mine = self._mine(path) if dir_fd is None else None
            if mine is None:
                return real["unlink"](path, dir_fd=dir_fd)
            with self._lock:
                return self._do(("unlink", mine), lambda: real["unlink"](path))

        def mkdir(path, mode=0o777, *, dir_fd=None):
            mine = self._mine(path) if dir_fd is None else None
            if mine is None:
                return real["mkdir"](path, mode, dir_fd=dir_fd)
            with self._lock:
                return self._do(("mkdir", mine), lambda: real["mkdir"](path, mode))

        def close(fd):
            with self._lock:
                self._fds.pop(fd, None)
                return real["close"](fd)

        for name, fn in zip(self.NAMES, (open_, write, fsync, link, unlink, mkdir, close), strict=True):
            setattr(os, name, fn)
        return self

    def uninstall(self) -> None:
        for name, fn in self._real.items():
            setattr(os, name, fn)
        self._real = {}

    def __enter__(self) -> SyscallTracer:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


class _Inode:
    def __init__(self, is_dir: bool, content: bytes = b"", entries: dict[str, _Inode] | None = None):
        self.is_dir = is_dir
        self.volatile = bytearray(content)
        self.durable = bytes(content)
        self.entries: dict[str, _Inode] = dict(entries or {})  # volatile directory entries
        self.durable_entries: dict[str, _Inode] = dict(entries or {})


def _snapshot(path: Path) -> _Inode:
    if path.is_dir():
        children = {child.name: _snapshot(child) for child in sorted(path.iterdir())}
        return _Inode(True, entries=children)
    return _Inode(False, path.read_bytes())


def crash_image(base: Path, initial: _Inode, ops: list[tuple], out: Path) -> None:
    """Write to ``out`` what a power loss right after ``ops`` could leave of ``base``.

    Model (the POSIX minimum, pessimistic): a file's bytes survive only as of its last
    ``fsync(fd)``; a directory entry (create, link, unlink, mkdir) survives only once its
    directory was ``fsync``ed. ``initial`` is the (fully durable) snapshot of ``base`` before the ops.
    """
    import copy

    root = copy.deepcopy(initial)
    base_text = os.path.abspath(base)
    fds_inode: dict[str, _Inode] = {}

    def parent_and_name(path: str) -> tuple[_Inode, str]:
        rel = os.path.relpath(path, base_text).split(os.sep)
        node = root
        for part in rel[:-1]:
            node = node.entries[part]
        return node, rel[-1]

    def lookup(path: str) -> _Inode:
        if os.path.abspath(path) == base_text:
            return root
        parent, name = parent_and_name(path)
        return parent.entries[name]

    for op in ops:
        kind = op[0]
        if kind == "mkdir":
            parent, name = parent_and_name(op[1])
            parent.entries[name] = _Inode(True)
        elif kind == "create":
            parent, name = parent_and_name(op[1])
            node = _Inode(False)
            node.durable = b""
            parent.entries[name] = node
            fds_inode[op[1]] = node
        elif kind == "write":
            fds_inode[op[1]].volatile += op[2]  # by the path the file was created under
        elif kind == "fsync":
            node = fds_inode.get(op[1]) if not op[2] else None
            node = node or lookup(op[1])
            if node.is_dir:
                node.durable_entries = dict(node.entries)
            else:
                node.durable = bytes(node.volatile)
        elif kind == "link":
            parent, name = parent_and_name(op[2])
            parent.entries[name] = lookup(op[1])
        elif kind == "unlink":
            parent, name = parent_and_name(op[1])
            del parent.entries[name]
        else:
            raise AssertionError(op)

    def materialize(node: _Inode, where: Path) -> None:
        if node.is_dir:
            where.mkdir(parents=True, exist_ok=True)
            for name, child in node.durable_entries.items():
                materialize(child, where / name)
        else:
            where.write_bytes(node.durable)

    materialize(root, out)


def snapshot(base: Path) -> _Inode:
    """The durable model of ``base`` as it is now (everything on it counts as synced)."""
    return _snapshot(base)


# -- deterministic states --------------------------------------------------------------------------
SHARED = bytes(range(256)) * 4


def state_for(tag: str) -> dict[str, bytes]:
    """The state a saver commits for ``tag``: 3 chunks of its own and one chunk every tag shares."""
    return {"w": random.Random(f"state-{tag}").randbytes(2 * CHUNK + 500), "shared": SHARED}


def plans(state: dict[str, bytes]) -> list[Any]:
    from prefect_recovery.core import EntryPlan

    return [EntryPlan(name=name, kind="bytes", data=memoryview(data)) for name, data in state.items()]


def _regions(urls: list[str]) -> list[Any]:
    from prefect_recovery.core import open_region

    return [open_region(url) for url in urls]


# -- the subprocess saver --------------------------------------------------------------------------
def _killsave_child(run: dict[str, Any], report: int) -> None:
    from prefect_recovery.core import Store

    ops: list[str] = []
    kill = run.get("kill")
    tracer = None
    if run["layer"] == "os":

        def on_op(index: int, op: tuple, phase: str) -> None:
            if phase == "before":
                ops.append(op[0])
                os.write(report, (json.dumps({"op": [op[0], index]}) + "\n").encode())
            if kill and index == kill["index"] and phase == kill["phase"]:
                _kill_self()

        tracer = SyscallTracer(run["roots"], on_op=on_op)
    else:
        faults = controller()
        faults.clear()

        if kill:
            faults.add(op=WRITES, action="kill", skip=kill["index"], times=1, phase=kill["phase"])
    store = Store(_regions(run["regions"]), write_quorum=run["quorum"], chunk_bytes=CHUNK, io_threads=2)
    if tracer:
        tracer.install()
    info = store.commit(run["lineage"], plans(state_for(run["tag"])), step=run.get("step"))
    if tracer:
        tracer.uninstall()
    if run["layer"] == "fs":
        ops = [f"{c.op}:{c.outcome}" for c in controller().calls(WRITES)]
    os.write(report, (json.dumps({"done": info.version, "ops": ops}) + "\n").encode())


def killsaves(config: dict[str, Any]) -> None:
    import prefect_recovery.core  # noqa: F401  (once, here, rather than in every child)

    for run in config["runs"]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one save, killed or not
            os.close(read_end)
            code = 0
            try:
                _killsave_child(run, write_end)
            except BaseException as exc:
                os.write(write_end, (json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
                code = 3
            finally:
                os._exit(code)
        os.close(write_end)
        chunks = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        lines = [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line]
        result: dict[str, Any] = {"run": run.get("id"), "ops": []}
        for line in lines:
            if "op" in line:
                result["ops"].append(line["op"][0])
            if "done" in line:
                result["version"] = line["done"]
                if line["ops"]:
                    result["ops"] = line["ops"]
            if "error" in line:
                result["error"] = line["error"]
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            result["status"] = "killed"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            result["status"] = "finished"
        else:
            result["status"] = "error"
        print(json.dumps(result), flush=True)


def skewsave(skew: float, config: dict[str, Any]) -> None:
    import datetime as datetime_module

    real = datetime_module.datetime

    class SkewedDatetime(real):  # type: ignore[misc, valid-type]
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return real.now(tz) + datetime_module.timedelta(seconds=skew)

    datetime_module.datetime = SkewedDatetime  # before prefect_recovery binds the name
    assert "prefect_recovery.core.store" not in sys.modules
    from prefect_recovery.core import Journal, Store

    store = Store(_regions(config["regions"]), write_quorum=config["quorum"], chunk_bytes=CHUNK)
    info = store.commit(config["lineage"], plans(state_for(config["tag"])), step=config.get("step"))
    event = Journal(store, config["lineage"]).append(
        "checkpoint_committed",
        run_id=f"skewed-{skew}",
        data={"version": info.version, "step": info.step, "trigger": "manual", "tier": "heavy", "regions": []},
    )
    print(json.dumps({"version": info.version, "created_at": info.created_at, "seq": event.seq, "time": event.time}))


if __name__ == "__main__":
    if sys.argv[1] == "killsaves":
        killsaves(json.loads(Path(sys.argv[2]).read_text()))
    elif sys.argv[1] == "skewsave":
        skewsave(float(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
