"""Typed errors a user can hit. Each message says what happened and what to do next."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by prefect-recovery."""


class InvalidArgumentError(CheckpointError, ValueError):
    """An argument is out of its range or inconsistent (a quorum, a fraction, a size, a region list)."""


class InvalidNameError(InvalidArgumentError):
    """A lineage, entry name or digest is malformed or would escape its region."""


class RecordError(CheckpointError):
    """A stored record cannot be trusted; ``region`` and ``key`` say which copy."""

    def __init__(self, message: str, *, region: str | None = None, key: str | None = None):
        where = f" [{region}:{key}]" if region and key else ""
        super().__init__(message + where)
        self.region = region
        self.key = key


class ManifestError(RecordError):
    """A manifest cannot be trusted: unreadable, malformed, tampered or of an unknown format."""


class ManifestSignatureError(ManifestError):
    """A manifest's signature is missing, made with an unknown key, or does not match its content."""


class SigningKeyError(CheckpointError, ValueError):
    """A signing or verification key is malformed, too short or of the wrong kind."""


class RegionConfigError(CheckpointError):
    """A region's configuration is malformed: an unknown or mistyped field, storage options that
    are not a mapping, a URL that cannot be parsed. The message names the field and never shows
    its value (it may be a credential). Not a ValueError, so pydantic passes it through as is."""


class JournalError(RecordError):
    """A journal event cannot be trusted or written: malformed, tampered, misplaced or damaged."""


class JournalSignatureError(JournalError):
    """On a signing store, a journal event's signature is missing, made with an unknown key, or does
    not match its content: the event is never acted upon."""


class RegionError(CheckpointError):
    """A region could not be reached or refused an operation."""

    def __init__(self, region: str, message: str):
        super().__init__(f"region {region}: {message}")
        self.region = region


class RegionUnavailableError(RegionError):
    """The region's storage could not be reached (network, credentials, missing bucket...)."""


class StorageFullError(RegionError):
    """The region ran out of space while writing. Free space and save again."""


class ObjectNotFoundError(RegionError):
    """An object the caller asked for does not exist in this region."""


class ForeignObjectError(RegionError):
    """Something the store did not write sits where one of its objects belongs (a symbolic link,
    a directory, a device): never followed or read; verify reports it, repair replaces a link."""


class QuorumNotMetError(CheckpointError):
    """Fewer regions than ``write_quorum`` committed a save, so it was not committed at all."""

    def __init__(self, message: str, causes: dict[str, str]):
        detail = "; ".join(f"{region}: {cause}" for region, cause in causes.items())
        super().__init__(f"{message} ({detail})" if detail else message)
        self.causes = causes


class VersionConflictError(CheckpointError):
    """Another writer kept committing the version this save tried to take."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No consistent checkpoint matches the request."""


class BlobUnavailableError(CheckpointError):
    """No region holds an intact copy of a blob a manifest names."""

    def __init__(self, digest: str, causes: dict[str, str]):
        detail = "; ".join(f"{region}: {cause}" for region, cause in causes.items())
        super().__init__(
            f"no intact copy of blob {digest} in any region ({detail}). "
            "Run `prefect-recovery verify` to see the damage, or load an older version."
        )
        self.digest = digest
        self.causes = causes


# The errors of pipeline steps and recovery (RecoveryError, StepInputError, StepResultError,
# LineageBusyError, PreflightError, ReplayError) are raised by the tasks and flows layers only: they live
# in prefect_recovery.tasks.errors and are exported by prefect_recovery.
