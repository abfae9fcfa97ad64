"""CSR zarr stacks in anndata's on-disk ``csr_matrix`` encoding.

Layout (a zarr group, format 2 or 3)::

    <group>/            attrs: encoding-type: csr_matrix, encoding-version: 0.1.0,
                               shape: [n_images, H*W], frame_shape: [H, W]
    <group>/data        (nnz,)   values
    <group>/indices     (nnz,)   column index of each value (flattened pixel)
    <group>/indptr      (n+1,)   row i's values are data[indptr[i]:indptr[i+1]]

Reading a row block reads ``indptr[start:stop+1]`` and then one slice of
``data``/``indices``.

Writing (:class:`CSROutput`) cannot know a block's nnz, hence its offset in
``data``, before the block is computed, and parallel writers must never share
a zarr chunk. Each block therefore writes ONE raw staging key
``_staging/block_<i>`` (a small header plus the block's ``indptr``,
``indices`` and ``data``; see :func:`_pack_staging`) and then its done marker.
Consolidation copies staging into contiguous ``data``/``indices``/``indptr``
in tasks that each write whole chunks (:meth:`CSROutput.consolidation_tasks`),
so they can run in parallel; :meth:`CSROutput.finalize` runs any that have
not run, deletes staging and sets ``complete: true`` last.

A block may also skip staging: :meth:`CSROutput.hold_block` returns it as a
:class:`HeldBlock` in memory, and consolidation tasks take held blocks as an
argument. The pipeline holds blocks when the whole output fits one block's
memory budget (see ``dask_sparseconv.pipeline``): a staging write and read
fewer per block. Held and staged blocks mix freely; only staged blocks
survive an interrupted run.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import scipy.sparse
import zarr

from ..engine.base import index_dtype
from ..engine.threads import default_threads
from ..validation import _short
from . import progress
from ._zarr_compat import buffer, prototype, shrink_metadata, sync
from .base import InputBase, OutputBase, io_context
from .dense_store import (
    check_numeric_dtype,
    check_rows,
    codec_text,
    create_kwargs,
    layout_attrs,
    read_rows,
    resolve_compressors,
)
from .location import Location, resolve_location

__all__ = ["CSRInput", "CSROutput", "ConsolidationTask", "HeldBlock", "write_csr_stack", "is_csr_group", "CSR_ATTRS"]

CSR_ATTRS = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
STAGING = "_staging"
CONSOLIDATED = "_consolidated"
# 2: data/indices/indptr are created with the output (data/indices at their
# capacity) and consolidation marks live under _consolidated/<plan digest>/
CSR_LAYOUT = 2
DEFAULT_CHUNK_NNZ = 1 << 18  # elements per data/indices chunk (1 MiB of float32)
DEFAULT_INDPTR_CHUNK = 1 << 18  # indptr entries per chunk (2 MiB of int64)
_VALIDATE_STEP = 1 << 22


def is_csr_group(node: Any) -> bool:
    return isinstance(node, zarr.Group) and node.attrs.get("encoding-type") == "csr_matrix"


def _int_pair(value: Any) -> tuple[int, int] | None:
    try:
        if len(value) != 2:
            return None
        a, b = value
        if int(a) != a or int(b) != b:
            return None
        return int(a), int(b)
    except Exception:
        return None


# --------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------
def csr_chunk_rows(n_images: int, nnz: int, data_chunk: int, indptr_chunk: int) -> int:
    """Images per "chunk" of a CSR stack, for aligning row blocks: about the
    rows one ``data`` chunk holds (at the mean nonzeros per image), at most
    one ``indptr`` chunk's."""
    avg = nnz / n_images if n_images else 0.0
    by_data = data_chunk / avg if avg > 0 else float(n_images or 1)
    return int(max(1, min(n_images or 1, by_data, indptr_chunk)))


