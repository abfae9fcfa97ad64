"""Dense zarr stacks ``(n_images, H, W)``: read row blocks, write row blocks.

Input: any zarr array (format 2 or 3) of a numeric or bool dtype, chunked any
way. :meth:`DenseInput.read_block` converts a slab to canonical CSR with a
mask/``flatnonzero`` pass (4-6x faster than ``scipy.sparse.csr_matrix(dense)``
on 64 x 512 x 512 float32 slabs at 0.1-10 % density, see docs/storage.md).

Output: a zarr v3 array ``(n_images, H_out, W_out)`` whose chunks are aligned
to the pipeline's row blocks, so each block writes whole chunks and parallel
writers never share a chunk.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numba
import numpy as np
import scipy.sparse
import zarr

from ..engine.base import index_dtype
from ..validation import _short
from . import progress
from .base import InputBase, OutputBase
from .location import Location

__all__ = [
    "DenseInput",
    "DenseOutput",
    "dense_to_csr",
    "resolve_compressors",
    "check_block_bounds",
    "write_dense_stack",
    "read_rows",
]

# --------------------------------------------------------------------------
# helpers shared with csr_store
# --------------------------------------------------------------------------
def check_rows(start: Any, stop: Any, n: int, what: str) -> tuple[int, int]:
    """Validate a row range ``[start, stop)`` of an ``n``-row stack."""
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer row index; got {_short(v)}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows [{start}, {stop}) are out of range for {what} with {n} images (need 0 <= start <= stop <= {n})")
    return start, stop


def _chunk_span(arr: zarr.Array, lo: int, hi: int) -> tuple[int, int]:
    c = arr.chunks[0]
    return lo // c, max(lo, hi - 1) // c


def read_rows(arr: zarr.Array, lo: int, hi: int, what: str, where: str) -> np.ndarray:
    """``arr[lo:hi]`` with decode failures reported by array name and chunk.

    zarr raises codec-specific errors for a corrupt chunk; this re-raises a
    ``ValueError`` naming the array, the rows asked for and the first chunk
    that fails to decode (found by re-reading chunk by chunk).
    """
    try:
        return arr[lo:hi]
    except Exception as exc:  # zarr / numcodecs decode errors have no common base class
        c = arr.chunks[0]
        bad = None
        first, last = _chunk_span(arr, lo, hi)
        for j in range(first, last + 1):
            try:
                arr[j * c: min((j + 1) * c, arr.shape[0])]
            except Exception:
                bad = j
                break
        chunk = f"chunk {bad} along axis 0 (elements {bad * c}-{min((bad + 1) * c, arr.shape[0]) - 1})" if bad is not None \
            else f"chunks {first}-{last} along axis 0"
        raise ValueError(
            f"could not read {what} at {where}: {chunk} failed to decode while reading elements [{lo}, {hi}) "
            f"({type(exc).__name__}: {exc}); the store is corrupt or was written incompletely"
        ) from exc


@numba.njit(nogil=True, cache=True)
def _gather_nonzeros(flat, counts, indices, data):
    """One pass over a C-contiguous 2-D array: nonzeros per row into
    ``counts`` and the column index and value of the first ``indices.size``
    nonzeros (row-major). Returns the total count, which may exceed the
    buffers (the caller then runs it again with room for all)."""
    rows, ncols = flat.shape
    cap = indices.size
    p = 0
    for r in range(rows):
        c = 0
        for j in range(ncols):
            v = flat[r, j]
            if v != 0:
                if p < cap:
                    indices[p] = j
                    data[p] = v
                p += 1
                c += 1
        counts[r] = c
    return p


#: First-pass room of :func:`dense_to_csr`'s compiled path, as a share of
#: the pixels: sparse blocks take one pass, denser ones a second.
_GATHER_ROOM = 1 / 16


def dense_to_csr(flat: np.ndarray, compiled: bool = True) -> scipy.sparse.csr_matrix:
    """Canonical CSR of a 2-D array, keeping its dtype; int32 indices when they fit.

    Booleans, integers and float32/float64 in native byte order take one
    compiled pass that counts and gathers at once (memory-bound: the numpy
    path below makes a mask, counts it and scans it again, ~30 % slower on
    sparse 16 x 512 x 512 float32 blocks); other dtypes, and
    ``compiled=False`` (the planner's samples on the client, where loading
    the first compiled function costs ~0.3 s), use numpy: a boolean mask,
    per-row counts give ``indptr`` and ``flatnonzero`` of the mask gives
    column indices already sorted by row then column (canonical) without
    scipy's COO round trip.
    """
    flat = np.ascontiguousarray(flat)
    rows, ncols = flat.shape
    if (compiled and flat.dtype.isnative and (flat.dtype.kind in "biu" or flat.dtype in (np.float32, np.float64))
            and flat.size):
        return _dense_to_csr_compiled(flat)
    mask = flat != 0
    counts = np.count_nonzero(mask, axis=1)
    nnz = int(counts.sum())
    idt = index_dtype(ncols, nnz, rows)
    indptr = np.zeros(rows + 1, dtype=idt)
    np.cumsum(counts, out=indptr[1:])
    lin = np.flatnonzero(mask)
    data = flat.reshape(-1)[lin]
    indices = (lin % ncols).astype(idt, copy=False)
    out = scipy.sparse.csr_matrix((data, indices, indptr), shape=(rows, ncols), copy=False)
    out.has_sorted_indices = True
    out.has_canonical_format = True
    return out


def _dense_to_csr_compiled(flat: np.ndarray) -> scipy.sparse.csr_matrix:
    rows, ncols = flat.shape
    idt = index_dtype(ncols, flat.size, rows)  # nnz <= size
    counts = np.empty(rows, dtype=np.int64)
    room = max(1024, int(flat.size * _GATHER_ROOM))
    indices, data = np.empty(room, dtype=idt), np.empty(room, dtype=flat.dtype)
    nnz = int(_gather_nonzeros(flat, counts, indices, data))
    if nnz > room:
        indices, data = np.empty(nnz, dtype=idt), np.empty(nnz, dtype=flat.dtype)
        _gather_nonzeros(flat, counts, indices, data)
    elif nnz < room:  # keep only what the block holds
        indices, data = indices[:nnz].copy(), data[:nnz].copy()
    idt = index_dtype(ncols, nnz, rows)
    indptr = np.zeros(rows + 1, dtype=idt)
    np.cumsum(counts, out=indptr[1:])
    out = scipy.sparse.csr_matrix((data, indices.astype(idt, copy=False), indptr), shape=(rows, ncols), copy=False)
    out.has_sorted_indices = True
    out.has_canonical_format = True
    return out


def resolve_compressors(compressor: Any, name: str = "compressor"):
    """``'default'`` -> zstd level 1; ``None``/``'none'`` -> no compression;
    ``'zstd'``, ``'lz4'`` (blosc lz4 + shuffle), ``'blosc-zstd'``; or zarr v3
    codec object(s) passed through."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if compressor is None or (isinstance(compressor, str) and compressor.lower() == "none"):
        return None
    if isinstance(compressor, str):
        key = compressor.lower()
        table = {
            "default": lambda: [ZstdCodec(level=1)],
            "zstd": lambda: [ZstdCodec(level=1)],
            "lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
            "blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
            "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
        }
        if key not in table:
            raise ValueError(f"{name} must be 'default', None, one of {sorted(k for k in table if k != 'default')} "
                             f"or zarr codec object(s); got {compressor!r}")
        return table[key]()
    if isinstance(compressor, (list, tuple)):
        return list(compressor)
    return [compressor]


