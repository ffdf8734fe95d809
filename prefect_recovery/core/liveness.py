"""Whether the process that wrote a journal event is still alive (lineage holders).

This module owns the identity of a process (``host_and_pid``, ``process_identity``). A run
records ``process_identity()`` in its ``run_started`` / ``recovery_started`` event. Another
process on the same machine (same boot) can then tell for certain whether that run is still
alive: the pid exists *and* started at the recorded time, so a recycled pid does not count.
From another machine the answer is ``None`` (unknown); the flows layer then asks the
orchestrator.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import JsonValue


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: the process start time in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def host_and_pid() -> tuple[str, int]:
    """This process's host name and pid: the identity every record of the store names (a
    manifest's ``writer``, ``process_identity``)."""
    return socket.gethostname(), os.getpid()


def process_identity() -> dict[str, JsonValue]:
    """host, boot, pid and pid start time of this process."""
    host, pid = host_and_pid()
    return {"host": host, "boot_id": _boot_id(), "pid": pid, "pid_start": _start_ticks(pid)}


def is_alive(identity: object) -> bool | None:
    """True / False when this machine can tell; None when the process ran elsewhere (or unknown)."""
    if not isinstance(identity, dict):
        return None
    pid, start, boot = identity.get("pid"), identity.get("pid_start"), identity.get("boot_id")
    if identity.get("host") != host_and_pid()[0] or not isinstance(pid, int) or boot is None:
        return None
    if boot != _boot_id():
        return False  # same host name, but the machine rebooted since: every process of then is gone
    current = _start_ticks(pid)
    if current is None:
        return False
    return start is None or current == start
