"""The async half of the ``CheckpointStore`` API: an ``a``-prefixed coroutine per public I/O method.

PrefectHQ's integrations pair each blocking method with an async one and let
``prefect._internal.compatibility.async_dispatch.async_dispatch`` pick (``S3Bucket.read_path``
/ ``aread_path``): called from async code (an async flow or task, or anywhere an event loop
runs) the plain name returns the coroutine, so ``await store.load_checkpoint(...)`` works; from
sync code it runs as before. ``_sync=True`` forces the blocking form anywhere (e.g. in a
notebook, whose running loop counts as async code), and ``store.asave_checkpoint(...)`` is
always the coroutine.

Each coroutine runs the blocking method in a worker thread (Prefect's
``run_sync_in_worker_thread``, anyio underneath, with the caller's context variables), so the
event loop keeps running while a save hashes and writes, or a load reads and verifies. The
store's I/O releases the GIL (file and socket I/O, BLAKE3 and SHA-256 over large buffers), so
other coroutines get the loop; docs/PREFECT.md has the measured longest stall.

Cancelling the coroutine does not stop the thread: a save still commits (or fails) as a whole,
a manifest being the commit (FORMAT.md, "Write protocol"), so a cancelled save is either fully
there or not at all.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prefect.utilities.asyncutils import run_sync_in_worker_thread
from pydantic import JsonValue

if TYPE_CHECKING:
    from ..core import CheckpointInfo, VerifyReport
    from ..core.audit import AuditReport


class AsyncStoreApi:
    """The coroutines of ``CheckpointStore`` (mixed into the block); the blocking methods they run
    are the block's own, called with ``_sync=True`` so they never dispatch back here."""

    # No class annotations here: pydantic would take them for block fields.
    if TYPE_CHECKING:
        save_checkpoint: Any
        load_checkpoint: Any
        list: Any
        lineages: Any
        latest: Any
        audit: Any
        verify: Any

    async def asave_checkpoint(
        self,
        state: Any,
        *,
        lineage: str,
        step: int | None = None,
        metadata: dict[str, JsonValue] | None = None,
    ) -> CheckpointInfo:
        """``save_checkpoint`` without blocking the event loop: same arguments, same result."""
        return await run_sync_in_worker_thread(
            self.save_checkpoint, state, lineage=lineage, step=step, metadata=metadata, _sync=True
        )

    async def aload_checkpoint(
        self,
        *,
        lineage: str,
        version: int | None = None,
        keys: Iterable[Any] | None = None,
        into: Any = None,
    ) -> Any:
        """``load_checkpoint`` without blocking the event loop: same arguments, same result."""
        return await run_sync_in_worker_thread(
            self.load_checkpoint, lineage=lineage, version=version, keys=keys, into=into, _sync=True
        )

    async def alist(self, lineage: str | None = None) -> builtins.list[CheckpointInfo]:
        """``list`` without blocking the event loop."""
        return await run_sync_in_worker_thread(self.list, lineage, _sync=True)

    async def alineages(self) -> builtins.list[str]:
        """``lineages`` without blocking the event loop."""
        return await run_sync_in_worker_thread(self.lineages, _sync=True)

    async def alatest(self, lineage: str) -> CheckpointInfo | None:
        """``latest`` without blocking the event loop."""
        return await run_sync_in_worker_thread(self.latest, lineage, _sync=True)

    async def aaudit(
        self,
        *,
        read_data: float = 1.0,
        repair: bool = True,
        apply_retention: bool = True,
        lineage: str | None = None,
        dry_run: bool = False,
        seed: int | None = None,
    ) -> AuditReport:
        """``audit`` without blocking the event loop."""
        return await run_sync_in_worker_thread(
            self.audit,
            read_data=read_data,
            repair=repair,
            apply_retention=apply_retention,
            lineage=lineage,
            dry_run=dry_run,
            seed=seed,
            _sync=True,
        )

    async def averify(self, repair: bool = False, lineage: str | None = None, decode: bool = False) -> VerifyReport:
        """``verify`` without blocking the event loop."""
        return await run_sync_in_worker_thread(self.verify, repair=repair, lineage=lineage, decode=decode, _sync=True)
