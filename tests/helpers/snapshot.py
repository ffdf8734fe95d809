"""Every file under a directory with its size and modification time: proof that nothing was written
(anywhere, or outside the given regions)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def snapshot(root: Path, exclude: Iterable[Path] = ()) -> dict[str, tuple[int, int]]:
    """Path (relative to ``root``) -> (size, mtime in ns) of everything under ``root`` but the ``exclude``d
    trees, symlinks not followed: e.g. what a malicious manifest must never change outside its regions."""
    excluded = list(exclude)
    found = {}
    for path in root.rglob("*"):
        if any(path == skip or skip in path.parents for skip in excluded):
            continue
        stat = path.lstat()
        found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found
