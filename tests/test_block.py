"""The ``CheckpointStore`` block on a Prefect server: save/load of the document, secrets, registration."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from prefect_recovery import CheckpointError, CheckpointStore, Region

SECRET = "s3cr3t-key-DO-NOT-SHOW"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_regions(tmp_path: Path, count: int = 2) -> list[Path]:
    paths = [tmp_path / f"region-{i}" for i in range(count)]
    for path in paths:
        path.mkdir(parents=True)
    return paths


def config_of(store: CheckpointStore) -> dict[str, Any]:
    """The user-visible configuration, with secret values revealed."""
    return {
        "regions": [
            {"url": r.url, "name": r.name, "storage_options": r.storage_options.get_secret_value()}
            for r in store.regions
        ],
        "write_quorum": store.write_quorum,
        "hash_algorithm": store.hash_algorithm,
        "chunk_bytes": store.chunk_bytes,
        "io_threads": store.io_threads,
    }


def api_env() -> dict[str, str]:
    """Environment for a subprocess that talks to the harness server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the prefect_server fixture should have set an API URL"
    return {**os.environ, "PREFECT_API_URL": url, "COLUMNS": "250", "NO_COLOR": "1"}


def prefect_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True, timeout=180
    )


# -- the document on the server -------------------------------------------------------------------------
def test_block_saved_on_server_loads_with_same_config_and_checkpoints(prefect_server, tmp_path: Path) -> None:
    a, b = make_regions(tmp_path)
    store = CheckpointStore(
        regions=[Region(url=str(a), name="eu"), str(b)],
        write_quorum=2,
        hash_algorithm="sha256",
        chunk_bytes=4096,
        io_threads=2,
    )
    weights = torch.randn(64, 64)  # 16 KiB: several chunks of 4096 bytes
    first = store.save({"w": weights, "note": "v1"}, lineage="blk", step=3, metadata={"by": "first"})
    name = unique("my-store")
    document_id = store.save(name)
    assert isinstance(document_id, uuid.UUID)

    loaded = CheckpointStore.load(name)
    assert type(loaded) is CheckpointStore
    assert config_of(loaded) == config_of(store)
    assert loaded.regions[0].name == "eu"

    restored = loaded.load(lineage="blk")
    assert torch.equal(restored["w"], weights)
    assert restored["note"] == "v1"
    [info] = loaded.list("blk")
    assert (info.version, info.step, info.metadata, info.manifest_digest) == (
        first.version,
        3,
        {"by": "first"},
        first.manifest_digest,
    )
    assert info.manifest_digest.startswith("sha256:")

    second = loaded.save({"w": weights * 2}, lineage="blk", step=4)  # and the other way round
    assert second.version == first.version + 1
    assert torch.equal(store.load(lineage="blk")["w"], weights * 2)
    assert torch.equal(store.load(lineage="blk", version=first.version)["w"], weights)


def test_block_save_respects_overwrite(prefect_server, tmp_path: Path) -> None:
    a, b, c = make_regions(tmp_path, 3)
    name = unique("ow")
    CheckpointStore(regions=[str(a), str(b)]).save(name)
    with pytest.raises(ValueError, match="overwrite"):
        CheckpointStore(regions=[str(a), str(c)]).save(name)
    assert [r.url for r in CheckpointStore.load(name).regions] == [str(a), str(b)]
    CheckpointStore(regions=[str(a), str(c)], write_quorum=2).save(name, overwrite=True)
    reloaded = CheckpointStore.load(name)
    assert [r.url for r in reloaded.regions] == [str(a), str(c)]
    assert reloaded.write_quorum == 2


def test_block_load_of_unknown_name_fails_clearly(prefect_server) -> None:
    with pytest.raises(ValueError, match=r"not found|Unable to find"):
        CheckpointStore.load(unique("missing"))


