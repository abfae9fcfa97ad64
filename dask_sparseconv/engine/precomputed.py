"""The ``precomputed`` method: multiply by a sparse Toeplitz matrix.

For a mode, the matrix ``T`` of shape ``(H*W, H_out*W_out)`` holds in row
``p = r*W + c`` the weights with which input pixel ``(r, c)`` reaches every
output pixel: ``T[p, q] = kernel[i, j]`` for each **nonzero** tap ``(i, j)``
mapping ``(r, c)`` to ``q``. A batch is then ``x @ T``.

``T`` is built on the first call for a mode (guarded by a lock, so
concurrent first calls build it once) and kept; building each mode directly
is a few vectorised passes, cheaper than building ``'full'`` and slicing
columns out of it (a CSR column selection copies and re-indexes the whole
matrix). Its size is estimated exactly before anything is allocated, and a
matrix above :attr:`PrecomputedNumpy.max_toeplitz_bytes` is refused with a
``ValueError`` (huge frames: use ``method='direct'`` or ``'gather_scatter'``).

NaN/inf in images propagate only through nonzero kernel taps (zero taps are
not stored in ``T``); exact-zero sums are dropped; float32 stays float32.
"""

from __future__ import annotations

import threading

import numpy as np
import scipy.sparse

from .base import Engine, dense_out, empty_csr, index_dtype
from .gather_scatter import _SCRATCH_OVERHEAD, assemble_ranges, band_rows_for, numba, output_arrays
from .lazy import finish_csr, image_of_entry, kernel_taps, make_csr
from .threads import run_ranges, split_ranges

#: Bound on the temporaries used while building one slab of T.
_BUILD_SLAB_BYTES = 64 * 1024**2
#: Bound on product temporaries of the numpy dense path.
_DENSE_SLAB_BYTES = 64 * 1024**2


def _valid_count(n_in: int, n_out: int, shift: int) -> int:
    """How many ``r`` in ``[0, n_in)`` have ``0 <= r + shift < n_out``."""
    return max(0, min(n_in, n_out - shift) - max(0, -shift))


def toeplitz_nnz(frame_shape, geo, ti, tj) -> int:
    """Exact number of stored entries of the Toeplitz matrix (nonzero taps only)."""
    H, W = frame_shape
    Ho, Wo = geo.out_shape
    total = 0
    for i, j in zip(ti.tolist(), tj.tolist()):
        total += _valid_count(H, Ho, i - geo.top) * _valid_count(W, Wo, j - geo.left)
    return total


def toeplitz_bytes(frame_shape, geo, ti, tj, dtype) -> int:
    """Bytes the Toeplitz matrix for ``geo`` would take (data, indices, indptr)."""
    n_in = frame_shape[0] * frame_shape[1]
    nnz = toeplitz_nnz(frame_shape, geo, ti, tj)
    idx = index_dtype(n_in, geo.out_pixels, nnz).itemsize
    return nnz * (np.dtype(dtype).itemsize + idx) + (n_in + 1) * idx


