"""Run a command with its output on a pseudo-terminal, as a user at a terminal sees it (progress bars)."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path
from typing import IO


def run_on_a_terminal(
    command: list[str], env: dict[str, str], cwd: Path, stderr: IO[bytes] | None = None, timeout: float = 120
) -> tuple[bytes, int]:
    """What ``command`` writes to the terminal (stdout, and stderr unless ``stderr`` takes it) and its exit code."""
    primary, secondary = pty.openpty()
    with subprocess.Popen(command, stdout=secondary, stderr=stderr or secondary, env=env, cwd=cwd) as process:
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the command exited and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        code = process.wait(timeout)
    os.close(primary)
    return shown, code
