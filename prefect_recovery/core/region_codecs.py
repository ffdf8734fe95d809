"""Per-region codecs: which stored form of a chunk each region holds (FORMAT.md, "Region codecs").

A store may give each region its own codec (a cloud region compressed, a local one raw). The
writer then prepares a chunk once per distinct codec and the chunk reference names every form
(``ChunkRef.forms``), all verified against one content digest. Everything here is a pure
function of the chunk reference and the region's codec, so the writer, verify and repair agree
on which form belongs where without the manifest naming regions (region names and URLs change
when a bucket moves; the codec setting is the store's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from . import codecs
from .codecs import CodecName
from .digest import HashAlgorithm, hash_bytes
from .manifest import MAX_FORMS, ChunkRef, Entry

# A dtype of each bytegroup width, for re-encoding a form from its recorded width alone (the
# byte grouping depends on the element width only).
_DTYPE_OF_WIDTH = {2: "float16", 4: "float32", 8: "float64"}


def select_form(chunk: ChunkRef, codec: CodecName) -> ChunkRef:
    """The stored form a region with ``codec`` holds of ``chunk`` (a reference without ``forms``).

    ``none``: the raw form; ``zstd`` / ``bytegroup-zstd``: the first form of that codec
    (``bytegroup-zstd`` falls back to ``zstd``, as it does for integer dtypes); ``auto``: the
    first compressed form. When none matches: a raw form, else the primary.
    """
    forms = chunk.stored_forms()
    if len(forms) == 1:
        return forms[0]
    wanted: tuple[str, ...]
    if codec == "none":
        wanted = ()
    elif codec in ("auto", "bytegroup-zstd"):
        wanted = ("bytegroup-zstd", "zstd")
    else:
        wanted = ("zstd",)
    for name in wanted:
        for form in forms:
            if form.codec == name:
                return form
    if codec != "none" and any(form.codec is None and form.parent is not None for form in forms):
        # a delta stored without a codec (its XOR did not compress) is still the coded region's form
        return next(form for form in forms if form.codec is None and form.parent is not None)
    return next((form for form in forms if form.stored_raw), forms[0])


def combine(forms_by_codec: Sequence[ChunkRef], codec_of_region: Sequence[CodecName]) -> ChunkRef:
    """One chunk reference naming the forms the regions will hold, in the order they were
    prepared (the first region's codec first); a form no region selects is dropped (dropping
    a form no region selects changes no region's selection)."""
    distinct: list[ChunkRef] = []
    for form in forms_by_codec:
        if all(form.digest != seen.digest for seen in distinct):
            distinct.append(form)
    if len(distinct) == 1:
        return distinct[0]
    candidate = distinct[0].model_copy(update={"forms": distinct[1:]})
    picked = {select_form(candidate, codec).digest for codec in codec_of_region}
    kept = [form for form in distinct if form.digest in picked]
    if len(kept) == 1:
        return kept[0]
    return kept[0].model_copy(update={"forms": kept[1:]})


def required_forms(entries: Iterable[Entry]) -> tuple[dict[str, int], list[list[list[tuple[str, int]]]]]:
    """What a consistent version needs: the blobs of every one-form chunk (digest -> size), and,
    per chunk with several forms, the blobs of each form (one form's blobs present suffice)."""
    single: dict[str, int] = {}
    several: list[list[list[tuple[str, int]]]] = []
    for entry in entries:
        for chunk in entry.chunks:
            if chunk.forms is None:
                for digest, size in chunk.form_blobs():
                    single.setdefault(digest, size)
            else:
                several.append([form.form_blobs() for form in chunk.stored_forms()])
    return single, several


def expected_blob_regions(
    entries: Iterable[Entry], expected: set[str], codec_of: Mapping[str, CodecName]
) -> dict[tuple[str, int], set[str]]:
    """Which of the ``expected`` regions should hold each blob ``entries`` name: every one for a
    chunk with one form, for a chunk with several the regions whose codec selects a form that
    includes the blob (``codec_of``: region name -> its codec)."""
    found: dict[tuple[str, int], set[str]] = {}
    for entry in entries:
        for chunk in entry.chunks:
            if chunk.forms is None:
                for pair in chunk.form_blobs():
                    found.setdefault(pair, set()).update(expected)
                continue
            for pair in chunk.blobs():
                found.setdefault(pair, set())
            for region in expected:
                for pair in select_form(chunk, codec_of[region]).form_blobs():
                    found[pair].add(region)
    return found


def rebuild_sources(entries: Iterable[Entry]) -> dict[tuple[str, int], tuple[ChunkRef, ChunkRef, str | None]]:
    """For each blob of a form of a chunk with several forms (parents excluded): the chunk, the
    form and the entry's dtype, so that repair can rebuild a blob no region holds from another
    form (``rebuild_blob``)."""
    found: dict[tuple[str, int], tuple[ChunkRef, ChunkRef, str | None]] = {}
    for entry in entries:
        for chunk in entry.chunks:
            if chunk.forms is None:
                continue
            for form in chunk.stored_forms():
                found.setdefault((form.digest, form.blob_size), (chunk, form, entry.dtype))
    return found


def collect_parents(entries: Iterable[Entry], nodes: dict[str, dict[str, ChunkRef]]) -> None:
    """Add to ``nodes`` (content digest -> blob digest -> reference) every delta parent of a form
    of a chunk with several forms in ``entries``: what ``parent_sources`` rebuilds parents from."""
    for entry in entries:
        for chunk in entry.chunks:
            if chunk.forms is None:
                continue
            for form in chunk.stored_forms():
                node = form.parent
                while node is not None:
                    nodes.setdefault(node.content_digest, {}).setdefault(node.digest, node)
                    node = node.parent


def parent_sources(
    nodes: Mapping[str, Mapping[str, ChunkRef]], by_content: Mapping[str, ChunkRef]
) -> dict[tuple[str, int], tuple[ChunkRef, ChunkRef, str | None]]:
    """For each delta parent in ``nodes`` (``collect_parents``): a reference to read its content
    another way, so repair can rebuild the parent's blob where no region holds it
    (``rebuild_blob``). The source is a kept chunk of that content (``by_content``), else the
    other chains' parents of that content joined as forms of one reference (the regions' chains
    of one chunk start at the same versions, so another codec's chain usually holds the same
    content): the first that reads serves. Retention may have removed every version that named
    the parent's chunk itself, and GC its raw form."""
    found: dict[tuple[str, int], tuple[ChunkRef, ChunkRef, str | None]] = {}
    for content, refs in nodes.items():
        for digest, node in refs.items():
            kept = by_content.get(content)
            if kept is not None and kept.size == node.size:
                found[(digest, node.blob_size)] = (kept, node, None)
                continue
            others = [ref for other, ref in refs.items() if other != digest][:MAX_FORMS]
            if others:
                source = others[0].model_copy(update={"forms": others[1:] or None})
                found[(digest, node.blob_size)] = (source, node, None)
    return found


def rebuild_blob(
    chunk: ChunkRef,
    form: ChunkRef,
    read_chunk: Callable[[ChunkRef, memoryview], object],
    by_content: Mapping[str, ChunkRef] | None = None,
) -> bytes | None:
    """The blob of ``form`` rebuilt from ``chunk``'s verified content (read through any of its
    forms by ``read_chunk``): raw, encoded again, or XORed with its verified parent and encoded.
    A delta's parent is read through the chunk with every form of that content in
    ``by_content`` (the parent's own blob may be as lost as this one, in the same region).
    None when the result does not hash to the form's digest (another zstandard version)."""
    content = bytearray(chunk.size)
    read_chunk(chunk, memoryview(content))  # verified against the content digest
    data = memoryview(content)
    if form.parent is not None:
        base = bytearray(chunk.size)
        parent = (by_content or {}).get(form.parent.content_digest, form.parent)
        read_chunk(parent if parent.size == chunk.size else form.parent, memoryview(base))
        codecs.xor_into(data, base)
    if form.codec is None:
        blob = bytes(data)
    else:
        dtype = _DTYPE_OF_WIDTH[form.width] if form.width is not None else None
        encoded = codecs.encode(data, form.codec, dtype)
        if encoded.codec != form.codec or encoded.width != form.width:
            return None
        blob = bytes(encoded.data)
    algorithm: HashAlgorithm = form.digest.split(":", 1)[0]  # type: ignore[assignment]
    if len(blob) != form.blob_size or hash_bytes(blob, algorithm) != form.digest:
        return None
    return blob