def test_block_load_and_checkpoints_inside_a_flow(prefect_server, tmp_path: Path) -> None:
    a, b = make_regions(tmp_path)
    name = unique("in-flow")
    CheckpointStore(regions=[str(a), str(b)]).save(name)

    @flow
    def train(block_name: str) -> int:
        store = CheckpointStore.load(block_name)
        info = store.save({"w": torch.arange(4.0)}, lineage="flow", step=1)
        return info.version

    @flow
    async def restore(block_name: str) -> list[float]:
        store = await CheckpointStore.load(block_name)  # Prefect's async dispatch in async code
        state = await store.load_checkpoint(lineage="flow")  # and the store's own (blocks/async_api.py)
        return state["w"].tolist()

    assert train(name) == 1
    assert asyncio.run(restore(name)) == [0.0, 1.0, 2.0, 3.0]


# -- secrets ------------------------------------------------------------------------------------------------
def _secret_store(tmp_path: Path) -> CheckpointStore:
    a, b = make_regions(tmp_path)
    return CheckpointStore(regions=[Region(url=str(a), storage_options={"key": SECRET, "anon": False}), str(b)])


def test_storage_options_are_secret_in_python(prefect_server, tmp_path: Path) -> None:
    store = _secret_store(tmp_path)
    name = unique("secret")
    store.save(name)
    loaded = CheckpointStore.load(name)
    assert loaded.regions[0].storage_options.get_secret_value() == {"key": SECRET, "anon": False}
    assert loaded.regions[1].storage_options.get_secret_value() == {}
    for shown in (
        repr(loaded),
        str(loaded.model_dump()),
        loaded.model_dump_json(),
        json.dumps(loaded.model_dump(mode="json")),
    ):
        assert SECRET not in shown


def test_block_schema_declares_storage_options_secret() -> None:
    fields = CheckpointStore._to_block_schema().fields
    # Prefect's server masks by dotted path and never inside a list: the secrets live outside it
    assert "region_storage_options.*" in fields["secret_fields"]
    assert not [field for field in fields["secret_fields"] if field.startswith("regions")]
    region = fields["definitions"]["Region"]
    assert set(region["properties"]) == {"url", "name", "credentials"}  # storage options are not typed in a list
    # inline (Prefect's server would drop block definitions it cannot rebuild from nested block schemas)
    options = region["properties"]["credentials"]["anyOf"]
    slugs = {option["block_type_slug"] for option in options if "block_type_slug" in option}
    assert slugs == {"aws-credentials", "gcp-credentials", "azure-blob-storage-credentials"}
    assert {"type": "string"} in region["properties"]["credentials"]["anyOf"]  # "aws-credentials/prod" still works


def test_the_api_document_shows_regions_and_masks_only_secrets_and_an_edit_keeps_them(
    prefect_server, tmp_path: Path
) -> None:
    """What the UI does: read the document without secrets, change one region, write every field back
    (masked values included); the server restores the masked values, the edit lands."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    a, b = make_regions(tmp_path)
    c = tmp_path / "region-c"
    c.mkdir()
    store = CheckpointStore(
        regions=[Region(url=str(a), name="eu", storage_options={"key": SECRET, "anon": False}), Region(url=str(b))]
    )
    name = unique("ui-edit")
    store.save(name)
    with get_client(sync_client=True) as client:
        shown = client.read_block_document_by_name(name, "checkpoint-store", include_secrets=False)
        assert SECRET not in json.dumps(shown.data, default=str)
        assert [region["url"] for region in shown.data["regions"]] == [str(a), str(b)]  # readable, editable
        assert shown.data["region_storage_options"] == {"eu": {"key": "********", "anon": "********"}}
        data = json.loads(json.dumps(shown.data))
        data["regions"][1]["url"] = str(c)
        client.update_block_document(shown.id, BlockDocumentUpdate(block_schema_id=shown.block_schema_id, data=data))
    loaded = CheckpointStore.load(name)
    assert [region.url for region in loaded.regions] == [str(a), str(c)]
    assert loaded.regions[0].storage_options.get_secret_value() == {"key": SECRET, "anon": False}
    assert loaded.region_storage_options.get_secret_value() == {}  # back inside the regions


def test_a_document_saved_by_the_previous_version_still_loads(prefect_server, tmp_path: Path) -> None:
    """0.1 kept storage options and a text credentials reference inside the region list."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate

    a, b = make_regions(tmp_path)
    CheckpointStore.register_type_and_schema()
    old = {
        "regions": [
            {"url": str(a), "storage_options": {"key": SECRET}, "name": "eu", "credentials": None},
            {"url": str(b), "storage_options": {}, "name": None, "credentials": "aws-credentials/prod"},
        ],
        "write_quorum": 2,
        "retention": None,
    }
    name = unique("v01")
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("checkpoint-store")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        client.create_block_document(
            BlockDocumentCreate(name=name, data=old, block_schema_id=schema.id, block_type_id=block_type.id)
        )
    loaded = CheckpointStore.load(name)
    assert [(r.url, r.name, r.credentials) for r in loaded.regions] == [
        (str(a), "eu", None),
        (str(b), None, "aws-credentials/prod"),
    ]
    assert loaded.regions[0].storage_options.get_secret_value() == {"key": SECRET}
    assert loaded.write_quorum == 2


