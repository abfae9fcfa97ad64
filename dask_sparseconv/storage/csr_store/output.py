"""Writing CSR outputs: each value written once, straight to its final place.

A block's offset in the final ``data``/``indices`` is the nnz of every block
before it, known only once those are computed, and two writers must never
share a zarr chunk. Blocks are therefore written as a chain with parallel
writes (the graph is built by :mod:`dask_sparseconv.pipeline.csr_chain`):

* a **carry** runs down the blocks in order: :meth:`CSROutput.carry` takes the
  previous block's carry and this block's result and returns the values past
  the block's last chunk boundary (at most one chunk's worth: the start of a
  chunk that the next block completes) and the offset of the next block.
  It is small, so it travels between workers cheaply;
* each block **writes** (:meth:`CSROutput.write_chunks`) every chunk that ends
  inside it: the previous carry, then its own values up to its last chunk
  boundary, as whole chunks. The last block writes the final partial chunk.
  Chunks are written once, by one task, compressed once.

Block ``i``'s done marker says those chunks are written; with it goes
``_blocks/block_<i>``, a small key with the block's per-image nnz (the
``indptr`` is built from them at the end) and the range and CRC-32 of the
values it wrote, which a resumed run reads back and checks. A
resumed run skips blocks whose record checks out; when a block left to do
needs the carry of a skipped one, it recomputes just the frames that carry
held (``produce``).

:meth:`CSROutput.finish` writes ``indptr`` from the per-image counts, shrinks
``data``/``indices`` to the true nnz (metadata only), records
``consolidated: true``, deletes ``_blocks`` and sets ``complete: true`` last.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import scipy.sparse
import zarr

from ...engine.base import index_dtype
from .. import progress
from .._zarr_compat import buffer, prototype, shrink_metadata, sync
from ..base import OutputBase, io_context
from ..dense_store import create_kwargs, layout_attrs, resolve_compressors, tile_units
from ..location import Location
from .input import CSR_ATTRS, DEFAULT_CHUNK_NNZ, DEFAULT_INDPTR_CHUNK

BLOCKS = "_blocks"
# 3: values written once, at their final offsets, by a chain of blocks; the
# per-block records live under _blocks/ (2 staged every block first)
CSR_LAYOUT = 3

#: ``produce(f0, f1)``: output rows of images ``[f0, f1)`` as canonical CSR
Produce = Callable[[int, int], scipy.sparse.csr_matrix]


def canonical_result(result: Any, rows: int, ncols: int, i: int) -> scipy.sparse.csr_matrix:
    """A block's result (CSR ``(rows, ncols)`` or dense ``(rows, ...)``) as canonical CSR."""
    from ..dense_store import dense_to_csr

    if scipy.sparse.issparse(result):
        if result.shape != (rows, ncols):
            raise ValueError(f"block {i}: result must have shape {(rows, ncols)}; got {result.shape}")
        csr = result if isinstance(result, scipy.sparse.csr_matrix) else scipy.sparse.csr_matrix(result.tocsr())
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        return csr
    arr = np.asarray(result)
    if arr.ndim < 2 or arr.shape[0] != rows or int(np.prod(arr.shape[1:])) != ncols:
        raise ValueError(f"block {i}: result must have {rows} rows of {ncols} pixels; got shape {arr.shape}")
    return dense_to_csr(arr.reshape(rows, ncols))


class Carry(NamedTuple):
    """Output values ``[start, stop)`` not yet written, carried to the next block.

    ``start`` is a chunk boundary, ``stop`` the next block's offset (so
    ``stop`` is also the nnz of every block so far). ``data``/``indices``
    hold the values, or are ``None`` when the blocks they come from were
    skipped by a resumed run: they are then recomputed from images
    ``[frame0, frame1)``, whose first value is at ``first_offset``.
    """

    start: int
    stop: int
    data: np.ndarray | None
    indices: np.ndarray | None
    frame0: int
    frame1: int
    first_offset: int

    @property
    def nnz(self) -> int:
        return self.stop - self.start

    @property
    def in_memory(self) -> bool:
        return self.data is not None or self.nnz == 0


