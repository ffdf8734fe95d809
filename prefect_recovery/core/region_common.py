"""What every region shares, whatever stores its objects: the outcome of a create-only write
(``PutOutcome``), which errors are worth retrying (``is_transient_io``), and how a region URL is
shown and checked (``redact_url``, ``check_url``).

These sit apart from the implementations (``RegionIO`` in core/region_object.py,
``LocalRegionIO`` in core/region_local.py) because callers that never open a region use them
too: a block validates and prints its URLs, publish reads ``PutOutcome``, and the retry rule
must be one rule for every backend.
"""

from __future__ import annotations

import enum
import errno
from urllib.parse import urlsplit

from .errors import (
    RegionConfigError,
    RegionError,
)


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
