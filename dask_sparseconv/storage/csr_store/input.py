"""Reading CSR stacks: anndata's on-disk ``csr_matrix`` encoding plus ``frame_shape``.

Layout (a zarr group, format 2 or 3)::

    <group>/            attrs: encoding-type: csr_matrix, encoding-version: 0.1.0,
                               shape: [n_images, H*W], frame_shape: [H, W]
    <group>/data        (nnz,)   values
    <group>/indices     (nnz,)   column index of each value (flattened pixel)
    <group>/indptr      (n+1,)   row i's values are data[indptr[i]:indptr[i+1]]

Reading a row block reads ``indptr[start:stop+1]`` and then one slice of
``data``/``indices``. :func:`write_csr_stack` writes such a group from a
matrix in memory (tests, benchmarks, sample data).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import scipy.sparse
import zarr

from ...engine.base import index_dtype
from ...validation import _short
from ..base import InputBase
from ..dense_store import check_numeric_dtype, check_rows, codec_text, create_kwargs, read_rows, resolve_compressors
from ..location import Location, resolve_location

CSR_ATTRS = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
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
    # A store on local disk is scanned here whatever its size: 230 MB of
    # indices (200,000 ROI frames) took 0.16-0.18 s here against 1.3-2.1 s
    # as a dask reduction on 2 local workers.
    _LOCAL_CHECK_BYTES = 64 << 20
    _LOCAL_DISK_CHECK_BYTES = 4 << 30

    def check_indices(self) -> None:
        """Check every column index lies in ``[0, H*W)``, before a job writes anything.

        One extra read of ``indices`` (the smallest of the three arrays for
        float data): in this process, chunk by chunk, up to 64 MiB of it
        (up to 4 GiB on local disk); beyond that as a dask ``min``/``max``
        reduction on the active scheduler, in parallel. Blocks are still checked as they are read;
        this makes a bad store fail before the target exists.
        """
        if self.nnz == 0:
            return
        limit = self._LOCAL_DISK_CHECK_BYTES if self._loc.kind == "local" else self._LOCAL_CHECK_BYTES
        if self.nnz * self._indices.dtype.itemsize <= limit:
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
        if lo is None or hi is None:  # nothing read (every chunk empty)
            return
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

    def read_frame_rows(self, image: int, r0: int, r1: int, c0: int = 0,
                        c1: int | None = None) -> scipy.sparse.csr_matrix:
        """Pixels ``[r0, r1) x [c0, c1)`` of frame ``image`` (clipped to the
        frame) as canonical CSR ``(rows, cols)``: a tile's input window
        (:mod:`dask_sparseconv.tiles`).

        Only the rows' values are read: their first and last positions are
        found by binary search in the frame's sorted column indices, chunk
        by chunk (a few chunk reads), never by a scan of the whole frame."""
        H, W = self.frame_shape
        c0, c1 = max(0, int(c0)), W if c1 is None else min(W, int(c1))
        band = self._frame_rows(int(image), max(0, int(r0)), min(H, int(r1)))
        return band if (c0, c1) == (0, W) else scipy.sparse.csr_matrix(band[:, c0:max(c0, c1)])

    def _frame_rows(self, image: int, r0: int, r1: int) -> scipy.sparse.csr_matrix:
        H, W = self.frame_shape
        if not 0 <= image < self.n_images:
            raise ValueError(f"CSR source {self._loc}: image {image} is out of range [0, {self.n_images})")
        if r1 <= r0:
            return scipy.sparse.csr_matrix((0, W), dtype=self.dtype)
        ip = self._read_nz("indptr", image, image + 2).astype(np.int64, copy=False)
        a = self._search_indices(int(ip[0]), int(ip[1]), r0 * W)
        b = self._search_indices(a, int(ip[1]), r1 * W)
        data = self._read_nz("data", a, b)
        flat = self._read_nz("indices", a, b).astype(np.int64, copy=False) - r0 * W
        if flat.size and not np.all(np.diff(flat) > 0):
            raise ValueError(f"CSR source {self._loc}: image {image} has unsorted or repeated column indices; "
                             "frames larger than a block are read by rows and need canonical CSR (sorted indices)")
        from ...tiles import band_csr

        return band_csr(data.astype(self.dtype, copy=False), flat, r1 - r0, W, index_dtype(W, b - a, r1 - r0))

    def _search_indices(self, a: int, b: int, value: int) -> int:
        """The first position in ``[a, b)`` whose column index is ``>= value``
        (``b`` if none): ``indices[a:b]`` is sorted. Narrowed to one chunk by
        probing chunk starts (each probe one cached chunk read), then
        searched in that chunk."""
        c = max(1, int(self._indices.chunks[0]))
        # chunks decoded before (by earlier searches and reads in this
        # process) bound the answer without another read: a tile's search
        # then mostly lands in chunks its neighbours' reads already decoded
        for j, (first, last) in self.__dict__.get("_index_bounds", {}).items():
            lo, hi = j * c, (j + 1) * c
            if lo < a or hi > b:  # only chunks wholly inside the image are sorted
                continue
            if last < value:
                a = max(a, hi)
            elif first >= value:
                b = min(b, lo)
        a = min(a, b)
        while b - a > 0 and a // c != (b - 1) // c:
            mid = ((a // c) + ((b - 1) // c) + 1) // 2 * c  # a chunk start strictly inside (a, b)
            if int(self._read_nz("indices", mid, mid + 1)[0]) >= value:
                b = mid
            else:
                a = mid
        if b <= a:
            return a
        return a + int(np.searchsorted(self._read_nz("indices", a, b), value, side="left"))

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
        state.pop("_index_bounds", None)
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
                if name == "indices" and chunk.size:  # its first and last index, for _search_indices
                    d.setdefault("_index_bounds", {})[j] = (int(chunk[0]), int(chunk[-1]))
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

        from ...validation import check_positive_int

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


def write_csr_stack(target: Any, csr: Any, frame_shape: Sequence[int], storage_options: dict | None = None,
                    chunk_size: int = DEFAULT_CHUNK_NNZ, array_path: str | None = None, overwrite: bool = False,
                    zarr_format: int = 3, compressor: Any = "default") -> zarr.Group:
    """Write ``csr`` ``(n_images, H*W)`` as an anndata ``csr_matrix`` group plus ``frame_shape``.

    For tests, benchmarks and sample data. ``chunk_size``: elements per
    chunk of ``data``/``indices``/``indptr``.
    """
    from ...validation import check_frame_shape, check_positive_int

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
    g = zarr.create_group(zarr_format=zarr_format, overwrite=overwrite, **kw)  # type: ignore[arg-type]
    g.attrs.update({**CSR_ATTRS, "shape": [int(m.shape[0]), int(m.shape[1])], "frame_shape": list(fs)})
    comp = resolve_compressors(compressor) if zarr_format == 3 else "auto"
    for name, values in (("data", m.data), ("indices", m.indices), ("indptr", m.indptr.astype(np.int64))):
        z = g.create_array(name, shape=values.shape, chunks=(max(1, min(chunk_size, values.shape[0])),),
                           dtype=values.dtype, fill_value=0, compressors=comp)  # type: ignore[arg-type]
        if values.size:
            z[:] = values
    return g
