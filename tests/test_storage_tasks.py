"""The Prefect tasks in ``prefect_recovery.tasks`` (save, load, verify, audit), composed in a user's own
flow without ``@step``, against the session's Prefect server and a real two-region store on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from prefect_recovery import CheckpointStore
from prefect_recovery.core.layout import blob_key
from prefect_recovery.tasks import StoreUnhealthyError, audit_store, load_checkpoint, save_checkpoint, verify_store

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return CheckpointStore(regions=[str(tmp_path / "a"), str(tmp_path / "b")], write_quorum=2)


def state_of(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 32, generator=generator)}, "step": seed}


async def task_run_names(flow_run_id) -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.type.value for run in runs}


def test_a_flow_saves_loads_verifies_and_audits_through_tasks(store: CheckpointStore) -> None:
    @flow
    def my_flow() -> tuple:
        first = save_checkpoint(state_of(1), "job", store=store, step=1)
        second = save_checkpoint(state_of(2), "job", store=store, step=2, metadata={"epoch": 0})
        latest = load_checkpoint("job", store=store)
        older = load_checkpoint("job", store=store, version=first.version, keys=["model"])
        report = verify_store(store=store)
        audit = audit_store(store=store, read_data=1.0)
        from prefect.runtime import flow_run

        return first, second, latest, older, report, audit, flow_run.id

    first, second, latest, older, report, audit, run_id = my_flow()
    assert (first.version, second.version) == (1, 2)
    assert second.metadata["epoch"] == 0
    assert torch.equal(latest["model"]["w"], state_of(2)["model"]["w"]) and latest["step"] == 2
    assert set(older) == {"model"} and torch.equal(older["model"]["w"], state_of(1)["model"]["w"])
    assert report.healthy and report.versions == 2
    assert audit.healthy and audit.scrub.blobs_read == audit.scrub.blobs
    import asyncio

    # each is its own task run in the Prefect UI, completed
    states = asyncio.run(task_run_names(run_id))
    assert {"save-checkpoint", "load-checkpoint", "verify-store", "audit-store"} <= set(states)
    assert set(states.values()) == {"COMPLETED"}


def test_verify_task_fails_on_a_corrupt_blob_and_repair_heals_it(store: CheckpointStore, tmp_path: Path) -> None:
    info = save_checkpoint.fn(state_of(3), "job", store=store)
    manifest, _ = store.core.resolve("job", info.version)
    digest = manifest.entries[0].chunks[0].digest
    blob = tmp_path / "a" / blob_key(digest)
    blob.write_bytes(b"\0" * blob.stat().st_size)  # same size, wrong bytes: only a re-hash finds it

    @flow
    def check(repair: bool):
        return verify_store(store=store, repair=repair)

    with pytest.raises(StoreUnhealthyError, match="unrepaired") as raised:
        check(False)
    assert raised.value.report.unrepaired
    healed = check(True)
    assert healed.problems and not healed.unrepaired
    assert verify_store.fn(store=store).healthy
    assert torch.equal(load_checkpoint.fn("job", store=store)["model"]["w"], state_of(3)["model"]["w"])


def test_tasks_take_a_saved_block_by_name_or_the_default_store(store: CheckpointStore, recovery_home: Path) -> None:
    store.save("tasks-test-store", overwrite=True)
    info = save_checkpoint.fn(state_of(4), "named", store="tasks-test-store")
    assert info.regions and torch.equal(
        load_checkpoint.fn("named", store=store)["model"]["w"], state_of(4)["model"]["w"]
    )
    # no store: the embedded default under $PREFECT_RECOVERY_HOME
    save_checkpoint.fn(state_of(5), "embedded")
    assert (recovery_home / "regions" / "region-a").is_dir()
    assert load_checkpoint.fn("embedded")["step"] == 5
