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

That retry policy is the only one for ``gs://`` and ``az://`` regions: their clients are built
with their own retries off (``CLIENT_DEFAULTS``; gcsfs would otherwise try each request 6 times
over about 30 s, azure-storage-blob 4 times over about 60 s, under every one of our attempts),
unless the region's storage options set them, and each attempt there is cut off at the call's
deadline. So a region whose endpoint refuses connections costs a call about a second, as on S3
with botocore's retries off. S3 and other backends are called as configured.

Everything else in the package talks to a region only through these methods.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential_jitter

from .errors import (
    ForeignObjectError,
    ObjectNotFoundError,
    RegionConfigError,
    RegionError,
    RegionUnavailableError,
    StorageFullError,
)
from .redact import register_secrets, scrub


class PutOutcome(enum.Enum):
    CREATED = "created"
    EXISTED = "existed"


def redact_url(url: str) -> str:
    """A URL for logs and errors: no user info, query string or fragment (may hold secrets)."""
    try:
        parts = urlsplit(url)
        if not parts.scheme or len(parts.scheme) == 1:  # plain path (or a Windows drive letter)
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}"
    except ValueError:  # unparsable (a bad port, an unclosed IPv6 bracket): keep the scheme and host only
        scheme, found, _rest = url.partition("://")
        return f"{scheme}://(unparsable)" if found and scheme.isalnum() else "(unparsable URL)"


def _url_secrets(url: str) -> list[str]:
    """The parts of ``url`` that may hold credentials: user info, query string, fragment."""
    rest = url.partition("://")[2]
    if not rest:
        return []
    authority = rest.split("?", 1)[0].split("#", 1)[0]  # up to the last '@': a password may hold a '/'
    found = [authority.rpartition("@")[0]] if "@" in authority else []
    for separator in ("?", "#"):
        if separator in url:
            found.append(url.split(separator, 1)[1])
    found += [part for secret in list(found) for part in secret.replace("&", ":").split(":")]
    return [part for part in found if part]


logger = logging.getLogger("prefect_recovery.region")

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
    # Retried by gcsfs and azure-storage-blob themselves before their retries were turned off
    # (CLIENT_DEFAULTS): aiohttp connection drops and cut-off bodies, gcsfs's 502 (it raises
    # requests' ProxyError for it), an Azure download cut short.
    "ClientConnectionError",
    "ClientPayloadError",
    "ProxyError",
    "IncompleteReadError",
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


# -- object-store clients whose own retries we turn off ----------------------------------------
_GCS_SCHEMES = ("gs", "gcs")
_AZURE_SCHEMES = ("az", "abfs", "abfss")
_AZURE_RETRY_OPTIONS = {  # storage option (azure-core's name) -> StorageRetryPolicy attribute
    "retry_total": "total_retries",
    "retry_connect": "connect_retries",
    "retry_read": "read_retries",
    "retry_status": "status_retries",
}

# Storage options RegionIO adds for these schemes when the region's own options set none of
# them. gcsfs: ``retries`` is its tries per HTTP request (its own default 6, about 30 s of
# backoff); 1 is a single try. adlfs: the azure-core retry counts of the BlobServiceClient
# (its own default 3 retries after 15, 18 and 24 s); 0 is a single try. Either way RegionIO's
# tenacity layer is then the one retry policy, bounded by ``call_deadline``.
CLIENT_DEFAULTS: dict[str, dict[str, Any]] = {
    **{scheme: {"retries": 1} for scheme in _GCS_SCHEMES},
    **{scheme: {"retry_total": 0} for scheme in _AZURE_SCHEMES},
}
_CLIENT_OPTION_KEYS = {
    **dict.fromkeys(_GCS_SCHEMES, ("retries",)),
    **dict.fromkeys(_AZURE_SCHEMES, tuple(_AZURE_RETRY_OPTIONS)),
}
_client_classes: dict[str, type] = {}
_client_classes_lock = threading.Lock()