def check_block_bounds(block_bounds: Any, n_images: int) -> list[tuple[int, int]]:
    """Validate row blocks: contiguous ``(start, stop)`` pairs covering
    ``[0, n_images)``, all the same size except a smaller last one."""
    try:
        bounds = [(int(a), int(b)) for a, b in block_bounds]
    except Exception:
        raise TypeError(f"block_bounds must be a sequence of (start, stop) integer pairs; got {_short(block_bounds)}") from None
    if not bounds:
        raise ValueError("block_bounds must hold at least one (start, stop) pair")
    pos = 0
    for i, (a, b) in enumerate(bounds):
        if a != pos or b <= a:
            raise ValueError(f"block_bounds must be contiguous non-empty (start, stop) pairs from 0 to n_images={n_images}; "
                             f"block {i} is ({a}, {b}) but should start at {pos}")
        pos = b
    if pos != n_images:
        raise ValueError(f"block_bounds must end at n_images={n_images}; they end at {pos}")
    size = bounds[0][1] - bounds[0][0]
    for i, (a, b) in enumerate(bounds[:-1]):
        if b - a != size:
            raise ValueError(f"block_bounds must all hold {size} rows except the last; block {i} is ({a}, {b})")
    if bounds[-1][1] - bounds[-1][0] > size:
        raise ValueError(f"the last block may not be larger than the others ({size} rows); got {bounds[-1]}")
    return bounds


