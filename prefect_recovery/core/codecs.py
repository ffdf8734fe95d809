"""Chunk codecs: how a chunk's bytes are stored in its blob (FORMAT.md, "Codecs").

A store (or one region of it) picks a codec; each chunk records the one it was stored with:

- ``none``: the blob is the chunk's bytes (every checkpoint written before codecs existed).
- ``zstd``: one zstd frame of the chunk's bytes.
- ``bytegroup-zstd``: for floating-point tensors, each element's bits are rotated left by one
  (the sign bit moves to the bottom, so the top byte is the exponent's high bits), then the
  bytes are grouped into planes (all top bytes, then the next...), then one zstd frame. Trained
  weights and optimizer moments have few distinct exponents, so the exponent plane shrinks
  far more than interleaved bytes would; the mantissa planes are near random and zstd stores
  their blocks raw. This is the grouping ZipNN (arXiv 2411.05239) measured, with zstd for the
  entropy coding.
- ``auto``: per chunk, ``bytegroup-zstd`` for floating-point dtypes and ``zstd`` otherwise,
  kept only when it saves at least ``min_saving`` of the bytes; else the chunk is stored raw.

Codecs work on bytes plus the dtype name the manifest records (core knows no torch). A
decode is bounded by the size the manifest declares: a frame that declares another size, or
would inflate past it, is refused before more than that much memory is written
(``CodecError``), and the decoded bytes are hashed against the manifest's digest by the
caller before anything is handed out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zstandard

from .digest import HASH_PIECE_BYTES
from .errors import InvalidArgumentError
from .region_local import prefault

CodecName = Literal["none", "zstd", "bytegroup-zstd", "auto"]
StoredCodec = Literal["zstd", "bytegroup-zstd"]
CODECS: tuple[str, ...] = ("none", "zstd", "bytegroup-zstd", "auto")
# zstd level: 1 is the speed ZipNN's default is measured against (benchmarks/codecs.py);
# higher levels buy a few per cent on weights at several times the CPU.
DEFAULT_LEVEL = 1
# ``auto`` keeps a codec only when the blob is at least this much smaller than the chunk.
DEFAULT_MIN_SAVING = 0.05
# ``auto`` tries a sample of this many bytes (in this many pieces) of chunks of at least
# SAMPLE_MIN_CHUNK bytes before compressing them whole.
SAMPLE_BYTES = 64 * 2**10
SAMPLE_PIECES = 4
SAMPLE_MIN_CHUNK = 1 * 2**20
# Floating-point dtype names (torch's, as the manifest records them) -> element width. The
# unsigned view of each width rotates the sign bit to the bottom before grouping.
_FLOAT_WIDTHS = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "torch.bfloat16": 2,
    "torch.float16": 2,
    "torch.float32": 4,
    "torch.float64": 8,
}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
# Elements per block of ``group_bytes`` and ``ungroup_bytes`` (256 KiB of fp32: a block's planes,
# words and temporaries stay in the CPU cache). Measured per 16 MiB on this VM against blocks of
# 1 << 18: group fp32 8.3 -> 6.1 ms, fp64 17.9 -> 9.2 ms, bf16 4.3 -> 4.5 ms (noise).
UNGROUP_BLOCK = 1 << 16
# A pool thread keeps its byte-plane buffer (and a reader its stored-blob buffer,
# core/chunks.py) for the next chunk up to this size: a fresh buffer per chunk costs a page
# fault per 4 KiB written, about as much as the decode. Larger ones are allocated per chunk.
SCRATCH_KEEP_BYTES = 64 * 2**20
_scratch = threading.local()
# Threads that keep their buffers: the pools of core/store_reads.py and core/store_writer.py.
SCRATCH_THREADS = "ckpt-"


class CodecError(ValueError):
    """A blob that does not decode to the chunk its manifest declares (corrupt, or a bomb)."""


@dataclass(frozen=True)
class Encoded:
    """A chunk as it will be stored: the codec (None: raw), the element width for
    ``bytegroup-zstd``, and the blob's bytes."""

    codec: StoredCodec | None
    width: int | None
    data: bytes | memoryview


def check_codec(name: str) -> CodecName:
    if name not in CODECS:
        raise InvalidArgumentError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}")
    return name  # type: ignore[return-value]


def float_width(dtype: str | None) -> int | None:
    """The element width of a floating-point dtype name, None for anything else."""
    return _FLOAT_WIDTHS.get(dtype or "")


