"""Backend retry patches: gcsfs and adlfs clients with their own retries made an option.

``gs://`` and ``az://`` clients retry on their own (gcsfs each request 6 times over about 30 s,
azure-storage-blob 4 times over about 60 s), under every one of RegionIO's attempts, so a
region whose endpoint refuses connections would cost minutes. The classes built here take the
retry counts as storage options; ``CLIENT_DEFAULTS`` turns them off unless the region's options
set them, leaving RegionIO's tenacity layer (core/region_object.py) the one retry policy. The
seam is there because this is the only code that reaches into a client library's internals:
when gcsfs or adlfs change, this module is what to read.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import fsspec

logger = logging.getLogger("prefect_recovery.region")

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