# the block record: one raw key per block -------------------------------------
# ``_blocks/block_<i>`` (little-endian): magic b"DSCBLK3\0", rows (int64),
# per-image nnz (rows x int64), then UTF-8 JSON to the end: rows, nnz, the
# CRC-32 of the bytes before it, the range of values written and the data
# and indices chunks holding them as stored, size and XXH3 digest of their
# encoded bytes (``written``; earlier versions: a CRC-32 of the values), and
# the writer's extra keys.
_MAGIC = b"DSCBLK3\0"
_HEAD = struct.Struct("<8sq")


def _pack_record(counts: np.ndarray, record: dict) -> bytes:
    counts = np.ascontiguousarray(counts, dtype="<i8")
    body = _HEAD.pack(_MAGIC, counts.size) + counts.tobytes()
    rec = {**record, "rows": int(counts.size), "nnz": int(counts.sum()), "crc32": zlib.crc32(body)}
    return body + json.dumps(progress.jsonable(rec)).encode()


def _unpack_record(raw: bytes) -> tuple[np.ndarray, dict] | None:
    """``(counts, record)`` of a whole record key, else ``None``."""
    if len(raw) < _HEAD.size:
        return None
    magic, rows = _HEAD.unpack_from(raw)
    end = _HEAD.size + 8 * rows
    if magic != _MAGIC or rows < 0 or len(raw) <= end:
        return None
    try:
        rec = json.loads(bytes(raw[end:]).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("crc32") != zlib.crc32(raw[:end]) or rec.get("rows") != rows:
        return None
    counts = np.frombuffer(raw, dtype="<i8", count=rows, offset=_HEAD.size).astype(np.int64)
    return counts, rec


class CSROutput(OutputBase):
    """Writer for a CSR output group; see :func:`dask_sparseconv.storage.create_output`.

    Blocks go through :meth:`carry` and :meth:`write_chunks` (the pipeline
    runs them as a chain of dask tasks), or, from one process in block
    order, through :meth:`write_block`. Picklable (location and layout only);
    each process reopens the group on first use.
    """

    format = "csr"
    finish_label = "index"
    #: blocks are written in a chain (each needs the previous block's carry)
    chained = True

    def __init__(self, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
                 block_bounds: Sequence[tuple[int, int]], indptr_chunk: int | None, chunk_nnz: int | None,
                 compressor: Any = "default", per_image: int = 1):
        super().__init__(loc, n_images, out_shape, dtype, block_bounds)
        # frames larger than a block (dask_sparseconv.tiles): blocks count
        # tiles, ``per_image`` bands of each image in order, so a tile's
        # values are a contiguous run of the image's; counts are per tile
        self.per_image = int(per_image)
        self.n_cols = self.out_shape[0] * self.out_shape[1]
        self.indptr_chunk = indptr_chunk or DEFAULT_INDPTR_CHUNK
        self.chunk_nnz = chunk_nnz or DEFAULT_CHUNK_NNZ
        self.compressor = compressor
        self.index_dtype = index_dtype(self.n_cols)

    # per-process caches (never pickled): the opened final arrays, the serial writer's carry
    _CACHE_KEYS = ("_arrays", "_serial")

    def _open_node(self) -> zarr.Group:
        return self._loc.open_group(mode="r+")

    @classmethod
    def create(cls, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]], *, chunk_rows: int | None, chunk_nnz: int | None,
               compressor: Any, attrs: dict | None, overwrite: bool) -> "CSROutput":
        """A new CSR output; ``chunk_rows``: rows per ``indptr`` chunk, ``chunk_nnz``: values per ``data`` chunk."""
        out = cls(loc, n_images, out_shape, dtype, block_bounds, chunk_rows, chunk_nnz, compressor, tile_units(attrs))
        comp = resolve_compressors(compressor)
        extra = layout_attrs("csr", n_images, out_shape, dtype, block_bounds)
        extra.update(chunk_nnz=out.chunk_nnz, indptr_chunk=out.indptr_chunk, csr_layout=CSR_LAYOUT,
                     compressor=compressor if isinstance(compressor, str) or compressor is None else repr(compressor))
        group_attrs = {**CSR_ATTRS, "shape": [int(n_images), out.n_cols], "frame_shape": [int(v) for v in out_shape],
                       progress.ATTR: progress.new_provenance(attrs, extra)}
        kw = create_kwargs(loc)
        kw["path"] = kw.pop("name")
        g = zarr.create_group(zarr_format=3, overwrite=overwrite, attributes=group_attrs, **kw)
        # data/indices exist from the start at a capacity no output can exceed
        # (every pixel of every frame) and are shrunk to the true nnz at the
        # end: blocks write their chunks as soon as their offsets are known,
        # with no task that sizes the arrays first
        capacity = max(1, int(n_images) * out.n_cols)
        c_nz = max(1, min(out.chunk_nnz, capacity))
        c_ip = max(1, min(out.indptr_chunk, int(n_images) + 1))
        specs: list[tuple[str, tuple[int], int, Any, Any]] = [(progress.PROGRESS, (len(block_bounds),), 1, "uint8", None),
                 ("data", (capacity,), c_nz, out.dtype, comp), ("indices", (capacity,), c_nz, out.index_dtype, comp),
                 ("indptr", (int(n_images) + 1,), c_ip, np.int64, comp)]

        from zarr.api.asynchronous import create_array

        # four metadata documents written concurrently, not one by one;
        # overwrite=True only skips zarr's probes for an existing node: the group
        # was created empty just above (figures: docs/benchmarks.md, "Figures behind the code")
        sync(_gather(*(create_array(g.store_path, name=name, shape=shape, chunks=(c,), dtype=dt, fill_value=0,
                                    compressors=codecs, overwrite=True) for name, shape, c, dt, codecs in specs)))
        out.attach(g)
        return out

    #: layout keys a resumed output must match besides the common ones (an
    #: output of an older CSR layout staged its blocks: it cannot be continued)
    RESUME_LAYOUT = {"csr_layout": CSR_LAYOUT}

    @classmethod
    def reopen(cls, loc: Location, node: Any, prov: dict, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]]) -> "CSROutput":
        out = cls(loc, n_images, out_shape, dtype, block_bounds, int(prov.get("indptr_chunk", 0)) or None,
                  int(prov.get("chunk_nnz", 0)) or None, prov.get("compressor", "default"), tile_units(prov))
        out.attach(node)
        return out

    # -- the chain ---------------------------------------------------------
    @staticmethod
    def first_carry() -> Carry:
        """The carry before block 0: nothing written, nothing held."""
        return Carry(0, 0, np.empty(0), np.empty(0, np.int32), 0, 0, 0)

    def _chunk(self) -> int:
        return int(self._final("data").chunks[0])

    def carry(self, i: int, prev: Carry | None, result: scipy.sparse.csr_matrix | None,
              counts: np.ndarray) -> Carry:
        """The carry after block ``i``: its values past its last chunk
        boundary (with ``prev``'s when the block holds no boundary).
        ``result``: the block's canonical CSR, or ``None`` for a block a
        resumed run skipped (``counts``: its per-image nnz, from its record)."""
        prev = prev or self.first_carry()
        start, stop = self.block_bounds[int(i)]
        counts = np.asarray(counts, dtype=np.int64)
        off = prev.stop
        nxt = off + int(counts.sum())
        c = self._chunk()
        boundary = (nxt // c) * c
        if boundary < off:
            # no chunk boundary inside the block (so the previous carry is not
            # empty and starts at ``boundary``): all of it carries on
            data: np.ndarray | None = None
            ind: np.ndarray | None = None
            if prev.data is not None and prev.indices is not None and result is not None:
                data = np.concatenate((prev.data, result.data[: result.nnz]))
                ind = np.concatenate((prev.indices, result.indices[: result.nnz]))
            return Carry(prev.start, nxt, data, ind, prev.frame0, stop, prev.first_offset)
        # the carry starts at the block's last boundary, in the image holding that value
        local = np.concatenate(([0], np.cumsum(counts)))
        f = int(np.searchsorted(local, boundary - off, side="right")) - 1
        f = min(max(f, 0), len(counts))
        first = off + int(local[f])
        if result is None:
            return Carry(boundary, nxt, None, None, start + f, stop, first)
        a = boundary - off
        return Carry(boundary, nxt, np.array(result.data[a: result.nnz]), np.array(result.indices[a: result.nnz]),
                     start + f, stop, first)

    def write_chunks(self, i: int, prev: Carry | None, result: scipy.sparse.csr_matrix, *,
                     produce: Produce | None = None, record: dict | None = None) -> int:
        """Write every chunk that ends inside block ``i`` (the last block: every
        chunk left), then its record and done marker. ``prev``: the carry
        after block ``i - 1``; when it holds no values (blocks a resumed run
        skipped), ``produce`` recomputes them. Returns the block's nnz."""
        self.check_fence(f"writing block {i}")
        prev = prev or self.first_carry()
        if not 0 <= int(i) < len(self.block_bounds):
            raise ValueError(f"block index {i} is out of range: the output {self._loc} has {len(self.block_bounds)} blocks")
        start, stop = self.block_bounds[int(i)]
        csr = canonical_result(result, stop - start, self.n_cols, i)
        counts = np.diff(csr.indptr).astype(np.int64)
        nnz = int(csr.nnz)
        off = prev.stop
        nxt = off + nnz
        c = self._chunk()
        last = int(i) == len(self.block_bounds) - 1
        end = nxt if last else (nxt // c) * c  # values [prev.start, end) are written here
        written: dict[str, Any] = {}
        if end > prev.start and (end > off or last):
            pdata, pind = self._carried(prev, produce)
            own = end - off
            data_arr, ind_arr = self._final("data"), self._final("indices")
            pieces: list[tuple[int, int, np.ndarray, np.ndarray]] = []
            if prev.nnz:  # the chunk the previous blocks started: their values, then ours
                head = min(c, end - prev.start)
                take = head - prev.nnz
                pieces.append((prev.start, prev.start + head,
                               np.concatenate((pdata, csr.data[:take])).astype(self.dtype, copy=False),
                               np.concatenate((pind, csr.indices[:take])).astype(self.index_dtype, copy=False)))
                a = take
            else:
                a = 0
            if off + a < end:
                pieces.append((off + a, end, np.asarray(csr.data[a:own], dtype=self.dtype),
                               np.asarray(csr.indices[a:own], dtype=self.index_dtype)))
            for lo, hi, d, ix in pieces:
                try:
                    sync(_gather(data_arr.async_array.setitem(slice(lo, hi), d),
                                 ind_arr.async_array.setitem(slice(lo, hi), ix)))
                except OSError as exc:
                    raise io_context(exc, f"writing values {lo}-{hi - 1} of {self._loc}") from exc
            # the chunks as stored (size and digest of their encoded bytes), so
            # that a resumed run checks them raw, with nothing decoded
            written = {"values": [int(prev.start), int(end)], "chunks": self._stored_chunks(prev.start, end)}
        rec = {**(record or {}), "offset": int(off), "written": written}
        self._raw(BLOCKS, f"block_{int(i)}").set_sync(_pack_record(counts, rec))
        progress.mark_block_done(self.node, i)
        return nnz

    def _carried(self, prev: Carry, produce: Produce | None) -> tuple[np.ndarray, np.ndarray]:
        if prev.nnz == 0:
            return np.empty(0, self.dtype), np.empty(0, self.index_dtype)
        if prev.data is not None and prev.indices is not None:
            return prev.data, prev.indices
        if produce is None:
            raise ValueError(f"the values {prev.start}-{prev.stop - 1} of {self._loc} come from blocks that were not "
                             "computed in this run; pass produce= to recompute them")
        rows = produce(prev.frame0, prev.frame1)
        a = prev.start - prev.first_offset
        b = prev.stop - prev.first_offset
        if rows.nnz != b:
            raise ValueError(f"recomputing images {prev.frame0}-{prev.frame1 - 1} of {self._loc} gave {rows.nnz} values "
                             f"where the blocks' records say {b}: the input or the engine changed since "
                             "they were written; start over (overwrite=True / --restart)")
        return rows.data[a:b], rows.indices[a:b]

    # -- one process, blocks in order -----------------------------------------
    def write_block(self, i: int, start: int, stop: int, result: Any, *, record: dict | None = None) -> int:
        """Write block ``i`` (rows ``[start, stop)``) from this process: the
        carry of the blocks before it is kept here, so blocks come in order,
        0 first. Returns the block's nnz. (The pipeline instead runs
        :meth:`carry` and :meth:`write_chunks` as a chain of tasks.)"""
        self._check_block(i, start, stop)
        state = self.__dict__.get("_serial") or (0, self.first_carry())
        if int(i) != state[0]:
            raise ValueError(f"CSR blocks are written in order from one process: block {state[0]} comes next, "
                             f"got block {i}")
        csr = canonical_result(result, stop - start, self.n_cols, i)
        nnz = self.write_chunks(i, state[1], csr, record=record)
        self.__dict__["_serial"] = (int(i) + 1, self.carry(i, state[1], csr, np.diff(csr.indptr)))
        return nnz

    # -- resume ------------------------------------------------------------
    def block_record(self, i: int) -> tuple[np.ndarray, dict] | None:
        """Block ``i``'s per-image nnz and record if its marker is set, its
        record key is whole, holds its rows, and every chunk key it wrote is
        stored as it was written (size and XXH3 digest of the encoded bytes,
        read raw: ~10x cheaper than decoding the values; records of earlier
        versions: CRC-32 of the decoded values); else ``None`` (redo the
        block)."""
        if not 0 <= int(i) < len(self.block_bounds):
            return None
        try:
            if not progress.block_marked(self.node, int(i)):
                return None
            raw = self._raw(BLOCKS, f"block_{int(i)}").get_sync()
        except Exception:  # unreadable marker or record
            return None
        got = None if raw is None else _unpack_record(bytes(raw))
        start, stop = self.block_bounds[int(i)]
        if got is None or got[1].get("rows") != stop - start:
            return None
        written = got[1].get("written") or {}
        if written:
            try:
                lo, hi = (int(v) for v in written["values"])
                if isinstance(written.get("chunks"), dict):
                    chunks = written["chunks"]
                    return got if self._stored_chunks(lo, hi, progress.chunk_hash(chunks)) == chunks else None
                # a record of an earlier version: the values' CRC-32, decoded
                values = [np.asarray(self._final(name)[lo:hi]) for name in ("data", "indices")]
            except Exception:  # a damaged record or chunk
                return None
            if progress.checksum(*values) != written.get("crc32"):
                return None
        return got

    def _stored_chunks(self, lo: int, hi: int, hash: str = progress.CHUNK_HASH) -> dict[str, list | None]:
        """``{"data/<key>" or "indices/<key>": [size, digest]}`` of the chunks
        holding values ``[lo, hi)`` as stored now (:func:`progress.stored_chunks`)."""
        c = self._chunk()
        out: dict[str, list | None] = {}
        for name in ("data", "indices"):
            arr = self._final(name)
            keys = [arr.metadata.encode_chunk_key((j,)) for j in range(lo // c, (hi - 1) // c + 1)]
            out.update({f"{name}/{k}": v for k, v in progress.stored_chunks(arr, keys, hash).items()})
        return out

    def verify_block(self, i: int) -> dict | None:
        """Block ``i``'s record (see :meth:`block_record`) with its ``counts``, or ``None``."""
        got = self.block_record(i)
        return None if got is None else {**got[1], "counts": got[0]}

    # -- the end -----------------------------------------------------------
    def finish(self, stats: Sequence[Any], resumed: bool) -> None:
        """Write ``indptr`` from the blocks' per-image nnz, shrink the arrays,
        drop the block records and set the completion flag."""
        self.finalize([s.counts for s in sorted(stats, key=lambda s: s.index)])

    def finalize(self, counts: Sequence[np.ndarray] | None = None) -> None:
        """Complete the output once every block is written: ``indptr``, the
        true length of ``data``/``indices``, then ``complete: true`` last.
        ``counts``: every block's per-image nnz, in block order (``None``:
        read from the block records)."""
        g = self.node
        prov = progress.provenance(g) or {}
        if prov.get("complete"):
            return
        self.check_fence("completing the output")
        if not prov.get("consolidated"):
            if counts is None:
                counts = self._recorded_counts()
            counts = [np.asarray(c, dtype=np.int64) for c in counts]
            if len(counts) != len(self.block_bounds) or any(
                    c.size != b - a for c, (a, b) in zip(counts, self.block_bounds)):
                raise ValueError(f"counts must hold one array per block with one entry per image; got {len(counts)}")
            indptr = np.zeros(self.n_images + 1, dtype=np.int64)
            if self.n_images:
                per_row = np.concatenate(counts)
                if self.per_image > 1:  # tiles: an image's nnz is its bands'
                    per_row = per_row.reshape(self.n_images, self.per_image).sum(axis=1)
                np.cumsum(per_row, out=indptr[1:])
            nnz = int(indptr[-1])
            ip = self._final("indptr")
            step = max(1, int(ip.chunks[0])) * 8  # a few chunks per write, encoded concurrently
            try:
                for lo in range(0, indptr.size, step):
                    ip[lo: lo + step] = indptr[lo: lo + step]
            except OSError as exc:
                raise io_context(exc, f"writing the indptr of {self._loc}") from exc
            # metadata only: no chunk lies beyond nnz, and listing the
            # capacity's chunk grid to delete them would be unbounded
            sync(_gather(*(shrink_metadata(self._final(name), nnz) for name in ("data", "indices"))))
            prov["consolidated"] = True
            prov["nnz"] = nnz
            g.attrs[progress.ATTR] = prov  # the records may go now; a crash from here on resumes at the cleanup
        else:
            nnz = int(prov.get("nnz", g["data"].shape[0]))
        prefix = g.path + "/" if g.path else ""
        sync(g.store.delete_dir(prefix + BLOCKS))
        progress.mark_complete(g, nnz=nnz)  # the encoding attributes were written with the group

    def _recorded_counts(self) -> list[np.ndarray]:
        out = []
        for b in range(len(self.block_bounds)):
            got = self.block_record(b)
            if got is None:
                raise ValueError(f"cannot finish {self._loc}: block {b} is not written (or its record is damaged)")
            out.append(got[0])
        return out

    # -- raw keys and arrays ------------------------------------------------------
    def _raw(self, *parts: str) -> "_RawKey":
        return _RawKey(self.node.store_path, "/".join(parts))

    def _final(self, name: str) -> zarr.Array:
        """The final ``data``/``indices``/``indptr`` array, opened once per process."""
        arrays = self.__dict__.setdefault("_arrays", {})
        z = arrays.get(name)
        if z is None:
            # every chunk written here holds values, so zarr's scan of each
            # encoded chunk for "all fill value" (to skip storing it) only
            # costs time: 25-30 % of a chunk write (docs/benchmarks.md)
            with zarr.config.set({"array.write_empty_chunks": True}):
                z = arrays[name] = zarr.open_array(self.node.store_path / name, mode="r+")
        return z

    def __repr__(self) -> str:
        return f"CSROutput({self._loc}, n_images={self.n_images}, frame_shape={self.out_shape}, dtype={self.dtype})"


async def _gather(*aws):
    import asyncio

    return await asyncio.gather(*aws)


class _RawKey:
    """A raw store key below a group (bytes in, bytes out; no zarr metadata)."""

    __slots__ = ("path",)

    def __init__(self, store_path: Any, key: str):
        self.path = store_path / key

    def set_sync(self, value: bytes) -> None:
        sync(self.path.set(buffer(value)))

    def get_sync(self) -> bytes | None:
        buf = sync(self.path.get(prototype=prototype()))
        return None if buf is None else buf.to_bytes()

