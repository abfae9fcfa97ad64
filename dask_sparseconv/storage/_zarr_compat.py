"""The only module that touches zarr internals.

zarr-python 3 has no public API yet for four things this package needs:
running its async store API from synchronous code (``zarr.core.sync.sync``),
making buffers for raw key writes and reads into a caller's array
(``zarr.core.buffer``), naming a chunk's key without reading the array's
metadata, and decoding one chunk straight into a caller's buffer. They live here, so that a zarr
release that moves them breaks one file; pyproject pins ``zarr<4``, and CI
tests the lower bound it declares.
"""

from __future__ import annotations

from typing import Any, Awaitable, TypeVar

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as _sync

T = TypeVar("T")

__all__ = ["sync", "prototype", "buffer", "default_chunk_key", "shrink_metadata", "read_into", "decode_chunk_into"]


def sync(coro: Awaitable[T]) -> T:
    """Run a zarr coroutine on zarr's own event loop and return its result."""
    return _sync(coro)


def prototype() -> Any:
    """The default buffer prototype (for ``store.get``)."""
    return default_buffer_prototype()


def buffer(data: bytes) -> Any:
    """A zarr buffer holding ``data`` (for ``store.set``)."""
    return default_buffer_prototype().buffer.from_bytes(data)


def default_chunk_key(*coords: int) -> str:
    """The key of a chunk under the zarr format 3 default chunk key encoding
    (``c/i/j``), for arrays this package created with that encoding: naming
    it directly saves reading the array's metadata on every marker write."""
    return "/".join(("c",) + tuple(str(int(c)) for c in coords))


def shrink_metadata(arr: Any, length: int) -> Awaitable[Any]:
    """A coroutine that resizes a 1-D array to ``length`` by rewriting its
    metadata only: no chunk beyond it is listed or deleted (listing the chunk
    grid of a capacity-sized array to delete nothing would be unbounded).
    ``delete_outside_chunks`` of the async array, zarr >= 3.1.4."""
    return arr.async_array.resize((int(length),), delete_outside_chunks=False)


def read_into(arr: Any, selection: tuple, out: Any) -> None:
    """Read ``arr[selection]`` (basic slices) into the numpy array ``out``.

    Into a buffer the caller reuses: reading a whole 4096 x 4096 float32
    chunk into a fresh array took 176 ms, into a reused one 35 ms (the
    kernel zeroes every page of a fresh 64 MB allocation as it is first
    touched; docs/benchmarks.md, "Frames larger than a block")."""
    arr.get_basic_selection(selection, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))


def _single_compressor(arr: Any):
    """The numcodecs codec that alone encodes ``arr``'s chunks (raw C-order
    bytes in native order, then one compressor, no filters, no sharding),
    or ``None`` when its codecs are anything else."""
    import sys

    import numcodecs

    meta = arr.metadata
    little = sys.byteorder == "little"
    if meta.zarr_format == 2:
        if meta.filters or meta.order != "C" or not arr.dtype.isnative:
            return None
        comp = meta.compressor
        return comp if comp is not None and comp.codec_id in ("zstd", "blosc", "lz4", "gzip", "zlib") else None
    codecs = list(meta.codecs)
    if len(codecs) != 2 or type(codecs[0]).__name__ != "BytesCodec":
        return None
    endian = getattr(codecs[0], "endian", None)
    endian = getattr(endian, "value", endian)
    if endian not in (None, "little" if little else "big"):
        return None
    comp = codecs[1]
    name = type(comp).__name__
    if name == "ZstdCodec":
        return numcodecs.Zstd(level=comp.level)
    if name == "BloscCodec":
        return numcodecs.Blosc()
    if name == "GzipCodec":
        return numcodecs.GZip(level=comp.level)
    return None


def decode_chunk_into(arr: Any, coords: tuple[int, ...], out: Any) -> bool:
    """Decode the whole chunk ``coords`` of ``arr`` into the C-contiguous
    numpy array ``out`` (the chunk's full shape), with no copy through
    zarr's own buffers: its raw bytes are read and decompressed in place.
    A chunk that is not stored reads as the fill value. Returns ``False``
    (nothing done) when the array's codecs are not one plain compressor;
    the caller then reads through zarr.

    Why: zarr decodes into a new buffer and copies out of it, two fresh
    allocations of the chunk's size (a 64 MiB chunk of a 4096 x 4096
    float32 frame: 35 ms and 128 MiB at peak with a reused output, against
    4 ms and no allocation here)."""
    comp = _single_compressor(arr)
    if comp is None or not out.flags.c_contiguous or out.dtype != arr.dtype:
        return False
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    raw = _sync((arr.store_path / key).get(prototype=default_buffer_prototype()))
    if raw is None:
        out[...] = arr.metadata.fill_value if arr.metadata.zarr_format == 3 else (arr.fill_value or 0)
        return True
    flat = out.reshape(-1).view("u1")
    comp.decode(raw.as_numpy_array(), out=flat)
    return True
