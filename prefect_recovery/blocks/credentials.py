"""Storage options from the Prefect credential blocks users already have.

A region may name a saved block (``"aws-credentials/prod"``, ``"gcp-credentials/ml"``,
``"azure-blob-storage-credentials/ckpt"``); when the matching integration (prefect-aws,
prefect-gcp, prefect-azure) is installed, its secrets become the region's fsspec storage
options. Options given on the region itself win over the block's. Secrets never enter an error
message: errors name the block and the field, not its value.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import RegionUnavailableError


def _secret(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _aws(block: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if block.aws_access_key_id:
        options["key"] = block.aws_access_key_id
    if block.aws_secret_access_key:
        options["secret"] = _secret(block.aws_secret_access_key)
    if block.aws_session_token:
        options["token"] = block.aws_session_token
    if block.profile_name:
        options["profile"] = block.profile_name
    client_kwargs: dict[str, Any] = {}
    if block.region_name:
        client_kwargs["region_name"] = block.region_name
    parameters = getattr(block, "aws_client_parameters", None)
    if parameters is not None and parameters.endpoint_url:
        options["endpoint_url"] = parameters.endpoint_url
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def _gcp(block: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    info = _secret(block.service_account_info) if block.service_account_info else None
    if info:
        options["token"] = dict(info)
    elif block.service_account_file:
        options["token"] = str(block.service_account_file)
    if block.project:
        options["project"] = block.project
    return options


def _azure(block: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(block, "connection_string", None):
        options["connection_string"] = _secret(block.connection_string)
    if getattr(block, "account_url", None):
        options["account_name"] = block.account_url.split("//", 1)[-1].split(".", 1)[0]
    return options


_CONVERTERS = {
    "aws-credentials": _aws,
    "gcp-credentials": _gcp,
    "azure-blob-storage-credentials": _azure,
}


def options_from_block(reference: str) -> dict[str, Any]:
    """fsspec storage options from the saved credentials block ``"<block-type-slug>/<name>"``."""
    from prefect.blocks.core import Block

    slug = reference.split("/", 1)[0]
    if "/" not in reference or slug not in _CONVERTERS:
        raise RegionUnavailableError(
            reference,
            f"credentials must name a saved block as '<type>/<name>' with type one of {sorted(_CONVERTERS)}",
        )
    try:
        block = Block.load(reference)
    except Exception as exc:  # unknown block, integration not installed, no API
        raise RegionUnavailableError(
            reference,
            f"cannot load credentials block {reference!r} ({type(exc).__name__}); is it saved on this Prefect "
            f"server, and is the integration for {slug!r} installed (prefect-aws, prefect-gcp, prefect-azure)?",
        ) from None
    return _CONVERTERS[slug](block)
