"""A throwaway PostgreSQL database for a production-shaped Prefect server (tests/test_production.py).

The server is the machine's PostgreSQL (``make postgres`` starts or installs one on 127.0.0.1:5432); another
one: ``PREFECT_RECOVERY_TEST_POSTGRES=postgresql://USER:PASSWORD@HOST:PORT``. Each use creates a database with
a fresh name and drops it afterwards, so runs never see each other's flow runs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Trust auth ignores the password; a cluster installed by `make postgres` has this one.
DEFAULT = "postgresql://postgres:postgres@127.0.0.1:5432"


def _admin(base: str, statement: str) -> None:
    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(f"{base}/postgres", timeout=10)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


@contextmanager
def postgres_database() -> Iterator[str]:
    """Yields ``postgresql+asyncpg://.../NAME`` of a new, empty database, dropped on the way out."""
    base = os.environ.get("PREFECT_RECOVERY_TEST_POSTGRES", DEFAULT).rstrip("/")
    name = f"prefect_recovery_{uuid.uuid4().hex[:12]}"
    try:
        _admin(base, f'CREATE DATABASE "{name}"')
    except (TimeoutError, OSError) as exc:
        pytest.fail(
            f"no PostgreSQL answers at {base.rsplit('@', 1)[-1]} ({exc}): run `make postgres` (starts the "
            "machine's cluster, or installs Debian's postgresql), or point PREFECT_RECOVERY_TEST_POSTGRES at one"
        )
    try:
        yield f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}"
    finally:
        _admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