def test_region_storage_options_for_no_region_are_an_error_not_lost(tmp_path: Path) -> None:
    from prefect_recovery.core.errors import RegionConfigError

    a, b = make_regions(tmp_path)
    with pytest.raises(RegionConfigError, match="'us' names no region") as failure:
        CheckpointStore(regions=[Region(url=str(a), name="eu"), str(b)], region_storage_options={"us": {"key": SECRET}})
    assert SECRET not in str(failure.value)


def test_storage_options_are_obfuscated_in_the_api_document(prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    store = _secret_store(tmp_path)
    name = unique("secret-api")
    store.save(name)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "checkpoint-store", include_secrets=False)
    assert SECRET not in json.dumps(document.data, default=str)  # the API never shows the secret ...
    with get_client(sync_client=True) as client:
        full = client.read_block_document_by_name(name, "checkpoint-store", include_secrets=True)
    assert full.data["regions"][0]["url"] == store.regions[0].url  # ... which the block itself still has
    assert CheckpointStore.load(name).regions[0].storage_options.get_secret_value()["key"] == SECRET


# -- validation ----------------------------------------------------------------------------------------------
def test_regions_given_as_strings_become_region_models(tmp_path: Path) -> None:
    a, b = make_regions(tmp_path)
    store = CheckpointStore(regions=[str(a), str(b)])
    assert all(type(region) is Region for region in store.regions)
    assert [region.url for region in store.regions] == [str(a), str(b)]
    assert all(region.storage_options.get_secret_value() == {} for region in store.regions)

    single = CheckpointStore(regions=str(a))
    assert [region.url for region in single.regions] == [str(a)]

    mixed = CheckpointStore(regions=[{"url": str(a), "name": "one"}, Region(url=str(b))])
    assert [(r.url, r.name) for r in mixed.regions] == [(str(a), "one"), (str(b), None)]

    info = store.save({"x": torch.ones(1)}, lineage="s")
    assert info.regions == [str(a), str(b)]


@pytest.mark.parametrize("bad", [{"regions": []}, {"regions": ["/tmp"], "write_quorum": 0}, {"hash_algorithm": "md5"}])
def test_invalid_configuration_is_rejected_at_construction(bad: dict[str, Any]) -> None:
    kwargs = {"regions": ["/tmp/a", "/tmp/b"], **bad}
    with pytest.raises(ValidationError):
        CheckpointStore(**kwargs)


def test_region_rejects_unknown_fields() -> None:
    from prefect_recovery.core.errors import RegionConfigError

    # The store's own error (not pydantic's, which would quote the options: credentials).
    with pytest.raises(RegionConfigError, match="did you mean 'storage_options'"):
        Region(url="/tmp", storage_option={"typo": True})


def test_write_quorum_larger_than_region_count_is_a_clear_error(tmp_path: Path) -> None:
    a, b = make_regions(tmp_path)
    with pytest.raises(CheckpointError) as excinfo:
        store = CheckpointStore(regions=[str(a), str(b)], write_quorum=3)
        store.save({"x": torch.ones(1)}, lineage="q")
    message = str(excinfo.value)
    assert "write_quorum" in message
    assert "3" in message and "2" in message
    assert not any(p.is_file() for p in a.rglob("*"))  # nothing half-written


