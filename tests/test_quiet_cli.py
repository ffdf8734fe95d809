"""The CLI is quiet against a live Prefect server: no "Still processing items: N items remaining..." lines after a
command. Prefect's events worker logs that line when the process exits with events still queued for the server
(prefect/_internal/concurrency/services.py); a pipeline run queues its task-run events, and on a busy machine
some are still queued at exit.

The server is the session's Prefect test server; each process is a real subprocess pointed at it. To make the
backlog certain rather than a matter of load, the process queues 3000 events just before the command runs: the
same command with the CLI's filter switched off shows the line (so the check cannot pass on a machine where the
queue happens to drain in time), the CLI as shipped does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

COMMAND = """
import sys
import prefect_recovery.cli as cli
from prefect.events import emit_event
{patch}
for i in range(3000):  # far more than the websocket sends before the command below exits
    emit_event(event="test.backlog", resource={{"prefect.resource.id": f"test.backlog.{{i}}"}})
sys.argv = ["prefect-recovery", "ls", "--json"]
cli.main()
"""


def run(patch: str, tmp_path: Path, recovery_home: Path) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RECOVERY_HOME": str(recovery_home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", COMMAND.format(patch=patch)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


def test_a_command_exiting_with_queued_events_prints_no_queue_draining_noise(
    prefect_server, recovery_home: Path, tmp_path: Path
) -> None:
    # the control: the same command with the filter switched off shows the line
    control = run("cli._quiet_queue_services = lambda: None", tmp_path, recovery_home)
    assert control.returncode == 0, control.stderr[-3000:]
    assert "Still processing items" in control.stderr, "no backlog at exit: this check would prove nothing"

    command = run("", tmp_path, recovery_home)
    assert command.returncode == 0, command.stderr[-3000:]
    assert json.loads(command.stdout) == [], command.stdout  # stdout is the JSON alone
    assert "Still processing items" not in command.stdout + command.stderr, command.stderr[-3000:]
    assert "items remaining" not in command.stdout + command.stderr, command.stderr[-3000:]
