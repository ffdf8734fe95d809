"""The ``CheckpointStore`` block: where checkpoints live, saved on the Prefect server.

The block holds configuration only (regions, quorum, hashing, chunking) and builds a core
``Store`` on first use. The checkpoint operations have their own names, so Prefect's block
operations keep their meaning:

* ``CheckpointStore.load("name")`` and ``store.save("name")`` are Prefect's block document
  operations, unchanged;
* ``store.save_checkpoint(state, lineage=..., step=...)`` and ``store.load_checkpoint(lineage=...)``
  save and load checkpoints.

Deprecated (0.2, removed in 0.4): ``store.save(state, lineage=...)`` and, on an instance,
``store.load(lineage=...)`` still save and load checkpoints, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.core import Block, schema_extra
from prefect.filesystems import WritableFileSystem
from prefect.types import SecretDict
from prefect.utilities.names import obfuscate
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from ..core import CheckpointInfo, Store, VerifyReport, open_region, verify_store
from ..core.audit import AuditReport, audit_store
from ..core.errors import CheckpointError, RegionConfigError, SigningKeyError
from ..core.layout import check_base_lineage
from ..core.region import check_url, redact_url
from ..core.region_marker import guard_empty_mounts, init_region
from ..core.retention import RetentionPolicy
from ..core.signing import Keyring, ManifestKey, SignatureAlgorithm, load_key
from ..core.store import DEFAULT_CHUNK_BYTES, check_regions
from ..telemetry import default_observers
from ..training.state_io import load_state, save_state
from .async_api import AsyncStoreApi
from .result_storage import ResultStorage

HOME_ENV = "PREFECT_RECOVERY_HOME"
DEFAULT_HOME = ".prefect-recovery"


def recovery_home() -> Path:
    """``$PREFECT_RECOVERY_HOME``, or ``./.prefect-recovery``."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


_REGION_FIELDS = ("url", "storage_options", "name", "credentials")


