"""Real protocol peers for the cloud regions: S3 (moto), GCS (gcp-storage-emulator), Azure Blob (azurite).

Each context manager starts its emulator as a subprocess on 127.0.0.1 with a free port, waits
until it answers HTTP, creates a bucket (container) and yields an ``Emulator``: the region URL
and the fsspec storage options to give ``open_region(url, storage_options)`` or a
``CheckpointStore`` region (``emulator.region(prefix)``). The process is stopped at the end.
``running_emulators()`` starts several in parallel. For "region down" tests, ``refused_endpoint()``
holds a port that refuses connections and ``unreachable_emulator(kind, endpoint)`` gives the
storage options of a region of that kind behind it.

Binaries: ``moto_server`` and ``gcp-storage-emulator`` next to the running Python (the dev extra);
azurite from ``$AZURITE_BIN``, else ``.cache/azurite`` (installed by ``make install-dev``), else PATH.
"""

from __future__ import annotations

import os

# gcsfs reads this when imported: without it, it spends 60 s per bucket on a gRPC probe the
# emulator cannot answer (shared/FACTS.md).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AZURITE_ENV = "AZURITE_BIN"
AZURITE_LOCAL = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

KINDS = ("s3", "gcs", "azure")
STARTUP_TIMEOUT = 60.0


class EmulatorError(RuntimeError):
    """An emulator did not start or refused set-up; the message carries its log tail."""


@dataclass
class Emulator:
    """A running emulator: where it listens and how an fsspec client reaches it."""

    kind: str  # "s3", "gcs" or "azure"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # bucket (container) created at start
    storage_options: dict[str, Any]
    log: Path
    process: subprocess.Popen | None = None
    _create_bucket: Callable[[str], None] | None = field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return {"s3": "s3", "gcs": "gs", "azure": "az"}[self.kind]

    @property
    def url(self) -> str:
        """The region URL of the bucket created at start."""
        return f"{self.scheme}://{self.bucket}"

    def url_for(self, prefix: str = "", bucket: str | None = None) -> str:
        base = f"{self.scheme}://{bucket or self.bucket}"
        return f"{base}/{prefix.strip('/')}" if prefix.strip("/") else base

    def region(self, prefix: str = "", bucket: str | None = None, name: str | None = None) -> dict[str, Any]:
        """A region for ``CheckpointStore(regions=[...])``: ``{"url", "storage_options"[, "name"]}``."""
        region: dict[str, Any] = {"url": self.url_for(prefix, bucket), "storage_options": dict(self.storage_options)}
        if name is not None:
            region["name"] = name
        return region

    def create_bucket(self, name: str) -> None:
        assert self._create_bucket is not None
        try:
            self._create_bucket(name)
        except Exception as exc:
            message = f"{self.kind} emulator: creating bucket {name!r} failed: {exc!r}"
            raise EmulatorError(message + self.log_tail()) from exc

    def fs(self) -> fsspec.AbstractFileSystem:
        """A new filesystem instance (not fsspec's cached one): another client of the same storage."""
        return fsspec.filesystem(self.scheme, skip_instance_cache=True, **self.storage_options)

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log, chars)

    @property
    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None


# -- process plumbing -------------------------------------------------------------------------
def log_tail(log: Path, chars: int = 3000) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    if not text:
        return f"\n({log} is empty)"
    return f"\n--- last {min(chars, len(text))} characters of {log} ---\n{text[-chars:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, grace: float = 10) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_http(kind: str, url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until ``url`` answers HTTP at all (any status: an error status still means it listens)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmulatorError(f"{kind} emulator exited with status {process.returncode} at start{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    message = f"{kind} emulator not answering {url} after {timeout:.0f} s (last error: {last!r})"
    raise EmulatorError(message + log_tail(log))


@contextmanager
def _process(
    kind: str,
    command: Callable[[int], list[str]],
    probe_path: str,
    log_dir: Path | None,
    env: dict[str, str] | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> Iterator[tuple[int, Path, subprocess.Popen]]:
    """Run ``command(port)`` on a free port until HTTP answers; retry once on a port race."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-emulator-", dir=log_dir))
    for attempt in range(3):
        port = free_port()
        log = workdir / f"{kind}-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command(port),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: stopped with everything it started
            )
        try:
            _wait_http(kind, f"http://127.0.0.1:{port}{probe_path}", process, log, timeout)
        except EmulatorError:
            _stop(process)
            text = log.read_text(errors="replace")
            if attempt < 2 and ("EADDRINUSE" in text or "Address already in use" in text):
                continue  # another process took the port between free_port() and bind
            raise
        try:
            yield port, log, process
        finally:
            _stop(process)
        return


# -- S3: moto ---------------------------------------------------------------------------------
def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


@contextmanager
def s3_emulator(bucket: str = "ckpt", log_dir: Path | None = None) -> Iterator[Emulator]:
    """moto's S3 server (``moto_server -H 127.0.0.1 -p PORT``) with ``bucket`` created by boto3."""
    moto = BIN / "moto_server"
    if not moto.exists():
        raise EmulatorError(f"{moto} is missing: install the dev extra (make install-dev)")
    with _process("s3", lambda port: [str(moto), "-H", "127.0.0.1", "-p", str(port)], "/", log_dir) as (
        port,
        log,
        process,
    ):
        endpoint = f"http://127.0.0.1:{port}"

        def create(name: str) -> None:
            import boto3

            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                region_name="us-east-1",
            )
            client.create_bucket(Bucket=name)

        emulator = Emulator("s3", endpoint, bucket, s3_options(endpoint), log, process, create)
        emulator.create_bucket(bucket)
        yield emulator


# -- GCS: gcp-storage-emulator ----------------------------------------------------------------
def gcs_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "token": "anon", "project": "test"}


