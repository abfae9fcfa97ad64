"""Boundary conditions, computed from the nonzeros only.

``scipy.signal.convolve2d`` pads its input before convolving: with a constant
(``boundary='fill'``, ``fillvalue``), periodically (``'wrap'``) or by
reflection (``'symm'``). Here no padded frame is ever made. Every boundary
but ``'fill'`` is a *fold*: a map from a pixel of the padded frame back to
the input pixel it copies. A nonzero near an edge therefore has a few ghost
copies in the padding (interior nonzeros have none), and the convolution of
the padded frame in ``'valid'`` mode is the requested output window:

* :class:`Extension` lists each input row's and column's copies once per
  convolver and turns a CSR batch into a CSR batch on the padded frame,
  ghosts included, for any engine to convolve in ``'valid'`` mode;
* :func:`fill_frame` is the exact contribution of a nonzero ``fillvalue``:
  the same frame for every image (zero in the interior), added to each
  image's sparse result.

Folds are registered in :data:`FOLDS` by name; :data:`ALIASES` maps the
``scipy.ndimage`` names that mean the same thing.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np
import scipy.sparse

from .engine.base import canonical_csr, index_dtype
from .geometry import Geometry


def _wrap(u: np.ndarray, n: int) -> np.ndarray:
    """Periodic: ``... c d | a b c d | a b ...``."""
    return np.mod(u, n)


def _symm(u: np.ndarray, n: int) -> np.ndarray:
    """Reflection about the edge, edge pixel repeated: ``... b a | a b c d | d c ...``."""
    v = np.mod(u, 2 * n)
    return np.where(v < n, v, 2 * n - 1 - v)


def _mirror(u: np.ndarray, n: int) -> np.ndarray:
    """Reflection about the edge pixel's centre: ``... c b | a b c d | c b ...``."""
    if n == 1:
        return np.zeros_like(u)
    v = np.mod(u, 2 * n - 2)
    return np.where(v < n, v, 2 * n - 2 - v)


def _nearest(u: np.ndarray, n: int) -> np.ndarray:
    """The edge pixel repeated: ``... a a | a b c d | d d ...``."""
    return np.clip(u, 0, n - 1)


#: Boundary name -> fold ``(padded coordinates, size) -> input coordinates``;
#: ``None`` for ``'fill'``, whose padding is a constant and copies nothing.
FOLDS: dict[str, Callable[[np.ndarray, int], np.ndarray] | None] = {
    "fill": None,
    "wrap": _wrap,
    "symm": _symm,
    "mirror": _mirror,
    "nearest": _nearest,
}

#: ``scipy.ndimage`` names accepted for the boundary of the same meaning.
ALIASES: dict[str, str] = {"constant": "fill", "reflect": "symm", "grid-wrap": "wrap"}

BOUNDARIES: tuple[str, ...] = tuple(FOLDS) + tuple(ALIASES)


def canonical_boundary(name: str) -> str:
    """The registered name of a boundary or of its ``scipy.ndimage`` alias."""
    return ALIASES.get(name, name)


def pads(geo: Geometry) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding of the input that output window
    ``geo`` reads: full-convolution rows ``geo.top .. geo.top + H_out - 1``
    read input rows ``geo.top - kH + 1 .. geo.top + H_out - 1``."""
    H, W = geo.frame_shape
    kh, kw = geo.kernel_shape
    Ho, Wo = geo.out_shape
    return (kh - 1 - geo.top, geo.top + Ho - H, kw - 1 - geo.left, geo.left + Wo - W)


def _copies(n: int, before: int, after: int, fold) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` input coordinates, its coordinates in the padded axis
    (``before + n + after`` long), as CSR-style ``(starts, positions)``
    sorted within each input coordinate."""
    padded = np.arange(n + before + after, dtype=np.int64)
    if fold is None:  # constant padding: the input coordinate itself, shifted
        src = padded - before
        keep = (src >= 0) & (src < n)
        padded, src = padded[keep], src[keep]
    else:
        src = fold(padded - before, n)
    order = np.argsort(src, kind="stable")
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=starts[1:])
    return starts, padded[order]


def _sources(n: int, before: int, after: int, fold) -> np.ndarray:
    """The input coordinate each padded coordinate copies (-1: the constant)."""
    u = np.arange(-before, n + after, dtype=np.int64)
    if fold is None:
        return np.where((u >= 0) & (u < n), u, -1)
    return fold(u, n).astype(np.int64)


