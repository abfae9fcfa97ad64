"""Separable engine (numba): a kernel of rank r as r pairs of 1-D passes.

A kernel ``k`` of rank ``r`` is a sum of ``r`` outer products
``k = sum_p outer(u_p, w_p)`` (column factor ``u_p`` of length kH, row factor
``w_p`` of length kW). Convolving with one outer product is a horizontal pass
with ``w_p`` and a vertical pass with ``u_p``:

1. each input row with nonzeros is convolved with ``w_p`` into a row buffer
   (``nnz * kW`` updates). The touched columns are the union of the kernel's
   width around each nonzero, known from the sorted indices as merged runs;
2. each run of that row buffer is added, times ``u_p[i]``, to output row
   ``r + i - top`` for every nonzero ``u_p[i]``: contiguous updates that
   vectorise (``T * kH`` updates, with ``T`` the touched row-buffer slots).

Against the 2-D direct scatter (``nnz * kH * kW`` updates) this wins when the
nonzeros lie in clusters (cell masks, ROI footprints, rasters), where ``T``
is about ``nnz`` plus the kernel's width per row; for isolated pixels ``T``
is ``nnz * kW`` and the two cost about the same. :class:`AutoSeparable`
(``method='auto'``) estimates ``T`` for each call from a sample of its
images and takes this path only when its cost model says it is cheaper.

Each image's output is accumulated in its bounding box (cut into bands of
output rows when the box is over the scratch budget), read back span by span
(each output row remembers the columns it was given), values sorted, exact
zeros dropped.

Factorisation (:func:`low_rank`): the rank is the number of singular values
above ``rtol * s_max``, with ``rtol = RANK_RTOL_ULPS * max(kH, kW) * eps``
and ``eps`` that of float32 when every kernel value is a float32 number (a
kernel made or stored in float32 and cast up) and of float64 otherwise. The
pairs come from elimination with complete pivoting (each pair a column and
a row of what is left of the kernel): a rank-1 kernel's zero taps stay
exactly zero, so NaN and inf reach exactly the pixels they reach in the 2-D
path, and small integer kernels factor exactly. When elimination leaves more
than the tolerance behind, the SVD's factors are used. Results agree with the 2-D path to a few ulps of the compute
dtype times the kernel's size (the sums are taken in another order), within
the dropped singular values.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse

from .base import Engine, canonical_csr, dense_out, empty_csr, index_dtype
from .direct import DirectNumba, _out_rows
from .threads import run_ranges, split_ranges

#: rank tolerance in units of eps * max(kH, kW) (see the module docstring)
RANK_RTOL_ULPS = 8

#: ``method='auto'`` considers the separable path for kernels with at least
#: this many nonzero taps (7 x 7): below it the 2-D scatter's few taps per
#: pixel leave little to win, and weighing the paths cost a 5 x 5 kernel's
#: 0.36 ms call ~5 % (docs/engine.md, "Separable kernels").
AUTO_MIN_TAPS = 49

#: ``method='auto'`` takes the separable path when its updates, weighted by
#: this factor, are fewer than the 2-D scatter's: a separable update costs
#: more (two passes, a row buffer, span reads) than a 2-D one
#: (docs/engine.md, "Separable kernels").
AUTO_WEIGHT = 2.0

#: ``method='auto'`` weighs the two paths on at most this many images of a
#: batch, spread over it (a pass over every image cost ~5 % of a 2-D call
#: with a 9 x 9 kernel).
AUTO_SAMPLE = 16

#: Below this many estimated updates a call runs in the calling thread.
SERIAL_WORK = 1_000_000

_JIT = dict(nogil=True, cache=True)


# ---------------------------------------------------------------------------
# factorisation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """A kernel as ``sum_p outer(u[p], w[p])``.

    Attributes
    ----------
    u : ndarray, shape (r, kH)
        Column factors.
    w : ndarray, shape (r, kW)
        Row factors.
    rank : int
        ``r``; 0 for an all-zero kernel.
    rtol : float
        Singular values below ``rtol * s_max`` were dropped.
    residual : float
        Largest absolute difference between the kernel and the factors' sum.
    """

    u: np.ndarray
    w: np.ndarray
    rank: int
    rtol: float
    residual: float

    @property
    def taps(self) -> int:
        """Nonzero taps of the factored kernel (where some pair is nonzero)."""
        support = (np.abs(self.u).T @ np.abs(self.w)) != 0
        return int(np.count_nonzero(support))


def rank_rtol(kernel: np.ndarray) -> float:
    """The relative singular-value tolerance :func:`low_rank` uses for ``kernel``."""
    k = np.asarray(kernel)
    as32 = k.dtype == np.float32 or (k.dtype.kind in "biu") or np.array_equal(k, k.astype(np.float32))
    eps = float(np.finfo(np.float32 if as32 else np.float64).eps)
    return RANK_RTOL_ULPS * max(k.shape) * eps


def low_rank(kernel: np.ndarray, rtol: float | None = None) -> LowRank:
    """Factor a 2-D kernel into ``rank`` outer products (see the module docstring).

    Parameters
    ----------
    kernel : ndarray
        2-D, finite.
    rtol : float, optional
        Relative singular-value tolerance; default :func:`rank_rtol`.

    Returns
    -------
    LowRank
        Factors in float64.
    """
    k = np.asarray(kernel, dtype=np.float64)
    kh, kw = k.shape
    if rtol is None:
        rtol = rank_rtol(kernel)
    s = np.linalg.svd(k, compute_uv=False)
    if s.size == 0 or s[0] == 0:
        return LowRank(np.zeros((0, kh)), np.zeros((0, kw)), 0, rtol, 0.0)
    rank = int(np.count_nonzero(s > rtol * s[0]))
    # Elimination with complete pivoting: each pair is a column and a row of
    # what is left of the kernel, so zero taps stay exactly zero in the pairs
    # (NaN reaches what it reaches in 2-D) and small integer kernels factor
    # into exact binary fractions. The SVD's factors are the fallback.
    u = np.zeros((rank, kh))
    w = np.zeros((rank, kw))
    rest = k.copy()
    for p in range(rank):
        i0, j0 = np.unravel_index(int(np.argmax(np.abs(rest))), rest.shape)
        if rest[i0, j0] == 0:
            break
        u[p] = rest[:, j0]
        w[p] = rest[i0, :] / rest[i0, j0]
        rest -= np.outer(u[p], w[p])
        # exactly zero in exact arithmetic; rounding would leave ~1e-17 there,
        # which the next pairs would carry to pixels the kernel does not reach
        rest[i0, :] = 0.0
        rest[:, j0] = 0.0
    residual = float(np.max(np.abs(k - u.T @ w)))
    if residual > rtol * float(np.max(np.abs(k))):
        U, sv, Vt = np.linalg.svd(k)
        u = (U[:, :rank] * sv[:rank]).T.copy()
        w = Vt[:rank].copy()
        residual = float(np.max(np.abs(k - u.T @ w)))
    return LowRank(np.ascontiguousarray(u), np.ascontiguousarray(w), rank, float(rtol), residual)


# ---------------------------------------------------------------------------
# numba kernels (serial, nogil; parallelism is in engine/threads.py)
# ---------------------------------------------------------------------------


@numba.njit(inline="always", **_JIT)
def _image_runs(indices, a, e, W_in, W_out, left, jmin, jmax):
    """``(T, cmin, cmax)`` of one image's pixels indices[a:e]: the row-buffer
    slots its horizontal pass touches (each pixel's kernel width, merged
    into runs per input row; indices are sorted) and its column range."""
    T = np.int64(0)
    cmin = W_in
    cmax = np.int64(-1)
    re = np.int64(-1)
    run_end = np.int64(-2)
    for jj in range(a, e):
        p = np.int64(indices[jj])
        if p >= re:
            re = (p // W_in + 1) * W_in
            run_end = np.int64(-2)
        c = p - (re - W_in)
        cmin = min(cmin, c)
        cmax = max(cmax, c)
        A = max(c + jmin - left, 0)
        B = min(c + jmax - left, W_out - 1)
        if A <= B:
            if A <= run_end:
                if B > run_end:
                    T += B - run_end
                    run_end = B
            else:
                T += B - A + 1
                run_end = B
    return T, cmin, cmax


@numba.njit(**_JIT)
def _bounds(indptr, indices, W_in, H_out, W_out, top, left, imin, imax, jmin, jmax, K, ub_cum, cols):
    """ub_cum[b+1] - ub_cum[b] = an upper bound of image b's output nnz
    (its bounding box, at most nnz * K); cols[b] = the box's output columns
    (first, last). Returns ``T``, the row-buffer slots the horizontal pass
    touches over the batch."""
    n = indptr.size - 1
    ub_cum[0] = 0
    T = np.int64(0)
    for b in range(n):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        ub = np.int64(0)
        cols[b, 0] = 0
        cols[b, 1] = -1
        if e > a:
            R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
            t, cmin, cmax = _image_runs(indices, a, e, W_in, W_out, left, jmin, jmax)
            T += t
            C0 = max(cmin + jmin - left, 0)
            C1 = min(cmax + jmax - left, W_out - 1)
            if R1 >= R0 and C1 >= C0:
                ub = min((e - a) * K, (R1 - R0 + 1) * (C1 - C0 + 1))
                cols[b, 0] = C0
                cols[b, 1] = C1
        ub_cum[b + 1] = ub_cum[b] + ub
    return T


@numba.njit(**_JIT)
def _sampled_runs(indptr, indices, step, W_in, W_out, left, jmin, jmax):
    """``(T, nnz)`` of :func:`_bounds` over images 0, step, 2 * step, ...:
    what ``method='auto'`` weighs, without a pass over the whole batch."""
    T = np.int64(0)
    nnz = np.int64(0)
    for b in range(0, indptr.size - 1, step):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        nnz += e - a
        T += _image_runs(indices, a, e, W_in, W_out, left, jmin, jmax)[0]
    return T, nnz


@numba.njit(**_JIT)
def _window(indices, data, a, e, W_in, U, Wf, top, left, imin, imax, jmin, jmax,
            wr0, wh, wc0, ww, buf, tmp, rlo, rhi, run_a, run_b):
    """Add the pixels indices[a:e] of one image, convolved with
    ``sum_p outer(U[p], Wf[p])``, into the window ``buf``: output rows
    [wr0, wr0 + wh), columns [wc0, wc0 + ww), row-major with width ``ww``.

    ``tmp`` (>= ww slots, zero) is the row buffer, left zero. ``rlo``/``rhi``
    (window rows; None: not tracked) widen to the window columns each row
    was given. ``run_a``/``run_b`` hold one input row's merged runs.
    """
    n_pairs = U.shape[0]
    jj = a
    while jj < e:
        p = np.int64(indices[jj])
        r = p // W_in
        rs = r * W_in
        re = rs + W_in
        k = jj + 1
        while k < e and np.int64(indices[k]) < re:
            k += 1
        # the row buffer's runs: each pixel's kernel width, merged (columns sorted)
        nrun = 0
        for q in range(jj, k):
            c = np.int64(indices[q]) - rs
            A = max(c + jmin - left - wc0, 0)
            B = min(c + jmax - left - wc0, ww - 1)
            if A > B:
                continue
            if nrun > 0 and A <= run_b[nrun - 1] + 1:
                if B > run_b[nrun - 1]:
                    run_b[nrun - 1] = B
            else:
                run_a[nrun] = A
                run_b[nrun] = B
                nrun += 1
        if nrun > 0:
            first = run_a[0]
            last = run_b[nrun - 1]
            for pp in range(n_pairs):
                # horizontal: the row convolved with w_p
                for q in range(jj, k):
                    c = np.int64(indices[q]) - rs
                    v = data[q]
                    base = c - left - wc0
                    for j in range(jmin, jmax + 1):
                        wv = Wf[pp, j]
                        C = base + j
                        if wv != 0 and 0 <= C and C < ww:
                            tmp[C] += v * wv
                # vertical: each run, times u_p[i], into output row r + i - top
                for i in range(imin, imax + 1):
                    uv = U[pp, i]
                    R = r + i - top - wr0
                    if uv == 0 or R < 0 or R >= wh:
                        continue
                    # unsigned indices: no negative-index wraparound test, so the loop vectorises
                    ob = np.uint64(R * ww)
                    for g in range(nrun):
                        for C in range(np.uint64(run_a[g]), np.uint64(run_b[g] + 1)):
                            buf[ob + C] += uv * tmp[C]
                    if rlo is not None:
                        if first < rlo[R]:
                            rlo[R] = first
                        if last > rhi[R]:
                            rhi[R] = last
                for g in range(nrun):
                    tmp[run_a[g] : run_b[g] + 1] = 0
        jj = k


@numba.njit(**_JIT)
def _extract(buf, wr0, wc0, ww, wh, rlo, rhi, W_out, out_idx, out_val, pos):
    """Write the nonzeros of each window row's span (sorted) at out_*[pos:],
    zeroing buffer and spans; returns the new pos. Branch-free: the caller
    keeps one spare slot after the last possible value."""
    p = np.uint64(pos)
    for R in range(wh):
        lo = rlo[R]
        hi = rhi[R]
        if lo > hi:
            continue
        rb = np.uint64(R * ww)
        ob = (R + wr0) * W_out + wc0
        for C in range(np.uint64(lo), np.uint64(hi + 1)):
            v = buf[rb + C]
            out_idx[p] = ob + np.int64(C)
            out_val[p] = v
            p += np.uint64(v != 0)
        buf[rb + lo : rb + hi + 1] = 0
        rlo[R] = ww
        rhi[R] = -1
    return np.int64(p)


@numba.njit(**_JIT)
def _csr_range(start, stop, indptr, indices, data, W_in, U, Wf, top, left, imin, imax, jmin, jmax,
               H_out, W_out, cap, cols, out_idx, out_val, pos, counts):
    """Convolve images [start, stop) into out_*[pos:]; counts[b] = nnz of
    image b. Returns the new pos. Each image is done in its bounding box
    (output columns ``cols[b]``, from :func:`_bounds`), in bands of output
    rows of at most ``cap`` slots."""
    dt = out_val.dtype
    buf = np.zeros(0, dtype=dt)
    tmp = np.zeros(0, dtype=dt)
    rlo = np.zeros(0, dtype=np.int64)
    rhi = np.zeros(0, dtype=np.int64)
    run_a = np.empty(W_in + 1, dtype=np.int64)
    run_b = np.empty(W_in + 1, dtype=np.int64)
    for b in range(start, stop):
        begin = pos
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        if e > a:
            R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
            C0 = np.int64(cols[b, 0])
            C1 = np.int64(cols[b, 1])
            if R1 >= R0 and C1 >= C0:
                h = R1 - R0 + 1
                w = C1 - C0 + 1
                hb = max(1, min(h, cap // w))
                if buf.size < hb * w:
                    buf = np.zeros(hb * w, dtype=dt)
                if tmp.size < w:
                    tmp = np.zeros(w, dtype=dt)
                if rlo.size < hb:
                    rlo = np.full(hb, np.int64(1) << 62)
                    rhi = np.full(hb, np.int64(-1))
                for B0 in range(R0, R1 + 1, hb):
                    B1 = min(B0 + hb, R1 + 1)
                    # the input rows that reach the band
                    lo = max(B0 + top - imax, 0) * W_in
                    hi = (B1 + top - imin) * W_in
                    aa = a + np.searchsorted(indices[a:e], lo)
                    ee = a + np.searchsorted(indices[a:e], hi)
                    if ee > aa:
                        _window(indices, data, aa, ee, W_in, U, Wf, top, left, imin, imax, jmin, jmax,
                                B0, B1 - B0, C0, w, buf, tmp, rlo, rhi, run_a, run_b)
                        pos = _extract(buf, B0, C0, w, B1 - B0, rlo, rhi, W_out, out_idx, out_val, pos)
        counts[b] = pos - begin
    return pos


@numba.njit(**_JIT)
def _dense_range(start, stop, indptr, indices, data, W_in, U, Wf, top, left, imin, imax, jmin, jmax,
                 H_out, W_out, out):
    """Images [start, stop) straight into out[b] (zeroed, flat frames)."""
    tmp = np.zeros(W_out, dtype=out.dtype)
    run_a = np.empty(W_in + 1, dtype=np.int64)
    run_b = np.empty(W_in + 1, dtype=np.int64)
    for b in range(start, stop):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        if e > a:
            _window(indices, data, a, e, W_in, U, Wf, top, left, imin, imax, jmin, jmax,
                    0, H_out, 0, W_out, out[b], tmp, None, None, run_a, run_b)


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------


class SeparableNumba(Engine):
    """The kernel as ``rank`` separable pairs, each a horizontal and a vertical
    1-D pass over the nonzeros (module docstring). Any kernel is accepted:
    ``method='separable'`` forces this path whatever the rank.

    Thread-safe: calls share only the read-only factors.
    """

    method = "separable"
    backend = "numba"
    serial_work: int | None = None

    def __init__(self, frame_shape, kernel, dtype, **kwargs):
        super().__init__(frame_shape, kernel, dtype, **kwargs)
        self.factors = low_rank(self.kernel)
        f = self.factors
        self.u = np.ascontiguousarray(f.u, dtype=self.dtype)
        self.w = np.ascontiguousarray(f.w, dtype=self.dtype)
        nz_i = np.flatnonzero(np.any(self.u != 0, axis=0))
        nz_j = np.flatnonzero(np.any(self.w != 0, axis=0))
        self.rank = f.rank if nz_i.size and nz_j.size else 0
        self.extent = (int(nz_i[0]), int(nz_i[-1]), int(nz_j[0]), int(nz_j[-1])) if self.rank else (0, 0, 0, 0)
        self.taps = f.taps if self.rank else 0
        #: nonzero factor taps summed over the pairs: a call's updates are
        #: ``nnz * row_taps + T * col_taps``
        self.row_taps = int(np.count_nonzero(self.w)) if self.rank else 0
        self.col_taps = int(np.count_nonzero(self.u)) if self.rank else 0
        self._sample_args: dict[str, tuple] = {}

    def _args(self, mode: str):
        geo = self.geometry(mode)
        H_out, W_out = geo.out_shape
        imin, imax, jmin, jmax = self.extent
        return geo, (np.int64(geo.frame_shape[1]), self.u, self.w, np.int64(geo.top), np.int64(geo.left),
                     np.int64(imin), np.int64(imax), np.int64(jmin), np.int64(jmax), np.int64(H_out), np.int64(W_out))

    def count(self, x: scipy.sparse.csr_matrix, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``(ub_cum, cols, T)``: per-image output bounds (cumulative), each
        image's output columns, and the row-buffer slots of the horizontal
        pass, in one pass over the indices."""
        geo = self.geometry(mode)
        H_out, W_out = geo.out_shape
        imin, imax, jmin, jmax = self.extent
        ub_cum = np.empty(x.shape[0] + 1, dtype=np.int64)
        cols = np.empty((x.shape[0], 2), dtype=np.int64)
        T = _bounds(x.indptr, x.indices, np.int64(geo.frame_shape[1]), np.int64(H_out), np.int64(W_out),
                    np.int64(geo.top), np.int64(geo.left), np.int64(imin), np.int64(imax), np.int64(jmin),
                    np.int64(jmax), np.int64(max(self.taps, 1)), ub_cum, cols)
        return ub_cum, cols, int(T)

    def work(self, nnz: int, T: int) -> int:
        """Estimated updates of a call: ``nnz * row taps + T * column taps`` (over the pairs)."""
        return nnz * self.row_taps + T * self.col_taps

    def sampled_work(self, x: scipy.sparse.csr_matrix, mode: str) -> float:
        """Estimated updates per input pixel, from at most ``AUTO_SAMPLE``
        images spread over the batch (every image when the sample is empty)."""
        args = self._sample_args.get(mode)
        if args is None:  # per mode, once: this runs on every call of method='auto'
            geo = self.geometry(mode)
            _, _, jmin, jmax = self.extent
            args = self._sample_args[mode] = (np.int64(geo.frame_shape[1]), np.int64(geo.out_shape[1]),
                                              np.int64(geo.left), np.int64(jmin), np.int64(jmax))
        n = x.shape[0]
        T, nnz = _sampled_runs(x.indptr, x.indices, np.int64(max(1, n // AUTO_SAMPLE)), *args)
        if nnz == 0:
            T, nnz = _sampled_runs(x.indptr, x.indices, np.int64(1), *args)
        return self.work(int(nnz), int(T)) / max(int(nnz), 1)

    def _ranges(self, weights, n: int, work: int) -> list[tuple[int, int]]:
        threshold = SERIAL_WORK if self.serial_work is None else self.serial_work
        if self.n_threads == 1 or n < 2 or work < threshold:
            return [(0, n)]
        return split_ranges(weights, n, self.n_threads)

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo, args = self._args(mode)
        n = x.shape[0]
        out_pixels = geo.out_pixels
        if n == 0 or self.rank == 0 or x.nnz == 0:
            return empty_csr(n, out_pixels, self.dtype)
        ub_cum, cols, T = self.count(x, mode)
        ranges = self._ranges(ub_cum, n, self.work(x.nnz, T))
        cap = np.int64(max(1, self.max_buffer_bytes // (self.dtype.itemsize * len(ranges))))
        idx_dt = index_dtype(n, out_pixels, int(ub_cum[-1]) + 1)
        counts = np.empty(n, dtype=np.int64)
        # Range r writes from ub_cum[a_r] + r (its bound, plus one spare slot
        # each for branch-free extraction), then moves down to join the one
        # before. Slack past the values is never written: address space, not
        # memory (the bounds are boxes, loose for images with blobs far apart).
        out_idx = np.empty(int(ub_cum[-1]) + len(ranges), dtype=idx_dt)
        out_val = np.empty(int(ub_cum[-1]) + len(ranges), dtype=self.dtype)
        begin = {a: int(ub_cum[a]) + r for r, (a, _) in enumerate(ranges)}

        def run(a: int, b: int) -> int:
            return int(_csr_range(np.int64(a), np.int64(b), x.indptr, x.indices, x.data, *args, cap, cols, out_idx,
                                  out_val, np.int64(begin[a]), counts)) - begin[a]

        written = run_ranges(run, ranges)
        end = written[0]
        for (a, _), m in zip(ranges[1:], written[1:]):
            if m and begin[a] != end:
                out_idx[end:end + m] = out_idx[begin[a]:begin[a] + m]
                out_val[end:end + m] = out_val[begin[a]:begin[a] + m]
            end += m
        indices_out, data_out = out_idx[:end], out_val[:end]
        indptr_out = np.empty(n + 1, dtype=idx_dt)
        indptr_out[0] = 0
        np.cumsum(counts, out=indptr_out[1:])
        return canonical_csr(data_out, indices_out, indptr_out, (n, out_pixels))

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo, args = self._args(mode)
        n = x.shape[0]
        res = dense_out(n, geo, self.dtype, out)
        if n == 0 or self.rank == 0 or x.nnz == 0:
            return res
        flat = res.reshape(n, geo.out_pixels)
        work = x.nnz * (self.row_taps + self.row_taps * self.col_taps)  # T <= nnz * row taps
        ranges = self._ranges(x.indptr if self.n_threads > 1 else None, n, work)

        def run(a: int, b: int) -> None:
            _dense_range(np.int64(a), np.int64(b), x.indptr, x.indices, x.data, *args, flat)

        run_ranges(run, ranges)
        return res

    def nbytes(self) -> int:
        return self.kernel.nbytes + self.u.nbytes + self.w.nbytes


class AutoSeparable(Engine):
    """``method='auto'`` on numba for a low-rank kernel: per call, the direct
    2-D scatter or the separable passes, whichever the cost model says is
    cheaper for this batch (``T`` estimated from up to ``AUTO_SAMPLE`` of its images).

    Built by :class:`~dask_sparseconv.Convolver` only when :func:`worth_trying`
    says the kernel could win; reports ``method='direct'``.
    """

    method = "direct"
    backend = "numba"

    def __init__(self, frame_shape, kernel, dtype, **kwargs):
        super().__init__(frame_shape, kernel, dtype, **kwargs)
        # self.kernel: cast once here, shared by both paths
        self.direct = DirectNumba(frame_shape, self.kernel, dtype, **kwargs)
        self.separable = SeparableNumba(frame_shape, self.kernel, dtype, **kwargs)
        self.direct_taps = int(np.count_nonzero(self.kernel))
        self._lock = threading.Lock()
        #: calls that took each path (for tests and docs/engine.md's figures)
        self.calls = {"direct": 0, "separable": 0}

    def choose(self, x: scipy.sparse.csr_matrix, mode: str) -> str:
        """``'separable'`` or ``'direct'`` for this batch.

        Inputs with NaN or inf take the 2-D path: with rank > 1 the factors
        can be nonzero where the kernel is zero, and a NaN would then reach
        pixels the 2-D convolution leaves alone.
        """
        sep = self.separable
        if sep.rank == 0 or x.nnz == 0:
            return "direct"
        if sep.rank > 1 and not np.isfinite(x.data).all():
            return "direct"
        return "separable" if AUTO_WEIGHT * sep.sampled_work(x, mode) < self.direct_taps else "direct"

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        path = self.choose(x, mode)
        with self._lock:
            self.calls[path] += 1
        if path == "separable":
            return self.separable.to_csr(x, mode)
        return self.direct.to_csr(x, mode)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        path = self.choose(x, mode)
        with self._lock:
            self.calls[path] += 1
        if path == "separable":
            return self.separable.to_dense(x, mode, out)
        return self.direct.to_dense(x, mode, out)

    def nbytes(self) -> int:
        return self.direct.nbytes() + self.separable.nbytes()


def worth_trying(kernel: np.ndarray) -> bool:
    """Whether ``method='auto'`` should weigh the separable path for this
    kernel: enough taps, and a rank low enough that ``rank * (kH + kW)``
    updates per pixel can beat ``kH * kW`` (a cheap test first, the SVD last)."""
    kh, kw = kernel.shape
    if kh < 2 or kw < 2 or kh * kw < AUTO_MIN_TAPS:
        return False
    taps = int(np.count_nonzero(kernel))
    if taps < AUTO_MIN_TAPS:
        return False
    f = low_rank(kernel)
    return 0 < f.rank and AUTO_WEIGHT * f.rank * (kh + kw) < taps


__all__ = ["AUTO_MIN_TAPS", "AUTO_WEIGHT", "AutoSeparable", "LowRank", "SeparableNumba", "low_rank", "rank_rtol",
           "worth_trying"]
