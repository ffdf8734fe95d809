"""Entry pages: a large manifest's entries stored as content-addressed blobs (FORMAT.md, "Entry pages").

A manifest that would name more than ``page_entries`` entries (or be larger than
``PAGE_BYTES``) is committed in the paged form: its entries go into *entry pages*, canonical
JSON lists of entries written like data blobs (content-addressed, create-only, every region,
same quorum), and the root manifest lists the pages (digest, size, entry count, ranks, first
and last entry name). A 1,000-rank x 1,000-tensor checkpoint's root is then ~1,000 page
references instead of a 200 MB file every rank reads; a rank restoring its shards reads the
root and the pages of its rank (docs/SCALING.md).

``Store.manifest_entries`` is the one way to read a manifest's entries, in either form: every
reader (loads, verify, GC, replay, DCP) goes through it and never touches pages. A page is
trusted only through the root: its bytes must hash to the digest the (signed) root lists, and
parse strictly; a copy that fails either is damaged and the next region's is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .digest import HashAlgorithm, hash_bytes
from .errors import ManifestError, RegionError
from .layout import blob_key
from .manifest import Entry, Manifest, PageRef, check_entries, decode_page, state_digest_of
from .state_tree import check_tree
from .store_reads import StoreReads

# A page is closed at this many bytes of JSON (or ``page_entries`` entries), and a manifest
# larger than this is paged whatever its entry count: a root stays small enough for every rank
# to read, and each page small enough to read whole.
PAGE_BYTES = 2**20
DEFAULT_PAGE_ENTRIES = 4096


class PageUnavailableError(ManifestError):
    """No region holds an intact copy of an entry page a manifest lists (missing, or every copy
    fails its digest or does not parse): the checkpoint's entries cannot be known."""


class StorePages(StoreReads):
    """Reading a manifest's entries, whatever its form (core/store.py sets the fields)."""

    hash_algorithm: HashAlgorithm
    page_entries: int | None

    def manifest_entries(
        self,
        manifest: Manifest,
        *,
        ranks: Iterable[int] | None = None,
        prefer: Sequence[str] = (),
    ) -> list[Entry]:
        """The entries ``manifest`` names, in manifest order, in either form.

        Args:
            manifest: A manifest this store resolved (``resolve``, ``manifest_copies``...).
            ranks: Only the entries written for these torch.distributed ranks, and those of no
                rank (state every rank needs); a paged manifest then reads only the pages that
                cover them. None: every entry.
            prefer: Regions to read pages from first (the manifest's holders).

        Raises:
            PageUnavailableError: A page the manifest lists has no intact copy in any region.
        """
        wanted = None if ranks is None else set(ranks)
        if manifest.pages is None:
            if wanted is None:
                return list(manifest.entries)
            return [e for e in manifest.entries if e.shard is None or e.shard.rank is None or e.shard.rank in wanted]
        refs = [p for p in manifest.pages if wanted is None or not p.ranks or wanted & set(p.ranks)]
        pages = self.read_pages(refs, prefer=prefer, where=f"lineage {manifest.lineage!r} version {manifest.version}")
        entries = [entry for page in pages for entry in page]
        try:
            check_entries(entries)  # what the single-file form's schema checks, across pages
            if wanted is None:  # every page read: the tree's leaves name entries of their kind
                check_tree(manifest.tree, {entry.name: entry.kind for entry in entries})
        except ValueError as exc:
            raise ManifestError(f"lineage {manifest.lineage!r} version {manifest.version}: {exc}") from None
        return entries

    def manifest_blobs(self, manifest: Manifest, prefer: Sequence[str] = ()) -> dict[str, int]:
        """Every object a manifest references, digest -> size: its pages and every blob named."""
        found: dict[str, int] = {page.digest: page.size for page in manifest.pages or ()}
        for entry in self.manifest_entries(manifest, prefer=prefer):
            for chunk in entry.chunks:
                for digest, size in chunk.blobs():  # delta parents are referenced too
                    found.setdefault(digest, size)
        return found

    def state_digest(self, manifest: Manifest) -> str:
        """Digest of the saved state alone (``ManifestBody.state_digest``), whatever the form:
        a paged manifest and a single-file one of the same state give the same digest."""
        return state_digest_of(self.manifest_entries(manifest), manifest.tree, manifest.hash_algorithm)

    def read_pages(self, refs: Sequence[PageRef], *, prefer: Sequence[str] = (), where: str = "") -> list[list[Entry]]:
        """Each page's entries, pages read in parallel, each verified (digest, strict parse)."""
        if len(refs) <= 1:
            return [self._read_page(ref, prefer, where) for ref in refs]
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="ckpt-page") as pool:
            return list(pool.map(lambda ref: self._read_page(ref, prefer, where), refs))

    def _read_page(self, ref: PageRef, prefer: Sequence[str], where: str) -> list[Entry]:
        key = blob_key(ref.digest)
        causes: dict[str, str] = {}
        for region in self._read_order(prefer):
            try:
                data = self._bounded(region, region.get, key, ref.size)
            except RegionError as exc:
                causes[region.name] = str(exc)
                continue
            if len(data) != ref.size or hash_bytes(data, ref.digest.split(":", 1)[0]) != ref.digest:  # type: ignore[arg-type]
                causes[region.name] = "content does not match its digest (corrupt)"
                continue
            try:
                return decode_page(data, ref, region=region.name, key=key)
            except ManifestError as exc:
                causes[region.name] = str(exc)
        detail = "; ".join(f"{region}: {cause}" for region, cause in causes.items())
        raise PageUnavailableError(
            f"{where + ': ' if where else ''}no intact copy of entry page {ref.digest} in any region ({detail}); "
            "run `prefect-recovery verify --repair`, or load an earlier version"
        )
