"""Output pixels reached per image, from the supports alone: no values computed.

:func:`support_counts` gives, for each image, the number of output pixels
that its nonzero pixels reach through the kernel's nonzero taps: an upper
bound of its output nnz (engines drop values that cancel to exactly zero).
The planner uses it on a sample of images to size CSR outputs.

Input pixels of one row that are adjacent form a run; a run ``[c0, c1]``
dilated by the taps ``[j0, j1]`` of one kernel row is the interval
``[c0 + j0, c1 + j1]`` of one output row. Each output row's count is the
length of the union of its intervals: memory in runs, not in pixels (a
boolean map of the output frames, the former way, is 900 MB for one
30000 x 30000 image), and ``O(runs x kernel-row intervals)`` work.
Measured on 2000 ROI frames of 512 x 512 with a 7 x 7 kernel: 25 ms, about
the time of the convolution itself (docs/benchmarks.md), so it is no
shortcut for computing the nnz of a whole stack.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse

from ..geometry import Geometry

_JIT = dict(nogil=True, cache=True)


def kernel_row_intervals(taps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's nonzero taps as runs: ``(row, first column, last column)`` per run, int64."""
    nz = np.asarray(taps) != 0
    rows, lo, hi = [], [], []
    for i in range(nz.shape[0]):
        j = np.flatnonzero(nz[i])
        if j.size == 0:
            continue
        breaks = np.flatnonzero(np.diff(j) > 1)
        starts = np.concatenate(([j[0]], j[breaks + 1]))
        ends = np.concatenate((j[breaks], [j[-1]]))
        rows += [i] * starts.size
        lo += starts.tolist()
        hi += ends.tolist()
    as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as64(rows), as64(lo), as64(hi)


@numba.njit(**_JIT)
def _grow(a, n):
    b = np.empty(max(2 * a.size, n), dtype=a.dtype)
    b[: a.size] = a
    return b


@numba.njit(**_JIT)
def _union_length(lo, hi, m):
    """Length of the union of the integer intervals ``[lo[q], hi[q]]``, q < m (sorts them in place)."""
    for q in range(1, m):  # insertion sort: a handful of intervals per output row
        a, b = lo[q], hi[q]
        p = q - 1
        while p >= 0 and lo[p] > a:
            lo[p + 1] = lo[p]
            hi[p + 1] = hi[p]
            p -= 1
        lo[p + 1] = a
        hi[p + 1] = b
    total = 0
    cur_lo, cur_hi = lo[0], hi[0]
    for q in range(1, m):
        if lo[q] > cur_hi + 1:
            total += cur_hi - cur_lo + 1
            cur_lo, cur_hi = lo[q], hi[q]
        elif hi[q] > cur_hi:
            cur_hi = hi[q]
    return total + cur_hi - cur_lo + 1


@numba.njit(**_JIT)
def _support_counts(indptr, indices, data, W_in, kr, klo, khi, top, left, H_out, W_out, counts):
    n = indptr.size - 1
    nk = kr.size
    kmin, kmax = kr.min(), kr.max()
    run_c0 = np.empty(64, np.int64)
    run_c1 = np.empty(64, np.int64)
    rows_u = np.empty(64, np.int64)  # distinct input rows, and where their runs start
    rows_s = np.empty(65, np.int64)
    tmp_lo = np.empty(64, np.int64)
    tmp_hi = np.empty(64, np.int64)
    ptr = np.empty(nk, np.int64)  # per kernel-row run: the first input row not yet passed
    for b in range(n):
        a, e = indptr[b], indptr[b + 1]
        nr = 0
        nu = 0
        p = a
        while p < e:
            if data[p] == 0:  # a stored zero reaches nothing
                p += 1
                continue
            idx = indices[p]
            r = idx // W_in
            c0 = idx - r * W_in
            c1 = c0
            p += 1
            while p < e and c1 + 1 < W_in and indices[p] == idx + (c1 - c0) + 1 and data[p] != 0:
                c1 += 1
                p += 1
            if nr == run_c0.size:
                run_c0 = _grow(run_c0, nr + 1)
                run_c1 = _grow(run_c1, nr + 1)
            run_c0[nr] = c0
            run_c1[nr] = c1
            if nu == 0 or rows_u[nu - 1] != r:
                if nu == rows_u.size:
                    rows_u = _grow(rows_u, nu + 1)
                    rows_s = _grow(rows_s, nu + 2)
                rows_u[nu] = r
                rows_s[nu] = nr
                nu += 1
            nr += 1
        if nr == 0:
            counts[b] = 0
            continue
        rows_s[nu] = nr
        total = 0
        ptr[:] = 0
        R_next = 0  # output rows are visited once each, in increasing order, so every ptr only moves on
        for k in range(nu):
            R0 = max(rows_u[k] + kmin - top, R_next, 0)
            R1 = min(rows_u[k] + kmax - top, H_out - 1)
            for R in range(R0, R1 + 1):
                m = 0
                for t in range(nk):
                    u = R + top - kr[t]
                    q = ptr[t]
                    while q < nu and rows_u[q] < u:
                        q += 1
                    ptr[t] = q
                    if q >= nu or rows_u[q] != u:
                        continue
                    for s in range(rows_s[q], rows_s[q + 1]):
                        lo = max(run_c0[s] + klo[t] - left, 0)
                        hi = min(run_c1[s] + khi[t] - left, W_out - 1)
                        if lo > hi:
                            continue
                        if m == tmp_lo.size:
                            tmp_lo = _grow(tmp_lo, m + 1)
                            tmp_hi = _grow(tmp_hi, m + 1)
                        tmp_lo[m] = lo
                        tmp_hi[m] = hi
                        m += 1
                if m:
                    total += _union_length(tmp_lo, tmp_hi, m)
            R_next = max(R_next, R1 + 1)
        counts[b] = total


def support_counts(x: scipy.sparse.csr_matrix, taps: np.ndarray, geo: Geometry) -> np.ndarray:
    """Output pixels each image's nonzeros reach, per image (int64, ``(n,)``).

    Parameters
    ----------
    x : scipy.sparse.csr_matrix
        Canonical CSR ``(n, H*W)`` images of ``geo.frame_shape``; stored
        zeros reach nothing.
    taps : numpy.ndarray
        ``(kH, kW)``; its nonzero entries are the kernel's taps.
    geo : Geometry

    Returns
    -------
    numpy.ndarray
        ``counts[i]`` pixels of output image ``i`` lie in the support of the
        result (an upper bound of its nnz).
    """
    n = int(x.shape[0])
    counts = np.zeros(n, dtype=np.int64)
    kr, klo, khi = kernel_row_intervals(taps)
    if n == 0 or x.nnz == 0 or kr.size == 0:
        return counts
    Ho, Wo = geo.out_shape
    indptr = np.asarray(x.indptr, dtype=np.int64)
    indices = np.asarray(x.indices, dtype=np.int64)
    _support_counts(indptr, indices, x.data, np.int64(geo.frame_shape[1]), kr, klo, khi, np.int64(geo.top),
                    np.int64(geo.left), np.int64(Ho), np.int64(Wo), counts)
    return counts
