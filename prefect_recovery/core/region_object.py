"""``RegionIO``: the region interface, and its implementation for object stores through fsspec.

Every other module talks to a region only through these methods (put_if_absent, get,
read_into, size, exists, list, walk, list_info, delete, probe); core/region_local.py overrides
them for directories. Writes are create-only (FORMAT.md, "Create-only writes"):
``pipe_file(..., mode="create")``, which fsspec maps to the backend's own precondition (S3
``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure ``If-None-Match: *``); ``gs://``
regions also read back what they wrote, because GCS emulators ignore the precondition.

Object-store calls are retried with exponential backoff and jitter (tenacity) for transient
errors only (``is_transient_io``: connection failures, timeouts, throttling and 5xx answers).
A 403, a missing object or an existing one is an answer, never retried. Each call gives up
after ``call_deadline`` seconds in all. That retry policy is the only one for ``gs://`` and
``az://`` regions: their clients are built with their own retries off (core/region_patches.py),
and each attempt there is cut off at the call's deadline, so a region whose endpoint refuses
connections costs a call about a second, as on S3 with botocore's retries off. S3 and other
backends are called as configured.
"""

from __future__ import annotations

import errno
import math
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from .errors import (
    ObjectNotFoundError,
    RegionError,
    RegionUnavailableError,
    StorageFullError,
)
from .redact import register_secrets, scrub
from .region_common import PutOutcome, _url_secrets, is_transient_io, redact_url
from .region_patches import _CLIENT_OPTION_KEYS, CLIENT_DEFAULTS, _client_class


def _open_fs(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    """``url_to_fs(url, **storage_options)``; for ``gs://`` and ``az://`` the client comes with
    its own retries off unless ``storage_options`` set them (``CLIENT_DEFAULTS``). The flag says
    whether each attempt is to be cut off at the call's deadline (those schemes only)."""
    scheme = urlsplit(url).scheme
    if scheme not in CLIENT_DEFAULTS or "::" in url or "protocol" in storage_options:
        fs, root = url_to_fs(url, **storage_options)
        return fs, root, False
    cls = _client_class(scheme)
    options = dict(storage_options)
    if not any(key in options for key in _CLIENT_OPTION_KEYS[scheme]):
        options.update(CLIENT_DEFAULTS[scheme])
    fs = cls(**{**cls._get_kwargs_from_urls(url), **options})
    return fs, cls._strip_protocol(url), isinstance(fs, AsyncFileSystem) and not fs.asynchronous


class RegionIO:
    """Create-only object I/O on one fsspec location. Keys are '/'-separated and relative."""

    retry_attempts = 4  # first try included
    call_deadline = 60.0  # seconds for one call, retries included
    verify_after_write = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, name: str | None = None):
        self.url = url
        self.name = name or redact_url(url)
        self._storage_options = dict(storage_options or {})
        # Backend errors may echo any of these (docs/THREAT_MODEL.md, "Secrets"): mask them everywhere.
        register_secrets(self._storage_options)
        register_secrets(_url_secrets(url))
        self._fs: fsspec.AbstractFileSystem | None = None
        self._root: str | None = None
        self._cut_off_attempts = False  # each attempt bounded by the call's deadline (gs://, az://)
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

    def _io(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)`` through ``_call``. Where the client's own retries are
        off (gs://, az://), each attempt is also cut off at the call's deadline: its coroutine
        is cancelled, so a hung request cannot outlast ``call_deadline``."""
        fs = self.fs
        if not self._cut_off_attempts:
            return self._call(getattr(fs, method), *args, **kwargs)
        coroutine = getattr(fs, f"_{method}")
        give_up = time.monotonic() + self.call_deadline

        def attempt() -> Any:
            left = give_up - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {self.call_deadline:g} s")
            try:
                return sync(fs.loop, coroutine, *args, timeout=left, **kwargs)
            except FSTimeoutError:
                raise TimeoutError(f"no answer within {self.call_deadline:g} s") from None

        return self._call(attempt)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- plumbing -------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            try:
                self._fs, self._root, self._cut_off_attempts = _open_fs(self.url, self._storage_options)
            except Exception as exc:  # fsspec raises anything from ImportError to ValueError
                raise RegionUnavailableError(
                    self.name,
                    f"cannot open this URL ({type(exc).__name__}: {scrub(str(exc))}). "
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
        return RegionUnavailableError(self.name, f"{action} {key} failed: {type(exc).__name__}: {scrub(str(exc))}")

    # -- the interface ----------------------------------------------------------------------
    def put_if_absent(self, key: str, data: bytes | memoryview) -> PutOutcome:
        """Create ``key`` with ``data`` unless it exists. Never overwrites, never leaves a partial object."""
        path = self._path(key)
        try:
            if self._io("exists", path):
                return PutOutcome.EXISTED
            payload = bytes(data)
            try:
                self._io("pipe_file", path, payload, mode="create")
            except FileExistsError:
                return PutOutcome.EXISTED  # incl. our own earlier attempt that timed out: callers compare
            except TypeError:  # an fsspec backend without `mode`: best effort, see FORMAT.md
                self._io("pipe_file", path, payload)
            if self.verify_after_write and self._io("cat_file", path) != payload:
                return PutOutcome.EXISTED  # another writer's object replaced ours: we lost the race
            return PutOutcome.CREATED
        except Exception as exc:
            raise self._wrap(exc, "writing", key) from None

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes. With ``max_bytes``, at most ``max_bytes + 1`` of them are read:
        a longer answer means the object is too large, and the caller rejects it unread."""
        try:
            if max_bytes is None:
                return self._io("cat_file", self._path(key))
            return self._io("cat_file", self._path(key), start=0, end=max_bytes + 1)
        except Exception as exc:
            # A ranged read of an empty object is refused by S3 (416, "range not satisfiable"): an empty
            # object is b"", for the caller to reject as a record, not a region that cannot be read.
            if max_bytes is not None and self._is_empty(key):
                return b""
            raise self._wrap(exc, "reading", key) from None

    def _is_empty(self, key: str) -> bool:
        try:
            return int(self._io("size", self._path(key))) == 0
        except Exception:
            return False

    def read_into(self, key: str, buffer: memoryview) -> int:
        """Read ``key`` into ``buffer``; return the object's size (may differ from the buffer's)."""
        data = self.get(key, max_bytes=len(buffer))
        if len(data) == len(buffer):
            buffer[:] = data
        return len(data)

    def size(self, key: str) -> int | None:
        """Size of ``key`` in bytes, or None when it does not exist."""
        try:
            return int(self._io("size", self._path(key)))
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
            entries = self._io("ls", self._path(prefix), detail=False)
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
            found = self._io("find", base)
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
            found = self._io("find", base, detail=True)
            if not isinstance(found, dict):  # adlfs answers a list of names for a single object
                found = {path: self._io("info", path) for path in found}
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
            self._io("rm_file", self._path(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._wrap(exc, "deleting", key) from None

    def probe(self) -> None:
        """Raise RegionUnavailableError unless the region can be listed."""
        self.list("")


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
