"""Listing: which lineages and version numbers the regions name, before any manifest is read.

A listing is only names: it says which versions exist somewhere, never which ones count (that
is core/store_consistency.py's rule) nor which number a save takes next (core/store_writer.py).
Regions are listed in parallel, each bounded by the read deadline (core/store_reads.py); a
region that cannot be listed is reported with why, because the consistency rule lowers the
copies it requires by the regions it could not ask. Names under ``lineages/`` that are no
lineage names are strays: reported, never touched.
"""

from __future__ import annotations

from .errors import InvalidNameError, RegionError, RegionUnavailableError
from .layout import check_lineage, lineages_prefix, manifests_prefix, version_from_manifest_name
from .region_object import RegionIO
from .store_reads import StoreReads

# Why a region was not listed when a recent read of it stalled (not asked again for a while).
STALLED = "stalled recently; skipped"


class StoreListing(StoreReads):
    """What the regions list: lineages, stray entries, version numbers per region."""

    def _list_all(self, prefix: str) -> tuple[dict[str, list[str]], dict[str, str]]:
        """List ``prefix`` in every region in parallel: names by region, and the regions that failed."""
        names: dict[str, list[str]] = {}
        causes: dict[str, str] = {}

        def one(region: RegionIO) -> None:
            if self._is_slow(region):
                causes[region.name] = STALLED
                return
            try:
                names[region.name] = self._bounded(region, region.list, prefix)
            except RegionError as exc:
                causes[region.name] = str(exc)

        self._each_region(one, self.regions)
        return names, causes

    def lineages(self) -> list[str]:
        """Every lineage any region lists; entries under ``lineages/`` that are not lineage names
        (``.DS_Store``, ``lost+found``, ``old run``) are skipped (see ``stray_entries``)."""
        return self._lineage_listing()[0]

    def stray_entries(self) -> list[str]:
        """``<region>: lineages/<name>`` of each entry under ``lineages/`` that is no lineage name:
        not the store's, never read, written or deleted; verify and the audit report them."""
        return self._lineage_listing()[1]

    def require_answer(self, unreachable: dict[str, str], what: str) -> None:
        """RegionUnavailableError when no region could be listed (``unreachable`` names every one):
        the store cannot tell what it holds, which is never "no checkpoints" (wrong credentials,
        an unmounted disk). One region down of several is the consistency rule's business."""
        if self.region_names and all(name in unreachable for name in self.region_names):
            causes = "; ".join(unreachable[name] for name in self.region_names)
            raise RegionUnavailableError(
                ", ".join(self.region_names),
                f"no region of the store answers, so {what} cannot be listed ({causes}). Nothing was read or "
                "changed: fix each region named here (credentials, network, the disk it lives on) and try again",
            )

    def _lineage_listing(self) -> tuple[list[str], list[str], dict[str, str]]:
        listed, causes = self._list_all(lineages_prefix())
        names: set[str] = set()
        strays: list[str] = []
        for region in self.region_names:
            for name in listed.get(region, []):
                try:
                    names.add(check_lineage(name))
                except InvalidNameError:
                    strays.append(f"{region}: lineages/{name}")
        return sorted(names), strays, causes

    def reachable_regions(self) -> tuple[list[RegionIO], dict[str, str]]:
        reachable, causes = [], {}
        for region in self.regions:
            try:
                region.probe()
                reachable.append(region)
            except RegionError as exc:
                causes[region.name] = str(exc)
        return reachable, causes

    def versions(self, lineage: str) -> dict[int, list[str]]:
        """Every version number any region lists for ``lineage``, with the regions listing it."""
        return self.version_listing(lineage)[0]

    def version_listing(self, lineage: str) -> tuple[dict[int, list[str]], dict[str, str]]:
        """Versions listed per region: every version number any region lists for ``lineage``, with
        the regions listing it (in region order), and the regions that could not be listed (with
        why). Regions are listed in parallel, each bounded by ``read_deadline``."""
        check_lineage(lineage)
        listed, unreachable = self._list_all(manifests_prefix(lineage))
        found: dict[int, list[str]] = {}
        for region in self.regions:
            for name in listed.get(region.name, []):
                version = version_from_manifest_name(name)
                if version is not None:
                    found.setdefault(version, []).append(region.name)
        return dict(sorted(found.items())), unreachable
