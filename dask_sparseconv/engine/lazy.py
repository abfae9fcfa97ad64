"""The ``lazy`` method: COO broadcasting with no set-up cost.

Every stored input pixel is paired with every nonzero kernel tap; the
products are laid out as COO entries ``(image, output pixel, value)`` and
duplicates are summed. Nothing is built ahead of the first call, which makes
this method the cheapest for a convolver used once; its cost per call is
``O(nnz * taps)`` memory and an ``O(nnz * taps)`` sort-like reduction.

This module also holds the small numpy helpers the other non-direct engines
share (nonzero taps, canonical CSR assembly).

Numerical behaviour (all engines in this module family)
-------------------------------------------------------
* Only **nonzero kernel taps** contribute. A NaN or inf in an image therefore
  reaches exactly the output pixels that a nonzero tap maps it to (``inf``
  times a negative tap is ``-inf``, ``inf + -inf`` is NaN); ``scipy.signal.
  convolve2d`` would also spread it over the zero taps (``NaN * 0``).
* Stored zeros in the input contribute nothing; outputs that sum to exactly
  zero (including ``-0.0``) are dropped from CSR results.
* Arithmetic is in the engine's dtype: float32 input is summed in float32.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from .base import Engine, dense_out, empty_csr, index_dtype
from .threads import split_ranges

#: Products (nonzero x tap pairs) are materialised at most this many bytes at a time.
_BYTES_PER_PRODUCT = 56  # int64 row/col/target temporaries, value, mask, selections


def kernel_taps(kernel: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonzero taps of ``kernel`` in row-major order: ``(rows, cols, values)``.

    Rows/cols are int64, values of ``dtype``. Row-major order matters: for one
    input pixel, its valid targets then come out in increasing output index.
    """
    k = np.asarray(kernel, dtype=dtype)
    ti, tj = np.nonzero(k)
    return ti.astype(np.int64), tj.astype(np.int64), np.ascontiguousarray(k[ti, tj])


def image_of_entry(indptr: np.ndarray, n: int) -> np.ndarray:
    """Image (row) number of every stored entry of a CSR with ``indptr``."""
    counts = np.diff(np.asarray(indptr, dtype=np.int64))
    return np.repeat(np.arange(n, dtype=np.int64), counts)


def make_csr(indptr, indices, data, n_rows: int, n_cols: int, dtype) -> scipy.sparse.csr_matrix:
    """Wrap arrays that already are canonical (sorted, unique, no zeros) in a CSR.

    Index arrays are cast to the package's index dtype rule (int32 when
    ``max(n_rows, n_cols, nnz)`` fits) and the result is flagged canonical.
    """
    data = np.asarray(data, dtype=dtype)
    idx = index_dtype(n_rows, n_cols, data.shape[0])
    indptr = np.asarray(indptr, dtype=idx)
    indices = np.asarray(indices, dtype=idx)
    m = scipy.sparse.csr_matrix((n_rows, n_cols), dtype=dtype)
    # Assign directly: the csr_matrix constructor re-chooses index dtypes.
    m.data, m.indices, m.indptr = data, indices, indptr
    m.has_sorted_indices = True
    m.has_canonical_format = True
    return m


def counts_to_indptr(counts: np.ndarray) -> np.ndarray:
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def drop_zeros(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray):
    """Remove exact zeros from CSR arrays (returns new arrays only if needed)."""
    keep = data != 0  # NaN != 0 is True: NaN is kept
    if keep.all():
        return indptr, indices, data
    kept_before = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    return kept_before[np.asarray(indptr, dtype=np.int64)], indices[keep], data[keep]


def finish_csr(m: scipy.sparse.csr_matrix, dtype) -> scipy.sparse.csr_matrix:
    """Canonicalise a CSR produced by scipy: sorted, summed, zeros dropped, index rule."""
    if not m.has_canonical_format:
        m.sum_duplicates()
    indptr, indices, data = drop_zeros(m.indptr, m.indices, m.data)
    return make_csr(indptr, indices, data, m.shape[0], m.shape[1], dtype)


