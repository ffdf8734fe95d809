"""A region can take its credentials from a saved Prefect credentials block (prefect-aws's
``AwsCredentials``), against a real S3 peer (moto server) and the session's Prefect server."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch
from helpers.emulators import s3_emulator

from prefect_recovery import CheckpointStore
from prefect_recovery.core.errors import RegionUnavailableError

SECRET = "not-a-real-secret-but-must-never-show"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_emulator(bucket="creds", log_dir=tmp_path_factory.mktemp("moto")) as running:
        yield running


def test_region_uses_a_saved_aws_credentials_block(prefect_server, s3, caplog):
    from prefect_aws import AwsCredentials

    name = f"moto-{uuid.uuid4().hex[:8]}"
    AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3.endpoint},
    ).save(name)
    store = CheckpointStore(regions=[{"url": f"s3://creds/{name}", "credentials": f"aws-credentials/{name}"}])
    state = {"w": torch.arange(1000, dtype=torch.float32), "step": 3}

    with caplog.at_level(logging.DEBUG):
        info = store.save(state, lineage="creds", step=3)
        loaded = store.load(lineage="creds")

    assert info.version == 1 and not info.lagging
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    # The objects really are in the bucket the block's endpoint points at.
    assert s3.fs().ls(f"creds/{name}/lineages/creds/manifests")
    assert SECRET not in caplog.text
    # The saved store block keeps only the reference, not the secret.
    assert SECRET not in store.model_dump_json()


def test_an_unknown_credentials_block_is_a_clear_error_without_secrets(prefect_server):
    store = CheckpointStore(regions=[{"url": "s3://creds/x", "credentials": "aws-credentials/no-such-block"}])
    with pytest.raises(RegionUnavailableError) as failure:
        store.save({"x": torch.zeros(1)}, lineage="nope")
    assert "aws-credentials/no-such-block" in str(failure.value)
    assert "prefect-aws" in str(failure.value)


def test_credentials_must_name_a_known_block_type(prefect_server):
    store = CheckpointStore(regions=[{"url": "s3://creds/x", "credentials": "secret/whatever"}])
    with pytest.raises(RegionUnavailableError, match="aws-credentials"):
        store.list()