def group_bytes(data: memoryview, width: int, out: memoryview | None = None) -> memoryview:
    """``data`` (little-endian elements of ``width`` bytes) as byte planes, the most significant
    (the exponent, after the sign bit is rotated to the bottom) first, written into ``out``
    (default: a new buffer) and returned.

    Block by block (``UNGROUP_BLOCK`` elements, small reused temporaries: whole-chunk
    temporaries cost a page fault per 4 KiB). Each block's words are rotated, then each plane is
    the word shifted right and narrowed to uint8 by a contiguous cast; gathering every
    ``width``-th byte instead is a strided byte copy, 1.5x (fp32) to 2.4x (bf16) slower."""
    count = len(data) // width
    planes = memoryview(bytearray(len(data))) if out is None else out
    words = np.frombuffer(data, dtype=_UINT[width])
    grouped = np.frombuffer(planes, dtype=np.uint8).reshape(width, count)
    size = min(UNGROUP_BLOCK, count)
    rotated, spare = np.empty(size, dtype=_UINT[width]), np.empty(size, dtype=_UINT[width])
    high = 8 * width - 1
    for start in range(0, count, UNGROUP_BLOCK):
        stop = min(count, start + UNGROUP_BLOCK)
        block, turned, shifted = words[start:stop], rotated[: stop - start], spare[: stop - start]
        np.left_shift(block, 1, out=turned)
        np.right_shift(block, high, out=shifted)
        np.bitwise_or(turned, shifted, out=turned)
        for plane in range(width):
            bits = 8 * (width - 1 - plane)
            source = np.right_shift(turned, bits, out=shifted) if bits else turned
            np.copyto(grouped[plane, start:stop], source, casting="unsafe")  # keeps the low byte
    return planes


def ungroup_bytes(planes: bytes | memoryview, width: int, out: memoryview, hasher: Any = None) -> None:
    """Inverse of ``group_bytes``, written into ``out``; with ``hasher`` (``digest.new_hasher``),
    each block of ``out`` is hashed right after it is written, while it is in the CPU cache.

    Block by block (``UNGROUP_BLOCK`` elements) with one small reused temporary, so a block's
    planes are joined while in the CPU cache (whole-chunk temporaries are fresh memory whose
    page faults cost more than the arithmetic). Each plane is widened, shifted straight to its
    place in the original word (the rotation undone in the same shift: the sign bit, at the
    bottom of the last plane, goes to the top) and or-ed in: one widening shift and one or per
    plane, contiguous and vectorised. Measured per 16 MiB on this VM (one process, best of 15):
    fp32 11.3 -> 8.7 ms and bf16 7.4 -> 7.2 ms against joining planes pairwise into ever wider
    words; scattering each plane into every ``width``-th byte of ``out`` (a strided copy, then
    the rotation) took 17 and 29 ms."""
    count = len(out) // width
    unsigned = _UINT[width]
    grouped = np.frombuffer(planes, dtype=np.uint8).reshape(width, count)
    words = np.frombuffer(out, dtype=unsigned)
    spare = np.empty(min(UNGROUP_BLOCK, count), dtype=unsigned)
    high = 8 * width - 1
    for start in range(0, count, UNGROUP_BLOCK):
        stop = min(count, start + UNGROUP_BLOCK)
        block, shifted, last = words[start:stop], spare[: stop - start], grouped[width - 1, start:stop]
        # The last plane holds the lowest bits after the rotation: its bit 0 is the sign.
        np.right_shift(last, 1, out=block, dtype=unsigned)
        np.left_shift(last, high, out=shifted, dtype=unsigned)
        np.bitwise_or(block, shifted, out=block)
        for plane in range(width - 1):  # most significant first: bits 8 * (width - 1 - plane) up, less one
            np.left_shift(grouped[plane, start:stop], 8 * (width - 1 - plane) - 1, out=shifted, dtype=unsigned)
            np.bitwise_or(block, shifted, out=block)
        if hasher is not None:
            hasher.update(block.view(np.uint8))


def _compress(data: bytes | memoryview, level: int) -> bytes:
    # write_content_size: the frame declares its decoded size, which decode checks first.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


# For byte planes: long minimum matches and a tiny hash table make zstd skip the short
# matches that cost more than they save in an exponent plane, so most bytes go to its
# Huffman-coded literals (near the plane's entropy), and fast. Measured in benchmarks/codecs.py.
_PLANE_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    write_content_size=True,
)


def _compress_planes(data: bytes | memoryview) -> bytes:
    return zstandard.ZstdCompressor(compression_params=_PLANE_PARAMS).compress(data)


def _sample(data: memoryview, width: int | None) -> memoryview:
    """``SAMPLE_PIECES`` pieces of ``data``, spread evenly over it (whole elements), together."""
    piece = SAMPLE_BYTES // SAMPLE_PIECES
    step = (len(data) - piece) // (SAMPLE_PIECES - 1)
    step -= step % (width or 1)
    return memoryview(b"".join(data[i * step : i * step + piece] for i in range(SAMPLE_PIECES)))


def _encode_as(data: memoryview, stored: StoredCodec, width: int | None, level: int) -> Encoded:
    if stored == "zstd":
        return Encoded("zstd", None, _compress(data, level))
    planes = group_bytes(data, width, scratch("planes", len(data)))  # type: ignore[arg-type]
    return Encoded("bytegroup-zstd", width, _compress_planes(planes))