@contextmanager
def gcs_emulator(bucket: str = "ckpt", log_dir: Path | None = None) -> Iterator[Emulator]:
    """``gcp-storage-emulator start --in-memory``, with ``bucket`` created through its JSON API."""
    if os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() not in ("false", "0"):
        raise EmulatorError("set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false before gcsfs is imported (60 s per bucket)")
    exe = BIN / "gcp-storage-emulator"
    if not exe.exists():
        raise EmulatorError(f"{exe} is missing: install the dev extra (make install-dev)")
    with _process(
        "gcs",
        lambda port: [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        "/storage/v1/b?project=test",
        log_dir,
    ) as (port, log, process):
        endpoint = f"http://127.0.0.1:{port}"

        def create(name: str) -> None:
            request = urllib.request.Request(
                f"{endpoint}/storage/v1/b?project=test",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status != 200:
                    raise EmulatorError(f"HTTP {response.status}")

        emulator = Emulator("gcs", endpoint, bucket, gcs_options(endpoint), log, process, create)
        emulator.create_bucket(bucket)
        yield emulator


# -- Azure Blob: azurite ----------------------------------------------------------------------
def azurite_binary() -> Path:
    """``$AZURITE_BIN``, else the repo-local npm install, else ``azurite-blob`` on PATH."""
    override = os.environ.get(AZURITE_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise EmulatorError(f"${AZURITE_ENV}={override} does not exist")
        return path
    if AZURITE_LOCAL.exists():
        return AZURITE_LOCAL
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    raise EmulatorError(
        f"azurite-blob not found: run `make install-dev` (npm install into {AZURITE_LOCAL.parents[2]}) "
        f"or set ${AZURITE_ENV}"
    )


def azure_connection_string(endpoint: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURE_ACCOUNT};"
    )


def azure_options(endpoint: str) -> dict[str, Any]:
    return {"connection_string": azure_connection_string(endpoint)}


@contextmanager
def azure_emulator(bucket: str = "ckpt", log_dir: Path | None = None) -> Iterator[Emulator]:
    """``azurite-blob --inMemoryPersistence``, with container ``bucket`` created by azure-storage-blob."""
    exe = azurite_binary()
    with _process(
        "azure",
        lambda port: [
            str(exe),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--loose",
            "--skipApiVersionCheck",
            "--disableTelemetry",
        ],
        f"/{AZURE_ACCOUNT}?comp=list",
        log_dir,
    ) as (port, log, process):
        endpoint = f"http://127.0.0.1:{port}"

        def create(name: str) -> None:
            from azure.storage.blob import BlobServiceClient

            with BlobServiceClient.from_connection_string(azure_connection_string(endpoint)) as client:
                client.create_container(name)

        emulator = Emulator("azure", endpoint, bucket, azure_options(endpoint), log, process, create)
        emulator.create_bucket(bucket)
        yield emulator


EMULATORS = {"s3": s3_emulator, "gcs": gcs_emulator, "azure": azure_emulator}


@contextmanager
def emulator(kind: str, bucket: str = "ckpt", log_dir: Path | None = None) -> Iterator[Emulator]:
    with EMULATORS[kind](bucket=bucket, log_dir=log_dir) as running:
        yield running


@contextmanager
def running_emulators(
    kinds: tuple[str, ...] = KINDS, buckets: tuple[str, ...] = ("ckpt",), log_dir: Path | None = None
) -> Iterator[dict[str, Emulator]]:
    """Every emulator of ``kinds``, started in parallel, each with all of ``buckets``; stopped at the end."""
    with ExitStack() as stack:
        managers = {kind: EMULATORS[kind](bucket=buckets[0], log_dir=log_dir) for kind in kinds}
        entered: dict[str, Emulator] = {}
        errors: list[BaseException] = []

        def enter(kind: str) -> None:
            try:
                entered[kind] = managers[kind].__enter__()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=enter, args=(kind,), name=f"start-{kind}") for kind in kinds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for kind in kinds:  # stop whatever did start, last started first
            if kind in entered:
                stack.push(managers[kind].__exit__)
        if errors:
            raise errors[0]
        for running in entered.values():
            for bucket in buckets[1:]:
                running.create_bucket(bucket)
        yield entered


# -- a region that is down --------------------------------------------------------------------
@contextmanager
def refused_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` where connections are refused: the port is bound, never listened on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# Client options that make a refused connection fail at once instead of after the client's own
# retries. botocore takes them as storage options (``retries.max_attempts``); for gs:// and az://
# regions RegionIO already turns the clients' own retries off (core/region.py, CLIENT_DEFAULTS),
# so nothing is needed there.
FAST_FAIL_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2}},
    "gcs": {},
    "azure": {},
}


def unreachable_emulator(kind: str, endpoint: str, bucket: str = "ckpt", fast_fail: bool = True) -> Emulator:
    """An ``Emulator`` of ``kind`` whose storage options point at ``endpoint`` (see ``refused_endpoint``).

    ``fast_fail`` adds ``FAST_FAIL_OPTIONS[kind]``, the client settings a user would give a region
    so that an outage costs little time per call, where the client has such settings.
    """
    options = {"s3": s3_options, "gcs": gcs_options, "azure": azure_options}[kind](endpoint)
    if fast_fail:
        options.update(FAST_FAIL_OPTIONS[kind])
    return Emulator(kind, endpoint, bucket, options, Path(os.devnull))


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