def _gcs_class(base: type) -> type:
    """gcsfs's filesystem with its tries per request an option (``retries``)."""
    from gcsfs.retry import HttpError, retry_request

    # gcsfs fixes its tries when the class is defined (``@retry_request(retries=6)``); these
    # are the undecorated request methods, retried here as the instance's ``retries`` says.
    raw = {
        name: getattr(getattr(base, name, None), "__wrapped__", None)
        for name in ("_request", "_get_file_request", "_get_file_concurrent")
    }
    missing = sorted(name for name, fn in raw.items() if fn is None)
    if "_request" in missing:  # gcsfs changed: keep its own retries rather than guess
        logger.warning("gcsfs %s: its request retries cannot be set; gs:// outages take longer", base.__module__)

    def single_try(fn: Any) -> Any:
        async def once(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except HttpError as exc:  # as gcsfs's retry_request words it
                if exc.code == 400 and "requester pays" in str(exc.message):
                    raise ValueError(
                        "Bucket is requester pays. Set `requester_pays=True` in the region's storage options."
                    ) from exc
                raise

        return once

    class RegionGCSFileSystem(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, retries: int = base.retries, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.retries = max(1, int(retries))
            for name, fn in raw.items():
                if fn is not None:
                    wrapped = single_try(fn) if self.retries == 1 else retry_request(retries=self.retries)(fn)
                    setattr(self, name, wrapped.__get__(self))

    return RegionGCSFileSystem


def _azure_class(base: type) -> type:
    """adlfs's filesystem with the azure-core retry counts of its client as options."""

    class RegionAzureBlobFileSystem(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            # Set before adlfs's __init__, which connects (do_connect) and would hand unknown
            # options to DefaultAzureCredential.
            self._client_retries = {
                _AZURE_RETRY_OPTIONS[option]: int(kwargs.pop(option))
                for option in list(kwargs)
                if option in _AZURE_RETRY_OPTIONS and kwargs[option] is not None
            }
            super().__init__(*args, **kwargs)

        def do_connect(self) -> None:
            super().do_connect()
            if not self._client_retries:
                return
            # adlfs builds the BlobServiceClient without client options; its retry policy
            # object is shared by every container and blob client made from it.
            policy = getattr(getattr(self.service_client, "_config", None), "retry_policy", None)
            if policy is None or not all(hasattr(policy, attribute) for attribute in self._client_retries):
                logger.warning("azure-storage-blob: its retry policy cannot be set; az:// outages take longer")
                return
            for attribute, value in self._client_retries.items():
                setattr(policy, attribute, value)

    return RegionAzureBlobFileSystem


def _client_class(scheme: str) -> type:
    """The filesystem class RegionIO uses for ``scheme`` (``gs``/``az`` and their aliases)."""
    with _client_classes_lock:
        if scheme not in _client_classes:
            base = fsspec.get_filesystem_class(scheme)  # ImportError naming the extra when missing
            cls = _gcs_class(base) if scheme in _GCS_SCHEMES else _azure_class(base)
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            globals()[cls.__name__] = cls  # importable by name, so instances pickle like fsspec's
            for alias in _GCS_SCHEMES if scheme in _GCS_SCHEMES else _AZURE_SCHEMES:
                _client_classes[alias] = cls
        return _client_classes[scheme]


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
            raise self._wrap(exc, "reading", key) from None

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


# The temp names LocalRegionIO.put_if_absent makes (".tmp-<final name, 32 chars at most>-<uuid4 hex>"),
# for each kind of object of the layout (FORMAT.md, "Layout"): what garbage collection may delete.
TEMP_KEY = re.compile(
    r"(?:blobs/(?:blake3|sha256)/[0-9a-f]{2}/\.tmp-[0-9a-f]{1,32}"
    r"|lineages/[A-Za-z0-9][A-Za-z0-9._-]{0,127}/(?:manifests|journal)/\.tmp-\d{12}\.json"
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
        # Keys are built by core.layout from validated parts; refuse anything else loudly.
        if key.startswith("/") or ".." in key.split("/") or "\x00" in key:
            raise RegionError(self.name, f"refusing key outside the region: {key!r}")
        # A region never follows a symbolic link below its root (the root itself may be one):
        # a link could point anywhere, so reading or writing through it leaves the region.
        current = self.root
        for part in [p for p in key.split("/") if p][:-1]:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(mode):
                raise ForeignObjectError(
                    self.name,
                    f"{current.relative_to(self.root).as_posix()} is a symbolic link; a region never follows links "
                    "(they may point outside it): replace it with a directory",
                )
        return self.root / key

    def _missing_root(self) -> RegionUnavailableError:
        # Never created by a save: an unmounted disk must not be replaced by the root disk unnoticed.
        return RegionUnavailableError(
            self.name,
            f"directory {self.root} does not exist: create it with `mkdir -p {self.root}` or "
            f"`prefect-recovery init --region {self.root}`, or mount the disk it lives on",
        )

    def _foreign(self, key: str, path: Path, what: str) -> ForeignObjectError:
        return ForeignObjectError(
            self.name, f"{key} is {what}, not an object the store wrote; it is not followed or read"
        )

    def _open_regular(self, key: str) -> tuple[int, int]:
        """Open ``key`` for reading without following a link or blocking on a FIFO: (fd, size)."""
        path = self._local(key)
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

    def read_into(self, key: str, buffer: memoryview) -> int:
        try:
            fd, size = self._open_regular(key)
            with open(fd, "rb", buffering=0) as handle:
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
            path = self._local(key)
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


def check_url(url: str) -> None:
    """Raise RegionConfigError unless ``url`` parses; the message never shows its user info or port
    (a password may sit there), only the scheme and host."""
    try:
        _ = urlsplit(url).port
    except ValueError as exc:
        why = (
            "an unclosed '[' in an IPv6 host"
            if "IPv6" in str(exc)
            else "what follows ':' in the host is not a port number (URL-encode a password, or give credentials "
            "as storage options)"
        )
        raise RegionConfigError(f"region URL {redact_url(url)} cannot be parsed: {why}") from None


def open_region(url: str, storage_options: dict[str, Any] | None = None, name: str | None = None) -> RegionIO:
    """Build the right ``RegionIO`` for ``url`` (a local path or any fsspec URL)."""
    if not isinstance(url, str) or not url.strip():
        raise RegionUnavailableError(str(url), "a region needs a non-empty URL or path")
    check_url(url)
    if _is_local(url):
        return LocalRegionIO(url, storage_options, name)
    return RegionIO(url, storage_options, name)
