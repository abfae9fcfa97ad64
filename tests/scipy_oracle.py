"""The one reference every value test compares against: ``scipy.signal.convolve2d``
applied per image, in float64. Helpers elsewhere only reshape its result."""

from __future__ import annotations

import numpy as np
import scipy.signal
import scipy.sparse


def convolve_stack(frames, kernel, mode: str = "same") -> np.ndarray:
    """``(n, H, W)`` frames -> ``(n, H_out, W_out)`` float64, one convolve2d per frame."""
    k = np.asarray(kernel, dtype=np.float64)
    frames = [np.asarray(f, dtype=np.float64) for f in frames]
    if not frames:  # no images: shape (0, 0, 0); callers reshape with the geometry's output size
        return np.zeros((0, 0, 0))
    return np.stack([scipy.signal.convolve2d(f, k, mode=mode) for f in frames])


def convolve_rows(x, frame_shape, kernel, mode: str = "same") -> np.ndarray:
    """A batch of flattened images ``(n, H*W)`` (dense or sparse) -> ``(n, H_out, W_out)`` float64."""
    H, W = frame_shape
    dense = x.toarray() if scipy.sparse.issparse(x) else np.asarray(x)
    return convolve_stack(dense.reshape(-1, H, W), kernel, mode)