def test_same_region_twice_is_rejected(tmp_path: Path) -> None:
    (a,) = make_regions(tmp_path, 1)
    with pytest.raises(CheckpointError, match="distinct"):
        CheckpointStore(regions=[str(a), str(a)]).list()


def test_checkpoint_save_without_lineage_says_lineage_is_missing(tmp_path: Path) -> None:
    store = CheckpointStore.default(tmp_path)
    with pytest.raises((TypeError, ValueError), match="lineage"):
        store.save({"model": {"w": torch.ones(2)}})


def test_checkpoint_operations_have_plain_names_and_the_old_overloads_warn(tmp_path: Path) -> None:
    """save/load keep Prefect's block meaning; checkpoints are save_checkpoint/load_checkpoint. The old
    checkpoint forms still work for now, each with a DeprecationWarning naming the replacement."""
    import warnings

    store = CheckpointStore.default(tmp_path)
    state = {"model": {"w": torch.arange(4.0)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain names warn about nothing
        info = store.save_checkpoint(state, lineage="plain", step=1)
        loaded = store.load_checkpoint(lineage="plain", version=info.version)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])

    with pytest.warns(DeprecationWarning, match="save_checkpoint"):
        old = store.save(state, lineage="plain", step=2)
    with pytest.warns(DeprecationWarning, match="load_checkpoint"):
        again = store.load(lineage="plain", version=old.version)
    assert old.version == info.version + 1 and torch.equal(again["model"]["w"], state["model"]["w"])


# -- registration ---------------------------------------------------------------------------------------------
def test_package_is_a_prefect_collection() -> None:
    from prefect.blocks.core import Block
    from prefect.plugins import load_prefect_collections
    from prefect.utilities.dispatch import lookup_type

    [entry_point] = [ep for ep in metadata.entry_points(group="prefect.collections") if ep.name == "prefect_recovery"]
    assert entry_point.value.split(":")[0].split(".")[0] == "prefect_recovery"
    module = load_prefect_collections()["prefect_recovery"]  # what Prefect itself imports at startup
    assert getattr(module, "CheckpointStore", None) is CheckpointStore
    assert lookup_type(Block, "checkpoint-store") is CheckpointStore


def test_prefect_block_register_and_block_type_listed(prefect_server) -> None:
    env = api_env()
    registered = prefect_cli("block", "register", "-m", "prefect_recovery", env=env)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "Checkpoint Store" in registered.stdout

    listed = prefect_cli("block", "type", "ls", env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "checkpoint-store" in listed.stdout

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("checkpoint-store")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
    assert block_type.name == "Checkpoint Store"
    assert "CheckpointStore.load(" in (block_type.code_example or "")
    assert {"regions", "write_quorum"} <= set(schema.fields["properties"])


class TestCheckpointStoreStandards(BlockStandardTestSuite):
    """Prefect's own checks for published blocks (description, docs URL, field docs, code example)."""

    @pytest.fixture
    def block(self) -> type[CheckpointStore]:
        return CheckpointStore

    def test_has_a_valid_image(self, block: type[CheckpointStore]) -> None:  # the original downloads the logo
        # none yet (the UI's generic icon), and never PrefectHQ's own avatar again
        assert block._logo_url is None

    def test_documentation_url_names_a_file_of_this_repository(self, block: type[CheckpointStore]) -> None:
        prefix = "https://github.com/prefect-recovery/prefect-recovery/blob/main/"
        assert block._documentation_url.startswith(prefix)
        assert (Path(__file__).parents[1] / block._documentation_url.removeprefix(prefix)).is_file()

    def test_retention_left_empty_says_what_it_means(self, block: type[CheckpointStore]) -> None:
        # the block page shows the title beside the value: not a bare "None"
        assert "keep every version" in block.model_json_schema()["properties"]["retention"]["title"]

    def test_region_fields_have_descriptions(self) -> None:
        for name, field in Region.model_fields.items():
            assert field.description, f"Region.{name} has no description"
