"""Every file under a directory with its size and modification time: proof that nothing was written."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            stat = os.stat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
    return found