def build_toeplitz(frame_shape, geo, ti, tj, tv, dtype) -> scipy.sparse.csr_matrix:
    """The canonical CSR Toeplitz matrix ``(H*W, H_out*W_out)`` of one mode.

    Built in slabs of input rows. Within a row, nonzero taps in row-major
    order reach increasing output indices, so no sort is needed.
    """
    H, W = frame_shape
    Ho, Wo = geo.out_shape
    n_in, n_out = H * W, geo.out_pixels
    n_taps = len(tv)
    nnz = toeplitz_nnz(frame_shape, geo, ti, tj)
    idx = index_dtype(n_in, n_out, nnz)
    indices = np.empty(nnz, dtype=idx)
    data = np.empty(nnz, dtype=dtype)
    counts = np.zeros(n_in, dtype=np.int64)
    di = (ti - geo.top)[None, None, :]
    dj = (tj - geo.left)[None, None, :]
    cols = np.arange(W, dtype=np.int64)[None, :, None]
    slab = max(1, _BUILD_SLAB_BYTES // max(1, W * n_taps * 32))
    pos = 0
    for r0 in range(0, H, slab):
        r1 = min(H, r0 + slab)
        rows = np.arange(r0, r1, dtype=np.int64)[:, None, None]
        orow = rows + di  # (rows, 1, taps)
        ocol = cols + dj  # (1, W, taps)
        ok = ((orow >= 0) & (orow < Ho)) & ((ocol >= 0) & (ocol < Wo))  # (rows, W, taps)
        q = orow * Wo + ocol
        q = np.broadcast_to(q, ok.shape)[ok]
        w = np.broadcast_to(tv[None, None, :], ok.shape)[ok]
        indices[pos : pos + len(q)] = q
        data[pos : pos + len(q)] = w
        counts[r0 * W : r1 * W] = ok.sum(axis=2).reshape(-1)
        pos += len(q)
    assert pos == nnz
    indptr = np.zeros(n_in + 1, dtype=idx)
    np.cumsum(counts, out=indptr[1:])
    return make_csr(indptr, indices, data, n_in, n_out, dtype)


class _ToeplitzEngine(Engine):
    """Shared part: the per-mode Toeplitz cache."""

    #: Largest Toeplitz matrix (bytes) an engine agrees to build for one mode.
    max_toeplitz_bytes: int = 4 * 1024**3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ti, self._tj, self._tv = kernel_taps(self.kernel, self.dtype)
        self._toeplitz: dict[str, scipy.sparse.csr_matrix] = {}
        self._build_lock = threading.Lock()

    def toeplitz(self, mode: str) -> scipy.sparse.csr_matrix:
        """The Toeplitz matrix for ``mode``, built on first use (once, under a lock)."""
        T = self._toeplitz.get(mode)
        if T is not None:
            return T
        with self._build_lock:
            T = self._toeplitz.get(mode)
            if T is None:
                geo = self.geometry(mode)
                size = toeplitz_bytes(self.frame_shape, geo, self._ti, self._tj, self.dtype)
                if size > self.max_toeplitz_bytes:
                    raise ValueError(
                        f"method='precomputed' would need a {size / 1024**3:.1f} GiB Toeplitz matrix for "
                        f"frame_shape={self.frame_shape}, kernel shape={self.kernel.shape}, mode={mode!r} "
                        f"(limit {self.max_toeplitz_bytes / 1024**3:.1f} GiB); use method='direct' or "
                        f"method='gather_scatter' for frames this large"
                    )
                T = build_toeplitz(self.frame_shape, geo, self._ti, self._tj, self._tv, self.dtype)
                self._toeplitz[mode] = T
        return T

    def prepare(self, mode: str) -> None:
        """Build the matrix for ``mode`` now (the Convolver calls this at
        construction). An all-zero kernel needs none: every call returns zeros."""
        if len(self._tv):
            self.toeplitz(mode)

    def _trivial(self, x) -> bool:
        return x.shape[0] == 0 or x.nnz == 0 or len(self._tv) == 0

    def nbytes(self) -> int:
        total = self.kernel.nbytes
        for T in list(self._toeplitz.values()):
            total += T.data.nbytes + T.indices.nbytes + T.indptr.nbytes
        return total


class PrecomputedNumpy(_ToeplitzEngine):
    """``x @ T`` with scipy's sparse product, threaded over image ranges.

    Dense output expands each stored pixel into its Toeplitz row and adds the
    products in place (no CSR result is built). NaN/inf propagate only through
    nonzero taps; float32 stays float32.
    """

    method = "precomputed"
    backend = "numpy"

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        if self._trivial(x):
            return empty_csr(n, n_out, self.dtype)
        T = self.toeplitz(mode)

        def work(a, b):
            part = x[a:b] @ T
            part.sum_duplicates()  # scipy's product leaves rows unsorted
            return part

        ranges = split_ranges(x.indptr, n, self.n_threads)
        parts = run_ranges(work, ranges)
        m = parts[0] if len(parts) == 1 else scipy.sparse.vstack(parts, format="csr")
        return finish_csr(scipy.sparse.csr_matrix(m), self.dtype)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        res = dense_out(n, geo, self.dtype, out)
        if self._trivial(x):
            return res
        T = self.toeplitz(mode)
        flat = res.reshape(-1)
        img_all = image_of_entry(x.indptr, n)
        Tptr = T.indptr.astype(np.int64, copy=False)
        per = max(1, _DENSE_SLAB_BYTES // (40 * max(1, len(self._tv))))
        for s in range(0, x.nnz, per):
            e = min(x.nnz, s + per)
            pix = x.indices[s:e]
            starts = Tptr[pix]
            lens = Tptr[pix + 1] - starts
            total = int(lens.sum())
            if total == 0:
                continue
            offsets = np.zeros(len(lens), dtype=np.int64)
            np.cumsum(lens[:-1], out=offsets[1:])
            k = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lens)
            target = np.repeat(img_all[s:e] * n_out, lens) + T.indices[k]
            np.add.at(flat, target, np.repeat(x.data[s:e], lens) * T.data[k])
        return res


if numba is not None:
    from .gather_scatter import nb_bsearch, nb_flush

    @numba.njit(nogil=True, cache=True)
    def _pc_csr_range(indptr, indices, data, a, b, W, Ho, Wo, top, kh, Tptr, Tind, Tval, band_rows, out_idx, out_val):
        """Images ``[a, b)`` times T; returns (entries per image, indices, values, nnz)."""
        band_len = band_rows * Wo
        acc = np.zeros(band_len, data.dtype)
        mark = np.zeros(band_len, np.uint8)
        touched = np.empty(band_len, np.int64)
        counts = np.zeros(b - a, np.int64)
        nnz = 0
        whole = band_rows >= Ho
        for img in range(a, b):
            s = indptr[img]
            e = indptr[img + 1]
            if s == e:
                continue
            before = nnz
            o_lo = max(0, np.int64(indices[s]) // W - top)
            o_hi = min(Ho, np.int64(indices[e - 1]) // W + kh - top)
            b0 = o_lo
            while b0 < o_hi:
                b1 = min(b0 + band_rows, o_hi)
                q0 = b0 * Wo
                q1 = b1 * Wo
                if whole:
                    ps, pe = s, e
                else:
                    ps = nb_bsearch(indices, s, e, max(0, b0 + top - kh + 1) * W)
                    pe = nb_bsearch(indices, ps, e, (b1 + top) * W)
                n_t = 0
                for p in range(ps, pe):
                    pix = indices[p]
                    v = data[p]
                    for k in range(Tptr[pix], Tptr[pix + 1]):
                        q = np.int64(Tind[k])
                        if q < q0 or q >= q1:
                            continue
                        pos = q - q0
                        if mark[pos] == 0:
                            mark[pos] = 1
                            touched[n_t] = pos
                            n_t += 1
                        acc[pos] += v * Tval[k]
                if n_t:
                    out_idx, out_val, nnz = nb_flush(acc, mark, touched, n_t, q1 - q0, q0, out_idx, out_val, nnz)
                b0 = b1
            counts[img - a] = nnz - before
        return counts, out_idx, out_val, nnz

    @numba.njit(nogil=True, cache=True)
    def _pc_dense_range(indptr, indices, data, a, b, Tptr, Tind, Tval, out2d):
        for img in range(a, b):
            for p in range(indptr[img], indptr[img + 1]):
                pix = indices[p]
                v = data[p]
                for k in range(Tptr[pix], Tptr[pix + 1]):
                    out2d[img, Tind[k]] += v * Tval[k]


class PrecomputedNumba(_ToeplitzEngine):
    """Sparse-times-Toeplitz product in serial ``nogil`` numba kernels, threaded
    over image ranges, each with an accumulator band bounded by
    ``max_buffer_bytes / threads``. NaN/inf propagate only through nonzero
    taps; float32 stays float32.
    """

    method = "precomputed"
    backend = "numba"

    def __init__(self, *args, **kwargs):
        if numba is None:  # pragma: no cover
            raise ValueError("backend='numba' was asked for but numba is not installed; install numba")
        super().__init__(*args, **kwargs)

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        if self._trivial(x):
            return empty_csr(n, n_out, self.dtype)
        T = self.toeplitz(mode)
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        kh = self.kernel.shape[0]
        ranges = split_ranges(x.indptr, n, self.n_threads)
        band_rows = band_rows_for(self.max_buffer_bytes // len(ranges), self.dtype.itemsize + _SCRATCH_OVERHEAD, Wo, Ho)
        n_taps = len(self._tv)

        def work(a, b):
            out_idx, out_val = output_arrays(x, a, b, n_taps, n_out, self.dtype)
            return _pc_csr_range(
                x.indptr, x.indices, x.data, a, b, W, Ho, Wo, geo.top, kh,
                T.indptr, T.indices, T.data, band_rows, out_idx, out_val,
            )

        return assemble_ranges(run_ranges(work, ranges), n, n_out, self.dtype)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        res = dense_out(n, geo, self.dtype, out)
        if self._trivial(x):
            return res
        T = self.toeplitz(mode)
        out2d = res.reshape(n, n_out)

        def work(a, b):
            _pc_dense_range(x.indptr, x.indices, x.data, a, b, T.indptr, T.indices, T.data, out2d)

        run_ranges(work, split_ranges(x.indptr, n, self.n_threads))
        return res
