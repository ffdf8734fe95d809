"""Errors of distributed (torch.distributed.checkpoint) saves and loads through the store.

They subclass the store's own ``CheckpointError`` family, so a handler of store errors catches
them too. Inside ``dcp.save``/``dcp.load`` torch wraps every rank's exception in a
``CheckpointException`` whose ``failures`` maps each failed rank to it.

That exception crosses ranks pickled (DCP gathers every rank's failures on the coordinator and
broadcasts them back), and an exception whose ``__init__`` takes other arguments than its
message (``BlobUnavailableError(digest, causes)``, ``QuorumNotMetError(message, causes)``,
``RegionError(region, message)``) does not survive Python's default exception pickling: every
rank got ``TypeError: __init__() missing 1 required positional argument`` instead of the typed
error. ``picklable_across_ranks`` registers, for the whole ``CheckpointError`` family, a reduction
that rebuilds the same type with the same message and attributes without calling ``__init__``.
"""

from __future__ import annotations

import copyreg
from typing import Any

from ..core.errors import CheckpointError, InvalidArgumentError, ManifestError


def _rebuild_error(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def _reduce_error(error: BaseException) -> tuple[Any, ...]:
    return _rebuild_error, (type(error), error.args, dict(error.__dict__))


def picklable_across_ranks(root: type[BaseException] = CheckpointError) -> None:
    """Make ``root`` and every subclass defined so far pickle to the same type, message and attributes.

    copyreg's table is per exact type, so this is called again when a store writer or reader is
    made (subclasses imported since then are registered too); registering twice is harmless.
    """
    stack: list[type[BaseException]] = [root]
    while stack:
        cls = stack.pop()
        if copyreg.dispatch_table.get(cls) is not _reduce_error:
            copyreg.pickle(cls, _reduce_error)
        stack.extend(cls.__subclasses__())


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


picklable_across_ranks()