def encode(
    data: memoryview,
    codec: CodecName,
    dtype: str | None,
    *,
    level: int = DEFAULT_LEVEL,
    min_saving: float = DEFAULT_MIN_SAVING,
) -> Encoded:
    """How to store one chunk under ``codec`` (``auto`` picks per chunk, keeping a codec only
    when it saves at least ``min_saving``; an explicit codec is always kept).

    ``auto`` first encodes a sample of a large chunk (``SAMPLE_BYTES`` from ``SAMPLE_PIECES``
    places): a chunk whose sample saves less than half of ``min_saving`` is stored raw without
    being compressed whole (random bytes, already-compressed data cost a compression pass for
    nothing). The margin keeps chunks whose sample compresses a little worse than the whole."""
    if codec == "none" or len(data) == 0:
        return Encoded(None, None, data)
    width = float_width(dtype)
    if width is not None and len(data) % width:
        width = None  # a chunk boundary inside an element (odd chunk_bytes): group nothing
    stored: StoredCodec = "zstd" if codec == "zstd" or width is None else "bytegroup-zstd"
    if codec == "auto" and len(data) >= SAMPLE_MIN_CHUNK:
        trial = _sample(data, width)
        if len(_encode_as(trial, stored, width, level).data) > (1.0 - min_saving / 2) * len(trial):
            return Encoded(None, None, data)
    encoded = _encode_as(data, stored, width, level)
    if codec == "auto" and len(encoded.data) > (1.0 - min_saving) * len(data):
        return Encoded(None, None, data)
    return encoded


def scratch(slot: str, size: int) -> memoryview:
    """A buffer of ``size`` bytes for ``slot`` (contents undefined). The store's own pool
    threads (named ``ckpt-...``: a load's readers, a save's encoders) keep it for their next
    chunk when at most ``SCRATCH_KEEP_BYTES``; those threads, and their buffers, end with the
    load or save. Any other thread (a caller reading on its own thread, which may live for the
    whole process) gets a new buffer every time."""
    buffer = getattr(_scratch, slot, None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        if size <= SCRATCH_KEEP_BYTES and threading.current_thread().name.startswith(SCRATCH_THREADS):
            setattr(_scratch, slot, buffer)
    return memoryview(buffer)[:size]


def decode_into(
    blob: bytes | memoryview, codec: StoredCodec, width: int | None, out: memoryview, hasher: Any = None
) -> None:
    """Decode ``blob`` into ``out``, whose length is the size the manifest declares; CodecError
    when the blob is no frame of exactly that size (corrupt, or declared small but inflating
    large: zstd writes into a buffer of the declared size, so it never writes past it).

    ``zstd`` decodes straight into ``out``; ``bytegroup-zstd`` decodes its planes into this
    thread's scratch buffer and ungroups them into ``out``. zstd releases the GIL, so chunks
    decode in parallel on a reader's threads. With ``hasher`` (``digest.new_hasher``) the
    decoded bytes are hashed piece by piece as they are written, while in the CPU cache (a
    second pass over a chunk larger than the cache reads it back from memory); it has been fed
    all of ``out`` when this returns. A fresh ``out`` (a new tensor) has its pages made present
    first, in one call (``region_local.prefault``), instead of a page fault per 4 KiB written."""
    size = len(out)
    if codec != "zstd" and not (codec == "bytegroup-zstd" and width in _UINT):
        raise CodecError(f"unknown stored codec {codec!r} (width {width})")
    try:
        declared = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as exc:
        raise CodecError(f"not a zstd frame ({exc})") from None
    if declared != size:
        raise CodecError(f"the frame declares {declared} decoded bytes, the manifest {size}")
    target = out if codec == "zstd" else scratch("planes", size)
    prefault(out)
    # zstd straight into ``out`` in pieces, each hashed as it lands; the planes of
    # bytegroup-zstd are not the chunk's bytes: they are hashed as ``ungroup_bytes`` joins them.
    hash_pieces = hasher is not None and codec == "zstd"
    piece = HASH_PIECE_BYTES if hash_pieces else size
    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob, closefd=False) as reader:
            while filled < size:
                got = reader.readinto(target[filled : filled + piece])
                if not got:
                    break
                if hash_pieces:  # (not ``piece != size``: a chunk of exactly one piece went unhashed)
                    hasher.update(target[filled : filled + got])  # type: ignore[union-attr]
                filled += got
            # The frame must end here: reading on checks its size and checksum, and a frame
            # that would inflate further yields more bytes (never written into ``out``).
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd frame does not decode ({exc})") from None
    if filled != size or extra:
        raise CodecError(f"decoded to {filled if filled != size else 'more than'} bytes, the manifest declares {size}")
    if codec == "bytegroup-zstd":
        ungroup_bytes(target, width, out, hasher)  # type: ignore[arg-type]


def xor_into(target: memoryview, other: bytes | memoryview) -> None:
    """``target ^= other`` byte for byte (delta chunks, core/delta.py)."""
    mine = np.frombuffer(target, dtype=np.uint8)
    np.bitwise_xor(mine, np.frombuffer(other, dtype=np.uint8), out=mine)
