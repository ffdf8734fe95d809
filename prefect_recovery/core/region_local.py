"""``LocalRegionIO``: a region in a directory on a local or mounted filesystem.

Create-only and atomic without any backend precondition (FORMAT.md, "Create-only writes"):
write a temp file in the target directory, fsync it, ``link()`` it to its final name (fails if
the name exists), fsync the directory. A local region never follows a symbolic link below its
root and never reads what the store did not write (a link, a directory, a FIFO in an object's
place is a ``ForeignObjectError``). It is its own module because durability on a POSIX
filesystem (fsync order, temp names GC may sweep, links) is a different problem from an object
store's preconditions and retries.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import stat
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .digest import HASH_PIECE_BYTES
from .errors import (
    ForeignObjectError,
    RegionError,
    RegionUnavailableError,
)
from .region_common import PutOutcome
from .region_object import RegionIO

# The temp names LocalRegionIO.put_if_absent makes (".tmp-<final name, 32 chars at most>-<uuid4 hex>"),
# for each kind of object of the layout (FORMAT.md, "Layout"): what garbage collection may delete.
TEMP_KEY = re.compile(
    r"(?:blobs/(?:blake3|sha256)/[0-9a-f]{2}/\.tmp-[0-9a-f]{1,32}"
    r"|lineages/[A-Za-z0-9][A-Za-z0-9._-]{0,127}/(?:manifests|journal)/\.tmp-[0-9]{12}\.json"
    r"|preflight/\.tmp-[0-9a-f]{1,32})-[0-9a-f]{32}"
)


class LocalRegionIO(RegionIO):
    """A directory on a local or mounted filesystem, with fsync-before-publish commits."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, name: str | None = None):
        super().__init__(url, storage_options, name)
        parts = urlsplit(url)
        raw = parts.path if parts.scheme in ("file", "local") else url
        self.root = Path(raw).expanduser().absolute()
        if name is None:
            self.name = str(self.root)

    def _local(self, key: str) -> Path:
        return Path(self._local_str(key))

    def _local_str(self, key: str) -> str:
        """The path of ``key``, as ``_local`` but a string: blob reads and size checks (every blob
        of a manifest, on every rank of a load) skip pathlib's parsing; the checks are the same."""
        # Keys are built by core.layout from validated parts; refuse anything else loudly.
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise RegionError(self.name, f"refusing key outside the region: {key!r}")
        # A region never follows a symbolic link below its root (the root itself may be one):
        # a link could point anywhere, so reading or writing through it leaves the region.
        parts = [p for p in key.split("/") if p]
        root = str(self.root)
        current = root
        for depth, part in enumerate(parts[:-1], start=1):
            current = os.path.join(current, part)
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(mode):
                raise ForeignObjectError(
                    self.name,
                    f"{'/'.join(parts[:depth])} is a symbolic link; a region never follows links "
                    "(they may point outside it): replace it with a directory",
                )
        return os.path.join(root, *parts)

    def _missing_root(self) -> RegionUnavailableError:
        # Never created by a save: an unmounted disk must not be replaced by the root disk unnoticed.
        return RegionUnavailableError(
            self.name,
            f"directory {self.root} does not exist: create it with `mkdir -p {self.root}` or "
            f"`prefect-recovery init --region {self.root}`, or mount the disk it lives on",
        )

    def _foreign(self, key: str, path: Path | str, what: str) -> ForeignObjectError:
        return ForeignObjectError(
            self.name, f"{key} is {what}, not an object the store wrote; it is not followed or read"
        )

    def _open_regular(self, key: str) -> tuple[int, int]:
        """Open ``key`` for reading without following a link or blocking on a FIFO: (fd, size)."""
        path = self._local_str(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._foreign(key, path, "a symbolic link") from None
            if exc.errno == errno.EISDIR:
                raise self._foreign(key, path, "a directory") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self._foreign(key, path, "a directory" if stat.S_ISDIR(st.st_mode) else "a special file")
        return fd, st.st_size

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                pass
            _fsync_dir(path.parent)  # the new directory entry must survive a power loss

    def put_if_absent(self, key: str, data: bytes | memoryview) -> PutOutcome:
        final = self._local(key)
        if os.path.lexists(final):  # a dangling link still takes the name: create-only never replaces
            return PutOutcome.EXISTED
        tmp = None
        try:
            if not self.root.is_dir():
                raise self._missing_root()
            self._make_dirs(final.parent)
            tmp = final.parent / f".tmp-{final.name[:32]}-{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data).cast("B")
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written : written + (64 << 20)])
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, final)  # atomic, and fails if another writer got there first
                outcome = PutOutcome.CREATED
            except FileExistsError:
                outcome = PutOutcome.EXISTED
            os.unlink(tmp)
            tmp = None
            _fsync_dir(final.parent)
            return outcome
        except Exception as exc:
            raise self._wrap(exc, "writing", key) from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            fd, _size = self._open_regular(key)
            with open(fd, "rb", buffering=0) as handle:
                if max_bytes is None:
                    return handle.read()
                return handle.read(max_bytes + 1)  # a file growing meanwhile still reads bounded
        except Exception as exc:
            raise self._wrap(exc, "reading", key) from None

    def read_into(self, key: str, buffer: memoryview, hasher: Any = None) -> int:
        """Read blob ``key`` into ``buffer`` (nothing when the sizes differ); return its size.

        With ``hasher`` (``digest.new_hasher``) every piece is hashed as soon as it is read,
        while it is still in the CPU cache (``HASH_PIECE_BYTES``)."""
        try:
            fd, size = self._open_regular(key)
            with open(fd, "rb", buffering=0) as handle:
                if size != len(buffer):
                    return size
                view = buffer.cast("B") if buffer.format != "B" else buffer
                prefault(view)
                piece = HASH_PIECE_BYTES if hasher is not None else size
                got = 0
                while got < size:
                    n = handle.readinto(view[got : got + piece])
                    if not n:
                        return got
                    if hasher is not None:
                        hasher.update(view[got : got + n])
                    got += n
                return size
        except Exception as exc:
            raise self._wrap(exc, "reading", key) from None

    def size(self, key: str) -> int | None:
        try:
            path = self._local_str(key)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                kind = (
                    "a symbolic link"
                    if stat.S_ISLNK(st.st_mode)
                    else "a directory"
                    if stat.S_ISDIR(st.st_mode)
                    else "a special file"
                )
                raise self._foreign(key, path, kind)
            return st.st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as exc:
            raise self._wrap(exc, "inspecting", key) from None

    def _directory(self, prefix: str) -> Path:
        """The directory ``prefix`` names, refused when it or a parent is a symbolic link."""
        path = self._local(prefix) if prefix else self.root
        if not self.root.is_dir():
            raise self._missing_root()
        if prefix and path.is_symlink():
            raise self._foreign(prefix, path, "a symbolic link")
        return path

    def list(self, prefix: str) -> list[str]:
        path = self._directory(prefix)
        try:
            return sorted(p.name for p in path.iterdir() if not p.name.startswith(".tmp-"))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None

    def walk(self, prefix: str) -> list[str]:
        """Regular files under ``prefix`` (links, and directories behind them, are not followed)."""
        return sorted(self.list_info(prefix))

    def list_info(self, prefix: str) -> dict[str, tuple[int, float]]:
        base = self._directory(prefix)
        try:
            st = os.lstat(base)
            if stat.S_ISREG(st.st_mode):
                return {prefix.rstrip("/"): (st.st_size, st.st_mtime)}
            listed: dict[str, tuple[int, float]] = {}
            for dirpath, _dirs, files in os.walk(base):
                for file in files:
                    path = Path(dirpath, file)
                    try:
                        st = os.lstat(path)  # a link is not followed, and not an object of the store
                    except FileNotFoundError:  # deleted while we walked
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    key = str(path.relative_to(self.root)).replace(os.sep, "/")
                    listed[key] = (st.st_size, st.st_mtime)
            return listed
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None

    def temp_files(self) -> list[str]:
        """Leftover temp files of this class's interrupted writes (never referenced by anything):
        only names ``put_if_absent`` makes, in the directories of the layout it writes to. A
        user's own ``.tmp-*`` file anywhere else is not the store's and is never listed here."""
        found = []
        for prefix in ("blobs", "lineages", "preflight"):
            found += [key for key in self.walk(prefix) if TEMP_KEY.fullmatch(key)]
        return sorted(found)

    def delete(self, key: str) -> None:
        try:
            self._local(key).unlink()
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._wrap(exc, "deleting", key) from None


