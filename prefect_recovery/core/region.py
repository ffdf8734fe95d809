"""One region: an fsspec URL plus storage options, behind a small create-only interface.

``open_region`` builds the right implementation for a URL. The parts live apart because each
answers a different question:

- core/region_common.py: what every region shares (``PutOutcome``, which errors are
  transient, ``redact_url`` / ``check_url``).
- core/region_object.py: ``RegionIO``, the interface every other module calls, implemented
  for object stores through fsspec (create-only preconditions, tenacity retries, deadlines).
- core/region_local.py: ``LocalRegionIO``, local directories (temp file, fsync, ``link()``).
- core/region_patches.py: the gcsfs / adlfs clients with their own retries off
  (``CLIENT_DEFAULTS``), the only code that reaches into a client library.

Backend quirks live in these modules and nowhere else (FORMAT.md, "Create-only writes").
Everything else in the package talks to a region only through ``RegionIO``'s methods, and
imports these names from here.
"""

from __future__ import annotations

from typing import Any

from .errors import RegionUnavailableError
from .region_common import PutOutcome, _is_local, check_url, is_transient_io, redact_url
from .region_local import TEMP_KEY, LocalRegionIO
from .region_object import RegionIO
from .region_patches import CLIENT_DEFAULTS

__all__ = [
    "CLIENT_DEFAULTS",
    "TEMP_KEY",
    "LocalRegionIO",
    "PutOutcome",
    "RegionIO",
    "check_url",
    "is_transient_io",
    "open_region",
    "redact_url",
]


def open_region(url: str, storage_options: dict[str, Any] | None = None, name: str | None = None) -> RegionIO:
    """Build the right ``RegionIO`` for ``url`` (a local path or any fsspec URL)."""
    if not isinstance(url, str) or not url.strip():
        raise RegionUnavailableError(str(url), "a region needs a non-empty URL or path")
    check_url(url)
    if _is_local(url):
        return LocalRegionIO(url, storage_options, name)
    return RegionIO(url, storage_options, name)
