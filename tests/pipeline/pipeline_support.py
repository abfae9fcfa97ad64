"""Helpers of the pipeline tests: sample stacks and the scipy reference."""

from __future__ import annotations

import numpy as np
import scipy.signal
import scipy.sparse
from scipy_oracle import convolve_stack


def sparse_stack(n, H, W, density=0.03, seed=0, dtype=np.float32):
    """A dense ``(n, H, W)`` stack with about ``density`` nonzeros, some empty frames."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, H, W)) < density, rng.standard_normal((n, H, W)), 0).astype(dtype)
    if n > 3:
        x[rng.choice(n, size=max(1, n // 5), replace=False)] = 0  # empty frames
    return x


def reference(x, kernel, mode):
    """Per-frame ``scipy.signal.convolve2d`` in float64: ``(n, H_out, W_out)``."""
    return convolve_stack(x, kernel, mode)


def assert_matches(result, ref, rtol=1e-5, atol=1e-5):
    """Compare a dense stack or a CSR ``(n, Ho*Wo)`` result with the reference."""
    if scipy.sparse.issparse(result):
        assert result.shape == (ref.shape[0], ref.shape[1] * ref.shape[2])
        result = result.toarray().reshape(ref.shape)
    else:
        result = np.asarray(result)
        assert result.shape == ref.shape
    np.testing.assert_allclose(result, ref, rtol=rtol, atol=atol)


KERNEL = np.array([[0.0, 1.0, 0.5], [2.0, -1.0, 0.25], [0.5, 0.0, 1.5]])
EVEN_KERNEL = np.arange(1, 13, dtype=np.float64).reshape(3, 4) / 10.0  # even width: exercises 'same' offsets
