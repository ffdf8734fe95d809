"""Prefect the way production runs it, for tests/test_production.py and benchmarks/storm.py: a Prefect server
on PostgreSQL (a fresh database, dropped afterwards), a process work pool, two workers, each with its own copy
of the user's code (as on two hosts), the user's deployments made by ``prefect deploy`` from
``tests/production/prefect.yaml``, and a ``CheckpointStore`` block over two local regions.

Every process is real and started with a new session, so a test can SIGKILL one worker and the flow-run
process it started (the flow-run process is found through the pid its lineage journal records).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers.live_prefect import BIN, LiveServer, api, start_server, stop, wait_for
from helpers.postgres import postgres_database

REPO = Path(__file__).resolve().parents[2]
CODE = REPO / "tests" / "production"  # the user's checkout: the sensorfit package and its prefect.yaml
POOL = "sensorfit-pool"
RECOVERY_LIMIT = 2  # the recover deployment's concurrency limit (prefect.yaml)
SLOT_WAIT_SECONDS = 2  # how often a recovery waiting for a slot asks again (Prefect's default: 30 s)
PIPELINE_DEPLOYMENT = "sensorfit/production"
RECOVER_DEPLOYMENT = "recover/recover"
STORE_BLOCK = "sensorfit-store"
HEARTBEAT_SECONDS = 30  # Prefect's minimum heartbeat frequency


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path
    code: Path  # this worker's copy of the user's code (its "host")


@dataclass
class ProductionStack:
    tmp: Path
    server: LiveServer
    database_url: str
    regions: list[Path]
    workers: dict[str, Worker] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """A client of this server that can import the user's code (the deploying machine's checkout)."""
        return self.server.env(
            PYTHONPATH=str(CODE),
            PREFECT_RECOVERY_PIPELINES="sensorfit.pipeline",
            PREFECT_RECOVERY_HOME=str(self.tmp / "client-recovery-home"),
            **extra,
        )

    def prefect(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd or self.tmp,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} failed\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    def prefect_recovery(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefect_recovery.cli", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=self.env(),
            cwd=self.tmp,
        )
        command = " ".join(args)
        assert done.returncode == 0, f"prefect-recovery {command} failed\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    def start_worker(self, name: str, wait: bool = True) -> Worker:
        """``prefect worker start`` on the pool, with its own copy of the code (the pull step's
        ``PREFECT_RECOVERY_WORKDIR``; the code is not on the worker's PYTHONPATH) and its own working directory."""
        host = self.tmp / name
        code = host / "checkout"
        if not code.exists():
            shutil.copytree(CODE, code, ignore=shutil.ignore_patterns("__pycache__"))
        log = host / "worker.log"
        env = self.server.env(
            PREFECT_RECOVERY_WORKDIR=str(code),
            PREFECT_RECOVERY_PIPELINES="sensorfit.pipeline",
            PREFECT_RECOVERY_HOME=str(host / "recovery-home"),
            PREFECT_HOME=str(host / "prefect-home"),
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_RECOVERY_STRICT_DETERMINISM="1",  # a run whose checkpointing moved a global RNG fails
            PREFECT_WORKER_HEARTBEAT_SECONDS="10",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_SECONDS),  # the flow runs' heartbeats: zombie detection
        )
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name, "--type", "process"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=host,
                start_new_session=True,
            )
        worker = Worker(name, process, log, code)
        self.workers[name] = worker
        if wait:
            self.wait_online(worker)
        return worker

    def wait_online(self, worker: Worker) -> None:
        name, process, log = worker.name, worker.process, worker.log

        def online() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited ({process.returncode}): {log.read_text()[-3000:]}")
            found = api(self.server, "POST", f"/work_pools/{POOL}/workers/filter", {})
            return any(w["name"] == name and w["status"] == "ONLINE" for w in found)  # type: ignore[union-attr]

        wait_for(online, 180, f"worker {name} to come online", interval=1)

    def deployment_id(self, name: str) -> str:
        return api(self.server, "GET", f"/deployments/name/{name}")["id"]  # type: ignore[index]

    def run_deployment(self, name: str, **parameters: Any) -> str:
        created = api(
            self.server, "POST", f"/deployments/{self.deployment_id(name)}/create_flow_run", {"parameters": parameters}
        )
        return created["id"]  # type: ignore[index]

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return api(self.server, "GET", f"/flow_runs/{run_id}")  # type: ignore[return-value]

    def logs(self) -> str:
        parts = [f"----- server (tail) -----\n{self.server.log.read_text(errors='replace')[-3000:]}"]
        for worker in self.workers.values():
            parts.append(f"----- {worker.name} (tail) -----\n{worker.log.read_text(errors='replace')[-5000:]}")
        return "\n".join(parts)


def _start_server(tmp: Path, database_url: str) -> LiveServer:
    return start_server(
        tmp,
        {
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": str(SLOT_WAIT_SECONDS),
        },
        startup_timeout=240,
    )


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (through /proc's children lists)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (flow-run processes live in sessions of their own)."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@contextmanager
def production_stack(tmp: Path, workers: int = 2) -> Iterator[ProductionStack]:
    """The whole stack in ``tmp``; everything is stopped and the database dropped on the way out."""
    with ExitStack() as cleanup, postgres_database() as database_url:
        server = _start_server(tmp, database_url)
        cleanup.callback(stop, server.process)
        regions = [tmp / "regions" / "region-a", tmp / "regions" / "region-b"]
        stack = ProductionStack(tmp, server, database_url, regions)
        cleanup.callback(lambda: [kill_tree(w.process) for w in stack.workers.values()])

        stack.prefect("work-pool", "create", POOL, "--type", "process")
        # the deployments, from the user's own prefect.yaml, deployed from the user's checkout
        stack.prefect("--no-prompt", "deploy", "--all", "--prefect-file", "prefect.yaml", cwd=CODE)
        saved = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from prefect_recovery import CheckpointStore; "
                "CheckpointStore(regions=sys.argv[2:], write_quorum=2).save(sys.argv[1], overwrite=True)",
                STORE_BLOCK,
                *map(str, regions),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=stack.env(),
        )
        assert saved.returncode == 0, saved.stderr[-3000:]
        # two disks, mounted and empty; no `init --store`: the runs that start together use the store first
        # (concurrent first use marks the regions before any write: tests/test_first_use_race.py)
        for region in regions:
            region.mkdir(parents=True)
        for worker in [stack.start_worker(f"worker-{'ab'[index]}", wait=False) for index in range(workers)]:
            stack.wait_online(worker)
        yield stack


__all__ = ["ProductionStack", "Worker", "descendants", "kill_tree", "production_stack"]
