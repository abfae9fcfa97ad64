"""Output pixels reached per image, from the supports alone: no values computed.

:func:`support_counts` gives, for each image, the number of output pixels
that its nonzero pixels reach through the kernel's nonzero taps: an upper
bound of its output nnz (engines drop values that cancel to exactly zero).
The planner uses it on a sample of images to size CSR outputs.

A nonzero pixel ``(r, c)`` dilated by the taps ``[j0, j1]`` of kernel row
``i`` is the interval ``[c + j0, c + j1]`` of output row ``r + i`` (before
the mode's crop). Each output row's count is the length of the union of its
intervals: memory in nonzeros x kernel-row intervals, not in pixels (a
boolean map of the output frames is 900 MB for one 30000 x 30000 image).
The unions are taken with numpy (one sort, one running maximum), not
compiled code: the planner runs this on the client, where loading the
first compiled function costs ~0.3 s (numba's start-up) against ~4 ms for
the largest sample the planner takes (2**16 intervals; a compiled loop over
runs took the same). It is no shortcut for the nnz of a whole stack.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from ..geometry import Geometry

#: intervals held at once (nonzeros x kernel-row intervals; ~80 bytes each
#: in the arrays of one piece): larger inputs go a few images at a time
_MAX_INTERVALS = 1 << 20


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
    indptr = np.asarray(x.indptr, dtype=np.int64)
    per = max(1, _MAX_INTERVALS // kr.size)  # nonzeros per piece
    a = 0
    while a < n:  # pieces of whole images
        b = max(a + 1, int(np.searchsorted(indptr, indptr[a] + per, side="right")) - 1)
        b = min(b, n)
        lo, hi = int(indptr[a]), int(indptr[b])
        _count_piece(np.asarray(x.indices[lo:hi], dtype=np.int64), np.asarray(x.data[lo:hi]),
                     indptr[a:b + 1] - lo, kr, klo, khi, geo, counts[a:b])
        a = b
    return counts


def _count_piece(indices, data, indptr, kr, klo, khi, geo: Geometry, counts: np.ndarray) -> None:
    Ho, Wo = (int(v) for v in geo.out_shape)
    keep = data != 0  # a stored zero reaches nothing
    image = np.repeat(np.arange(counts.size, dtype=np.int64), np.diff(indptr))[keep]
    r, c = np.divmod(indices[keep], int(geo.frame_shape[1]))
    R = (r[:, None] + kr[None, :] - int(geo.top)).ravel()
    lo = np.maximum(c[:, None] + klo[None, :] - int(geo.left), 0).ravel()
    hi = np.minimum(c[:, None] + khi[None, :] - int(geo.left), Wo - 1).ravel()
    image = np.repeat(image, kr.size)
    ok = (R >= 0) & (R < Ho) & (lo <= hi)
    if not ok.any():
        return
    R, lo, hi, image = R[ok], lo[ok], hi[ok], image[ok]
    # every (image, output row) on one line, two pixels apart, so that one
    # sort and one running maximum take all the unions at once
    base = (image * Ho + R) * (Wo + 2)
    order = np.argsort(lo + base, kind="stable")
    lo, hi, image = lo[order] + base[order], hi[order] + base[order], image[order]
    reach = np.maximum.accumulate(hi)
    covered = np.concatenate(([np.iinfo(np.int64).min], reach[:-1]))
    np.add.at(counts, image, np.maximum(hi - np.maximum(lo, covered + 1) + 1, 0))