# Reads of at least this many bytes have their destination's pages made present in one call first
# (``prefault``): a destination freshly allocated (``torch.empty``, a model's ``to_empty``) is
# otherwise faulted in 4 KiB at a time as the read lands, and on 2 cores those faults cost more
# CPU than the read itself (benchmarks/ranks.py --dcp; docs/SCALING.md).
PREFAULT_BYTES = 1 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_populate: Any = None  # libc's madvise once probed; False where it is unavailable


def _libc_calls() -> Any:
    """libc's ``(madvise, mincore)`` if this kernel has ``MADV_POPULATE_WRITE`` (probed once), else False."""
    global _populate
    if _populate is None:
        _populate = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                madvise, mincore = libc.madvise, libc.mincore
                madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
                madvise.restype = mincore.restype = ctypes.c_int
                probe = mmap.mmap(-1, mmap.PAGESIZE)
                try:
                    anchor = ctypes.c_char.from_buffer(probe)
                    ok = madvise(ctypes.addressof(anchor), mmap.PAGESIZE, _MADV_POPULATE_WRITE) == 0
                    del anchor
                finally:
                    probe.close()
                _populate = (madvise, mincore) if ok else False
            except Exception:  # no libc symbol, no ctypes: reads fault pages in as they land
                _populate = False
    return _populate


def prefault(view: memoryview) -> None:
    """Make the pages of writable ``view`` present (writable, as a write would) in one
    ``madvise(MADV_POPULATE_WRITE)`` call, before a read fills it, unless they already are.

    Contents are unchanged: a page already present is left as it is, a missing one is allocated
    as the first write would. Resident memory (a model's live parameters) is detected by sampling
    three pages with ``mincore`` and skipped: populating it would walk every page for nothing (on
    2 cores about as costly as the faults it saves on fresh memory). Only an optimization: any
    failure, or a kernel without it, leaves the read to fault pages in as before."""
    if len(view) < PREFAULT_BYTES:
        return
    calls = _libc_calls()
    if not calls:
        return
    madvise, mincore = calls
    try:
        anchor = ctypes.c_char.from_buffer(view)  # writable and contiguous, or TypeError/ValueError
        address = ctypes.addressof(anchor)
        del anchor
    except (TypeError, ValueError, BufferError):
        return
    page = mmap.PAGESIZE
    start = -(-address // page) * page  # whole pages inside the view: the edges fault as before
    end = (address + len(view)) // page * page
    if end <= start:
        return
    resident = ctypes.c_ubyte(0)
    last = end - page
    for sample in (start, start + (last - start) // page // 2 * page, last):
        if mincore(sample, page, ctypes.byref(resident)) != 0 or not resident.value & 1:
            madvise(start, end - start, _MADV_POPULATE_WRITE)
            return


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
