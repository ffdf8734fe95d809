"""Where each object lives inside a region (FORMAT.md, "Layout").

Every key built here comes from validated parts, so no manifest content can make a key point
outside its region.
"""

from __future__ import annotations

import hashlib
import re

from .digest import check_digest
from .errors import InvalidNameError

LINEAGE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MANIFEST_NAME = re.compile(r"([0-9]{12})\.json")  # ASCII digits: \d takes "٢" and "２" too
VERSION_WIDTH = 12


# Lineages derived from a run's lineage L, in the same store: ``L.light`` holds the Checkpointer's
# light tier (training/checkpointer.py), ``L.steps`` the results of its @step tasks
# (tasks/pipeline_run.py). Defined here, the lowest layer, so every layer names them the same.
LIGHT_SUFFIX = ".light"
STEPS_SUFFIX = ".steps"
DERIVED_SUFFIXES = (LIGHT_SUFFIX, STEPS_SUFFIX)

# Prefect result storage (blocks/result_storage.py): the object Prefect writes under path P is
# the latest version of the lineage ``prefect-result.<sha256(P) hex>`` (FORMAT.md, "Prefect
# results"). A fixed hash, not the store's digest, so the name survives a hash_algorithm change.
RESULT_PREFIX = "prefect-result."


def result_lineage(path: str) -> str:
    """The lineage holding what Prefect stored under ``path`` (any non-empty string)."""
    if not isinstance(path, str) or not path or len(path) > 4096 or "\x00" in path:
        raise InvalidNameError(f"invalid result path {path!r}: must be 1-4096 characters without NUL")
    return RESULT_PREFIX + hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()


def check_base_lineage(lineage: str) -> str:
    """A lineage a user names (a run's, a plain save's): a valid name not ending in a derived
    suffix, which is reserved, since retention, replay and the audit treat those lineages as
    derived from another one (a plain ``exp.steps`` would be exempt from retention)."""
    check_lineage(lineage)
    if lineage.startswith(RESULT_PREFIX):
        raise InvalidNameError(
            f"invalid lineage {lineage!r}: the prefix {RESULT_PREFIX!r} is reserved for Prefect results stored "
            "in this store (result_storage=store); choose another name"
        )
    if lineage.endswith(DERIVED_SUFFIXES):
        raise InvalidNameError(
            f"invalid lineage {lineage!r}: the suffixes {', '.join(DERIVED_SUFFIXES)} are reserved for the lineages "
            "the store derives from a run's lineage; choose another name"
        )
    return lineage


def check_lineage(lineage: str) -> str:
    if not isinstance(lineage, str) or not LINEAGE_PATTERN.fullmatch(lineage) or ".." in lineage:
        raise InvalidNameError(
            f"invalid lineage {lineage!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return lineage


def check_entry_name(name: str) -> str:
    """Entry names are relative, '/'-separated paths; reject anything that could escape."""
    if not isinstance(name, str) or not name or len(name) > 4096:
        raise InvalidNameError(f"invalid entry name {name!r}: must be 1-4096 characters")
    if "\x00" in name or "\\" in name:
        raise InvalidNameError(f"invalid entry name {name!r}: NUL and backslash are not allowed")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise InvalidNameError(f"invalid entry name {name!r}: absolute paths are not allowed")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise InvalidNameError(f"invalid entry name {name!r}: empty, '.' or '..' component")
    return name


def blob_key(digest: str) -> str:
    algo, hexdigest = check_digest(digest).split(":", 1)
    return f"blobs/{algo}/{hexdigest[:2]}/{hexdigest}"


def lineages_prefix() -> str:
    return "lineages"


def manifests_prefix(lineage: str) -> str:
    return f"lineages/{check_lineage(lineage)}/manifests"


def manifest_key(lineage: str, version: int) -> str:
    if not isinstance(version, int) or version < 1 or version >= 10**VERSION_WIDTH:
        raise InvalidNameError(f"invalid version {version!r}: must be a positive integer")
    return f"{manifests_prefix(lineage)}/{version:0{VERSION_WIDTH}d}.json"


def version_from_manifest_name(name: str) -> int | None:
    """The version of a manifest file name (``000000000007.json``), or None for anything else (incl.
    version 0, which no save writes: a stray ``000000000000.json`` is ignored, never a version)."""
    match = MANIFEST_NAME.fullmatch(name)
    version = int(match.group(1)) if match else 0
    return version or None


# -- journal (DESIGN.md invariant 8, FORMAT.md "Journal") ------------------------------------
JOURNAL_NAME = re.compile(r"([0-9]{12})\.json")
SEQ_WIDTH = 12


def journal_prefix(lineage: str) -> str:
    return f"lineages/{check_lineage(lineage)}/journal"


def journal_key(lineage: str, seq: int) -> str:
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or seq >= 10**SEQ_WIDTH:
        raise InvalidNameError(f"invalid journal seq {seq!r}: must be a positive integer below 10**{SEQ_WIDTH}")
    return f"{journal_prefix(lineage)}/{seq:0{SEQ_WIDTH}d}.json"


def seq_from_journal_name(name: str) -> int | None:
    """The seq of a journal file name (``000000000007.json``), or None for anything else (incl. seq 0)."""
    match = JOURNAL_NAME.fullmatch(name)
    seq = int(match.group(1)) if match else 0
    return seq or None