def _check_region_input(value: Any) -> Any:
    """A region as given (a dict): unknown fields and wrong types are a RegionConfigError that names
    the field and never its value (pydantic's own errors quote the input: a secret, here)."""
    if isinstance(value, Region) or not isinstance(value, Mapping):
        return value
    import difflib

    url = value.get("url")
    where = f"region {redact_url(url)}" if isinstance(url, str) and url.strip() else "a region"
    for key in value:
        if key not in _REGION_FIELDS:
            close = difflib.get_close_matches(str(key), _REGION_FIELDS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RegionConfigError(
                f"{where}: unknown field {str(key)[:40]!r}; {hint}a region takes {', '.join(_REGION_FIELDS)}"
            )
    if not isinstance(url, str) or not url.strip():
        raise RegionConfigError(f"{where}: 'url' is required: an fsspec URL or a local path")
    check_url(url)
    options = value.get("storage_options")
    if options is not None and not isinstance(options, Mapping) and not hasattr(options, "get_secret_value"):
        hint = " (a JSON string? give the object itself, e.g. json.loads(...))" if isinstance(options, str) else ""
        raise RegionConfigError(
            f"{where}: storage_options must be a mapping of fsspec options, not {type(options).__name__}{hint}"
        )
    if value.get("name") is not None and not isinstance(value["name"], str):
        raise RegionConfigError(f"{where}: 'name' must be a string, not {type(value['name']).__name__}")
    return value


class Region(BaseModel):
    """One copy of the store: an fsspec URL (or local path) and how to reach it."""

    # Validation errors never quote the input: storage options hold credentials.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str = Field(description="fsspec URL or local path, e.g. `/mnt/ckpt`, `gs://bucket/ckpt`, `s3://bucket/ckpt`.")
    name: str | None = Field(
        default=None, description="Display name in reports; defaults to the URL without credentials."
    )
    # Not in the JSON schema: Prefect's server masks secrets by dotted path and never looks inside a list, so
    # options typed into the UI here would be shown in clear. A saved store keeps them in its top-level
    # region_storage_options (masked value by value); CheckpointStore moves them there and back.
    storage_options: SkipJsonSchema[SecretDict] = Field(
        default_factory=lambda: SecretDict({}),
        description="Options passed to the fsspec filesystem (credentials, endpoint). Kept secret.",
    )
    # The UI schema (a picker of credentials blocks, or text) is set by CheckpointStore.model_json_schema:
    # pydantic cannot name the integrations' block schemas without importing them (seconds for prefect-azure).
    credentials: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "null"}]})] = Field(
        default=None,
        description="A credentials block (AwsCredentials, GcpCredentials or AzureBlobStorageCredentials, from "
        "prefect-aws/-gcp/-azure), or a saved one named '<type>/<name>', e.g. 'aws-credentials/prod'. The store "
        "keeps a reference, never a copy of its secrets. storage_options win over it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _check_region_input(value)

    @field_validator("credentials", mode="before")
    @classmethod
    def _check_credentials(cls, value: Any) -> Any:
        from .credentials import check_credentials

        return check_credentials(value)

    @property
    def key(self) -> str:
        """How ``CheckpointStore.region_storage_options`` names this region: its name, else its URL."""
        return self.name or self.url

    def __repr_args__(self) -> Any:  # the URL without user info or query (they may hold credentials)
        for key, value in super().__repr_args__():
            yield key, redact_url(value) if key == "url" and isinstance(value, str) else value

    def fsspec_options(self) -> dict[str, Any]:
        options = dict(self.storage_options.get_secret_value())
        if self.credentials is not None:
            from .credentials import options_from_credentials

            options = {**options_from_credentials(self.credentials), **options}
        return options


def _schema_extra(schema: dict[str, Any], model: type[Block]) -> None:
    """Prefect's block schema, without secret paths inside the region list.

    Prefect's server obfuscates secret fields by dotted path and does not look inside lists, so
    ``regions.storage_options.*`` would promise a masking that never happens. No secret is kept in
    the list: a saved store keeps the regions' storage options in ``region_storage_options`` (masked
    value by value) and their credentials blocks as references to their own (masked) documents.
    """
    schema_extra(schema, model)
    schema["secret_fields"] = [field for field in schema.get("secret_fields", []) if not field.startswith("regions.")]


def _credential_definitions() -> dict[str, dict[str, Any]]:
    """JSON schema definitions the UI turns into a picker of saved credentials blocks (by block type slug)."""
    from .credentials import CREDENTIAL_BLOCKS

    return {
        name: {"title": name, "type": "object", "block_type_slug": slug, "description": f"A {name} block ({dist})."}
        for slug, (_module, name, dist) in CREDENTIAL_BLOCKS.items()
    }


_DEPRECATED = (
    "CheckpointStore.{old} is deprecated for checkpoints (it also means Prefect's block {kind}); "
    "use store.{new}(...): same arguments, same result. The old form is removed in 0.4."
)


class _CheckpointOrBlockLoad:
    """On the class: Prefect's ``Block.load(name)``. On an instance: the deprecated checkpoint
    load (``load_checkpoint`` with a ``DeprecationWarning``)."""

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return Block.__dict__["load"].__get__(None, owner)

        def deprecated_load(**kwargs: Any) -> Any:
            warnings.warn(
                _DEPRECATED.format(old="load(lineage=...)", kind="load", new="load_checkpoint"),
                DeprecationWarning,
                stacklevel=2,
            )
            return instance.load_checkpoint(**kwargs)

        return deprecated_load


class CheckpointStore(ResultStorage, AsyncStoreApi, WritableFileSystem):
    """Immutable, versioned, content-verified checkpoints replicated over several regions.

    A save writes every blob to every region in parallel and commits when ``write_quorum``
    regions hold its manifest; a load picks the latest consistent version and verifies every
    byte, falling back to another region on a missing or corrupt copy.

    Example:
        ```python
        from prefect_recovery import CheckpointStore

        store = CheckpointStore.load("BLOCK_NAME")
        info = store.save_checkpoint({"model": model.state_dict()}, lineage="resnet", step=100)
        state = store.load_checkpoint(lineage="resnet")  # latest consistent version
        ```
    """

    model_config = ConfigDict(
        ignored_types=(_CheckpointOrBlockLoad,), json_schema_extra=_schema_extra, hide_input_in_errors=True
    )

    _block_type_name: ClassVar[str] = "Checkpoint Store"
    _block_type_slug: ClassVar[str] = "checkpoint-store"
    # No logo of its own yet: the UI shows its generic block icon (the former one was PrefectHQ's avatar).
    _logo_url: ClassVar[str | None] = None
    _documentation_url: ClassVar[str] = "https://github.com/prefect-recovery/prefect-recovery/blob/main/docs/REGIONS.md"
    _description: ClassVar[str] = "Versioned, verified, multi-region checkpoints for recoverable ML pipelines."

    regions: builtins.list[Region] = Field(
        description="Where copies of every checkpoint are written (two or more for safety).",
        min_length=1,
    )
    region_storage_options: SecretDict = Field(
        default_factory=lambda: SecretDict({}),
        description="fsspec storage options of each region (keys, tokens, endpoints) by region name, or by URL for "
        'a region without a name, e.g. {"eu": {"key": "...", "secret": "..."}}. Every value is kept secret: the '
        "UI masks it, and a masked value left as it is keeps the saved one. Options a Region is given in Python "
        "are saved here.",
    )
    write_quorum: int = Field(default=1, ge=1, description="How many regions must commit a save for it to count.")
    hash_algorithm: Literal["blake3", "sha256"] = Field(
        default="blake3", description="Digest used to name and verify blobs."
    )
    chunk_bytes: int = Field(
        default=DEFAULT_CHUNK_BYTES,
        ge=1024,
        description="Tensors larger than this are split into chunks of this many bytes.",
    )
    io_threads: int = Field(default=4, ge=1, le=64, description="Parallel transfers per region.")
    codec: Literal["none", "zstd", "bytegroup-zstd", "auto"] = Field(
        default="none",
        description="How chunks are stored: none (raw), zstd, bytegroup-zstd (byte planes of floating-point "
        "tensors, then zstd) or auto (per chunk, compressed only where it saves; docs/FORMAT.md, Codecs).",
    )
    region_codecs: dict[str, Literal["none", "zstd", "bytegroup-zstd", "auto"]] = Field(
        default_factory=dict,
        description="A codec of its own for some regions, by region name (or URL for a region without a name), "
        'e.g. {"s3://bucket/ckpt": "auto"} to compress a cloud region while a local one stays raw; the others '
        "use codec. Each region then holds the chunks in its own codec (docs/FORMAT.md, Region codecs).",
    )
    delta: bool = Field(
        default=False,
        description="Store changed chunks as the XOR with the lineage's previous version, compressed, where "
        "that saves (fine-tunes; at most 8 parents per chunk, which garbage collection keeps).",
    )
    straggler_grace_seconds: float | None = Field(
        default=30.0,
        ge=0,
        description="Once write_quorum regions hold a save's data, how long slower regions get before they are "
        "left lagging (healed later by verify --repair); at least as long again as the quorum took. "
        "Empty: always wait for every region.",
    )
    signing_key: str | None = Field(
        default=None,
        description="Name of a Prefect Secret block holding the key that signs every new manifest (its name is "
        "the key id). Empty: manifests are not signed.",
    )
    signing_algorithm: SignatureAlgorithm = Field(
        default="hmac-sha256",
        description="hmac-sha256 (the Secret holds 32+ random bytes) or ed25519 (the Secret holds a PEM private "
        "key; `prefect-recovery keygen` makes one).",
    )
    verification_keys: builtins.list[str] = Field(
        default_factory=list,
        description="Names of Secret blocks with older keys (rotated out) or other writers' keys whose "
        "signatures are still accepted; for ed25519 a public key PEM is enough. A Secret holding "
        '{"key_id": ..., "key": ...} names its key id itself (`prefect-recovery keygen --public` saves one).',
    )
    retention: RetentionPolicy | None = Field(
        default=None,
        title="Retention (empty: keep every version)",
        description="Which versions the audit keeps (keep_last, keep_every_steps, keep_milestones, keep_within). "
        "Empty: the audit deletes no version.",
    )
    gc_grace_seconds: float = Field(
        default=3600.0,
        ge=60,
        description="Garbage collection keeps unreferenced blobs younger than this, so a save still uploading "
        "never loses its data; longer than your longest save.",
    )
    accept_unsigned: bool = Field(
        default=False,
        description="With signing on, still accept unsigned manifests (while migrating a store written before "
        "signing was turned on).",
    )

    _store: Store | None = PrivateAttr(default=None)
    # How open_store / default() opened this instance (_store_spec), so a recovery's pipeline run
    # that opens the same store gets this instance back (see shared_store).
    _opened_as: tuple[Any, ...] | None = PrivateAttr(default=None)

    load = _CheckpointOrBlockLoad()

    @field_validator("regions", mode="before")
    @classmethod
    def _regions_from_urls(cls, value: Any) -> Any:
        if isinstance(value, (str, Region, dict)):
            value = [value]
        return [Region(url=item) if isinstance(item, str) else _check_region_input(item) for item in value]

    @model_validator(mode="after")
    def _region_codecs_name_regions(self) -> CheckpointStore:
        """Every key of ``region_codecs`` names exactly one region: a typo is an error, not a codec
        silently unused."""
        keys = [region.key for region in self.regions]
        for key in self.region_codecs:
            if keys.count(key) != 1:
                problem = "names no region" if key not in keys else "names several regions"
                raise RegionConfigError(
                    f"region_codecs: key {str(key)[:60]!r} {problem}; keys are region names (or URLs for regions "
                    f"without a name): {', '.join(redact_url(k) for k in keys)}"
                )
        return self

    @model_validator(mode="after")
    def _storage_options_into_regions(self) -> CheckpointStore:
        """A saved document's ``region_storage_options`` go back into its regions (``_to_block_document``
        takes them out); a key that names no region is an error, so no option is silently dropped."""
        by_key = self.region_storage_options.get_secret_value()
        if not by_key:
            return self
        keys = [region.key for region in self.regions]
        for key, options in by_key.items():
            matches = [region for region in self.regions if region.key == key]
            if len(matches) != 1:
                problem = "names no region" if not matches else "names several regions"
                raise RegionConfigError(
                    f"region_storage_options: key {str(key)[:60]!r} {problem}; keys are region names (or URLs for "
                    f"regions without a name): {', '.join(redact_url(k) for k in keys)}"
                )
            if not isinstance(options, Mapping):
                raise RegionConfigError(
                    f"region_storage_options[{str(key)[:60]!r}] must be an object of fsspec options, "
                    f"not {type(options).__name__}"
                )
            # options on the Region itself win, as they do over its credentials block
            matches[0].storage_options = SecretDict({**options, **matches[0].storage_options.get_secret_value()})
        self.region_storage_options = SecretDict({})
        return self

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Prefect's block schema, with a region's credentials offered as a picker of saved credentials blocks
        (the definitions carry their block type slugs) or a text reference."""
        schema = super().model_json_schema(*args, **kwargs)
        region = schema.get("definitions", {}).get("Region")
        if region is not None:
            # inline, not under definitions: Prefect's server drops a block's definitions and rebuilds them from
            # registered nested block schemas, which a block inside a list item cannot have
            region["properties"]["credentials"]["anyOf"] = [
                *_credential_definitions().values(),
                {"type": "string"},
                {"type": "null"},
            ]
        return schema

    def _to_block_document(self, *args: Any, **kwargs: Any) -> Any:
        """Prefect's block document, with no secret inside the region list (the server masks none there): each
        region's storage options move to ``region_storage_options`` and a credentials block becomes a reference
        to its own saved document, as the UI's picker writes it."""
        document = super()._to_block_document(*args, **kwargs)
        items = document.data.get("regions")
        if not isinstance(items, builtins.list) or len(items) != len(self.regions):
            return document
        include_secrets = bool(kwargs.get("include_secrets", args[4] if len(args) > 4 else False))
        moved = dict(document.data.get("region_storage_options") or {})
        for region, item in zip(self.regions, items, strict=True):
            item.pop("storage_options", None)
            if options := region.storage_options.get_secret_value():
                moved[region.key] = (
                    options if include_secrets else {key: obfuscate(value) for key, value in options.items()}
                )
            if isinstance(region.credentials, Block):
                if region.credentials._block_document_id is None:
                    raise RegionConfigError(
                        f"region {redact_url(region.url)}: its credentials block is not saved; save it first "
                        "(credentials.save('NAME')): the store keeps a reference to it, never a copy of its secrets"
                    )
                item["credentials"] = {"$ref": {"block_document_id": str(region.credentials._block_document_id)}}
        document.data["region_storage_options"] = moved
        return document

    @classmethod
    def default(cls, home: str | os.PathLike[str] | None = None) -> CheckpointStore:
        """The embedded store: two local regions under ``$PREFECT_RECOVERY_HOME``."""
        root = Path(home).absolute() if home is not None else recovery_home()
        spec = ("default", str(root))
        shared = _shared_as(spec)
        if isinstance(shared, cls):  # inside a recovery that opened this very store
            return shared
        paths = [root / "regions" / "region-a", root / "regions" / "region-b"]
        for path in paths:
            if not path.exists():  # created here, so a region (region_marker.py); never marks an existing one
                init_region(open_region(str(path)))
        store = cls(regions=[str(path) for path in paths], write_quorum=1)
        store._opened_as = spec
        return store

    @property
    def core(self) -> Store:
        """The bytes-level store built from this configuration."""
        if self._store is None:
            regions = [open_region(region.url, region.fsspec_options(), region.name) for region in self.regions]
            check_regions(regions, self.write_quorum)  # before guard_empty_mounts marks a new store's regions
            self._store = Store(
                guard_empty_mounts(regions),
                write_quorum=self.write_quorum,
                hash_algorithm=self.hash_algorithm,
                chunk_bytes=self.chunk_bytes,
                io_threads=self.io_threads,
                codec=self.codec,
                region_codecs={
                    opened.name: self.region_codecs[region.key]
                    for region, opened in zip(self.regions, regions, strict=True)
                    if region.key in self.region_codecs
                },
                delta=self.delta,
                straggler_grace=self.straggler_grace_seconds,
                keyring=self.keyring(),
                observers=default_observers(),
            )
        return self._store

    def keyring(self) -> Keyring | None:
        """The signing keyring from the Secret blocks named by ``signing_key`` and ``verification_keys``."""
        if self.signing_key is None and not self.verification_keys:
            return None
        from prefect.blocks.system import Secret

        def key(name: str) -> ManifestKey:
            try:
                material = Secret.load(name, _sync=True).get()  # a coroutine in an async flow without _sync
            except ValueError as exc:
                raise SigningKeyError(
                    f"signing key Secret block {name!r} cannot be loaded ({exc}); create it with "
                    f"`Secret(value=...).save({name!r})` or fix the store's signing_key/verification_keys"
                ) from None
            if isinstance(material, dict):  # {"key_id": ..., "key": ...}: a key saved under another name
                try:
                    return load_key(str(material["key_id"]), self.signing_algorithm, str(material["key"]))
                except KeyError:
                    raise SigningKeyError(
                        f"Secret block {name!r} holds a JSON object without 'key_id' and 'key'"
                    ) from None
            return load_key(name, self.signing_algorithm, str(material))

        signer = key(self.signing_key) if self.signing_key else None
        verifiers = [key(name) for name in self.verification_keys if name != self.signing_key]
        return Keyring(signer, verifiers, accept_unsigned=self.accept_unsigned)

    def save(  # type: ignore[override]
        self,
        state: Any = None,
        *,
        lineage: str | None = None,
        step: int | None = None,
        metadata: dict[str, JsonValue] | None = None,
        name: str | None = None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Save this block document (Prefect's ``Block.save``); with ``lineage``, the deprecated form
        of ``save_checkpoint``.

        Args:
            state: Nested dict/list/tuple of tensors, numbers, str, bytes and None.
            lineage: The run history this checkpoint belongs to.
            step: Training step of the state, recorded in the manifest.
            metadata: JSON metadata stored in the manifest.
            name: Block document name, when saving the block itself (Prefect's ``save``).
            overwrite: Overwrite an existing block document of that name.

        Returns:
            ``CheckpointInfo`` for a checkpoint; the block document id for a block save.
        """
        if lineage is None:
            block_name = name if name is not None else state
            if block_name is not None and not isinstance(block_name, str):
                raise TypeError(
                    "save() of a checkpoint needs lineage=..., e.g. store.save(state, lineage='my-run', step=10); "
                    "without lineage it saves this block document and takes a name string"
                )
            return Block.save(self, block_name, overwrite=overwrite, **kwargs)
        warnings.warn(
            _DEPRECATED.format(old="save(state, lineage=...)", kind="save", new="save_checkpoint"),
            DeprecationWarning,
            stacklevel=2,
        )
        return self.save_checkpoint(state, lineage=lineage, step=step, metadata=metadata)

    @async_dispatch(AsyncStoreApi.asave_checkpoint)
    def save_checkpoint(
        self,
        state: Any,
        *,
        lineage: str,
        step: int | None = None,
        metadata: dict[str, JsonValue] | None = None,
    ) -> CheckpointInfo:
        """Save a checkpoint of ``lineage``: every region in parallel, committed at the write quorum.

        Args:
            state: Nested dict/list/tuple of tensors, numbers, str, bytes and None.
            lineage: The run history this checkpoint belongs to.
            step: Training step of the state, recorded in the manifest.
            metadata: JSON metadata stored in the manifest.
        """
        check_base_lineage(lineage)
        return save_state(self.core, state, lineage=lineage, step=step, metadata=metadata)

    @async_dispatch(AsyncStoreApi.aload_checkpoint)
    def load_checkpoint(
        self,
        *,
        lineage: str,
        version: int | None = None,
        keys: Iterable[Any] | None = None,
        into: Any = None,
    ) -> Any:
        """Load a checkpoint: the same nested structure, bit-identical tensors.

        Args:
            lineage: The lineage to load from.
            version: A committed version; default the latest consistent one.
            keys: Only these subtrees, e.g. ``["model"]``, ``["optimizer/state/0"]``.
            into: A nested state whose matching CPU tensors are filled in place instead of
                allocating new ones (e.g. ``{"model": model.state_dict()}``); see
                ``training.state_io.load_state``.
        """
        state, _manifest = load_state(self.core, lineage=lineage, version=version, keys=keys, into=into)
        return state

    def dcp_writer(self, lineage: str, step: int | None = None, metadata: dict[str, JsonValue] | None = None) -> Any:
        """A ``torch.distributed.checkpoint`` storage writer: each ``dcp.save`` through it commits
        the next version of ``lineage``, one manifest naming every rank's shards
        (``prefect_recovery.distributed.dcp``).

        Example:
            ``dcp.save(state_dict, storage_writer=store.dcp_writer("my-run", step=100))``
        """
        from ..distributed.dcp import dcp_writer  # torch.distributed only for those who use it

        check_base_lineage(lineage)
        return dcp_writer(self, lineage, step=step, metadata=metadata)

    def dcp_reader(self, lineage: str, version: int | None = None) -> Any:
        """A ``torch.distributed.checkpoint`` storage reader of ``version`` of ``lineage`` (default:
        the latest consistent one); DCP reshards on load, each rank reading only its shards.

        Example:
            ``dcp.load(state_dict, storage_reader=store.dcp_reader("my-run"))``
        """
        from ..distributed.dcp import dcp_reader

        return dcp_reader(self, lineage, version)

    @async_dispatch(AsyncStoreApi.alist)
    def list(self, lineage: str | None = None) -> builtins.list[CheckpointInfo]:
        """Every consistent checkpoint, oldest first (of one lineage, or all)."""
        return self.core.list(lineage)

    @async_dispatch(AsyncStoreApi.alineages)
    def lineages(self) -> builtins.list[str]:
        return self.core.lineages()

    @async_dispatch(AsyncStoreApi.alatest)
    def latest(self, lineage: str) -> CheckpointInfo | None:
        """The latest consistent checkpoint of ``lineage``, or None; a newest version that no
        region holds a trusted copy of raises, as a load would (``Store.latest``)."""
        return self.core.latest(lineage)

    @async_dispatch(AsyncStoreApi.aaudit)
    def audit(
        self,
        *,
        read_data: float = 1.0,
        repair: bool = True,
        apply_retention: bool = True,
        lineage: str | None = None,
        dry_run: bool = False,
        seed: int | None = None,
    ) -> AuditReport:
        """Scrub (signatures, presence, a ``read_data`` fraction re-hashed), repair, then apply
        this store's ``retention`` and collect garbage older than ``gc_grace_seconds``
        (``core.audit.audit_store``)."""
        return audit_store(
            self.core,
            policy=self.retention,
            read_data=read_data,
            repair=repair,
            apply_retention_policy=apply_retention,
            gc_grace=timedelta(seconds=self.gc_grace_seconds),
            lineage=lineage,
            dry_run=dry_run,
            seed=seed,
        )

    @async_dispatch(AsyncStoreApi.averify)
    def verify(self, repair: bool = False, lineage: str | None = None, decode: bool = False) -> VerifyReport:
        """Re-hash every manifest and blob in every region; ``repair`` heals from good copies;
        ``decode`` also decodes every compressed or delta chunk and checks its decoded digest."""
        return verify_store(self.core, repair=repair, lineage=lineage, decode=decode)


# The store a recovery opened, for the pipeline run it starts (shared_store).
_shared: contextvars.ContextVar[CheckpointStore | None] = contextvars.ContextVar("shared_store", default=None)


def _store_spec(
    store_block: CheckpointStore | str | None, regions: list[str] | None, write_quorum: int
) -> tuple[Any, ...]:
    if isinstance(store_block, CheckpointStore):
        # a block a flow was handed (the UI's picker): the same store as its saved name says
        name = store_block._block_document_name
        return ("block", name) if name else ("instance", id(store_block))
    if store_block:
        return ("block", store_block)
    if regions:
        return ("regions", tuple(regions), write_quorum)
    return ("default", str(recovery_home()))


def _shared_as(spec: tuple[Any, ...]) -> CheckpointStore | None:
    shared = _shared.get()
    return shared if shared is not None and shared._opened_as == spec else None


@contextlib.contextmanager
def shared_store(
    store: CheckpointStore,
    store_block: str | None = None,
    regions: list[str] | None = None,
    write_quorum: int = 1,
) -> Iterator[CheckpointStore]:
    """Inside, ``open_store`` (and ``CheckpointStore.default()``) asked for the store ``store`` was
    opened as return ``store`` itself instead of opening it again.

    A recovery opens its store once (one block load from the server, one set of regions, one
    keyring from the Secret blocks) and runs the pipeline inside this, so the pipeline's own
    ``open_store(store_block, ...)`` with its recorded parameters gets the same instance. A
    pipeline that names another store still opens that one. A store built by other means (the
    CLI's) says what it was opened as with ``store_block``/``regions``/``write_quorum``, as
    ``open_store`` takes them.
    """
    if store_block is not None or regions:
        store._opened_as = _store_spec(store_block, regions, write_quorum)
    token = _shared.set(store)
    try:
        yield store
    finally:
        _shared.reset(token)


def store_block_name(store_block: CheckpointStore | str | None) -> str | None:
    """The saved block's name a flow records for a later run (a recovery) to open the same store: the name
    itself, or the name of the block a flow was handed. An unsaved store has none to record."""
    if not isinstance(store_block, CheckpointStore):
        return store_block or None
    if not store_block._block_document_name:
        raise CheckpointError(
            "this CheckpointStore is not a saved block, so a recovery could not open it again: save it "
            "(store.save('NAME')) and pass it or its name, or pass regions=[...] instead"
        )
    return store_block._block_document_name


def open_store(
    store_block: CheckpointStore | str | None = None, regions: list[str] | None = None, write_quorum: int = 1
) -> CheckpointStore:
    """The store a flow runs against: a ``CheckpointStore`` block (as the UI's block picker hands it to a flow)
    or a saved one's name, else the given regions, else the embedded default store. Every flow opens its store
    here; inside a recovery (``shared_store``) the store the recovery opened is returned when it is the same
    one."""
    spec = _store_spec(store_block, regions, write_quorum)
    shared = _shared_as(spec)
    if shared is not None:
        return shared
    if isinstance(store_block, CheckpointStore):
        store_block._opened_as = spec
        return store_block
    if store_block:
        store = CheckpointStore.load(store_block, _sync=True)  # sync even when called in an async flow
    elif regions:
        store = CheckpointStore(regions=regions, write_quorum=write_quorum)
    else:
        return CheckpointStore.default()
    store._opened_as = spec
    return store
