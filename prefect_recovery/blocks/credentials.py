"""Storage options from the Prefect credential blocks users already have.

A region's ``credentials`` is one of PrefectHQ's credential blocks (prefect-aws's
``AwsCredentials``, prefect-gcp's ``GcpCredentials``, prefect-azure's
``AzureBlobStorageCredentials``), given three ways:

* the block itself (``Region(credentials=AwsCredentials.load("prod"))``);
* a nested block reference ``{"$ref": {"block_document_id": ...}}``: what the Prefect UI's block
  picker writes, and what a saved store keeps, so the credentials' secrets stay in their own block
  document (masked there by the server) and never in the store's;
* the text reference ``"<block-type-slug>/<name>"`` (``"aws-credentials/prod"``), loaded when the
  store opens.

The block's secrets become the region's fsspec storage options; options given on the region itself
win over them. The integrations are imported only when a region names their block: prefect-azure
alone takes seconds to import. Secrets never enter an error message: errors name the block and the
field, not its value.
"""

from __future__ import annotations

import importlib
from typing import Any
from uuid import UUID

from ..core.errors import RegionConfigError, RegionUnavailableError

# block type slug -> (module, class, the distribution that ships it)
CREDENTIAL_BLOCKS: dict[str, tuple[str, str, str]] = {
    "aws-credentials": ("prefect_aws", "AwsCredentials", "prefect-aws"),
    "gcp-credentials": ("prefect_gcp", "GcpCredentials", "prefect-gcp"),
    "azure-blob-storage-credentials": ("prefect_azure", "AzureBlobStorageCredentials", "prefect-azure"),
}


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
    # a service principal (adlfs takes the same three names)
    for field in ("client_id", "tenant_id", "client_secret"):
        if getattr(block, field, None):
            options[field] = _secret(getattr(block, field))
    return options


_CONVERTERS = {
    "aws-credentials": _aws,
    "gcp-credentials": _gcp,
    "azure-blob-storage-credentials": _azure,
}


def credential_block_class(slug: str, where: str = "credentials") -> type[Any]:
    """The block class of a credentials block type slug, importing its integration."""
    if slug not in CREDENTIAL_BLOCKS:
        raise RegionConfigError(
            f"{where}: a {slug!r} block cannot be a region's credentials; use one of {sorted(CREDENTIAL_BLOCKS)}"
        )
    module, name, distribution = CREDENTIAL_BLOCKS[slug]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise RegionConfigError(f"{where}: a {slug!r} block needs {distribution}: pip install {distribution}") from None


def block_reference_id(value: Any) -> str | None:
    """The block document id of a ``{"$ref": {"block_document_id": ...}}`` reference, else None."""
    if isinstance(value, dict) and isinstance(value.get("$ref"), dict):
        ref = value["$ref"].get("block_document_id")
        return str(ref) if ref is not None else None
    return None


def load_referenced_block(document_id: str, where: str = "credentials") -> Any:
    """The credentials block saved as document ``document_id`` (a UI picker's reference)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            document = client.read_block_document(UUID(document_id), include_secrets=True)
    except Exception as exc:  # deleted document, no API, malformed id
        raise RegionUnavailableError(
            where,
            f"cannot read the credentials block document {document_id} ({type(exc).__name__}): was it "
            "deleted? Pick another credentials block for this region.",
        ) from None
    slug = document.block_type.slug if document.block_type is not None else "?"
    cls = credential_block_class(slug, where)
    # _sync: the store may be loaded inside an event loop (Block.aload); this is a one-time read
    return cls.load_from_ref(document_id, _sync=True)


def check_credentials(value: Any, where: str = "credentials") -> Any:
    """A region's credentials as given: None, a ``"<slug>/<name>"`` string, a credentials block, or a
    ``$ref`` to a saved one (loaded here). Anything else is a RegionConfigError that never quotes it."""
    from prefect.blocks.core import Block

    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, Block):
        credential_block_class(value.get_block_type_slug(), where)
        return value
    document_id = block_reference_id(value)
    if document_id is not None:
        return load_referenced_block(document_id, where)
    raise RegionConfigError(
        f"{where}: credentials must be a credentials block ({', '.join(sorted(CREDENTIAL_BLOCKS))}), a reference "
        f"'<type>/<name>' to a saved one, or {{'$ref': {{'block_document_id': ...}}}}; not {type(value).__name__}"
    )


def options_from_credentials(credentials: Any) -> dict[str, Any]:
    """fsspec storage options from a credentials block, or from the saved block ``"<slug>/<name>"``."""
    if isinstance(credentials, str):
        return options_from_block(credentials)
    return _CONVERTERS[credentials.get_block_type_slug()](credentials)


def options_from_block(reference: str) -> dict[str, Any]:
    """fsspec storage options from the saved credentials block ``"<block-type-slug>/<name>"``."""
    slug, _, name = reference.partition("/")
    if not name or slug not in _CONVERTERS:
        raise RegionUnavailableError(
            reference,
            f"credentials must name a saved block as '<type>/<name>' with type one of {sorted(_CONVERTERS)}",
        )
    try:
        block = credential_block_class(slug, reference).load(name, _sync=True)
    except Exception as exc:  # unknown block, integration not installed, no API
        raise RegionUnavailableError(
            reference,
            f"cannot load credentials block {reference!r} ({type(exc).__name__}); is it saved on this Prefect "
            f"server, and is the integration for {slug!r} installed (prefect-aws, prefect-gcp, prefect-azure)?",
        ) from None
    return _CONVERTERS[slug](block)