def check_numeric_dtype(dtype: Any, name: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a numeric or bool numpy dtype; got {_short(dtype)}") from None
    if dt == np.bool_ or (np.issubdtype(dt, np.number) and not np.issubdtype(dt, np.complexfloating)):
        return dt
    raise TypeError(f"{name} must be a real numeric or bool dtype; got {dt}")


# --------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------
def image_runs(lead: tuple[int, ...], start: int, stop: int):
    """Images ``[start, stop)`` of an array whose leading axes ``lead`` count
    images in C order, as runs along the last of them: ``(first image,
    count, index)``, ``index`` selecting the run (integers for the other
    leading axes, a slice for the last). One zarr read or write per run."""
    last = lead[-1]
    row = start
    while row < stop:
        at = np.unravel_index(row, lead)
        a = int(at[-1])
        b = min(last, a + (stop - row))
        yield row, b - a, tuple(int(i) for i in at[:-1]) + (slice(a, b),)
        row += b - a


class DenseInput(InputBase):
    """A read-only dense stack ``(n_images, H, W)`` in a zarr array.

    Picklable and light: it holds the location and the opened zarr array
    (metadata only). Build it with :func:`dask_sparseconv.storage.open_input`.
    """

    format = "dense"

    def __init__(self, loc: Location, arr: zarr.Array, *, frame_axes: int = 1):
        # frame_axes: how many leading axes count images (an OME-Zarr image's
        # t, c, z...: storage/ome_zarr.py); a plain array must be (n, H, W)
        if arr.ndim != frame_axes + 2:
            raise ValueError(f"source {loc} is a {arr.ndim}-D zarr array of shape {arr.shape}; a dense stack must be 3-D "
                             "(n_images, H, W)")
        try:
            self.dtype = check_numeric_dtype(arr.dtype, "source dtype")
        except TypeError:
            raise TypeError(f"source {loc} has dtype {arr.dtype}; a dense stack must hold real numbers or bools") from None
        if arr.shape[-2] < 1 or arr.shape[-1] < 1:
            raise ValueError(f"source {loc} has frames of shape {arr.shape[-2:]}; H and W must be at least 1")
        self._loc = loc
        self._arr = arr
        self._lead = tuple(int(v) for v in arr.shape[:-2])
        self.n_images = int(np.prod(self._lead))
        self.frame_shape = (int(arr.shape[-2]), int(arr.shape[-1]))
        self.nnz = None
        shards = getattr(arr, "shards", None)
        if frame_axes == 0:  # one 2-D image
            self.chunk_rows = 1
        else:
            along = int((shards or arr.chunks)[-3])
            # images [k*c, (k+1)*c) must lie in one chunk of the last leading
            # axis and in one index of the axes before it: c divides that axis
            self.chunk_rows = along if frame_axes == 1 else math.gcd(along, self._lead[-1])
        self.chunks = tuple(int(c) for c in arr.chunks)

    @property
    def array(self) -> zarr.Array:
        """The underlying (read-only) zarr array."""
        return self._arr

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_images,) + self.frame_shape

    @property
    def bytes_per_image_dense(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize

    def read_dense_block(self, start: int, stop: int) -> np.ndarray:
        """Images ``[start, stop)`` as a C-contiguous ``(rows, H, W)`` array."""
        start, stop = check_rows(start, stop, self.n_images, f"source {self._loc}")
        if len(self._lead) == 1:
            return np.ascontiguousarray(read_rows(self._arr, start, stop, "dense array", f"{self._loc}"))
        if not self._lead:  # one 2-D image
            return np.ascontiguousarray(self._arr[...])[None][start:stop]
        # images are the leading axes in C order: read runs along the last one
        out = np.empty((stop - start,) + self.frame_shape, dtype=self._arr.dtype)
        for row, count, index in image_runs(self._lead, start, stop):
            try:
                out[row - start: row - start + count] = self._arr[index]
            except Exception as exc:  # zarr / numcodecs decode errors have no common base class
                raise ValueError(f"could not read the dense array at {self._loc}: images {row}-{row + count - 1} "
                                 f"(index {index}) failed to decode ({type(exc).__name__}: {exc}); "
                                 "the store is corrupt or was written incompletely") from exc
        return out

    def read_block(self, start: int, stop: int, compiled: bool = True) -> scipy.sparse.csr_matrix:
        """Images ``[start, stop)`` as canonical CSR ``(rows, H*W)`` of the input dtype
        (``compiled=False``: converted by numpy, see :func:`dense_to_csr`)."""
        dense = self.read_dense_block(start, stop)
        H, W = self.frame_shape
        return dense_to_csr(dense.reshape(dense.shape[0], H * W), compiled=compiled)

    def read_frame_rows(self, image: int, r0: int, r1: int, c0: int = 0,
                        c1: int | None = None) -> scipy.sparse.csr_matrix:
        """Pixels ``[r0, r1) x [c0, c1)`` of image ``image`` (clipped to the
        frame) as canonical CSR ``(rows, cols)``: a tile's input window
        (:mod:`dask_sparseconv.tiles`); only the chunks holding them are read.

        A frame chunked in space (e.g. chunks ``(1, 4096, 4096)``) is read
        chunk by chunk, each kept in this process in CSR form (a few hundred
        KB for a sparse 4096 x 4096 chunk), so that the tiles sharing a chunk
        (the tiles inside it and the neighbours whose halo reaches into it)
        decode it once instead of once each."""
        H, W = self.frame_shape
        image, r0, r1 = int(image), max(0, int(r0)), min(H, int(r1))
        c0, c1 = max(0, int(c0)), W if c1 is None else min(W, int(c1))
        if not 0 <= image < self.n_images:
            raise ValueError(f"source {self._loc}: image {image} is out of range [0, {self.n_images})")
        if r1 <= r0 or c1 <= c0:
            return scipy.sparse.csr_matrix((max(0, r1 - r0), max(0, c1 - c0)), dtype=self.dtype)
        ch, cw = self.chunks[-2:]
        chunk_bytes = math.prod(self.chunks) * self.dtype.itemsize
        if (ch < H or cw < W) and isinstance(self._arr, zarr.Array) and chunk_bytes <= self._TILE_CHUNK_MAX_BYTES:
            rows = []
            for cy in range(r0 // ch, (r1 - 1) // ch + 1):
                y0 = cy * ch
                row = [self._chunk_csr(image, cy, cx)[max(r0, y0) - y0: min(r1, y0 + ch) - y0,
                                                      max(c0, cx * cw) - cx * cw: min(c1, (cx + 1) * cw) - cx * cw]
                       for cx in range(c0 // cw, (c1 - 1) // cw + 1)]
                rows.append(row[0] if len(row) == 1 else scipy.sparse.hstack(row, format="csr"))
            out = rows[0] if len(rows) == 1 else scipy.sparse.vstack(rows, format="csr")
            return scipy.sparse.csr_matrix(out)
        try:
            pixels = np.asarray(self._arr[self._image_index(image) + (slice(r0, r1), slice(c0, c1))])
        except Exception as exc:  # zarr / numcodecs decode errors have no common base class
            raise self._decode_error(image, r0, r1, c0, c1, exc) from exc
        return dense_to_csr(np.ascontiguousarray(pixels))

    #: chunks of a spatially chunked frame kept in CSR form per process (bytes)
    _TILE_CHUNK_CACHE_BYTES = 32 << 20
    #: chunks larger than this (e.g. 16 images of 4096 x 4096 float32 in one
    #: chunk: 1 GiB) are not decoded whole into a kept buffer; windows are
    #: read through zarr instead
    _TILE_CHUNK_MAX_BYTES = 256 << 20

    def _image_index(self, image: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(image, self._lead)) if self._lead else ()

    def _decode_error(self, image, r0, r1, c0, c1, exc) -> ValueError:
        return ValueError(f"could not read the dense array at {self._loc}: rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1} "
                          f"of image {image} failed to decode ({type(exc).__name__}: {exc}); the store is corrupt or "
                          "was written incompletely")

    def _chunk_csr(self, image: int, cy: int, cx: int) -> scipy.sparse.csr_matrix:
        """Chunk ``(cy, cx)`` of image ``image`` as 2-D CSR, through the per-process cache."""
        import threading
        from collections import OrderedDict

        from ._zarr_compat import decode_chunk_into, read_into

        d = self.__dict__
        if "_tile_lock" not in d:
            d.setdefault("_tile_lock", threading.Lock())
        key = (image, cy, cx)
        with d["_tile_lock"]:
            cache = d.setdefault("_tile_cache", OrderedDict())
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
                return hit
            H, W = self.frame_shape
            ch, cw = self.chunks[-2:]
            r0, c0 = cy * ch, cx * cw
            r1, c1 = min(H, r0 + ch), min(W, c0 + cw)
            lead = self._image_index(image)
            # one buffer of a whole chunk, reused: every chunk decodes into it
            buf = d.get("_tile_buffer")
            if buf is None or buf.shape != self.chunks:
                buf = d["_tile_buffer"] = np.empty(self.chunks, dtype=self._arr.dtype)
            part = buf[tuple(i % c for i, c in zip(lead, self.chunks[:-2]))][: r1 - r0, : c1 - c0]
            try:
                coords = tuple(i // c for i, c in zip(lead, self.chunks[:-2])) + (cy, cx)
                # the chunk's raw bytes straight into buf; codecs we do not decode ourselves: through zarr
                if not decode_chunk_into(self._arr, coords, buf):
                    read_into(self._arr, lead + (slice(r0, r1), slice(c0, c1)), part)
            except Exception as exc:  # zarr / numcodecs decode errors have no common base class
                raise self._decode_error(image, r0, r1, c0, c1, exc) from exc
            csr = dense_to_csr(part)
            cache[key] = csr
            size = sum(int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes) for m in cache.values())
            while size > self._TILE_CHUNK_CACHE_BYTES and len(cache) > 1:
                _, old = cache.popitem(last=False)
                size -= int(old.data.nbytes + old.indices.nbytes + old.indptr.nbytes)
            return csr

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_tile_lock", "_tile_cache", "_tile_buffer"):
            state.pop(key, None)
        return state

    def check_indices(self) -> None:
        """Nothing to check: a dense array has no indices."""

    @staticmethod
    def detect(node: Any) -> bool:
        return isinstance(node, zarr.Array)

    def to_dask(self, rows_per_chunk: int | None = None):
        """A lazy ``(n, H, W)`` dask array chunked like the zarr array."""
        import dask.array as da

        arr = da.from_zarr(self._arr)
        return arr if len(self._lead) == 1 else arr.reshape((self.n_images,) + self.frame_shape)

    def describe(self, sample_chunks: int = 4) -> dict:
        """Layout and an nnz estimate from up to ``sample_chunks`` evenly spaced row chunks."""
        import math

        arr = self._arr
        info: dict[str, Any] = dict(shape=list(arr.shape), chunks=list(arr.chunks), codec=codec_text(arr),
                                    zarr_format=arr.metadata.zarr_format)
        shards = getattr(arr, "shards", None)
        if shards:
            info["shards"] = list(shards)
        c, n = self.chunk_rows, self.n_images
        n_chunks = math.ceil(n / c) if n else 0
        evenly = np.linspace(0, n_chunks - 1, min(n_chunks, sample_chunks)).round().astype(int) if n_chunks else []
        picks = sorted(set(int(j) for j in evenly))
        seen = nz = 0
        for j in picks:
            block = self.read_dense_block(j * c, min((j + 1) * c, n))
            seen += block.size
            nz += int(np.count_nonzero(block))
        exact = len(picks) == n_chunks
        total = n * self.frame_shape[0] * self.frame_shape[1]
        density = nz / seen if seen else 0.0
        info.update(nnz=int(nz) if exact else int(round(density * total)), density=density, nnz_exact=exact,
                    sampled_images=int(sum(min((j + 1) * c, n) - j * c for j in picks)))
        return info

    def __repr__(self) -> str:
        return f"DenseInput({self._loc}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunks})"


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------
class DenseOutput(OutputBase):
    """Writer for a dense output stack; see :func:`dask_sparseconv.storage.create_output`.

    Picklable: dask tasks carry it and reopen the array (one metadata read)
    on first use in each process.
    """

    format = "dense"

    def __init__(self, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
                 block_bounds: Sequence[tuple[int, int]], chunk_rows: int, tile: tuple[int, int] | None = None):
        super().__init__(loc, n_images, out_shape, dtype, block_bounds)
        self.chunk_rows = chunk_rows
        # frames larger than a block (dask_sparseconv.tiles): blocks count
        # tiles of ``tile`` = (rows, cols) output pixels, each one chunk
        self.tile = tile

    @property
    def _unit_shape(self) -> tuple[int, ...]:
        """What one row of a block's result holds: an image, or a tile."""
        return tuple(self.out_shape) if self.tile is None else tuple(self.tile)

    def _tiles(self, start: int, stop: int):
        """``(k, image, y0, y1, x0, x1)`` for tiles ``[start, stop)`` (``k``: from ``start``)."""
        from ..tiles import TileGrid

        grid = TileGrid(self.n_images, tuple(self.out_shape), tuple(self.out_shape), *self.tile)
        for k, u in enumerate(range(start, stop)):
            yield (k,) + grid.tile(u)

    def _open_node(self) -> zarr.Array:
        return self._loc.open_array(mode="r+")

    @classmethod
    def create(cls, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]], *, chunk_rows: int | None, chunk_nnz: int | None,
               compressor: Any, attrs: dict | None, overwrite: bool) -> "DenseOutput":
        """A new dense output; ``chunk_rows`` must divide the block size (``chunk_nnz`` is for CSR)."""
        block_rows = block_bounds[0][1] - block_bounds[0][0]
        tile = tile_shape(attrs)
        if tile is not None:  # one chunk per tile
            chunk_rows, chunks = 1, (1,) + tile
        else:
            if chunk_rows is None:
                chunk_rows = block_rows
            if block_rows % chunk_rows:
                raise ValueError(f"chunk_rows={chunk_rows} must divide the block size ({block_rows} rows) so that each "
                                 "block writes whole chunks")
            chunks = (chunk_rows,) + tuple(out_shape)
        arr = zarr.create_array(
            shape=(n_images,) + tuple(out_shape),
            chunks=chunks,
            dtype=dtype,
            compressors=resolve_compressors(compressor),
            fill_value=0,
            zarr_format=3,
            overwrite=overwrite,
            **create_kwargs(loc),
        )
        progress.init_provenance(arr, attrs, layout_attrs("dense", n_images, out_shape, dtype, block_bounds))
        out = cls(loc, n_images, tuple(out_shape), np.dtype(dtype), block_bounds, chunk_rows, tile)
        out.attach(arr)
        return out

    def write_block(self, i: int, start: int, stop: int, result: Any, *, record: dict | None = None) -> int:
        """Write rows ``[start, stop)`` (block ``i``) and then mark it done.

        ``result``: dense ``(rows, H_out, W_out)`` or CSR ``(rows, H_out*W_out)``
        (a kernel bank's output: ``(rows, K, H_out, W_out)`` or CSR
        ``(rows, K*H_out*W_out)``, kernel-major within each image).
        Returns the block's nnz: the CSR result's ``nnz``, or the number of
        nonzero pixels written for a dense result.
        The marker holds the block's record: ``rows``, ``nnz`` (nonzero
        pixels), ``digest`` of the written values, plus ``record`` (caller's
        extra keys) -- see :meth:`verify_block`.
        """
        self._check_block(i, start, stop)
        self.check_fence(f"writing block {i}")
        rows = stop - start
        shape = self._unit_shape
        pixels = int(np.prod(shape))
        nnz = summary = None
        if scipy.sparse.issparse(result):
            if result.shape != (rows, pixels):
                raise ValueError(f"block {i}: result must have shape {(rows, pixels)}; got {result.shape}")
            csr = scipy.sparse.csr_matrix(result)
            if not csr.has_canonical_format:
                csr = csr.copy()
                csr.sum_duplicates()
            nnz = int(csr.nnz)
            data = csr.data.astype(self.dtype, copy=False)
            # digest the nonzeros we have instead of a pass over every pixel written
            positions = np.repeat(np.arange(rows, dtype=np.int64) * pixels, np.diff(csr.indptr)) + csr.indices
            summary = progress.nonzero_digest(positions, data)
            values = scipy.sparse.csr_matrix((data, csr.indices, csr.indptr), shape=csr.shape).toarray()
            values = values.reshape((rows,) + shape)
        else:
            dense = np.asarray(result)
            if dense.shape != (rows,) + shape:
                raise ValueError(f"block {i}: result must have shape {(rows,) + shape}; got {dense.shape}")
            values = dense.astype(self.dtype, copy=False)
        self._write_rows(start, stop, values)
        nonzero, digest = summary if summary is not None else progress.dense_digest(values)
        rec = {**(record or {}), "rows": [int(start), int(stop)], "nnz": nonzero, "digest": digest,
               "chunks": progress.stored_chunks(self.node, self._chunk_keys(start, stop))}
        progress.mark_block_done(self.marker_node, i, rec)
        # the count is made here anyway (for the record): hand it back so the
        # caller need not make a second pass over the block
        return nnz if nnz is not None else nonzero

    # -- where the values and markers go (an OME-Zarr output: a level array inside its group) --
    @property
    def marker_node(self) -> zarr.Array:
        """The array whose ``_progress/<i>`` keys hold the block records."""
        return self.node

    def done_blocks(self) -> set[int]:
        return {i for i in progress.done_blocks(self.marker_node) if i < len(self.block_bounds)}

    def _write_rows(self, start: int, stop: int, values: np.ndarray) -> None:
        if self.tile is None:
            self.node[start:stop] = values
            return
        for k, image, y0, y1, x0, x1 in self._tiles(start, stop):
            self.node[image, y0:y1, x0:x1] = values[k, : y1 - y0, : x1 - x0]

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        if self.tile is None:
            return np.asarray(self.node[start:stop])
        out = np.zeros((stop - start,) + self._unit_shape, dtype=self.dtype)
        for k, image, y0, y1, x0, x1 in self._tiles(start, stop):
            out[k, : y1 - y0, : x1 - x0] = self.node[image, y0:y1, x0:x1]
        return out

    def _chunk_keys(self, start: int, stop: int) -> list[str]:
        """Store keys (relative to the array) of the chunks holding rows (or tiles) ``[start, stop)``."""
        if self.tile is not None:
            rows, cols = self.tile
            return [self.node.metadata.encode_chunk_key((image, y0 // rows, x0 // cols))
                    for _, image, y0, _, x0, _ in self._tiles(start, stop)]
        c = int(self.node.chunks[0])
        rest = (0,) * (self.node.ndim - 1)
        return [self.node.metadata.encode_chunk_key((j, *rest)) for j in range(start // c, (stop - 1) // c + 1)]

    def verify_block(self, i: int) -> dict | None:
        """Block ``i``'s record if its marker is set and what is stored now
        matches the record; else ``None`` (redo it).

        The record lists the block's chunks as stored (size and XXH3 digest of
        the encoded bytes, taken right after the write): they are read back
        raw and compared, with nothing decoded (~10x cheaper than decoding
        and digesting the values). A record without that list (written by
        an earlier version) is checked by decoding the rows and comparing
        their nnz and value digest."""
        if not 0 <= int(i) < len(self.block_bounds):
            return None
        rec = progress.read_block_record(self.marker_node, int(i))
        start, stop = self.block_bounds[int(i)]
        if rec is None or rec.get("rows") != [start, stop]:
            return None
        if isinstance(rec.get("chunks"), dict):
            keys = self._chunk_keys(start, stop)
            if set(rec["chunks"]) != set(keys):
                return None
            stored = progress.stored_chunks(self.node, keys, progress.chunk_hash(rec["chunks"]))
            return rec if stored == rec["chunks"] else None
        try:
            values = self._read_rows(start, stop)
        except Exception:  # a chunk that no longer decodes
            return None
        if not progress.verify_digest(values, rec.get("nnz"), rec.get("digest")):
            return None
        return rec

    @classmethod
    def reopen(cls, loc: Location, node: Any, prov: dict, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]]) -> "DenseOutput":
        out = cls(loc, n_images, out_shape, dtype, block_bounds, int(node.chunks[0]), tile_shape(prov))
        out.attach(node)
        return out

    def finalize(self, block_nnz: Sequence[int] | None = None) -> None:
        """Check every block is done, then set ``complete: true`` (the last write)."""
        missing = sorted(set(range(len(self.block_bounds))) - self.done_blocks())
        if missing:
            raise ValueError(f"cannot finalize {self._loc}: {len(missing)} block(s) are not written yet "
                             f"(first: {missing[:10]}); write them (or resume) first")
        extra = {}
        if block_nnz is not None:
            extra["nnz"] = int(sum(int(x) for x in block_nnz))
        self.check_fence("completing the output")
        progress.mark_complete(self.node, **extra)

    def __repr__(self) -> str:
        return f"DenseOutput({self._loc}, shape={(self.n_images,) + self.out_shape}, dtype={self.dtype})"


def tile_shape(attrs: dict | None) -> tuple[int, int] | None:
    """Output ``(rows, cols)`` per tile of a tiled job's provenance (``None``: whole images)."""
    tiles = (attrs or {}).get("tiles")
    return (int(tiles["band_rows"]), int(tiles["band_cols"])) if isinstance(tiles, dict) else None


def tile_units(attrs: dict | None) -> int:
    """Tiles per image of a tiled job's provenance (1: whole images)."""
    tiles = (attrs or {}).get("tiles")
    return int(tiles["per_image"]) if isinstance(tiles, dict) else 1


def codec_text(arr: zarr.Array) -> str:
    parts = []
    try:
        parts += [repr(c) for c in (arr.filters or ())]
        parts += [repr(c) for c in (arr.compressors or ())]
    except Exception:
        pass
    return ", ".join(parts) if parts else "none"


def layout_attrs(fmt: str, n_images: int, out_shape, dtype, block_bounds) -> dict:
    return {
        "format": fmt,
        "n_images": int(n_images),
        "frame_shape": [int(x) for x in out_shape],
        "dtype": str(np.dtype(dtype)),
        "block_rows": int(block_bounds[0][1] - block_bounds[0][0]),
        "n_blocks": len(block_bounds),
    }


def create_kwargs(loc: Location) -> dict:
    if loc.kind == "object":
        return {"store": loc.store, "name": loc.path or None}
    kw: dict[str, Any] = {"store": loc.root, "name": loc.path or None}
    if loc.kind == "url" and loc.storage_options:
        kw["storage_options"] = loc.storage_options
    return kw


def write_dense_stack(target: Any, array: Any, chunks: Any = "auto", storage_options: dict | None = None,
                      zarr_format: int = 3, array_path: str | None = None, compressor: Any = "default",
                      overwrite: bool = False) -> zarr.Array:
    """Write a dense ``(n, H, W)`` stack to a new zarr array (for tests, benchmarks, sample data).

    ``chunks``: ``'auto'`` (whole frames, about 16 MiB per chunk), an int
    (images per chunk) or a full 3-tuple (e.g. ``(1, 256, 256)`` to split
    frames spatially). ``compressor`` as in :func:`resolve_compressors` for
    format 3; format 2 uses zarr's default.
    """
    from .location import resolve_location

    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"array must be 3-D (n_images, H, W); got shape {arr.shape}")
    check_numeric_dtype(arr.dtype, "array dtype")
    loc = resolve_location(target, array_path, storage_options, name="target")
    if chunks == "auto":
        per = max(1, arr[0].nbytes)
        chunks = (max(1, min(arr.shape[0], (16 << 20) // per)),) + arr.shape[1:]
    elif isinstance(chunks, (int, np.integer)):
        chunks = (int(chunks),) + arr.shape[1:]
    kw: dict[str, Any] = {}
    if zarr_format == 3:
        kw["compressors"] = resolve_compressors(compressor)
    z = zarr.create_array(shape=arr.shape, chunks=tuple(chunks), dtype=arr.dtype, zarr_format=zarr_format,
                          fill_value=0, overwrite=overwrite, **kw, **create_kwargs(loc))
    z[:] = arr
    return z
