"""One region: an fsspec URL plus storage options, behind a small create-only interface.

``RegionIO`` is the only place that knows backend quirks (FORMAT.md, "Create-only writes"):

* local directories: write a temp file in the target directory, fsync it, ``link()`` it to its
  final name (fails if the name exists, so the write is create-only and atomic), fsync the
  directory;
* object stores: ``pipe_file(..., mode="create")``, which fsspec maps to the backend's own
  precondition (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
  ``If-None-Match: *``); ``gs://`` regions also read back what they wrote, because GCS
  emulators ignore the precondition (FORMAT.md, "Create-only writes").

Object-store calls are retried with exponential backoff and jitter (tenacity) for transient
errors only: connection failures, timeouts, throttling and 5xx answers. A 403, a missing
object or an existing one is an answer, never retried. Each call gives up after
``call_deadline`` seconds in all.

Everything else in the package talks to a region only through these methods.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from .errors import ObjectNotFoundError, RegionError, RegionUnavailableError, StorageFullError


class PutOutcome(enum.Enum):
    CREATED = "created"
    EXISTED = "existed"


def redact_url(url: str) -> str:
    """A URL for logs and errors: no user info, query string or fragment (may hold secrets)."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # plain path (or a Windows drive letter)
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


_TRANSIENT_NAMES = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServiceRequestError",
    "ServiceResponseError",
    "ClientOSError",
)