class Extension:
    """A CSR batch's images padded by a boundary, with ghost copies of the
    nonzeros that the padding repeats.

    Parameters
    ----------
    geo : Geometry
        The output window (of the kernel the engine applies).
    boundary : str
        A key of :data:`FOLDS`. ``'fill'`` shifts the images into the padded
        frame and copies nothing (used for windows that no mode of the
        engines gives, such as ``correlate2d``'s ``'same'`` for even kernels).

    Attributes
    ----------
    frame_shape : tuple of int
        The padded frame; its ``'valid'`` convolution is ``geo``'s window.
    """

    def __init__(self, geo: Geometry, boundary: str):
        H, W = geo.frame_shape
        self.pads = pads(geo)
        pt, pb, pl, pr = self.pads
        self.frame_shape = (H + pt + pb, W + pl + pr)
        fold = FOLDS[boundary]
        self._rows = _copies(H, pt, pb, fold)
        self._cols = _copies(W, pl, pr, fold)
        self._row_src = _sources(H, pt, pb, fold)
        self._col_src = _sources(W, pl, pr, fold)
        self._n_in = (H, W)

    def __call__(self, x: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
        """``x`` (canonical CSR ``(n, H*W)``) on the padded frame, canonical."""
        H, W = self._n_in
        He, We = self.frame_shape
        rstart, _ = self._rows
        cstart, _ = self._cols
        # two compiled passes over the nonzeros (numpy's version, with its
        # temporaries, cost 0.6x a 7x7 convolution of the ROI stack: docs/operations.md)
        counts, ghosts = _copy_counts(x.indptr, x.indices, W, rstart, cstart)
        indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        idt = index_dtype(x.shape[0], He * We, int(indptr[-1]))
        indices = np.empty(int(indptr[-1]), dtype=idt)
        data = np.empty(int(indptr[-1]), dtype=x.data.dtype)
        _place_copies(x.indptr, x.indices, x.data, H, W, We, self.pads[0], self.pads[2], self._row_src,
                      self._col_src, ghosts, indptr, indices, data)
        return canonical_csr(data, indices, indptr.astype(idt, copy=False), (x.shape[0], He * We))


@numba.njit(nogil=True, cache=True)
def _copy_counts(indptr, indices, W, rstart, cstart):
    """Copies (the nonzero and its ghosts) per image, and whether an image has ghosts."""
    n = indptr.size - 1
    counts = np.zeros(n, dtype=np.int64)
    ghosts = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        s = 0
        r = 0
        row0 = 0  # r * W: indices are sorted, so rows are found by stepping, not dividing
        for p in range(indptr[i], indptr[i + 1]):
            while indices[p] >= row0 + W:
                r += 1
                row0 += W
            m = (rstart[r + 1] - rstart[r]) * (cstart[indices[p] - row0 + 1] - cstart[indices[p] - row0])
            s += m
            if m != 1:
                ghosts[i] = True
        counts[i] = s
    return counts, ghosts


@numba.njit(nogil=True, cache=True)
def _place_copies(indptr, indices, data, H, W, We, top, left, row_src, col_src, ghosts, out_indptr, out_idx, out_val):
    """Write every copy at its padded position, in order.

    An image without ghosts is its nonzeros shifted (the order is kept). One
    with ghosts is written padded row by padded row: each reads its source
    row's nonzeros (a contiguous run of the sorted indices), preceded and
    followed by the padding columns' sources, found by binary search in that
    run; so the result comes out sorted, with no sort."""
    n = indptr.size - 1
    rowptr = np.empty(H + 1, dtype=np.int64)
    He = row_src.size
    shift = top * We + left
    for i in range(n):
        q = out_indptr[i]
        a0, a1 = indptr[i], indptr[i + 1]
        if not ghosts[i]:
            r = 0
            row0 = 0
            for p in range(a0, a1):
                while indices[p] >= row0 + W:
                    r += 1
                    row0 += W
                out_idx[q] = indices[p] + r * (We - W) + shift  # (r + top) * We + (c + left)
                out_val[q] = data[p]
                q += 1
            continue
        p = a0
        for r in range(H):
            rowptr[r] = p
            while p < a1 and indices[p] < (r + 1) * W:
                p += 1
        rowptr[H] = a1
        for er in range(He):
            r = row_src[er]
            if r < 0:
                continue
            a, b = rowptr[r], rowptr[r + 1]
            if a == b:
                continue
            row0 = r * W
            base = er * We
            for ec in range(left):  # left padding
                q = _copy_one(indices, data, a, b, row0 + col_src[ec], col_src[ec] >= 0, base + ec, out_idx,
                              out_val, q)
            for t in range(a, b):  # the row itself
                out_idx[q] = base + indices[t] - row0 + left
                out_val[q] = data[t]
                q += 1
            for ec in range(left + W, We):  # right padding
                q = _copy_one(indices, data, a, b, row0 + col_src[ec], col_src[ec] >= 0, base + ec, out_idx,
                              out_val, q)


@numba.njit(nogil=True, inline="always")
def _copy_one(indices, data, a, b, want, valid, dest, out_idx, out_val, q):
    """Copy the nonzero at index ``want`` of the sorted run ``a:b`` (if it
    is one) to ``dest``; returns the next output position."""
    if not valid:
        return q
    t = np.searchsorted(indices[a:b], want) + a
    if t < b and indices[t] == want:
        out_idx[q] = dest
        out_val[q] = data[t]
        q += 1
    return q


def fill_frame(kernel: np.ndarray, geo: Geometry, fillvalue: float, dtype) -> scipy.sparse.csr_matrix:
    """What a constant padding of ``fillvalue`` adds to every output image.

    Output pixel ``(p, q)`` gains ``fillvalue`` times the sum of the taps
    that fall outside the frame there. The taps inside form one rectangle
    per pixel, and rows and columns have at most ``2 k - 1`` distinct
    rectangles each, so the sums are taken once per distinct pair, directly
    over the outside taps (no differences of prefix sums: taps that are zero
    give exactly zero, and interior pixels are exactly zero).

    Returns
    -------
    scipy.sparse.csr_matrix
        One row ``(1, H_out*W_out)`` of ``dtype``, canonical, zeros dropped.
    """
    H, W = geo.frame_shape
    kh, kw = kernel.shape
    Ho, Wo = geo.out_shape
    k = np.asarray(kernel, dtype=np.float64)

    def ranges(n_out: int, offset: int, n_in: int, kn: int):
        full = np.arange(n_out, dtype=np.int64) + offset  # full-convolution coordinate
        lo = np.clip(full - n_in + 1, 0, kn)
        hi = np.clip(full + 1, 0, kn)
        hi = np.maximum(hi, lo)
        pairs, ids = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
        return pairs, ids.reshape(-1), (lo == 0) & (hi == kn)

    rpairs, rid, rfull = ranges(Ho, geo.top, H, kh)
    cpairs, cid, cfull = ranges(Wo, geo.left, W, kw)
    table = np.empty((len(rpairs), len(cpairs)), dtype=np.float64)
    for a, (ilo, ihi) in enumerate(rpairs):
        for b, (jlo, jhi) in enumerate(cpairs):
            outside = np.ones(k.shape, dtype=bool)
            outside[ilo:ihi, jlo:jhi] = False
            table[a, b] = fillvalue * k[outside].sum()
    # pixels near an edge: every column of rows that miss kernel rows, and the
    # columns that miss kernel columns in the other rows
    edge_rows = np.flatnonzero(~rfull)
    edge_cols = np.flatnonzero(~cfull)
    inner_rows = np.flatnonzero(rfull)
    rows = np.concatenate([np.repeat(edge_rows, Wo), np.repeat(inner_rows, len(edge_cols))])
    cols = np.concatenate([np.tile(np.arange(Wo, dtype=np.int64), len(edge_rows)), np.tile(edge_cols, len(inner_rows))])
    vals = table[rid[rows], cid[cols]].astype(dtype)
    flat = rows * Wo + cols
    keep = vals != 0
    flat, vals = flat[keep], vals[keep]
    order = np.argsort(flat, kind="stable")
    idt = index_dtype(1, Ho * Wo, flat.size)
    return canonical_csr(vals[order], flat[order].astype(idt), np.array([0, flat.size], dtype=idt), (1, Ho * Wo))


def add_frame(res: scipy.sparse.csr_matrix, frame: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """``frame`` (one CSR row) added to every row of ``res``: canonical, with
    sums that cancel to zero dropped (one compiled merge per row; scipy's sum
    of ``res`` and a tiled frame took 2.5x as long on the ROI stack)."""
    n = res.shape[0]
    if frame.nnz == 0 or n == 0:
        return res
    fidx = frame.indices.astype(res.indices.dtype, copy=False)
    fval = frame.data.astype(res.data.dtype, copy=False)
    counts = _merge(res.indptr, res.indices, res.data, fidx, fval, None, None, None)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    idt = index_dtype(n, res.shape[1], int(indptr[-1]))
    indices = np.empty(int(indptr[-1]), dtype=idt)
    data = np.empty(int(indptr[-1]), dtype=res.data.dtype)
    _merge(res.indptr, res.indices, res.data, fidx, fval, indptr, indices, data)
    return canonical_csr(data, indices, indptr.astype(idt, copy=False), res.shape)


@numba.njit(nogil=True, cache=True)
def _merge(indptr, indices, data, fidx, fval, out_indptr, out_idx, out_val):
    """Merge each row with the frame's sorted entries. Without output arrays
    (``None``), count each row's entries; with them, write them."""
    n = indptr.size - 1
    counts = np.zeros(n, dtype=np.int64)
    m = fidx.size
    for i in range(n):
        p, e = indptr[i], indptr[i + 1]
        f = 0
        q = 0 if out_indptr is None else out_indptr[i]
        k = 0
        while p < e or f < m:
            if f >= m or (p < e and indices[p] < fidx[f]):
                j, v = indices[p], data[p]
                p += 1
            elif p >= e or fidx[f] < indices[p]:
                j, v = fidx[f], fval[f]
                f += 1
            else:
                j, v = indices[p], data[p] + fval[f]
                p += 1
                f += 1
            if v != 0:
                if out_idx is not None:
                    out_idx[q + k] = j
                    out_val[q + k] = v
                k += 1
        counts[i] = k
    return counts
