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


#: Boundaries scipy.signal has itself, and the numpy.pad mode that pads like
#: each of the others (for the references below).
SIGNAL_BOUNDARIES = ("fill", "wrap", "symm")
PAD_MODES = {"wrap": "wrap", "symm": "symmetric", "mirror": "reflect", "nearest": "edge"}


def operate_stack(frames, kernel, mode: str = "same", boundary: str = "fill", fillvalue: float = 0.0,
                  correlate: bool = False) -> np.ndarray:
    """``scipy.signal.convolve2d`` (``correlate2d`` with ``correlate``) per
    frame with ``boundary`` and ``fillvalue``, in float64.

    ``'mirror'`` and ``'nearest'`` (scipy.ndimage's) are not scipy.signal
    boundaries: their frames are padded by ``numpy.pad`` as wide as ``mode``
    reads, then convolved by scipy in ``'valid'`` mode (for ``'wrap'`` and
    ``'symm'`` that construction equals scipy.signal's own result; the tests
    check it does)."""
    k = np.asarray(kernel, dtype=np.float64)
    frames = [np.asarray(f, dtype=np.float64) for f in frames]
    if not frames:
        return np.zeros((0, 0, 0))
    func = scipy.signal.correlate2d if correlate else scipy.signal.convolve2d
    if boundary in SIGNAL_BOUNDARIES or mode == "valid":
        return np.stack([func(f, k, mode=mode, boundary="fill" if mode == "valid" else boundary,
                              fillvalue=fillvalue) for f in frames])
    return np.stack([padded_reference(f, k, mode, PAD_MODES[boundary], correlate) for f in frames])


def padded_reference(frame, kernel, mode: str, pad_mode: str, correlate: bool = False) -> np.ndarray:
    """One frame padded by ``numpy.pad(mode=pad_mode)`` exactly as far as the
    output window of ``mode`` reads, convolved in ``'valid'`` mode by scipy."""
    H, W = frame.shape
    kh, kw = kernel.shape
    if mode == "full":
        top, left, Ho, Wo = 0, 0, H + kh - 1, W + kw - 1
    else:  # same: correlate2d centres its window at k // 2, convolve2d at (k - 1) // 2
        top, left = (kh // 2, kw // 2) if correlate else ((kh - 1) // 2, (kw - 1) // 2)
        Ho, Wo = H, W
    pads = ((kh - 1 - top, top + Ho - H), (kw - 1 - left, left + Wo - W))
    k = kernel[::-1, ::-1] if correlate else kernel
    return scipy.signal.convolve2d(np.pad(frame, pads, mode=pad_mode), k, mode="valid")
