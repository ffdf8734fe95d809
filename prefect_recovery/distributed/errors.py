"""Errors of distributed (torch.distributed.checkpoint) saves and loads through the store.

They subclass the store's own ``CheckpointError`` family, so a handler of store errors catches
them too. Inside ``dcp.save``/``dcp.load`` torch wraps every rank's exception in a
``CheckpointException`` whose ``failures`` maps each failed rank to it.
"""

from __future__ import annotations

from ..core.errors import CheckpointError, InvalidArgumentError, ManifestError


class DCPCheckpointError(CheckpointError):
    """A distributed checkpoint cannot be saved or loaded through the store as asked."""


class NotADCPCheckpointError(DCPCheckpointError):
    """The version asked for is a checkpoint, but not one written by ``dcp_writer``."""


class DCPMetadataError(ManifestError):
    """DCP's metadata of a checkpoint cannot be stored or read without pickle (or is damaged)."""


class DCPVersionMismatchError(DCPCheckpointError):
    """The ranks of one ``dcp.load`` resolved different versions (a commit landed meanwhile)."""


class UnsafeBytesItemError(DCPCheckpointError):
    """A non-tensor item would need full unpickling (arbitrary code) to load, and is refused."""


class DCPArgumentError(InvalidArgumentError):
    """A DCP option the store cannot honour (``checkpoint_id`` of another lineage, ``use_collectives=False``)."""
