"""The ``gather_scatter`` method: one shifted scatter-add per nonzero kernel tap.

For each nonzero tap ``(i, j)`` every stored input pixel ``(r, c)`` is moved
to output pixel ``(r + i - top, c + j - left)`` and added, with the tap's
weight, into a dense accumulator. Within one tap the move is a shift, so no
two entries of a tap land on the same output pixel and numpy's fancy-index
``+=`` is exact. CSR results are gathered back from the accumulator.

The accumulator is bounded by ``max_buffer_bytes``: several whole images at a
time when they fit, otherwise bands of output rows of one image (so a sparse
50000 x 50000 frame works with a few hundred MiB). Dense results are
accumulated straight into the output array.

NaN/inf in images propagate only through nonzero kernel taps; exact-zero
sums are dropped from CSR output; float32 is summed in float32 (see
:mod:`dask_sparseconv.engine.lazy`).

This module also holds the numba building blocks (banded accumulator with a
touched list) that :mod:`dask_sparseconv.engine.precomputed` reuses. The
numba kernels are serial ``nogil`` functions over an image range; the
parallelism is :mod:`dask_sparseconv.engine.threads`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from .base import Engine, dense_out, empty_csr, index_dtype
from .lazy import counts_to_indptr, image_of_entry, kernel_taps, make_csr
from .threads import run_ranges, split_ranges

try:  # numba is a hard dependency of the package, but keep numpy engines importable without it
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

#: Entries handled at once by the numpy dense path (bounds index temporaries).
_DENSE_CHUNK_ENTRIES = 1 << 21
#: Largest initial output allocation (entries) of one numba range.
_MAX_INITIAL_ENTRIES = 1 << 27
#: Scratch bytes per accumulator element in the numba kernels: value + mark (uint8) + touched (int64).
_SCRATCH_OVERHEAD = 1 + 8


def band_rows_for(budget_bytes: int, bytes_per_elem: int, Wo: int, Ho: int) -> int:
    """Output rows per accumulator band: at least 1, at most ``Ho``."""
    return int(max(1, min(Ho, budget_bytes // max(1, bytes_per_elem * Wo))))


# ---------------------------------------------------------------------------
# numba building blocks
# ---------------------------------------------------------------------------
if numba is not None:

    @numba.njit(nogil=True, cache=True)
    def nb_bsearch(a, lo, hi, value):
        """First index in ``[lo, hi)`` with ``a[i] >= value`` (``a`` sorted there)."""
        while lo < hi:
            mid = (lo + hi) // 2
            if a[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @numba.njit(nogil=True, cache=True)
    def nb_reserve(out_idx, out_val, nnz, need):
        """Grow the output arrays (by doubling) so that ``need`` entries fit.

        Callers size them from an upper bound, so this is a fallback only."""
        if need <= out_idx.shape[0]:
            return out_idx, out_val
        cap = max(need, 2 * out_idx.shape[0])
        idx2 = np.empty(cap, out_idx.dtype)
        val2 = np.empty(cap, out_val.dtype)
        idx2[:nnz] = out_idx[:nnz]
        val2[:nnz] = out_val[:nnz]
        return idx2, val2

    @numba.njit(nogil=True, cache=True)
    def nb_flush(acc, mark, touched, n_touched, span_len, base, out_idx, out_val, nnz):
        """Append the touched accumulator positions (ascending, nonzero only) as
        ``base + position`` and reset them to zero. Returns the output arrays and nnz."""
        out_idx, out_val = nb_reserve(out_idx, out_val, nnz, nnz + n_touched)
        if n_touched * 16 < span_len:
            order = np.sort(touched[:n_touched])
            for k in range(n_touched):
                pos = order[k]
                v = acc[pos]
                acc[pos] = 0
                mark[pos] = 0
                if v != 0:
                    out_idx[nnz] = base + pos
                    out_val[nnz] = v
                    nnz += 1
        else:
            for pos in range(span_len):
                if mark[pos]:
                    v = acc[pos]
                    acc[pos] = 0
                    mark[pos] = 0
                    if v != 0:
                        out_idx[nnz] = base + pos
                        out_val[nnz] = v
                        nnz += 1
        return out_idx, out_val, nnz

    @numba.njit(nogil=True, cache=True)
    def nb_max_row_nnz(indptr, a, b):
        m = 0
        for img in range(a, b):
            m = max(m, indptr[img + 1] - indptr[img])
        return m

    @numba.njit(nogil=True, cache=True)
    def _gs_csr_range(indptr, indices, data, a, b, W, Ho, Wo, top, left, kh, ti, tj, tv, band_rows, out_idx, out_val):
        """Images ``[a, b)``; returns (entries per image, indices, values, nnz).

        ``out_idx``/``out_val`` come sized from an upper bound (grown if not)."""
        band_len = band_rows * Wo
        acc = np.zeros(band_len, data.dtype)
        mark = np.zeros(band_len, np.uint8)
        touched = np.empty(band_len, np.int64)
        m = nb_max_row_nnz(indptr, a, b)
        rr = np.empty(m, np.int64)
        cc = np.empty(m, np.int64)
        counts = np.zeros(b - a, np.int64)
        nnz = 0
        n_taps = tv.shape[0]
        for img in range(a, b):
            s = indptr[img]
            e = indptr[img + 1]
            if s == e:
                continue
            before = nnz
            for p in range(s, e):
                pix = np.int64(indices[p])
                r = pix // W
                rr[p - s] = r
                cc[p - s] = pix - r * W
            o_lo = max(0, rr[0] - top)
            o_hi = min(Ho, rr[e - s - 1] + kh - top)
            b0 = o_lo
            while b0 < o_hi:
                b1 = min(b0 + band_rows, o_hi)
                n_t = 0
                for t in range(n_taps):
                    di = ti[t] - top
                    dj = tj[t] - left
                    kv = tv[t]
                    # entries on input rows r with r + di in [b0, b1)
                    ps = nb_bsearch(rr, 0, e - s, b0 - di)
                    pe = nb_bsearch(rr, ps, e - s, b1 - di)
                    for p in range(ps, pe):
                        oc = cc[p] + dj
                        if oc < 0 or oc >= Wo:
                            continue
                        pos = (rr[p] + di - b0) * Wo + oc
                        if mark[pos] == 0:
                            mark[pos] = 1
                            touched[n_t] = pos
                            n_t += 1
                        acc[pos] += data[s + p] * kv
                if n_t:
                    out_idx, out_val, nnz = nb_flush(acc, mark, touched, n_t, (b1 - b0) * Wo, b0 * Wo, out_idx, out_val, nnz)
                b0 = b1
            counts[img - a] = nnz - before
        return counts, out_idx, out_val, nnz

    @numba.njit(nogil=True, cache=True)
    def _gs_dense_range(indptr, indices, data, a, b, W, Ho, Wo, top, left, ti, tj, tv, out2d):
        n_taps = tv.shape[0]
        for img in range(a, b):
            s = indptr[img]
            e = indptr[img + 1]
            for t in range(n_taps):
                di = ti[t] - top
                dj = tj[t] - left
                kv = tv[t]
                for p in range(s, e):
                    pix = indices[p]
                    r = pix // W
                    orow = r + di
                    if orow < 0 or orow >= Ho:
                        continue
                    oc = pix - r * W + dj
                    if oc < 0 or oc >= Wo:
                        continue
                    out2d[img, orow * Wo + oc] += data[p] * kv


def output_arrays(x, a: int, b: int, n_taps: int, n_cols: int, dtype):
    """Output arrays for images ``[a, b)`` sized by the upper bound
    ``sum(min(nnz_i * taps, n_cols))`` (capped; kernels grow them if needed).

    Untouched slack of ``np.empty`` costs address space, not memory. Indices
    are int32 whenever the output has fewer than 2**31 columns."""
    per = np.diff(x.indptr[a : b + 1]).astype(np.int64) * n_taps
    bound = int(np.minimum(per, n_cols).sum())
    cap = max(16, min(bound, _MAX_INITIAL_ENTRIES))
    return np.empty(cap, dtype=index_dtype(n_cols)), np.empty(cap, dtype=dtype)


def assemble_ranges(results, n: int, n_cols: int, dtype) -> scipy.sparse.csr_matrix:
    """Join per-range ``(counts, indices, values, nnz)`` (canonical rows) into one CSR."""
    if len(results) == 1:
        counts, idx, val, nnz = results[0]
        idx, val = idx[:nnz], val[:nnz]
    else:
        counts = np.concatenate([r[0] for r in results])
        idx = np.concatenate([r[1][: r[3]] for r in results])
        val = np.concatenate([r[2][: r[3]] for r in results])
    return make_csr(counts_to_indptr(counts), idx, val, n, n_cols, dtype)


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------
class GatherScatterNumpy(Engine):
    """Per-tap shifted scatter into a dense accumulator, in numpy.

    The accumulator holds whole images when ``max_buffer_bytes`` allows,
    else bands of output rows; it is gathered back to CSR by scanning it
    (dense results) or by looking up only the touched positions (sparse).
    NaN/inf propagate only through nonzero taps; float32 stays float32.
    """

    method = "gather_scatter"
    backend = "numpy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ti, self._tj, self._tv = kernel_taps(self.kernel, self.dtype)

    def _units(self, x, rows_all, geo, budget_elems):
        """Yield ``(a, b, lo, hi, s, e)``: images a..b, output rows lo..hi of each, entries s..e."""
        n = x.shape[0]
        Ho, Wo = geo.out_shape
        kh = self.kernel.shape[0]
        indptr = x.indptr
        per_unit = budget_elems // geo.out_pixels
        if per_unit >= 1:
            a = 0
            while a < n:
                b = min(n, a + per_unit)
                s, e = int(indptr[a]), int(indptr[b])
                if e > s:
                    yield a, b, 0, Ho, s, e
                a = b
            return
        band = max(1, budget_elems // Wo)
        for img in range(n):
            s, e = int(indptr[img]), int(indptr[img + 1])
            if e == s:
                continue
            o_lo = max(0, int(rows_all[s]) - geo.top)
            o_hi = min(Ho, int(rows_all[e - 1]) + kh - geo.top)
            for b0 in range(o_lo, o_hi, band):
                b1 = min(b0 + band, o_hi)
                in_lo, in_hi = max(0, b0 + geo.top - kh + 1), b1 + geo.top
                ps = s + int(np.searchsorted(rows_all[s:e], in_lo, side="left"))
                pe = s + int(np.searchsorted(rows_all[s:e], in_hi, side="left"))
                if pe > ps:
                    yield img, img + 1, b0, b1, ps, pe

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return empty_csr(n, n_out, self.dtype)
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        budget_elems = max(Wo, self.max_buffer_bytes // self.dtype.itemsize)
        pix_all = x.indices.astype(np.int64, copy=False)
        rows_all = pix_all // W
        cols_all = pix_all - rows_all * W
        img_all = image_of_entry(x.indptr, n)
        acc = np.zeros(min(budget_elems, n * n_out), dtype=self.dtype)
        out_img, out_q, out_v = [], [], []
        n_taps = len(self._tv)
        for a, b, lo, hi, s, e in self._units(x, rows_all, geo, budget_elems):
            span = (hi - lo) * Wo
            L = (b - a) * span
            buf = acc[:L]
            r, c, v = rows_all[s:e], cols_all[s:e], x.data[s:e]
            base = (img_all[s:e] - a) * span - lo * Wo
            sparse_gather = (e - s) * n_taps * 4 < L
            touched = []
            for ti, tj, tv in zip(self._ti, self._tj, self._tv):
                orow = r + (ti - geo.top)
                ocol = c + (tj - geo.left)
                ok = (orow >= lo) & (orow < hi) & (ocol >= 0) & (ocol < Wo)
                pos = base[ok] + orow[ok] * Wo + ocol[ok]
                buf[pos] += v[ok] * tv  # positions are distinct within one tap
                if sparse_gather:
                    touched.append(pos)
            if sparse_gather:
                cand = np.unique(np.concatenate(touched)) if touched else np.empty(0, np.int64)
                vals = buf[cand]
                buf[cand] = 0
            else:
                cand = np.flatnonzero(buf)  # NaN counts as nonzero
                vals = buf[cand]
                buf.fill(0)
            keep = vals != 0
            cand, vals = cand[keep], vals[keep]
            img_local = cand // span
            out_img.append(img_local + a)
            out_q.append(cand - img_local * span + lo * Wo)
            out_v.append(vals)
        if not out_v:
            return empty_csr(n, n_out, self.dtype)
        img = np.concatenate(out_img)
        counts = np.bincount(img, minlength=n)
        return make_csr(counts_to_indptr(counts), np.concatenate(out_q), np.concatenate(out_v), n, n_out, self.dtype)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        res = dense_out(n, geo, self.dtype, out)
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return res
        flat = res.reshape(-1)
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        img_all = image_of_entry(x.indptr, n)
        for s in range(0, x.nnz, _DENSE_CHUNK_ENTRIES):
            e = min(x.nnz, s + _DENSE_CHUNK_ENTRIES)
            pix = x.indices[s:e].astype(np.int64, copy=False)
            r = pix // W
            c = pix - r * W
            v = x.data[s:e]
            base = img_all[s:e] * n_out
            for ti, tj, tv in zip(self._ti, self._tj, self._tv):
                orow = r + (ti - geo.top)
                ocol = c + (tj - geo.left)
                ok = (orow >= 0) & (orow < Ho) & (ocol >= 0) & (ocol < Wo)
                flat[base[ok] + orow[ok] * Wo + ocol[ok]] += v[ok] * tv
        return res


class GatherScatterNumba(Engine):
    """Per-tap shifted scatter in serial ``nogil`` numba kernels, threaded over image ranges.

    Each thread owns an accumulator band of at most
    ``max_buffer_bytes / threads`` (value, touched mark and touched list);
    touched positions are emitted in order, so no sort of the whole image is
    needed. NaN/inf propagate only through nonzero taps; float32 stays float32.
    """

    method = "gather_scatter"
    backend = "numba"

    def __init__(self, *args, **kwargs):
        if numba is None:  # pragma: no cover
            raise ValueError("backend='numba' was asked for but numba is not installed; install numba")
        super().__init__(*args, **kwargs)
        self._ti, self._tj, self._tv = kernel_taps(self.kernel, self.dtype)

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return empty_csr(n, n_out, self.dtype)
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        kh = self.kernel.shape[0]
        ranges = split_ranges(x.indptr, n, self.n_threads)
        band_rows = band_rows_for(self.max_buffer_bytes // len(ranges), self.dtype.itemsize + _SCRATCH_OVERHEAD, Wo, Ho)
        n_taps = len(self._tv)

        def work(a, b):
            out_idx, out_val = output_arrays(x, a, b, n_taps, n_out, self.dtype)
            return _gs_csr_range(
                x.indptr, x.indices, x.data, a, b, W, Ho, Wo, geo.top, geo.left, kh,
                self._ti, self._tj, self._tv, band_rows, out_idx, out_val,
            )

        return assemble_ranges(run_ranges(work, ranges), n, n_out, self.dtype)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        res = dense_out(n, geo, self.dtype, out)
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return res
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        out2d = res.reshape(n, n_out)

        def work(a, b):
            _gs_dense_range(x.indptr, x.indices, x.data, a, b, W, Ho, Wo, geo.top, geo.left, self._ti, self._tj, self._tv, out2d)

        run_ranges(work, split_ranges(x.indptr, n, self.n_threads))
        return res
