"""A region can take its credentials from a saved Prefect credentials block (prefect-aws's
``AwsCredentials``), against a real S3 peer (moto server) and the session's Prefect server."""

from __future__ import annotations

import json
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


# -- the credential blocks as blocks: GCP and Azure converters, nested references ---------------------------
def test_gcp_credentials_block_becomes_gcsfs_options(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from prefect_gcp import GcpCredentials

    from prefect_recovery.blocks.credentials import options_from_credentials

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    info = {  # a service account key as Google issues it (GcpCredentials parses it on validation)
        "type": "service_account",
        "project_id": "ml",
        "private_key_id": "1",
        "private_key": pem.decode(),
        "client_email": "ci@ml.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    from_info = options_from_credentials(GcpCredentials(service_account_info=info, project="ml"))
    assert from_info == {"token": info, "project": "ml"}
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(info))
    from_file = options_from_credentials(GcpCredentials(service_account_file=key_file, project="ml"))
    assert from_file == {"token": str(key_file), "project": "ml"}
    region = CheckpointStore(regions=[{"url": "gs://b/x", "credentials": GcpCredentials(service_account_info=info)}])
    body = pem.decode().splitlines()[1]
    assert body not in repr(region) and body not in region.model_dump_json()


def test_azure_credentials_block_saves_and_loads_against_azurite(prefect_server, tmp_path_factory):
    from helpers.emulators import azure_connection_string, azure_emulator
    from prefect_azure import AzureBlobStorageCredentials

    with azure_emulator(bucket="creds", log_dir=tmp_path_factory.mktemp("azurite")) as azure:
        endpoint = azure.endpoint
        block = AzureBlobStorageCredentials(connection_string=azure_connection_string(endpoint))
        name = f"azurite-{uuid.uuid4().hex[:8]}"
        block.save(name)
        # the block itself, and its text reference, reach the same container
        for credentials in (AzureBlobStorageCredentials.load(name), f"azure-blob-storage-credentials/{name}"):
            lineage = f"az-{uuid.uuid4().hex[:6]}"
            store = CheckpointStore(regions=[{"url": f"az://creds/{name}", "credentials": credentials}])
            state = {"w": torch.arange(100, dtype=torch.float32)}
            info = store.save_checkpoint(state, lineage=lineage, step=1)
            assert info.version == 1
            assert torch.equal(store.load_checkpoint(lineage=lineage)["w"], state["w"])
            assert azure.fs().ls(f"creds/{name}/lineages/{lineage}/manifests")

    from prefect_recovery.blocks.credentials import options_from_credentials

    principal = AzureBlobStorageCredentials(
        account_url="https://ckptacct.blob.core.windows.net", client_id="app", tenant_id="t", client_secret=SECRET
    )
    assert options_from_credentials(principal) == {
        "account_name": "ckptacct",
        "client_id": "app",
        "tenant_id": "t",
        "client_secret": SECRET,
    }


def test_a_credentials_block_nests_as_a_reference_and_loads_back(prefect_server, s3):
    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials

    name = f"nested-{uuid.uuid4().hex[:8]}"
    AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=SECRET,
        aws_client_parameters={"endpoint_url": s3.endpoint},
    ).save(name)
    store = CheckpointStore(regions=[{"url": f"s3://creds/{name}", "credentials": AwsCredentials.load(name)}])
    store.save(f"store-{name}")
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(f"store-{name}", "checkpoint-store", include_secrets=True)
    # the store's document keeps a reference to the credentials' own document, never their secrets
    assert SECRET not in json.dumps(document.data, default=str)
    assert set(document.data["regions"][0]["credentials"]) == {"$ref"}

    loaded = CheckpointStore.load(f"store-{name}")
    credentials = loaded.regions[0].credentials
    assert isinstance(credentials, AwsCredentials)
    assert credentials.aws_secret_access_key.get_secret_value() == SECRET
    info = loaded.save_checkpoint({"x": torch.ones(3)}, lineage="nested", step=1)
    assert torch.equal(loaded.load_checkpoint(lineage="nested", version=info.version)["x"], torch.ones(3))


def test_an_unsaved_credentials_block_cannot_be_saved_inside_a_store(prefect_server):
    from prefect_aws import AwsCredentials

    from prefect_recovery.core.errors import RegionConfigError

    store = CheckpointStore(
        regions=[{"url": "s3://creds/x", "credentials": AwsCredentials(aws_secret_access_key=SECRET)}]
    )
    with pytest.raises(RegionConfigError, match="not saved") as failure:
        store.save(f"unsaved-{uuid.uuid4().hex[:8]}")
    assert SECRET not in str(failure.value)


def test_a_reference_to_a_deleted_credentials_block_is_a_clear_error(prefect_server):
    from prefect_recovery.core.errors import RegionUnavailableError

    missing = {"$ref": {"block_document_id": str(uuid.uuid4())}}
    with pytest.raises(RegionUnavailableError, match="deleted"):
        CheckpointStore(regions=[{"url": "s3://creds/x", "credentials": missing}])
