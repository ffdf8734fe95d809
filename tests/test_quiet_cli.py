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

from conftest import CLI, REPO
from helpers.prefect_events import BACKLOG_CLI
from helpers.terminal import run_on_a_terminal


def run(patch: str, tmp_path: Path, recovery_home: Path) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RECOVERY_HOME": str(recovery_home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", BACKLOG_CLI.format(patch=patch), "ls", "--json"],
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


def _store_with_blobs(home: Path) -> None:
    import torch

    from prefect_recovery import CheckpointStore

    store = CheckpointStore.default(home)
    for step in (1, 2):
        state = {f"layer{i}": torch.full((64,), float(step * 10 + i)) for i in range(6)}
        store.save_checkpoint(state, lineage="bars", step=step)


def on_a_terminal(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """What ``command`` shows when its output is a terminal (a pseudo-terminal); it must exit 0."""
    shown, code = run_on_a_terminal(command, env, cwd)
    assert code == 0, shown.decode(errors="replace")[-3000:]
    return shown.decode(errors="replace")


def test_verify_shows_a_progress_bar_on_a_terminal_and_none_when_piped(recovery_home: Path, tmp_path: Path) -> None:
    _store_with_blobs(recovery_home)
    env = {**os.environ, "PREFECT_RECOVERY_HOME": str(recovery_home), "COLUMNS": "120", "TERM": "xterm"}

    piped = subprocess.run([*CLI, "verify"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "verifying blobs" not in piped.stdout + piped.stderr and "\x1b[?25l" not in piped.stdout
    assert "healthy" in piped.stdout

    # the same command on a terminal (a pseudo-terminal): rich draws the bar, then clears it (transient)
    text = on_a_terminal([*CLI, "verify"], env, tmp_path)
    assert "verifying blobs (verify)" in text, text[-3000:]
    assert "healthy" in text


def test_export_shows_a_progress_bar_of_the_chunks_read_on_a_terminal_and_none_when_piped(
    recovery_home: Path, tmp_path: Path
) -> None:
    _store_with_blobs(recovery_home)
    env = {**os.environ, "PREFECT_RECOVERY_HOME": str(recovery_home), "COLUMNS": "120", "TERM": "xterm"}
    export = [*CLI, "export", "--lineage", "bars"]

    piped = subprocess.run([*export, "--to", str(tmp_path / "piped")], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "exporting" not in piped.stdout + piped.stderr and "\x1b[?25l" not in piped.stdout
    assert "exported bars v2 (6 tensors)" in piped.stdout

    text = on_a_terminal([*export, "--to", str(tmp_path / "shown")], env, tmp_path)
    assert "exporting (read)" in text, text[-3000:]  # the chunks read and verified, then the bar is cleared
    assert "exported bars v2" in text
    assert (tmp_path / "shown" / "tensors.safetensors").exists()


def killed_demo(env: dict[str, str], home: Path, cwd: Path, lineage: str) -> None:
    """A demo run SIGKILLed after its second heavy checkpoint: an unfinished lineage for `recover`. The whole
    process group goes, as with a lost machine: the run and the temporary Prefect server it started (killing the
    run alone left that server running after the test session)."""
    import signal
    import time

    manifests = home / "regions" / "region-a" / "lineages" / lineage / "manifests"
    command = [*CLI, "demo", "--json", "--lineage", lineage, "--steps", "150"]
    with subprocess.Popen(command, env={**env, "PREFECT_RECOVERY_HOME": str(home)}, cwd=cwd, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as run:  # fmt: skip
        deadline = time.monotonic() + 300
        while len(list(manifests.glob("*.json")) if manifests.is_dir() else []) < 2:
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGKILL)


def test_demo_and_recover_show_the_checkpoints_written_and_read_on_a_terminal_and_none_in_json(
    recovery_home: Path, tmp_path: Path
) -> None:
    """The long saves and loads of the commands that run a pipeline: `demo` writes checkpoints (a bar of the chunk
    copies written, from the background checkpoint writer too), `recover` restores one (chunks read) and writes
    the rest; `--json` output has no bar."""
    env = {**os.environ, "PREFECT_RECOVERY_HOME": str(recovery_home), "COLUMNS": "120", "TERM": "xterm"}
    text = on_a_terminal([*CLI, "demo", "--lineage", "shown", "--steps", "60"], env, tmp_path)
    assert "demo (write)" in text, text[-3000:]
    assert "lineage shown completed" in text

    killed_demo(env, recovery_home, tmp_path, "cut")
    quiet = subprocess.run([*CLI, "recover", "--json", "--lineage", "cut"], capture_output=True, text=True,
                           timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert json.loads(quiet.stdout)["status"] == "recovered"  # stdout is the JSON alone: no bar
    assert "recovering (" not in quiet.stdout + quiet.stderr and "\x1b[?25l" not in quiet.stdout

    killed_demo(env, recovery_home, tmp_path, "cut-again")
    text = on_a_terminal([*CLI, "recover", "--lineage", "cut-again"], env, tmp_path)
    assert "recovering (read)" in text and "recovering (write)" in text, text[-3000:]  # the restore, the saves
    assert "lineage cut-again recovered" in text, text[-3000:]