def _status_of(exc: BaseException) -> int | None:
    """The HTTP status an object-store error carries, whatever library raised it."""
    for attribute in ("status_code", "status", "code"):
        value = getattr(exc, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def is_transient_io(exc: BaseException) -> bool:
    """Worth retrying: the peer was unreachable, slow, throttling or failing on its side."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, RegionError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = _status_of(exc)
    if status is not None:
        return status in (408, 429) or status >= 500
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & set(_TRANSIENT_NAMES):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient_io(cause)


def _is_local(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return scheme in ("", "file", "local") or len(scheme) == 1


class RegionIO:
    """Create-only object I/O on one fsspec location. Keys are '/'-separated and relative."""

    retry_attempts = 4  # first try included
    call_deadline = 60.0  # seconds for one call, retries included
    verify_after_write = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, name: str | None = None):
        self.url = url
        self.name = name or redact_url(url)
        self._storage_options = dict(storage_options or {})
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None
        self.verify_after_write = urlsplit(url).scheme in ("gs", "gcs")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried for transient errors within ``call_deadline``."""
        retrying = Retrying(
            retry=retry_if_exception(is_transient_io),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            stop=stop_after_attempt(self.retry_attempts) | stop_after_delay(self.call_deadline),
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- plumbing -------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            try:
                self._fs, self._root = url_to_fs(self.url, **self._storage_options)
            except Exception as exc:  # fsspec raises anything from ImportError to ValueError
                raise RegionUnavailableError(
                    self.name,
                    f"cannot open this URL ({type(exc).__name__}: {exc}). "
                    "Check the scheme, the installed extra (s3/azure) and the storage options.",
                ) from None
        return self._fs

    def _path(self, key: str) -> str:
        _ = self.fs
        return f"{self._root.rstrip('/')}/{key}" if self._root else key

    def _wrap(self, exc: BaseException, action: str, key: str) -> RegionError:
        if isinstance(exc, RegionError):
            return exc
        if isinstance(exc, FileNotFoundError):
            return ObjectNotFoundError(self.name, f"{key} does not exist")
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFullError(self.name, f"no space left while {action} {key}; free space and retry")
        return RegionUnavailableError(self.name, f"{action} {key} failed: {type(exc).__name__}: {exc}")

    # -- the interface ----------------------------------------------------------------------
    def put_if_absent(self, key: str, data: bytes | memoryview) -> PutOutcome:
        """Create ``key`` with ``data`` unless it exists. Never overwrites, never leaves a partial object."""
        path = self._path(key)
        try:
            if self._call(self.fs.exists, path):
                return PutOutcome.EXISTED
            payload = bytes(data)
            try:
                self._call(self.fs.pipe_file, path, payload, mode="create")
            except FileExistsError:
                return PutOutcome.EXISTED  # incl. our own earlier attempt that timed out: callers compare
            except TypeError:  # an fsspec backend without `mode`: best effort, see FORMAT.md
                self._call(self.fs.pipe_file, path, payload)
            if self.verify_after_write and self._call(self.fs.cat_file, path) != payload:
                return PutOutcome.EXISTED  # another writer's object replaced ours: we lost the race
            return PutOutcome.CREATED
        except Exception as exc:
            raise self._wrap(exc, "writing", key) from None

    def get(self, key: str) -> bytes:
        try:
            return self._call(self.fs.cat_file, self._path(key))
        except Exception as exc:
            raise self._wrap(exc, "reading", key) from None

    def read_into(self, key: str, buffer: memoryview) -> int:
        """Read ``key`` into ``buffer``; return the object's size (may differ from the buffer's)."""
        data = self.get(key)
        if len(data) == len(buffer):
            buffer[:] = data
        return len(data)

    def size(self, key: str) -> int | None:
        """Size of ``key`` in bytes, or None when it does not exist."""
        try:
            return int(self._call(self.fs.size, self._path(key)))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._wrap(exc, "inspecting", key) from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and folders), or [] when it does not exist."""
        try:
            self.fs.invalidate_cache(self._path(prefix))  # listings must see other writers' objects
            entries = self._call(self.fs.ls, self._path(prefix), detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def walk(self, prefix: str) -> list[str]:
        """Every object key under ``prefix``, relative to the region root."""
        base = self._path(prefix).rstrip("/")
        try:
            self.fs.invalidate_cache(base)
            found = self._call(self.fs.find, base)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None
        root = self._path("").rstrip("/")
        return sorted(path[len(root) + 1 :] if root else path for path in found)

    def list_info(self, prefix: str) -> dict[str, tuple[int, float]]:
        """Every object under ``prefix`` (or the object ``prefix`` itself): key relative to the
        region -> (size in bytes, modification time as POSIX seconds).

        The time is the backend's own (S3 ``LastModified``, GCS ``updated``, Azure
        ``last_modified``); ``math.inf`` when the backend reports none, so an object of unknown
        age never looks old. Garbage collection ages unreferenced blobs by it.
        """
        base = self._path(prefix).rstrip("/")
        try:
            self.fs.invalidate_cache(base)
            found = self._call(self.fs.find, base, detail=True)
            if not isinstance(found, dict):  # adlfs answers a list of names for a single object
                found = {path: self._call(self.fs.info, path) for path in found}
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None
        root = self._path("").rstrip("/")
        listed: dict[str, tuple[int, float]] = {}
        for path, info in found.items():
            if info.get("type", "file") != "file":
                continue
            path = str(path).rstrip("/")
            key = path[len(root) + 1 :] if root else path
            listed[key] = (int(info.get("size") or 0), _modified_of(info))
        return listed

    def delete(self, key: str) -> None:
        try:
            self._call(self.fs.rm_file, self._path(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._wrap(exc, "deleting", key) from None

    def probe(self) -> None:
        """Raise RegionUnavailableError unless the region can be listed."""
        self.list("")


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
        # Keys are built by core.layout from validated parts; refuse anything else loudly.
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise RegionError(self.name, f"refusing key outside the region: {key!r}")
        return self.root / key

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
        if final.exists():
            return PutOutcome.EXISTED
        tmp = None
        try:
            if not self.root.is_dir():
                raise RegionUnavailableError(self.name, f"directory {self.root} does not exist")
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

    def get(self, key: str) -> bytes:
        try:
            return self._local(key).read_bytes()
        except IsADirectoryError:
            raise ObjectNotFoundError(self.name, f"{key} is a directory") from None
        except Exception as exc:
            raise self._wrap(exc, "reading", key) from None

    def read_into(self, key: str, buffer: memoryview) -> int:
        path = self._local(key)
        try:
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != len(buffer):
                    return size
                view = buffer.cast("B") if buffer.format != "B" else buffer
                got = 0
                while got < size:
                    n = handle.readinto(view[got:])
                    if not n:
                        return got
                    got += n
                return size
        except Exception as exc:
            raise self._wrap(exc, "reading", key) from None

    def size(self, key: str) -> int | None:
        try:
            return self._local(key).stat().st_size
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._wrap(exc, "inspecting", key) from None

    def list(self, prefix: str) -> list[str]:
        path = self._local(prefix) if prefix else self.root
        if not self.root.is_dir():
            raise RegionUnavailableError(self.name, f"directory {self.root} does not exist")
        try:
            return sorted(p.name for p in path.iterdir() if not p.name.startswith(".tmp-"))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None

    def walk(self, prefix: str) -> list[str]:
        base = self._local(prefix) if prefix else self.root
        if not self.root.is_dir():
            raise RegionUnavailableError(self.name, f"directory {self.root} does not exist")
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for file in files:
                keys.append(str(Path(dirpath, file).relative_to(self.root)).replace(os.sep, "/"))
        return sorted(keys)

    def list_info(self, prefix: str) -> dict[str, tuple[int, float]]:
        base = self._local(prefix) if prefix else self.root
        if not self.root.is_dir():
            raise RegionUnavailableError(self.name, f"directory {self.root} does not exist")
        try:
            if base.is_file():
                st = base.stat()
                return {prefix.rstrip("/"): (st.st_size, st.st_mtime)}
            listed: dict[str, tuple[int, float]] = {}
            for dirpath, _dirs, files in os.walk(base):
                for file in files:
                    path = Path(dirpath, file)
                    try:
                        st = path.stat()
                    except FileNotFoundError:  # deleted while we walked
                        continue
                    key = str(path.relative_to(self.root)).replace(os.sep, "/")
                    listed[key] = (st.st_size, st.st_mtime)
            return listed
        except FileNotFoundError:
            return {}
        except Exception as exc:
            raise self._wrap(exc, "listing", prefix) from None

    def temp_files(self) -> list[str]:
        """Leftover temp files of interrupted writes (never referenced by anything)."""
        return [key for key in self.walk("") if key.rsplit("/", 1)[-1].startswith(".tmp-")]

    def delete(self, key: str) -> None:
        try:
            self._local(key).unlink()
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._wrap(exc, "deleting", key) from None


# Modification-time fields of fsspec ``info`` dicts, by backend: local and gcsfs ``mtime``,
# s3fs ``LastModified``, adlfs ``last_modified``, GCS JSON ``updated``; creation times last.
_TIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated", "timeCreated", "creation_time", "created")


def _modified_of(info: dict[str, Any]) -> float:
    """POSIX seconds of an fsspec ``info`` dict's modification time; ``math.inf`` when unknown."""
    for field_name in _TIME_FIELDS:
        value = info.get(field_name)
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str) and value:
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return math.inf


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_region(url: str, storage_options: dict[str, Any] | None = None, name: str | None = None) -> RegionIO:
    """Build the right ``RegionIO`` for ``url`` (a local path or any fsspec URL)."""
    if not isinstance(url, str) or not url.strip():
        raise RegionUnavailableError(str(url), "a region needs a non-empty URL or path")
    if _is_local(url):
        return LocalRegionIO(url, storage_options, name)
    return RegionIO(url, storage_options, name)
