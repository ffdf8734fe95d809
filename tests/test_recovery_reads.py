"""What one recovery reads (issue 13): the store block loaded once, the checkpoint's blobs read once, the resume
point passed as a value.

A small registered pipeline (``make-data`` -> ``train``, the training checkpointed every 4 steps) runs in this
process against a saved ``CheckpointStore`` block on two local regions; its first run fails inside training after
its second checkpoint. Then ``recover`` runs in this process too, with every region read counted (the local
regions' ``get`` and ``read_into``) and every block load and block-to-store build counted:

* the block is loaded from the server once and built into a core store once, for the recover flow and the
  pipeline run it starts (which opens the store its recorded parameters name); through the CLI as well;
* every blob of the restored checkpoint is read exactly once: the recovery reads one copy of the checkpoint, plus
  small records (manifests, journal events, the reused step's result), not two copies;
* the training step gets the resume point as an argument (``run.resume_point()``) and its cache key is the same in
  the recovery as in the failed first attempt;
* a checkpoint whose blob has no intact copy in any region stops the recovery with an error naming the version
  and what to do (repair, or the earlier version), and nothing is trained from it.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import pytest
import torch
from prefect import flow
from prefect.blocks.core import Block
from typer.testing import CliRunner

from prefect_recovery import Checkpointer, CheckpointSchedule, CheckpointStore, EveryNSteps, PipelineRun, RecoveryError
from prefect_recovery.blocks import checkpoint_store as checkpoint_store_module
from prefect_recovery.blocks import open_store
from prefect_recovery.core import open_region
from prefect_recovery.core.journal import Journal
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.region import LocalRegionIO
from prefect_recovery.core.region_marker import init_region
from prefect_recovery.flows.recover import recover
from prefect_recovery.flows.registry import register_pipeline
from prefect_recovery.tasks.step import step
from prefect_recovery.training.context import ResumePoint

pytestmark = pytest.mark.usefixtures("prefect_server")

PIPELINE = "recovery-reads-pipeline"
STEPS = 12
CRASH_AT = 10  # checkpoints at steps 4 and 8 are committed; the run fails at step 10
WIDTH = 192  # a Linear(192, 192) with SGD momentum: about 300 KB of checkpoint, far above its records
CRASH: dict[str, int | None] = {"at": None}


@step(name="make-data")
def make_data(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, WIDTH, generator=generator)
    return {"x": x, "y": torch.randn(16, WIDTH, generator=generator)}


@step(name="train", ignore=["store"], retries=0)
def train(
    store: CheckpointStore, lineage: str, data: dict[str, torch.Tensor], seed: int, resume: ResumePoint | None = None
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(WIDTH, WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=4)], asynchronous=False)
    with Checkpointer(store, lineage, model=model, optimizer=optimizer, schedule=schedule, seed=seed,
                      handle_sigterm=False, resume_from=resume) as ckpt:  # fmt: skip
        while ckpt.step_count < STEPS:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(data["x"]), data["y"]).backward()
            optimizer.step()
            ckpt.step()
            if ckpt.step_count == CRASH["at"]:
                raise RuntimeError(f"crashed at step {ckpt.step_count}")
    return {"steps": ckpt.step_count, "resumed_from": ckpt.resumed_from}


@register_pipeline
@flow(name=PIPELINE)
def reads_pipeline(lineage: str, seed: int = 0, store_block: str | None = None) -> None:
    store = open_store(store_block)
    parameters = {"lineage": lineage, "seed": seed, "store_block": store_block}
    with PipelineRun(store, lineage, pipeline=PIPELINE, parameters=parameters) as run:
        data = make_data(seed)
        train(store, lineage, data, seed, run.resume_point())


class Counts:
    """Region reads (bytes per key), block loads from the server, and block-to-core-store builds."""

    def __init__(self) -> None:
        self.reads: collections.Counter[str] = collections.Counter()
        self.read_bytes: collections.Counter[str] = collections.Counter()
        self.block_loads: list[str] = []
        self.store_builds = 0

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def record(self, key: str, size: int) -> None:
        self.reads[key] += 1
        self.read_bytes[key] += size


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    found = Counts()
    get, read_into = LocalRegionIO.get, LocalRegionIO.read_into

    def counted_get(self: LocalRegionIO, key: str, max_bytes: int | None = None) -> bytes:
        data = get(self, key, max_bytes)
        found.record(key, len(data))
        return data

    def counted_read_into(self: LocalRegionIO, key: str, buffer: memoryview, hasher: Any = None) -> int:
        size = read_into(self, key, buffer, hasher)
        found.record(key, size)
        return size

    monkeypatch.setattr(LocalRegionIO, "get", counted_get)
    monkeypatch.setattr(LocalRegionIO, "read_into", counted_read_into)

    load = Block.__dict__["load"]

    def counted_load(cls: type[Block], name: str, *args: Any, **kwargs: Any) -> Any:
        found.block_loads.append(name)
        return load.__get__(None, cls)(name, *args, **kwargs)

    monkeypatch.setattr(Block, "load", classmethod(counted_load))
    build = checkpoint_store_module.Store

    def counted_build(*args: Any, **kwargs: Any) -> Any:
        found.store_builds += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(checkpoint_store_module, "Store", counted_build)
    return found


@pytest.fixture
def crashed(tmp_path, counts: Counts) -> tuple[str, str]:
    """(lineage, block name): a run of the pipeline on a saved two-region block that failed at step 10."""
    block = f"reads-{tmp_path.name.lower().replace('_', '-')}"[:60]
    regions = [str(tmp_path / "region-a"), str(tmp_path / "region-b")]
    for region in regions:
        init_region(open_region(region))
    CheckpointStore(regions=regions).save(block, overwrite=True)
    lineage = "reads"
    CRASH["at"] = CRASH_AT
    try:
        with pytest.raises(RuntimeError, match="crashed at step 10"):
            reads_pipeline(lineage=lineage, store_block=block)
    finally:
        CRASH["at"] = None
    store = CheckpointStore.load(block)
    assert [info.step for info in store.list(lineage)] == [4, 8]
    counts.clear()
    return lineage, block


def train_cache_keys(store: CheckpointStore, lineage: str) -> list[str]:
    events = Journal(store.core, lineage).events()
    return [str(e.data["cache_key"]) for e in events if e.kind == "step_started" and e.data.get("step") == "train"]


def checkpoint_keys(store: CheckpointStore, lineage: str, version: int) -> dict[str, int]:
    manifest, _holders = store.core.resolve(lineage, version)
    return {blob_key(chunk.digest): chunk.size for entry in manifest.entries for chunk in entry.chunks}


def test_one_recovery_loads_the_block_once_and_reads_the_checkpoint_once(crashed, counts):
    lineage, block = crashed
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the resume point is passed: no implicit path taken
        summary = recover(lineage=lineage, store_block=block)
    assert summary["status"] == "recovered" and summary["resumed_from"]["step"] == 8, summary
    assert counts.block_loads == [block], "the recovery and the pipeline run it starts load the block once"
    assert counts.store_builds == 1, "the block is built into a core store once per recovery"

    store = CheckpointStore.load(block)
    restored = checkpoint_keys(store, lineage, summary["resumed_from"]["version"])
    checkpoint_bytes = sum(restored.values())
    assert checkpoint_bytes > 250_000
    assert {key: counts.reads[key] for key in restored} == dict.fromkeys(restored, 1), "each blob read once"
    assert sum(counts.read_bytes[key] for key in restored) == checkpoint_bytes
    # Beside the checkpoint, the only data read is the reused step's stored result (make-data, once); the
    # rest are records: manifests and journal events (JSON), a few KB each.
    [data_result] = [info.version for info in store.list(f"{lineage}.steps") if info.metadata["step"] == "make-data"]
    reused = checkpoint_keys(store, f"{lineage}.steps", data_result)
    blobs_read = {key: n for key, n in counts.reads.items() if key.startswith("blobs/")}
    assert blobs_read == dict.fromkeys([*restored, *reused], 1), "data read beside one copy of the checkpoint"
    records = {key for key in counts.reads if not key.startswith("blobs/")}
    assert all(key.startswith(f"lineages/{lineage}") for key in records), sorted(records)
    assert max(counts.read_bytes[key] / counts.reads[key] for key in records) < 64_000

    first, again = train_cache_keys(store, lineage)
    assert first == again, "the training step re-run by the recovery keeps the cache key of its first attempt"
    [finished] = [e for e in Journal(store.core, lineage).events() if e.kind == "run_finished"]
    assert finished.data["final_version"] == store.latest(lineage).version and store.latest(lineage).step == STEPS


def test_the_cli_recovery_loads_the_block_once(crashed, counts):
    from prefect_recovery.cli import app

    lineage, block = crashed
    result = CliRunner().invoke(app, ["recover", "--lineage", lineage, "--store", block, "--json"])
    assert result.exit_code == 0, result.output
    assert counts.block_loads == [block] and counts.store_builds == 1


def test_a_checkpoint_blob_corrupt_in_every_region_stops_the_recovery_naming_the_version(crashed, tmp_path):
    lineage, block = crashed
    store = CheckpointStore.load(block)
    latest = store.latest(lineage)
    assert latest is not None and latest.step == 8
    key = max(checkpoint_keys(store, lineage, latest.version).items(), key=lambda item: item[1])[0]
    for region in ("region-a", "region-b"):  # same size, other bytes: presence and size checks pass
        path = tmp_path / region / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(data))

    with pytest.raises(RecoveryError) as raised:
        recover(lineage=lineage, store_block=block)
    message = str(raised.value)
    assert f"checkpoint {lineage} v{latest.version} cannot be restored" in message, message
    assert "verify --repair" in message and f"--checkpoint {latest.version - 1}" in message, message
    events = Journal(store.core, lineage).events()
    [finished] = [e for e in events if e.kind == "recovery_finished"]
    assert finished.data["status"] == "failed" and f"v{latest.version} cannot be restored" in finished.data["error"]
    assert [info.step for info in store.list(lineage)] == [4, 8], "nothing was trained from the damaged checkpoint"


def test_a_checkpointer_given_another_lineages_resume_point_refuses(tmp_path):
    store = CheckpointStore.default(tmp_path / "home")
    with pytest.raises(ValueError, match="resume point of lineage 'other'"):
        Checkpointer(store, "mine", resume_from=ResumePoint(lineage="other"))


def test_a_checkpointer_not_given_the_resume_point_in_a_run_still_resumes_and_journals_with_a_warning(tmp_path):
    store = CheckpointStore.default(tmp_path / "home")
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=1)], asynchronous=False)
    with PipelineRun(store, "implicit", pipeline="p", parameters={}) as run:
        assert run.resume_point() == ResumePoint("implicit", None, run.checkpoint_committed)
        with pytest.warns(DeprecationWarning, match=r"resume_from=resume"):
            checkpointer = Checkpointer(store, "implicit", model=torch.nn.Linear(2, 2), schedule=schedule,
                                        handle_sigterm=False)  # fmt: skip
        with checkpointer as ckpt:
            ckpt.step()
    events = Journal(store.core, "implicit").events()
    assert [e.data["version"] for e in events if e.kind == "checkpoint_committed"] == [1]
