"""Helpers shared by the engine tests: random CSR batches, the scipy
reference, and the engine contract's checks on a CSR result."""

from __future__ import annotations

import numpy as np
import scipy.signal
import scipy.sparse
from scipy_oracle import convolve_rows

from dask_sparseconv.engine.base import INT32_MAX
from dask_sparseconv.geometry import geometry


def random_csr(rng, n, H, W, density, dtype, *, explicit_zeros=False, idx64=False):
    """A canonical (n, H*W) CSR batch of normal values (optionally with stored zeros)."""
    dense = rng.standard_normal((n, H * W)).astype(dtype)
    keep = rng.random((n, H * W)) < density
    if explicit_zeros:
        zero = keep & (rng.random((n, H * W)) < 0.3)
        dense[zero] = 0
    rows, cols = np.nonzero(keep)
    x = scipy.sparse.csr_matrix((dense[rows, cols], (rows, cols)), shape=(n, H * W))
    x.sum_duplicates()
    if idx64:
        x.indices = x.indices.astype(np.int64)
        x.indptr = x.indptr.astype(np.int64)
    return x


def reference(x, frame_shape, kernel, mode):
    """scipy.signal.convolve2d per image, computed in float64: (n, H_out, W_out)."""
    geo = geometry(frame_shape, kernel.shape, mode)
    return convolve_rows(x, frame_shape, kernel, mode).reshape((x.shape[0],) + geo.out_shape)


def check_csr(y, n, out_pixels, dtype):
    """The engine contract's promises about a CSR result."""
    assert type(y) is scipy.sparse.csr_matrix
    assert y.shape == (n, out_pixels)
    assert y.data.dtype == np.dtype(dtype)
    want_idx = np.int32 if max(n, out_pixels, y.nnz) <= INT32_MAX else np.int64
    assert y.indices.dtype == want_idx and y.indptr.dtype == want_idx
    assert y.indptr[0] == 0 and y.indptr[-1] == y.nnz == y.data.size == y.indices.size
    assert np.all(np.diff(y.indptr) >= 0)
    # sorted, no duplicates, in range: strictly increasing within each row
    for i in range(n):
        row = y.indices[y.indptr[i] : y.indptr[i + 1]]
        assert np.all(np.diff(row) > 0)
        if row.size:
            assert 0 <= row[0] and row[-1] < out_pixels
    assert not np.any(y.data == 0), "explicit zeros stored"