class LazyNumpy(Engine):
    """COO broadcasting on numpy: every nonzero times every nonzero tap.

    No initialisation cost. Work is cut into image ranges whose products fit
    in ``max_buffer_bytes``; an image with more products than that is cut
    into runs of its entries whose partial results are added.

    NaN/inf in images propagate only through nonzero kernel taps (see the
    module docstring); float32 in gives float32 out, summed in float32.
    """

    method = "lazy"
    backend = "numpy"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ti, self._tj, self._tv = kernel_taps(self.kernel, self.dtype)

    # -- products --------------------------------------------------------
    def _products(self, geo, img, pix, vals):
        """Targets of (image, pixel, value) entries: (image, output pixel, value)."""
        W = self.frame_shape[1]
        Ho, Wo = geo.out_shape
        pix = pix.astype(np.int64, copy=False)
        r = pix // W
        c = pix - r * W
        orow = r[:, None] + (self._ti - geo.top)[None, :]
        ocol = c[:, None] + (self._tj - geo.left)[None, :]
        ok = (orow >= 0) & (orow < Ho) & (ocol >= 0) & (ocol < Wo)
        prod = vals.astype(self.dtype, copy=False)[:, None] * self._tv[None, :]
        q = orow * Wo + ocol
        img2 = np.broadcast_to(img[:, None], ok.shape)
        return img2[ok], q[ok], prod[ok]

    def _chunk_entries(self) -> int:
        n_taps = max(1, len(self._tv))
        return max(1, self.max_buffer_bytes // (_BYTES_PER_PRODUCT * n_taps))

    def _entry_chunks(self, indptr: np.ndarray, n: int):
        """Yield (image start, image stop, entry start, entry stop) pieces in order."""
        per = self._chunk_entries()
        weights = np.asarray(indptr, dtype=np.int64)
        total = int(weights[-1]) if n else 0
        n_pieces = max(1, -(-total // per))
        for a, b in split_ranges(weights, n, n_pieces):
            s, e = int(weights[a]), int(weights[b])
            if e - s <= per or b - a > 1:
                yield a, b, s, e
            else:  # one image with more products than the budget
                for s2 in range(s, e, per):
                    yield a, b, s2, min(e, s2 + per)

    # -- contract --------------------------------------------------------
    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return empty_csr(n, n_out, self.dtype)
        pieces = []  # (image start, image stop, canonical csr of rows a..b) in order
        img_all = image_of_entry(x.indptr, n)
        for a, b, s, e in self._entry_chunks(x.indptr, n):
            ri, q, v = self._products(geo, img_all[s:e] - a, x.indices[s:e], x.data[s:e])
            m = scipy.sparse.coo_matrix((v, (ri, q)), shape=(b - a, n_out)).tocsr()
            m.sum_duplicates()
            if pieces and pieces[-1][0] == a and pieces[-1][1] == b:
                prev = pieces.pop()[2]
                m = prev + m  # scipy adds canonical CSRs into canonical CSR
                m.sum_duplicates()
            pieces.append((a, b, m))
        parts = [p[2] for p in pieces]
        m = parts[0] if len(parts) == 1 else scipy.sparse.vstack(parts, format="csr")
        # images with no entries are covered: split_ranges pieces tile 0..n
        return finish_csr(scipy.sparse.csr_matrix(m), self.dtype)

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        geo = self.geometry(mode)
        n, n_out = x.shape[0], geo.out_pixels
        res = dense_out(n, geo, self.dtype, out)
        if n == 0 or x.nnz == 0 or len(self._tv) == 0:
            return res
        flat = res.reshape(-1)
        img_all = image_of_entry(x.indptr, n)
        for _a, _b, s, e in self._entry_chunks(x.indptr, n):
            ri, q, v = self._products(geo, img_all[s:e], x.indices[s:e], x.data[s:e])
            np.add.at(flat, ri * n_out + q, v)
        return res
