"""No secret from a region's storage options or credentials ever leaves the process in an error, a log
line, a Prefect event, CLI output or a repr (issue 12, class 1).

Regions are real: a ``gs://`` region whose token is a raw access token or a service-account JSON string
(gcsfs checks such a token against Google's tokeninfo endpoint, and the library's error carries it in the
request URL, URL-encoded), S3 and Azure regions behind a port that refuses connections, and mistyped
region configurations. Every secret below is random per run, so a match is a leak, never a coincidence.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid
from urllib.parse import quote, quote_plus

import pytest
import torch
from conftest import CLI
from helpers.emulators import FAST_FAIL_OPTIONS, refused_endpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefect_recovery import CheckpointStore
from prefect_recovery.core import CheckpointError, Store, open_region
from prefect_recovery.core.errors import RegionError
from prefect_recovery.training.state_io import load_state

WINDOW = 10  # any run of this many characters of a secret in an output is a leak


def random_secret(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex}{uuid.uuid4().hex[:8].upper()}/+="


def service_account(private_key_body: str, key_id: str, email_user: str) -> dict[str, str]:
    return {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": key_id,
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{private_key_body}\n-----END PRIVATE KEY-----\n",
        "client_email": f"{email_user}@proj.iam.gserviceaccount.com",
        "client_id": "1234",
    }


def leaks(text: str, secrets: list[str]) -> list[str]:
    """Pieces of ``secrets`` (raw, URL-encoded or JSON-escaped, whole or any WINDOW-long part) in ``text``."""
    found = []
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}:
            if len(form) < WINDOW:
                if form in text:
                    found.append(form)
                continue
            for start in range(len(form) - WINDOW + 1):
                if form[start : start + WINDOW] in text:
                    found.append(form[start : start + WINDOW])
                    break
    return found


def assert_no_leak(text: str, secrets: list[str]) -> None:
    found = leaks(text, secrets)
    assert not found, f"secret material {found[:3]} in:\n{text[:3000]}"


def small_state() -> dict:
    return {"w": torch.arange(256, dtype=torch.float32), "step": 1}


@pytest.fixture(scope="module")
def refused() -> str:
    with refused_endpoint() as endpoint:
        yield endpoint


def gs_region_with_raw_token(endpoint: str) -> tuple[dict, list[str]]:
    token = random_secret("ya29.")
    return {"url": "gs://ckpt-bucket/prod", "storage_options": {"endpoint_url": endpoint, "token": token}}, [token]


def gs_region_with_json_token(endpoint: str) -> tuple[dict, list[str]]:
    body, key_id, user = random_secret("MIIE"), uuid.uuid4().hex, f"sa{uuid.uuid4().hex[:12]}"
    token = json.dumps(service_account(body, key_id, user))
    region = {"url": "gs://ckpt-bucket/prod", "storage_options": {"endpoint_url": endpoint, "token": token}}
    return region, [body, key_id, user]


def s3_region(endpoint: str) -> tuple[dict, list[str]]:
    key, secret = "AKIA" + uuid.uuid4().hex[:16].upper(), random_secret()
    options = {"endpoint_url": endpoint, "key": key, "secret": secret, **FAST_FAIL_OPTIONS["s3"]}
    return {"url": "s3://ckpt-bucket/prod", "storage_options": options}, [key, secret]


def azure_region(endpoint: str) -> tuple[dict, list[str]]:
    account_key = random_secret()
    connection = (
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={account_key};BlobEndpoint={endpoint}/acct;"
    )
    return {"url": "az://ckpt/prod", "storage_options": {"connection_string": connection}}, [account_key, connection]


REGIONS = {
    "gs-raw-token": gs_region_with_raw_token,
    "gs-json-token": gs_region_with_json_token,
    "s3-key-secret": s3_region,
    "azure-connection-string": azure_region,
}


def fast(store: CheckpointStore) -> CheckpointStore:
    for region in store.core.regions:
        region.retry_attempts = 1
        region.call_deadline = 10.0
    return store


# -- backend errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gs-raw-token", "gs-json-token"])
def test_an_unreachable_gs_region_never_echoes_its_token(kind, refused, tmp_path, caplog):
    """gcsfs's own error puts the token in the tokeninfo URL; the store's error names the region, not the token."""
    region, secrets = REGIONS[kind](refused)
    store = fast(CheckpointStore(regions=[region]))
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointError) as failure:
        store.save(small_state(), lineage="leak", step=1)
    message = str(failure.value)
    assert "gs://ckpt-bucket/prod" in message  # still says which region failed
    assert_no_leak(message, secrets)
    assert_no_leak(caplog.text, secrets)


@pytest.mark.parametrize(
    "kind",
    list(REGIONS),
)
def test_every_store_operation_on_a_down_region_is_free_of_secrets(kind, refused, tmp_path, caplog):
    """save (quorum not met), load, list, verify and the reachability probe next to a healthy local region."""
    region, secrets = REGIONS[kind](refused)
    local = tmp_path / "local"
    local.mkdir()
    store = fast(CheckpointStore(regions=[str(local), region], write_quorum=2))
    outputs: list[str] = []
    with caplog.at_level(logging.INFO):
        with pytest.raises(CheckpointError) as failed_save:
            store.save(small_state(), lineage="leak", step=1)
        outputs.append(str(failed_save.value))
        relaxed = fast(CheckpointStore(regions=[str(local), region], write_quorum=1, straggler_grace_seconds=0))
        info = relaxed.save(small_state(), lineage="leak", step=2)
        outputs.append(info.model_dump_json())
        outputs.append(json.dumps([i.model_dump(mode="json") for i in relaxed.list("leak")]))
        _reachable, down = relaxed.core.reachable_regions()
        outputs.append(json.dumps(down))
        outputs.append(relaxed.verify().model_dump_json())
        with pytest.raises(CheckpointError) as failed_load:
            load_state(Store([relaxed.core.regions[1]]), lineage="leak")
        outputs.append(str(failed_load.value))
    assert info.lagging, "the down region should be reported lagging"
    for text in [*outputs, caplog.text]:
        assert_no_leak(text, secrets)


# -- events -----------------------------------------------------------------------------------------------------
def test_the_save_failed_event_carries_no_secret(prefect_server, refused):
    from helpers.prefect_events import read_lineage_events

    region, secrets = gs_region_with_json_token(refused)
    lineage = f"leak-{uuid.uuid4().hex[:8]}"
    store = fast(CheckpointStore(regions=[region]))
    with pytest.raises(CheckpointError):
        store.save(small_state(), lineage=lineage, step=3)
    event = read_lineage_events(lineage, {"prefect-recovery.save.failed"})["prefect-recovery.save.failed"]
    assert "gs://ckpt-bucket/prod" in json.dumps(event.payload)  # names the region...
    assert_no_leak(event.model_dump_json(), secrets)  # ...never its token


# -- CLI --------------------------------------------------------------------------------------------------------
def test_ls_json_and_human_output_of_a_saved_block_carry_no_secret(prefect_server, refused, tmp_path):
    from prefect.settings import PREFECT_API_URL

    region, secrets = gs_region_with_raw_token(refused)
    local = tmp_path / "local"
    local.mkdir()
    s3, s3_secrets = s3_region(refused)
    name = f"leaky-{uuid.uuid4().hex[:8]}"
    CheckpointStore(regions=[str(local), region, s3]).save(name)
    only_down = f"down-{uuid.uuid4().hex[:8]}"
    CheckpointStore(regions=[region, s3]).save(only_down)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for args in (
        ["ls", "--json", "--store", name],
        ["ls", "--store", name],
        ["ls", "--json", "--store", only_down],
        ["verify", "--json", "--store", name],
        ["verify", "--store", name],
    ):
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert_no_leak(output, secrets + s3_secrets)
        if args[1] == "--json":
            json.loads(result.stdout)  # still one JSON document


# -- configuration mistakes -------------------------------------------------------------------------------------
MISTYPED = {
    "uri-for-url": lambda secret: {"uri": "s3://bucket/x", "storage_options": {"key": "AKIAX", "secret": secret}},
    "options-as-json-string": lambda secret: {
        "url": "s3://bucket/x",
        "storage_options": json.dumps({"key": "AKIAX", "secret": secret}),
    },
    "misspelled-storage-options": lambda secret: {"url": "s3://bucket/x", "storage_option": {"secret": secret}},
    "options-as-list": lambda secret: {"url": "s3://bucket/x", "storage_options": [["secret", secret]]},
}


@pytest.mark.parametrize("case", list(MISTYPED))
def test_a_mistyped_region_is_a_clear_typed_error_without_the_secret(case):
    from prefect_recovery.core.errors import RegionConfigError

    secret = random_secret()
    with pytest.raises(RegionConfigError) as failure:
        CheckpointStore(regions=[MISTYPED[case](secret)])
    message = str(failure.value)
    assert_no_leak(message, [secret])
    assert_no_leak(repr(failure.value), [secret])
    # It says which field is wrong and what to write instead.
    expected = {
        "uri-for-url": "'url'",
        "options-as-json-string": "storage_options",
        "misspelled-storage-options": "'storage_options'",
        "options-as-list": "storage_options",
    }[case]
    assert expected in message, message


def test_a_mistyped_region_in_a_plain_region_model_is_also_clean():
    from prefect_recovery.blocks.checkpoint_store import Region
    from prefect_recovery.core.errors import RegionConfigError

    secret = random_secret()
    with pytest.raises(RegionConfigError) as failure:
        Region(uri="s3://b/x", storage_options={"secret": secret})
    assert_no_leak(str(failure.value), [secret])


def test_other_validation_errors_of_the_block_hide_their_input():
    """A wrong type elsewhere in the block (pydantic's own error) shows no input value either."""
    secret = random_secret()
    with pytest.raises(ValueError) as failure:
        CheckpointStore(regions=[{"url": "s3://b/x", "storage_options": {"secret": secret}}], write_quorum=secret)
    assert_no_leak(str(failure.value), [secret])


# -- repr -------------------------------------------------------------------------------------------------------
def test_reprs_and_dumps_of_regions_and_stores_hide_secrets(refused):
    from prefect_recovery.blocks.checkpoint_store import Region
    from prefect_recovery.core.errors import RegionConfigError

    region, secrets = azure_region(refused)
    password = uuid.uuid4().hex + "Zq"  # URL-safe: a valid URL with user info
    store = CheckpointStore(regions=[region, {"url": f"s3://AKIAUSER:{password}@bucket/x"}])
    for text in (repr(store), str(store), repr(store.regions), repr(Region(**region)), repr(store.core.regions)):
        assert_no_leak(text, [*secrets, password])
    # The block document keeps storage options secret (the URL is saved as given: it is how to reach the region).
    for text in (store.model_dump_json(), json.dumps(store.model_dump(mode="json"))):
        assert_no_leak(text, secrets)
    # A password that breaks the URL (a '/' in it) is refused without being shown.
    broken = random_secret()
    with pytest.raises(RegionConfigError) as failure:
        CheckpointStore(regions=[f"s3://AKIAUSER:{broken}@bucket/x"])
    assert_no_leak(str(failure.value), [broken])


# -- a sweep of random secrets ----------------------------------------------------------------------------------
secret_text = st.text(
    alphabet=st.characters(codec="ascii", categories=("L", "N", "P", "S")), min_size=12, max_size=80
).filter(lambda s: len(set(s)) >= 6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=secret_text)
def test_any_gs_token_stays_out_of_the_error(refused, token):
    """Random tokens, with every ASCII punctuation gcsfs then URL-encodes, through the tokeninfo failure."""
    region = open_region("gs://ckpt-bucket/x", {"endpoint_url": refused, "token": token})
    region.retry_attempts = 1
    with pytest.raises(RegionError) as failure:
        region.put_if_absent("blobs/x", b"data")
    assert_no_leak(str(failure.value), [token])
    assert_no_leak(repr(region), [token])


@settings(max_examples=40, deadline=None)
@given(secret=secret_text, case=st.sampled_from(sorted(MISTYPED)))
def test_any_secret_in_a_mistyped_region_stays_out_of_the_error(secret, case):
    from prefect_recovery.core.errors import RegionConfigError

    with pytest.raises(RegionConfigError) as failure:
        CheckpointStore(regions=[MISTYPED[case](secret)])
    assert_no_leak(str(failure.value), [secret])


@settings(max_examples=40, deadline=None)
@given(
    secret=secret_text,
    shape=st.sampled_from(["raw", "url", "url-plus", "json", "repr", "prefix", "suffix", "middle"]),
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_backend_text_with_any_secret_in_any_encoding_is_scrubbed(secret, shape, before, after):
    """What a backend may print of a secret: itself, URL- or JSON-encoded, or cut to a part of it."""
    from prefect_recovery.core.redact import Redactor

    shown = {
        "raw": secret,
        "url": quote(secret, safe=""),
        "url-plus": quote_plus(secret),
        "json": json.dumps(secret),
        "repr": repr(secret),
        "prefix": secret[: max(WINDOW, len(secret) // 2)],
        "suffix": secret[-max(WINDOW, len(secret) // 2) :],
        "middle": secret[2:-2],
    }[shape]
    redactor = Redactor()
    redactor.add({"token": secret, "endpoint_url": "http://127.0.0.1:9"})
    scrubbed = redactor.scrub(f"{before}{shown}{after}")
    assert_no_leak(scrubbed, [secret])
    # Text around the secret survives (the message stays useful), minus what overlaps the secret.
    if not leaks(before, [secret]) and len(before) > 2 * WINDOW:
        assert before[:WINDOW] in scrubbed


def test_cli_prints_the_region_but_not_the_secret_in_a_url(tmp_path):
    """A secret in the URL's user info (s3://KEY:SECRET@bucket) is not printed back either."""
    password = random_secret()
    result = subprocess.run(
        [*CLI, "ls", "--json", "--region", f"s3://AKIAUSER:{password}@bucket/x", "--region", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert_no_leak(result.stdout + result.stderr, [password])


def test_test_secrets_would_be_found_if_printed():
    """The leak detector itself: every encoding and any long part of a secret counts."""
    secret = random_secret()
    assert leaks(f"x {secret} y", [secret])
    assert leaks(quote_plus(json.dumps({"k": secret})), [secret])
    assert leaks(f"...{secret[5 : 5 + WINDOW]}...", [secret])
    assert not leaks("nothing here", [secret])