class CSRInput(InputBase):
    """A read-only CSR stack (anndata ``csr_matrix`` encoding) in a zarr group.

    Opening validates the attributes, the array lengths and that ``indptr``
    is non-decreasing from 0 to ``nnz`` (reading ``indptr`` once, in pieces);
    column indices are checked block by block as blocks are read. Picklable
    and light (the three zarr arrays' metadata only).
    """

    format = "csr"

    def __init__(self, loc: Location, group: zarr.Group, validate: bool = True):
        self._loc = loc
        attrs = dict(group.attrs)
        where = f"CSR source {loc}"
        version = attrs.get("encoding-version")
        if version != "0.1.0":
            raise ValueError(f"{where} has encoding-version {version!r}; only anndata's csr_matrix encoding 0.1.0 is supported")
        shape = _int_pair(attrs.get("shape"))
        if shape is None or shape[0] < 0 or shape[1] < 1:
            raise ValueError(f"{where} needs a 'shape' attribute [n_images, H*W] of non-negative integers; got "
                             f"{_short(attrs.get('shape'))}")
        if "frame_shape" not in attrs:
            raise ValueError(f"{where} has no 'frame_shape' attribute; set it to [H, W] (with H*W == shape[1] == {shape[1]}), "
                             "e.g. group.attrs['frame_shape'] = [H, W]")
        fs = _int_pair(attrs["frame_shape"])
        if fs is None or fs[0] < 1 or fs[1] < 1:
            raise ValueError(f"{where} has frame_shape {_short(attrs['frame_shape'])}; it must be [H, W], two positive integers")
        if fs[0] * fs[1] != shape[1]:
            raise ValueError(f"{where} has frame_shape {list(fs)} but H*W = {fs[0] * fs[1]} != shape[1] = {shape[1]} "
                             "(the number of columns)")
        arrays = {}
        for name in ("data", "indices", "indptr"):
            try:
                node = group[name]
            except KeyError:
                raise ValueError(f"{where} has no '{name}' array; a csr_matrix group holds data, indices and indptr") from None
            if not isinstance(node, zarr.Array) or node.ndim != 1:
                raise ValueError(f"{where}: '{name}' must be a 1-D array; got {_short(node)}")
            arrays[name] = node
        self._data, self._indices, self._indptr = arrays["data"], arrays["indices"], arrays["indptr"]
        try:
            self.dtype = check_numeric_dtype(self._data.dtype, "data dtype")
        except TypeError:
            raise TypeError(f"{where}: data has dtype {self._data.dtype}; it must hold real numbers or bools") from None
        for name in ("indices", "indptr"):
            dt = arrays[name].dtype
            if not np.issubdtype(dt, np.integer):
                raise TypeError(f"{where}: {name} has dtype {dt}; it must be an integer array")
        self.n_images, n_cols = shape
        self.frame_shape = fs
        self.nnz = int(self._data.shape[0])
        if self._indptr.shape[0] != self.n_images + 1:
            raise ValueError(f"{where}: indptr has length {self._indptr.shape[0]} but shape[0] = {self.n_images} needs "
                             f"n_images + 1 = {self.n_images + 1}")
        if self._indices.shape[0] != self.nnz:
            raise ValueError(f"{where}: indices has length {self._indices.shape[0]} but data has length {self.nnz}; "
                             "they must match")
        if validate:
            self._validate_indptr()
        self.chunk_rows = csr_chunk_rows(self.n_images, self.nnz, self._data.chunks[0], self._indptr.chunks[0])

    # Up to this many bytes of ``indices`` are scanned in this process: a dask
    # reduction costs a scheduler round trip, a large share of a small job,
    # while reading this much here is about as fast (figures: docs/benchmarks.md, "Figures behind the code").
    _LOCAL_CHECK_BYTES = 64 << 20

    def check_indices(self) -> None:
        """Check every column index lies in ``[0, H*W)``, before a job writes anything.

        One extra read of ``indices`` (the smallest of the three arrays for
        float data): in this process, chunk by chunk, up to 64 MiB of it;
        beyond that as a dask ``min``/``max`` reduction on the active
        scheduler, in parallel. Blocks are still checked as they are read;
        this makes a bad store fail before the target exists.
        """
        if self.nnz == 0:
            return
        if self.nnz * self._indices.dtype.itemsize <= self._LOCAL_CHECK_BYTES:
            step = max(int(self._indices.chunks[0]), 1 << 20)
            lo = hi = None
            for a in range(0, self.nnz, step):
                piece = read_rows(self._indices, a, min(self.nnz, a + step), "indices", str(self._loc))
                if piece.size:
                    p_lo, p_hi = int(piece.min()), int(piece.max())
                    lo = p_lo if lo is None else min(lo, p_lo)
                    hi = p_hi if hi is None else max(hi, p_hi)
        else:
            import dask
            import dask.array as da

            ind = da.from_zarr(self._indices)
            try:
                lo, hi = (int(v) for v in dask.compute(ind.min(), ind.max()))
            except Exception as exc:  # a corrupt chunk: name it like read_block does
                raise ValueError(f"CSR source {self._loc}: cannot read 'indices' to check it "
                                 f"({type(exc).__name__}: {exc})") from None
        n_cols = self.frame_shape[0] * self.frame_shape[1]
        if lo < 0 or hi >= n_cols:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"CSR source {self._loc}: column index {bad} is out of range; indices must lie in [0, {n_cols}) "
                f"for frame_shape {list(self.frame_shape)} (H*W = {n_cols})"
            )

    def _validate_indptr(self) -> None:
        where = f"CSR source {self._loc}"
        n1 = self.n_images + 1
        prev = None
        for lo in range(0, n1, _VALIDATE_STEP):
            hi = min(n1, lo + _VALIDATE_STEP)
            piece = read_rows(self._indptr, lo, hi, "indptr", str(self._loc)).astype(np.int64, copy=False)
            if lo == 0 and piece[0] != 0:
                raise ValueError(f"{where}: indptr[0] is {piece[0]}; it must be 0")
            if prev is not None and piece[0] < prev:
                raise ValueError(f"{where}: indptr is not monotonic (non-decreasing): indptr[{lo}] = {piece[0]} < "
                                 f"indptr[{lo - 1}] = {prev}")
            d = np.diff(piece)
            if d.size and d.min() < 0:
                k = int(np.argmax(d < 0))
                raise ValueError(f"{where}: indptr is not monotonic (non-decreasing): indptr[{lo + k + 1}] = {piece[k + 1]} < "
                                 f"indptr[{lo + k}] = {piece[k]}")
            prev = piece[-1]
        if prev != self.nnz:
            raise ValueError(f"{where}: indptr[-1] = {prev} but data and indices have length {self.nnz}; they must match")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_images, self.frame_shape[0] * self.frame_shape[1])

    @property
    def bytes_per_image_dense(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize

    @property
    def arrays(self) -> dict[str, zarr.Array]:
        return {"data": self._data, "indices": self._indices, "indptr": self._indptr}

    def read_block(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Rows ``[start, stop)`` as canonical CSR ``(rows, H*W)`` of the input dtype.

        Raises ``ValueError`` naming the rows when ``indptr`` is inconsistent
        there or a column index is outside ``[0, H*W)``.
        """
        start, stop = check_rows(start, stop, self.n_images, f"CSR source {self._loc}")
        where = f"CSR source {self._loc}"
        block = f"block rows [{start}, {stop})"
        ncols = self.shape[1]
        ip = self._read_nz("indptr", start, stop + 1).astype(np.int64, copy=False)
        a, b = int(ip[0]), int(ip[-1])
        if a < 0 or b > self.nnz or (ip.size > 1 and np.diff(ip).min() < 0):
            raise ValueError(f"{where}: indptr is inconsistent in {block} (values {a}..{b}, must be non-decreasing within "
                             f"[0, {self.nnz}])")
        data = self._read_nz("data", a, b)
        indices = self._read_nz("indices", a, b)
        if indices.size:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= ncols:
                bad = lo if lo < 0 else hi
                pos = int(np.argmax(indices == bad)) + a
                row = int(np.searchsorted(ip, pos, side="right")) - 1 + start
                raise ValueError(f"{where}: column index {bad} out of range [0, {ncols}) (H*W) in {block}, at row {row}")
        idt = index_dtype(ncols, b - a, stop - start)
        out = scipy.sparse.csr_matrix(
            (data.astype(self.dtype, copy=False), indices.astype(idt, copy=False), (ip - a).astype(idt)),
            shape=(stop - start, ncols),
            copy=False,
        )
        if not out.has_canonical_format:
            out.sum_duplicates()  # sorts indices; zarr gave us fresh buffers, so in place is safe
        return out

    def read_pattern(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Where rows ``[start, stop)`` are nonzero: a boolean CSR ``(rows,
        H*W)`` read from ``indptr`` and ``indices`` alone (no values read or
        decoded; indices as stored, unchecked). For planning: the pipeline
        samples it to estimate the output's size."""
        start, stop = check_rows(start, stop, self.n_images, f"CSR source {self._loc}")
        ip = self._read_nz("indptr", start, stop + 1).astype(np.int64, copy=False)
        a, b = int(ip[0]), int(ip[-1])
        if a < 0 or b > self.nnz or b < a:
            raise ValueError(f"CSR source {self._loc}: indptr is inconsistent in block rows [{start}, {stop})")
        indices = self._read_nz("indices", a, b)
        return scipy.sparse.csr_matrix((np.ones(b - a, dtype=bool), indices, ip - a),
                                       shape=(stop - start, self.shape[1]), copy=False)

    # Consecutive row blocks usually fall in the same data/indices/indptr chunk (the
    # default chunk holds 1M values, often a whole stack of small frames);
    # zarr decodes the whole chunk for every slice, so each block would
    # decompress it again. The reader keeps the last decoded chunks of each
    # array (per process, per reader object, never pickled) (figures: docs/benchmarks.md, "Figures behind the code").
    _CHUNK_CACHE = 2  # chunks kept per array
    _CHUNK_CACHE_MAX_BYTES = 64 << 20  # larger chunks are not kept

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_chunk_cache", None)
        state.pop("_chunk_lock", None)
        return state

    def _read_nz(self, name: str, a: int, b: int) -> np.ndarray:
        """``data[a:b]`` / ``indices[a:b]`` / ``indptr[a:b]`` through the per-reader chunk cache."""
        arr = {"data": self._data, "indices": self._indices, "indptr": self._indptr}[name]
        c = int(arr.chunks[0])
        if b <= a or c * arr.dtype.itemsize > self._CHUNK_CACHE_MAX_BYTES:
            return read_rows(arr, a, b, name, str(self._loc))
        d = self.__dict__
        if "_chunk_lock" not in d:
            d.setdefault("_chunk_lock", threading.Lock())
        lock = d["_chunk_lock"]
        parts = []
        for j in range(a // c, (b - 1) // c + 1):
            lo, hi = j * c, min((j + 1) * c, arr.shape[0])
            with lock:
                cache = d.setdefault("_chunk_cache", {}).setdefault(name, OrderedDict())
                chunk = cache.get(j)
                if chunk is not None:
                    cache.move_to_end(j)
            if chunk is None:
                try:
                    chunk = read_rows(arr, lo, hi, name, str(self._loc))
                except ValueError:  # re-read the block's own range: the error names those elements
                    return read_rows(arr, a, b, name, str(self._loc))
                chunk.setflags(write=False)
                with lock:
                    cache[j] = chunk
                    while len(cache) > self._CHUNK_CACHE:
                        cache.popitem(last=False)
            parts.append(chunk[max(a, lo) - lo: min(b, hi) - lo])
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.copy() if out.base is not None or not out.flags.writeable else out

    def read_dense_block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a dense ``(rows, H, W)`` array."""
        csr = self.read_block(start, stop)
        return csr.toarray().reshape((csr.shape[0],) + self.frame_shape)

    @staticmethod
    def detect(node: Any) -> bool:
        return is_csr_group(node)

    def to_dask(self, rows_per_chunk: int | None = None):
        """A lazy ``(n, H*W)`` dask array of ``csr_matrix`` row blocks of
        ``rows_per_chunk`` rows (default: ``chunk_rows``)."""
        import dask.array as da
        from dask.base import tokenize

        from ..validation import check_positive_int

        rows = check_positive_int(rows_per_chunk, "rows_per_chunk", allow_none=True) or self.chunk_rows
        bounds = [(a, min(a + rows, self.n_images)) for a in range(0, self.n_images, rows)] or [(0, 0)]
        name = "csr-stack-" + tokenize(str(self._loc), self.n_images, self.nnz, rows, str(self.dtype))
        dsk = {(name, i, 0): (self.read_block, a, b) for i, (a, b) in enumerate(bounds)}
        meta = scipy.sparse.csr_matrix((0, 0), dtype=self.dtype)
        chunks = (tuple(b - a for a, b in bounds), (self.shape[1],))
        return da.Array(dsk, name, chunks=chunks, meta=meta)

    def describe(self, sample_chunks: int = 4) -> dict:
        """Layout, codecs and the exact nnz (read from ``indptr``)."""
        arrays = self.arrays
        total = self.n_images * self.shape[1]
        return dict(shape=list(self.shape), chunks={k: list(v.chunks) for k, v in arrays.items()},
                    codec={k: codec_text(v) for k, v in arrays.items()}, nnz=self.nnz,
                    density=(self.nnz / total) if total else 0.0, nnz_exact=True,
                    zarr_format=arrays["data"].metadata.zarr_format,
                    index_dtypes={"indices": str(arrays["indices"].dtype), "indptr": str(arrays["indptr"].dtype)})

    def __repr__(self) -> str:
        return (f"CSRInput({self._loc}, n_images={self.n_images}, frame_shape={self.frame_shape}, nnz={self.nnz}, "
                f"dtype={self.dtype})")


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------
def _canonical_csr(result: Any, rows: int, ncols: int, dtype: np.dtype, i: int) -> scipy.sparse.csr_matrix:
    from .dense_store import dense_to_csr

    if scipy.sparse.issparse(result):
        if result.shape != (rows, ncols):
            raise ValueError(f"block {i}: result must have shape {(rows, ncols)}; got {result.shape}")
        csr = result if isinstance(result, scipy.sparse.csr_matrix) else scipy.sparse.csr_matrix(result.tocsr())
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
    else:
        arr = np.asarray(result)
        if arr.ndim < 2 or arr.shape[0] != rows or int(np.prod(arr.shape[1:])) != ncols:
            raise ValueError(f"block {i}: result must have {rows} rows of {ncols} pixels; got shape {arr.shape}")
        csr = dense_to_csr(arr.reshape(rows, ncols))
    return csr


# staging: one raw store key per block ---------------------------------------------
# Layout of ``_staging/block_<i>`` (little-endian)::
#
#     magic  b"DSCSTG2\0"     8 bytes
#     rows, nnz               2 x int64
#     data dtype, index dtype 2 x 8 bytes (numpy dtype.str, NUL padded)
#     indptr                  (rows + 1) x int64, relative to the block
#     indices                 nnz x index dtype
#     data                    nnz x data dtype
#     record                  UTF-8 JSON to the end: rows, nnz, crc32 of all
#                             the bytes before it, and the writer's keys
#
# One store write per block instead of three zarr arrays (three metadata
# documents, their parent groups and chunks), and one key to delete per
# block; the record rides in the same key (it was a second key: one more
# write and delete per block). Uncompressed on purpose: staging is written
# once and read once, and compressing it cost more time than the bytes it
# saved (figures: docs/benchmarks.md, "Figures behind the code").
_STAGING_MAGIC = b"DSCSTG2\0"
_STAGING_HEAD = struct.Struct("<8sqq8s8s")


def _pack_staging(csr: scipy.sparse.csr_matrix, dtype: np.dtype, index_dtype: np.dtype, record: dict) -> tuple[bytes, dict]:
    """The staging bytes of a block and its record (``record`` plus rows, nnz and crc32)."""
    rows, nnz = csr.shape[0], int(csr.nnz)
    data = np.ascontiguousarray(csr.data[:nnz], dtype=np.dtype(dtype).newbyteorder("<"))
    indices = np.ascontiguousarray(csr.indices[:nnz], dtype=np.dtype(index_dtype).newbyteorder("<"))
    indptr = np.ascontiguousarray(csr.indptr, dtype="<i8")
    head = _STAGING_HEAD.pack(_STAGING_MAGIC, rows, nnz, data.dtype.str.encode(), indices.dtype.str.encode())
    parts = (head, indptr.tobytes(), indices.tobytes(), data.tobytes())
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    rec = {**record, "nnz": nnz, "crc32": crc}
    return b"".join((*parts, json.dumps(progress.jsonable(rec)).encode())), rec


def _unpack_head(raw: bytes, where: str) -> tuple[int, int, np.dtype, np.dtype]:
    if len(raw) < _STAGING_HEAD.size:
        raise ValueError(f"staging of {where} is truncated ({len(raw)} bytes); the store is corrupt or was written incompletely")
    magic, rows, nnz, ddt, idt = _STAGING_HEAD.unpack_from(raw)
    if magic != _STAGING_MAGIC:
        raise ValueError(f"staging of {where} is not a dask_sparseconv staging block (bad magic {magic!r})")
    return int(rows), int(nnz), np.dtype(ddt.rstrip(b"\0").decode()), np.dtype(idt.rstrip(b"\0").decode())


def _payload_end(raw: bytes, where: str) -> tuple[int, int, np.dtype, np.dtype, int]:
    rows, nnz, ddt, idt = _unpack_head(raw, where)
    end = _STAGING_HEAD.size + 8 * (rows + 1) + nnz * (idt.itemsize + ddt.itemsize)
    if len(raw) <= end:
        raise ValueError(f"staging of {where} has {len(raw)} bytes but its header needs more than {end}; "
                         "the store is corrupt or was written incompletely")
    return rows, nnz, ddt, idt, end


def _staging_record(raw: bytes, where: str) -> dict | None:
    """The record at the end of a staging buffer if the buffer is whole (its
    CRC-32 matches), else ``None``."""
    try:
        _, nnz, _, _, end = _payload_end(raw, where)
        rec = json.loads(bytes(raw[end:]).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("nnz") != nnz or zlib.crc32(raw[:end]) != rec.get("crc32"):
        return None
    return rec


class HeldBlock(NamedTuple):
    """A block's CSR result kept in memory for consolidation instead of staged
    (:meth:`CSROutput.hold_block`): ``indptr`` (int64, from 0), ``indices``
    and ``data`` in the output's dtypes, exactly ``nnz`` long."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])


class ConsolidationTask:
    """One consolidation step: writes whole chunks of one final array.

    ``kind``: ``'data'`` or ``'indices'`` (chunk ``j`` of that array) or
    ``'indptr'``. ``pieces`` says which staging slices make up the chunk.
    Call it from any process; it is idempotent and records itself as done
    under ``_consolidated/<plan>`` (``plan``: a digest of the block nnz the
    offsets come from, so marks of another plan never count). ``held``
    (``{block: HeldBlock}``) supplies blocks kept in memory; the others are
    read from staging. ``mark=False`` writes no mark, for a caller that runs
    every task itself and then calls ``finalize(consolidated=True)``.
    """

    __slots__ = ("output", "kind", "j", "index", "lo", "hi", "pieces", "plan")

    def __init__(self, output: "CSROutput", kind: str, j: int, index: int, lo: int, hi: int, pieces: list, plan: str):
        self.output, self.kind, self.j, self.index, self.lo, self.hi, self.pieces = output, kind, j, index, lo, hi, pieces
        self.plan = plan

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"ConsolidationTask({self.kind} chunk {self.j}: [{self.lo}, {self.hi}) from {len(self.pieces)} block(s))"

    def __call__(self, held: Mapping[int, HeldBlock] | None = None, *, mark: bool = True) -> int:
        out = self.output
        held = held or {}
        parts = []
        if self.kind == "indptr":
            for b, a, z, offset in self.pieces:
                if b < 0:  # the final entry: total nnz
                    parts.append(np.full(z - a, offset, dtype=np.int64))
                    continue
                block = held.get(b)
                parts.append((block.indptr if block is not None else out._staged_indptr(b))[a:z] + offset)
        else:
            for b, a, z, expect in self.pieces:
                block = held.get(b)
                if block is None:
                    parts.append(out._staged_values(b, self.kind, a, z, expect))
                elif block.nnz != expect:
                    raise ValueError(f"block {b} of {out._loc} holds {block.nnz} values in memory but block_nnz says "
                                     f"{expect}; pass the nnz that hold_block returned")
                else:
                    parts.append(getattr(block, self.kind)[a:z])
        out._final(self.kind)[self.lo:self.hi] = np.concatenate(parts) if len(parts) != 1 else parts[0]
        if mark:
            out._mark_consolidated(self.plan, self.index)
        return self.hi - self.lo


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

    async def get(self, length: int | None = None, start: int = 0) -> bytes | None:
        """The value, or ``length`` bytes of it from ``start``; ``None`` if the key is missing."""
        from zarr.abc.store import RangeByteRequest

        rng = None if length is None else RangeByteRequest(int(start), int(start) + int(length))
        buf = await self.path.get(prototype=prototype(), byte_range=rng)
        return None if buf is None else buf.to_bytes()

    def get_sync(self, length: int | None = None, start: int = 0) -> bytes | None:
        return sync(self.get(length, start))


class CSROutput(OutputBase):
    """Writer for a CSR output group; see :func:`dask_sparseconv.storage.create_output`.

    Picklable (location and layout only); each process reopens the group on
    first use.
    """

    format = "csr"
    finish_label = "consolidate"

    def __init__(self, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
                 block_bounds: Sequence[tuple[int, int]], indptr_chunk: int | None, chunk_nnz: int | None,
                 compressor: Any = "default"):
        super().__init__(loc, n_images, out_shape, dtype, block_bounds)
        self.n_cols = self.out_shape[0] * self.out_shape[1]
        self.block_rows = self.block_bounds[0][1] - self.block_bounds[0][0]
        self.indptr_chunk = indptr_chunk or DEFAULT_INDPTR_CHUNK
        self.chunk_nnz = chunk_nnz or DEFAULT_CHUNK_NNZ
        self.compressor = compressor
        self.index_dtype = index_dtype(self.n_cols)

    # per-process cache (never pickled): the opened final arrays
    _CACHE_KEYS = ("_arrays",)

    def _open_node(self) -> zarr.Group:
        return self._loc.open_group(mode="r+")

    @classmethod
    def create(cls, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]], *, chunk_rows: int | None, chunk_nnz: int | None,
               compressor: Any, attrs: dict | None, overwrite: bool) -> "CSROutput":
        """A new CSR output; ``chunk_rows``: rows per ``indptr`` chunk, ``chunk_nnz``: values per ``data`` chunk."""
        out = cls(loc, n_images, out_shape, dtype, block_bounds, chunk_rows, chunk_nnz, compressor)
        comp = resolve_compressors(compressor)
        extra = layout_attrs("csr", n_images, out_shape, dtype, block_bounds)
        extra.update(chunk_nnz=out.chunk_nnz, indptr_chunk=out.indptr_chunk, csr_layout=CSR_LAYOUT,
                     compressor=compressor if isinstance(compressor, str) or compressor is None else repr(compressor))
        group_attrs = {**CSR_ATTRS, "shape": [int(n_images), out.n_cols], "frame_shape": [int(v) for v in out_shape],
                       progress.ATTR: progress.new_provenance(attrs, extra)}
        kw = create_kwargs(loc)
        kw["path"] = kw.pop("name")
        g = zarr.create_group(zarr_format=3, overwrite=overwrite, attributes=group_attrs, **kw)
        # The final arrays exist from the start, data/indices at a capacity no
        # output can exceed (every pixel of every frame) and shrunk to the
        # true nnz by finalize: consolidation tasks can then start as soon as
        # the blocks' nnz are known, with no planning task that creates them
        # first (one fewer hop through the scheduler at the end of every job).
        capacity = max(1, int(n_images) * out.n_cols)
        c_nz = max(1, min(out.chunk_nnz, capacity))
        c_ip = max(1, min(out.indptr_chunk, int(n_images) + 1))
        specs = [(progress.PROGRESS, (len(block_bounds),), 1, "uint8", None),
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
    #: output of an older CSR layout has no final arrays yet)
    RESUME_LAYOUT = {"csr_layout": CSR_LAYOUT}

    @classmethod
    def reopen(cls, loc: Location, node: Any, prov: dict, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds: list[tuple[int, int]]) -> "CSROutput":
        out = cls(loc, n_images, out_shape, dtype, block_bounds, int(prov.get("indptr_chunk", 0)) or None,
                  int(prov.get("chunk_nnz", 0)) or None, prov.get("compressor", "default"))
        out.attach(node)
        return out

    # -- block writes ------------------------------------------------------
    def write_block(self, i: int, start: int, stop: int, result: Any, *, record: dict | None = None) -> int:
        """Write block ``i`` (rows ``[start, stop)``) to its own staging key
        (one store write), then mark it done. ``result``: CSR ``(rows,
        H_out*W_out)`` or dense ``(rows, H_out, W_out)``. Returns the block's
        nnz (collect them for :meth:`finalize`). The staging key ends with a
        record: ``rows``, ``nnz``, ``crc32`` of the staged bytes and the
        caller's ``record`` keys (see :meth:`verify_block`)."""
        self._check_block(i, start, stop)
        rows = stop - start
        csr = _canonical_csr(result, rows, self.n_cols, self.dtype, i)
        resolve_compressors(self.compressor)  # refuse a bad codec before writing anything
        packed, rec = _pack_staging(csr, self.dtype, self.index_dtype, {**(record or {}), "rows": [int(start), int(stop)]})
        self._raw_path(STAGING, f"block_{int(i)}").set_sync(packed)
        progress.mark_block_done(self.node, i)
        return int(rec["nnz"])

    def hold_block(self, i: int, start: int, stop: int, result: Any) -> tuple[int, HeldBlock]:
        """Block ``i`` (rows ``[start, stop)``) kept in memory instead of
        staged: ``(nnz, HeldBlock)``, nothing written. Hand the held block to
        the consolidation tasks (``task({i: held})``) and its nnz to
        :meth:`finalize` as for :meth:`write_block`. A held block sets no
        done marker, so an interrupted run computes it again."""
        self._check_block(i, start, stop)
        csr = _canonical_csr(result, stop - start, self.n_cols, self.dtype, i)
        nnz = int(csr.nnz)
        block = HeldBlock(np.asarray(csr.indptr, dtype=np.int64), np.asarray(csr.indices[:nnz], dtype=self.index_dtype),
                          np.asarray(csr.data[:nnz], dtype=self.dtype))
        return nnz, block

    def verify_block(self, i: int) -> dict | None:
        """Block ``i``'s record (rows, nnz, CRC-32 of its staging bytes and the
        writer's extra keys) if its marker is set and its staging key, read
        back now, is whole and holds those rows; else ``None`` (redo the block)."""
        if not 0 <= int(i) < len(self.block_bounds):
            return None
        try:
            if not self.node[progress.PROGRESS][int(i)]:
                return None
            raw = self._raw_path(STAGING, f"block_{int(i)}").get_sync()
        except Exception:  # unreadable marker or staging
            return None
        if raw is None:
            return None
        rec = _staging_record(bytes(raw), f"block {i} of {self._loc}")
        start, stop = self.block_bounds[int(i)]
        return rec if rec is not None and rec.get("rows") == [start, stop] else None

    # -- consolidation -----------------------------------------------------
    # -- raw keys under the group --------------------------------------------
    def _raw_path(self, *parts: str) -> "_RawKey":
        return _RawKey(self.node.store_path, "/".join(parts))

    def _staged_values(self, b: int, kind: str, a: int, z: int, expect: int) -> np.ndarray:
        """``indices[a:z]`` or ``data[a:z]`` of block ``b``'s staging: two
        byte-range reads in one round trip, the header (checked against the
        block's rows, ``expect`` nnz and the output's dtypes) and exactly the
        slice (a chunk task needs one array's part of a few blocks; whole
        staging keys were ~2.5x the bytes)."""
        where = f"block {b} of {self._loc}"
        rows = self.block_bounds[int(b)][1] - self.block_bounds[int(b)][0]
        isz, dsz = self.index_dtype.itemsize, self.dtype.itemsize
        base = _STAGING_HEAD.size + 8 * (rows + 1)
        item, start = (isz, base) if kind == "indices" else (dsz, base + expect * isz)
        key = self._raw_path(STAGING, f"block_{int(b)}")
        head, raw = sync(_gather(key.get(_STAGING_HEAD.size), key.get((z - a) * item, start + a * item)))
        if head is None or raw is None:
            raise ValueError(f"staging of {where} is missing; the block is marked done but its data is gone "
                             "(write the block again)")
        got_rows, nnz, ddt, idt = _unpack_head(head, where)
        if nnz != expect:
            raise ValueError(f"block {b} of {self._loc} holds {nnz} values in staging but block_nnz says {expect}; "
                             "pass the nnz that write_block returned (or block_nnz=None)")
        if got_rows != rows or ddt != self.dtype.newbyteorder("<") or idt != self.index_dtype.newbyteorder("<") \
                or len(raw) != (z - a) * item:
            raise ValueError(f"staging of {where} does not match the output (rows {got_rows}, dtypes {ddt}/{idt}, "
                             f"{len(raw)} bytes read); the store is corrupt or was written incompletely")
        return np.frombuffer(raw, dtype=idt if kind == "indices" else ddt)

    def _staged_indptr(self, b: int) -> np.ndarray:
        """Block ``b``'s staged ``indptr``: a byte-range read of the header
        and ``indptr`` (an indptr chunk task needs a few KB, not the block's values)."""
        where = f"block {b} of {self._loc}"
        key = self._raw_path(STAGING, f"block_{int(b)}")
        rows = self.block_bounds[int(b)][1] - self.block_bounds[int(b)][0]
        raw = key.get_sync(_STAGING_HEAD.size + 8 * (rows + 1))
        if raw is None:
            raise ValueError(f"staging of {where} is missing; the block is marked done but its data is gone "
                             "(write the block again)")
        got_rows = _unpack_head(raw, where)[0]
        if got_rows != rows or len(raw) < _STAGING_HEAD.size + 8 * (rows + 1):
            raise ValueError(f"staging of {where} holds {got_rows} rows ({len(raw)} bytes read) but the block has {rows}; "
                             "the store is corrupt or was written incompletely")
        return np.frombuffer(raw, dtype="<i8", count=rows + 1, offset=_STAGING_HEAD.size)

    def _final(self, name: str) -> zarr.Array:
        """The final ``data``/``indices``/``indptr`` array, opened once per process."""
        arrays = self.__dict__.setdefault("_arrays", {})
        z = arrays.get(name)
        if z is None:
            z = arrays[name] = self.node[name]
        return z

    def _mark_consolidated(self, plan: str, index: int) -> None:
        self._raw_path(CONSOLIDATED, plan, str(int(index))).set_sync(b"\x01")

    def staged_nnz(self) -> list[int]:
        """nnz of every block, read from the staging headers."""
        out = []
        for b in range(len(self.block_bounds)):
            key = self._raw_path(STAGING, f"block_{b}")
            head = key.get_sync(_STAGING_HEAD.size)
            if head is None:
                raise ValueError(f"staging of block {b} of {self._loc} is missing; write the block again")
            out.append(_unpack_head(head, f"block {b} of {self._loc}")[1])
        return out

    def _offsets(self, block_nnz: Sequence[int] | None) -> tuple[np.ndarray, list[int], str]:
        n_blocks = len(self.block_bounds)
        if block_nnz is None:
            block_nnz = self.staged_nnz()
        block_nnz = [int(x) for x in block_nnz]
        if len(block_nnz) != n_blocks or (block_nnz and min(block_nnz) < 0):
            raise ValueError(f"block_nnz must hold {n_blocks} non-negative counts (one per block); got {len(block_nnz)}")
        offsets = np.zeros(n_blocks + 1, dtype=np.int64)
        np.cumsum(block_nnz, out=offsets[1:])
        plan = f"{zlib.crc32(offsets.astype('<i8').tobytes()):08x}"
        return offsets, block_nnz, plan

    def consolidation_tasks(self, block_nnz: Sequence[int] | None = None, *,
                            require_written: bool = True) -> list[ConsolidationTask]:
        """The tasks that fill the final ``data``/``indices``/``indptr``
        arrays, one per output chunk and array (parallel-safe: no two tasks
        write the same chunk). Call after every block is written (anywhere:
        it only computes offsets, the arrays were created with the output);
        run the tasks anywhere (e.g. ``dask.delayed(t)()``), then call
        :meth:`finalize`. ``block_nnz``: what ``write_block`` returned, in
        block order (``None`` reads them from staging).
        ``require_written=False`` skips listing the block markers, for a
        caller that holds every block's ``write_block`` result already."""
        n_blocks = len(self.block_bounds)
        missing = sorted(set(range(n_blocks)) - self.done_blocks()) if require_written else []
        if missing:
            raise ValueError(f"cannot consolidate {self._loc}: {len(missing)} block(s) are not written yet (first: "
                             f"{missing[:10]})")
        offsets, block_nnz, plan = self._offsets(block_nnz)
        nnz = int(offsets[-1])
        capacity = self._final("data").shape[0]
        if nnz > capacity:  # only a store resized by hand gets here
            raise ValueError(f"cannot consolidate {self._loc}: the blocks hold {nnz} values but 'data' has room for {capacity}")
        c_nz = int(self._final("data").chunks[0])
        c_ip = int(self._final("indptr").chunks[0])
        tasks: list[ConsolidationTask] = []
        for j in range(math.ceil(nnz / c_nz) if nnz else 0):
            lo, hi = j * c_nz, min((j + 1) * c_nz, nnz)
            pieces = []
            b = int(np.searchsorted(offsets, lo, side="right")) - 1
            while b < n_blocks and offsets[b] < hi:
                a, z = max(lo, offsets[b]) - offsets[b], min(hi, offsets[b + 1]) - offsets[b]
                if z > a:
                    pieces.append((b, int(a), int(z), block_nnz[b]))
                b += 1
            for kind in ("data", "indices"):
                tasks.append(ConsolidationTask(self, kind, j, len(tasks), lo, hi, pieces, plan))
        R = self.block_rows
        for j in range(math.ceil((self.n_images + 1) / c_ip)):
            lo, hi = j * c_ip, min((j + 1) * c_ip, self.n_images + 1)
            pieces = []
            r = lo
            while r < hi:
                if r >= self.n_images:
                    pieces.append((-1, r, hi, nnz))
                    break
                b = r // R
                start, stop = self.block_bounds[b]
                z = min(hi, stop)
                pieces.append((b, r - start, z - start, int(offsets[b])))
                r = z
            tasks.append(ConsolidationTask(self, "indptr", j, len(tasks), lo, hi, pieces, plan))
        return tasks

    def consolidated_tasks(self, block_nnz: Sequence[int] | None = None) -> set[int]:
        """Indices of the consolidation tasks of this ``block_nnz``'s plan that have run."""
        plan = self._offsets(block_nnz)[2]
        g = self.node
        prefix = (g.path + "/" if g.path else "") + f"{CONSOLIDATED}/{plan}/"

        async def _list() -> list[str]:
            return [k async for k in g.store.list_prefix(prefix)]

        return {int(k.rsplit("/", 1)[-1]) for k in sync(_list()) if k.rsplit("/", 1)[-1].isdigit()}

    def finalize(self, block_nnz: Sequence[int] | None = None, max_workers: int | None = None, *,
                 consolidated: bool = False, staged: bool = True) -> None:
        """Consolidate (running any consolidation task that has not run),
        shrink ``data``/``indices`` to the true nnz, delete staging, then set
        ``complete: true`` as the last write.

        ``block_nnz``: the counts ``write_block``/``hold_block`` returned, in
        block order; ``None`` reads them from the staging headers.
        ``max_workers``: threads for the remaining consolidation tasks
        (default: CPUs, at most 8; 1 runs them serially). Tasks write
        disjoint chunks, so threads never race.
        ``consolidated=True``: the caller ran every consolidation task of
        this ``block_nnz`` (marked or not); none is looked for or run.
        ``staged=False``: no block of this output was ever staged (every
        one was held, and no earlier run wrote any), so there is no staging
        to delete and ``complete`` is the one attribute write.
        """
        g = self.node
        prov = progress.provenance(g) or {}
        if prov.get("complete"):
            return
        if not prov.get("consolidated"):
            offsets, block_nnz, _ = self._offsets(block_nnz)  # None: staging headers read once, here
            if not consolidated:
                tasks = self.consolidation_tasks(block_nnz)
                done = self.consolidated_tasks(block_nnz)
                todo = [t for t in tasks if t.index not in done]
                workers = max_workers or min(8, default_threads())
                if workers > 1 and len(todo) > 1:
                    with ThreadPoolExecutor(min(workers, len(todo))) as ex:
                        list(ex.map(lambda t: t(), todo))
                else:
                    for t in todo:
                        t()
            nnz = int(offsets[-1])
            # metadata only: no chunk lies beyond nnz, and listing the
            # capacity's chunk grid to delete them would be unbounded
            sync(_gather(*(shrink_metadata(self._final(name), nnz) for name in ("data", "indices"))))
            if not staged:  # nothing to clean up: done in one attribute write
                progress.mark_complete(g, nnz=nnz)
                return
            prov["consolidated"] = True
            prov["nnz"] = nnz
            g.attrs[progress.ATTR] = prov  # staging may go now; a crash from here on resumes at the cleanup
        else:
            nnz = int(prov.get("nnz", g["data"].shape[0]))
        prefix = g.path + "/" if g.path else ""
        sync(_gather(*(g.store.delete_dir(prefix + name) for name in (STAGING, CONSOLIDATED))))
        progress.mark_complete(g, nnz=nnz)  # the encoding attributes were written with the group

    # -- what the graph runs after the blocks ---------------------------------
    def hold_limit(self, block_memory: int) -> int:
        """Per-block cap for holding results in memory instead of staging
        them: the whole output may take one block's memory budget, so a worker
        (which fetches every held block for its consolidation part) holds at
        most that on top of its block. Larger outputs stage every block."""
        return int(block_memory) // max(1, len(self.block_bounds))

    def finish_parts(self, threads: int) -> int:
        """Consolidation tasks to run in parallel after the blocks: the number
        of final chunks depends on the total nnz, known only then, so a fixed
        number of parts each plan them (cheap, from the blocks' nnz) and write
        a disjoint share of whole chunks."""
        return max(1, min(2 * int(threads), 64))

    def finish_part(self, part: int, n_parts: int, stats: Sequence[Any]) -> dict:
        """Run share ``part`` of ``n_parts`` of the consolidation tasks, after
        every block (``stats``: every block's, with the held ones' results).
        Returns its seconds and where it ran."""
        import time

        p0 = time.perf_counter()
        stats = sorted(stats, key=lambda s: s.index)
        held = {s.index: s.held for s in stats if s.held is not None}
        # every block's stats are here, so every block was written or held: no marker listing
        tasks = self.consolidation_tasks([s.nnz_out for s in stats], require_written=False)
        for task in share_tasks(tasks, n_parts)[part]:
            # no consolidation marks: a resumed run plans and runs every task
            # again (finalize then needs none), so they would only be written
            try:
                task(held, mark=False)
            except OSError as exc:
                raise io_context(exc, f"writing {task.kind} values {task.lo}-{task.hi - 1} of {self.location}") from exc
        return {"seconds": time.perf_counter() - p0, "worker": _worker_address()}

    def finish(self, stats: Sequence[Any], parts: Sequence[dict], resumed: bool) -> None:
        """Shrink the final arrays, drop staging (if any block was staged) and
        set the completion flag; the parts ran every consolidation task."""
        staged = resumed or any(s.held is None for s in stats)
        self.finalize(block_nnz=[s.nnz_out for s in stats], consolidated=True, staged=staged)

    def __repr__(self) -> str:
        return f"CSROutput({self._loc}, n_images={self.n_images}, frame_shape={self.out_shape}, dtype={self.dtype})"


#: Relative cost per element of a consolidation task, by array: float data
#: compresses slower than indices; indptr chunks are short (measured costs in
#: docs/benchmarks.md).
_CONSOLIDATION_COST = {"data": 1.4, "indices": 1.0, "indptr": 1.0}


def share_tasks(tasks: list[ConsolidationTask], n_parts: int) -> list[list[ConsolidationTask]]:
    """Deal consolidation tasks to ``n_parts`` parts, largest first, each to
    the least loaded part (deterministic: every part computes the same split;
    round-robin gave one part all the data chunks)."""
    def cost(t: ConsolidationTask) -> float:
        return (t.hi - t.lo) * _CONSOLIDATION_COST.get(t.kind, 1.0)

    load = [0.0] * n_parts
    shares: list[list[ConsolidationTask]] = [[] for _ in range(n_parts)]
    for t in sorted(tasks, key=lambda t: (-cost(t), t.index)):
        k = min(range(n_parts), key=lambda j: (load[j], j))
        shares[k].append(t)
        load[k] += cost(t)
    return shares


def _worker_address() -> str | None:
    from ..runtime.cluster import worker_address

    return worker_address()


def write_csr_stack(target: Any, csr: Any, frame_shape: Sequence[int], storage_options: dict | None = None,
                    chunk_size: int = DEFAULT_CHUNK_NNZ, array_path: str | None = None, overwrite: bool = False,
                    zarr_format: int = 3, compressor: Any = "default") -> zarr.Group:
    """Write ``csr`` ``(n_images, H*W)`` as an anndata ``csr_matrix`` group plus ``frame_shape``.

    For tests, benchmarks and sample data. ``chunk_size``: elements per
    chunk of ``data``/``indices``/``indptr``.
    """
    from ..validation import check_frame_shape, check_positive_int

    fs = check_frame_shape(frame_shape)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if not scipy.sparse.issparse(csr):
        raise TypeError(f"csr must be a scipy.sparse matrix or array; got {type(csr).__name__}")
    m = scipy.sparse.csr_matrix(csr)
    if m.shape[1] != fs[0] * fs[1]:
        raise ValueError(f"csr has {m.shape[1]} columns but frame_shape {list(fs)} needs H*W = {fs[0] * fs[1]}")
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    loc = resolve_location(target, array_path, storage_options, name="target")
    kw = create_kwargs(loc)
    kw["path"] = kw.pop("name")
    g = zarr.create_group(zarr_format=zarr_format, overwrite=overwrite, **kw)
    g.attrs.update({**CSR_ATTRS, "shape": [int(m.shape[0]), int(m.shape[1])], "frame_shape": list(fs)})
    comp = resolve_compressors(compressor) if zarr_format == 3 else "auto"
    for name, values in (("data", m.data), ("indices", m.indices), ("indptr", m.indptr.astype(np.int64))):
        z = g.create_array(name, shape=values.shape, chunks=(max(1, min(chunk_size, values.shape[0])),),
                           dtype=values.dtype, fill_value=0, compressors=comp)
        if values.size:
            z[:] = values
    return g
