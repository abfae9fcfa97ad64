"""The only module that touches zarr internals.

zarr-python 3 has no public API yet for four things this package needs:
running its async store API from synchronous code (``zarr.core.sync.sync``),
making buffers for raw key writes and reads into a caller's array
(``zarr.core.buffer``), and naming a chunk's key without reading the array's
metadata. They live here, so that a zarr
release that moves them breaks one file; pyproject pins ``zarr<4``, and CI
tests the lower bound it declares.
"""

from __future__ import annotations

from typing import Any, Awaitable, TypeVar

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as _sync

T = TypeVar("T")

__all__ = ["sync", "prototype", "buffer", "default_chunk_key", "shrink_metadata", "read_into"]


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
