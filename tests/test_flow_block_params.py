"""The flows take the ``CheckpointStore`` block itself (issue 16): Prefect's parameter schema offers the UI's
block picker for ``store_block``, a picked block (``{"$ref": ...}``, as the Custom run form sends it) reaches the
flow as the loaded block, and the block's name (the CLI's form) still works."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from prefect.utilities.callables import parameter_schema

from prefect_recovery import CheckpointStore
from prefect_recovery.blocks import open_store, store_block_name
from prefect_recovery.core.errors import CheckpointError
from prefect_recovery.examples.pipeline import example_pipeline
from prefect_recovery.flows.audit import audit
from prefect_recovery.flows.recover import recover
from prefect_recovery.flows.replay import replay_check_flow

FLOWS = [recover, audit, replay_check_flow, example_pipeline]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda flow: flow.name)
def test_store_block_is_a_block_picker_or_a_name(flow) -> None:
    schema = parameter_schema(flow.fn).model_dump()
    options = schema["properties"]["store_block"]["anyOf"]
    assert {"$ref": "#/definitions/CheckpointStore"} in options  # the UI offers saved CheckpointStore blocks
    assert schema["definitions"]["CheckpointStore"]["block_type_slug"] == "checkpoint-store"
    assert {"type": "string"} in options and {"type": "null"} in options  # the name, and the default store


def test_a_picked_block_reaches_the_flow_loaded_and_its_name_still_works(prefect_server, tmp_path: Path) -> None:
    regions = [tmp_path / "a", tmp_path / "b"]
    for region in regions:
        region.mkdir()
    name = f"picked-{uuid.uuid4().hex[:8]}"
    block = CheckpointStore(regions=[str(region) for region in regions], write_quorum=2)
    block.save(name)
    block.save_checkpoint({"w": torch.arange(8.0)}, lineage="picked", step=1)

    picked = audit.validate_parameters({"store_block": {"$ref": {"block_document_id": str(block._block_document_id)}}})
    store = picked["store_block"]
    assert isinstance(store, CheckpointStore) and [r.url for r in store.regions] == [str(r) for r in regions]
    assert open_store(store) is store and store_block_name(store) == name
    by_name = audit.validate_parameters({"store_block": name})["store_block"]
    assert by_name == name and [r.url for r in open_store(by_name).regions] == [str(r) for r in regions]

    report = audit(store_block=store, read_data=1.0, apply_retention=False)  # the flow itself, with the block
    assert report["scrub"]["healthy"] and report["scrub"]["versions"] == 1
    assert report["scrub"]["regions"] == [str(r) for r in regions]


def test_an_unsaved_store_cannot_be_recorded_for_a_recovery(tmp_path: Path) -> None:
    store = CheckpointStore(regions=[str(tmp_path / "a")])
    with pytest.raises(CheckpointError, match="not a saved block"):
        store_block_name(store)
    assert open_store(store) is store  # a flow that records nothing may still use it
