"""A real Prefect server (``prefect server start``, SQLite, temporary PREFECT_HOME) and a real
``prefect-recovery serve`` process, for the end-to-end tests of deployments, the UI and
automations. Both are subprocesses on 127.0.0.1 with free ports, stopped at the end.
``live_stack`` bundles the two with a shared PREFECT_RECOVERY_HOME, and ``wait_completed``
waits for a flow run of that stack, failing with its logs when it does not complete.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}): {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s: {log.read_text()[-3000:] if log else ''}")


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class LiveServer:
    url: str  # the UI, e.g. http://127.0.0.1:PORT
    api_url: str  # url + /api
    home: Path
    process: subprocess.Popen
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client process (CLI, serve, a pipeline run) of this server."""
        env = {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.update(extra)
        return env


def start_server(tmp: Path, extra_env: dict[str, str] | None = None, startup_timeout: float = 180) -> LiveServer:
    """A `prefect server start` on a free port with its own PREFECT_HOME under ``tmp``, healthy when this
    returns (stopped again if it never got there); ``extra_env`` adds server settings (a database URL...)."""
    port = free_port()
    home = tmp / "prefect-server-home"
    home.mkdir(parents=True, exist_ok=True)
    log = tmp / "prefect-server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        **(extra_env or {}),
    }
    env.pop("PREFECT_API_URL", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api", home, process, log)
    try:
        wait_http(f"{server.api_url}/health", startup_timeout, process, log)
    except BaseException:
        stop(process)
        raise
    return server


@contextmanager
def live_server(tmp: Path, startup_timeout: float = 180) -> Iterator[LiveServer]:
    server = start_server(tmp, startup_timeout=startup_timeout)
    try:
        yield server
    finally:
        stop(server.process)


@contextmanager
def serving(
    server: LiveServer, tmp: Path, env: dict[str, str], startup_timeout: float = 180
) -> Iterator[subprocess.Popen]:
    """``prefect-recovery serve`` against ``server``; yields once its three deployments exist."""
    log = tmp / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "prefect-recovery"), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        names = ["example-pipeline/example-pipeline", "recover/recover", "audit/audit-daily"]
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited ({process.returncode}): {log.read_text()[-3000:]}")
            if all(deployment_id(server, name) for name in names) and b"being served" in log.read_bytes():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve not ready after {startup_timeout} s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield process
    finally:
        stop(process)


def api(server: LiveServer, method: str, path: str, body: object | None = None, attempts: int = 6) -> object:
    """A plain HTTP call to the server's REST API (JSON in, JSON out).

    A SQLite-backed server under the load of several runs answers 503 now and then (its database is
    busy); like Prefect's own client, the call is retried with a growing pause. Other errors are raised.
    """
    import json
    import urllib.error

    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        request = urllib.request.Request(
            f"{server.api_url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 503) or attempt == attempts - 1:
                raise
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def deployment_id(server: LiveServer, name: str) -> str | None:
    flow, deployment = name.split("/")
    try:
        found = api(server, "GET", f"/deployments/name/{flow}/{deployment}")
    except OSError:
        return None
    return found["id"] if isinstance(found, dict) else None


def flow_runs(server: LiveServer, deployment: str | None = None, flow_name: str | None = None) -> list[dict]:
    body: dict = {"sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    if deployment:
        body["deployments"] = {"id": {"any_": [deployment_id(server, deployment)]}}
    if flow_name:
        body["flows"] = {"name": {"any_": [flow_name]}}
    return api(server, "POST", "/flow_runs/filter", body)  # type: ignore[return-value]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Stack:
    """A live server with ``prefect-recovery serve`` running against it, as the UI tests use them."""

    server: LiveServer
    env: dict[str, str]  # for subprocesses: this server's API and the shared PREFECT_RECOVERY_HOME
    home: Path  # PREFECT_RECOVERY_HOME of serve (and so of the flow runs it executes) and of ``env``
    tmp: Path
    serve_log: Path


@contextmanager
def live_stack(tmp: Path) -> Iterator[Stack]:
    """A server and ``serve`` in ``tmp``, sharing ``tmp/recovery-home`` as PREFECT_RECOVERY_HOME so that the flow
    runs serve executes and the test's own subprocesses and stores see the same embedded store. Yields once the
    deployments exist; both processes are stopped on the way out."""
    home = tmp / "recovery-home"
    with live_server(tmp) as server:
        env = server.env(PREFECT_RECOVERY_HOME=str(home))
        with serving(server, tmp, env):
            yield Stack(server, env, home, tmp, tmp / "serve.log")


def run_logs(stack: Stack, run_id: str) -> str:
    """The flow run's logs and the tail of serve's output, for a failure message: a run that fails or hangs in
    a subprocess of serve leaves its traceback in one of the two, and the test's own output shows neither."""
    logs = api(
        stack.server,
        "POST",
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    flow_log = "\n".join(entry["message"] for entry in logs)  # type: ignore[union-attr]
    return f"flow run logs:\n{flow_log[-4000:]}\nserve log:\n{stack.serve_log.read_text()[-6000:]}"


def wait_completed(stack: Stack, run_id: str, what: str, timeout: float = 300) -> dict:
    """The flow run ``run_id`` once it is COMPLETED. Fails the test, with ``run_logs``, as soon as the run ends in
    another final state (rather than waiting out ``timeout`` for a run that will not complete), or at ``timeout``.
    ``what`` names the run in the messages, e.g. "recover run"."""

    def finished() -> dict | None:
        run: dict = api(stack.server, "GET", f"/flow_runs/{run_id}")  # type: ignore[assignment]
        if run["state_type"] in ("FAILED", "CRASHED", "CANCELLED"):
            pytest.fail(f"{what} ended {run['state_name']}\n{run_logs(stack, run_id)}")
        return run if run["state_type"] == "COMPLETED" else None

    try:
        return wait_for(finished, timeout, f"the {what} to complete", interval=2)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{run_logs(stack, run_id)}")
