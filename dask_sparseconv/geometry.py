"""Output geometry of 2D convolution modes, with ``scipy.signal.convolve2d`` semantics.

Every engine works in the coordinates defined here: an input pixel ``(r, c)``
and a kernel tap ``(i, j)`` contribute to full-convolution pixel
``(r + i, c + j)``, which lands on output pixel ``(r + i - top, c + j - left)``
when that lies inside ``out_shape``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is not imported with the package: `import dask_sparseconv` stays cheap
    import numpy as np


MODES = ("full", "same", "valid")


@dataclass(frozen=True)
class Geometry:
    """Shapes and offsets of one (frame shape, kernel shape, mode) combination.

    Attributes
    ----------
    frame_shape : tuple of int
        Input image shape ``(H, W)``.
    kernel_shape : tuple of int
        Kernel shape ``(kH, kW)``.
    mode : str
        ``'full'``, ``'same'`` or ``'valid'``.
    out_shape : tuple of int
        Output image shape ``(H_out, W_out)``.
    top, left : int
        Offset of the output window inside the full convolution.
    """

    frame_shape: tuple[int, int]
    kernel_shape: tuple[int, int]
    mode: str
    out_shape: tuple[int, int]
    top: int
    left: int

    @property
    def in_pixels(self) -> int:
        return self.frame_shape[0] * self.frame_shape[1]

    @property
    def out_pixels(self) -> int:
        return self.out_shape[0] * self.out_shape[1]


def geometry(frame_shape: tuple[int, int], kernel_shape: tuple[int, int], mode: str) -> Geometry:
    """Compute the output shape and offsets for ``mode``.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)`` of the input images.
    kernel_shape : tuple of int
        ``(kH, kW)`` of the kernel.
    mode : {'full', 'same', 'valid'}
        As in ``scipy.signal.convolve2d``.

    Returns
    -------
    Geometry

    Raises
    ------
    ValueError
        If ``mode`` is unknown, or ``mode='valid'`` and the kernel is larger
        than the frame in either dimension.
    """
    try:
        return _known(frame_shape, kernel_shape, mode)
    except TypeError:  # unhashable shapes (lists): computed, not kept
        return _geometry(frame_shape, kernel_shape, mode)


def _geometry(frame_shape, kernel_shape, mode: str) -> Geometry:
    H, W = int(frame_shape[0]), int(frame_shape[1])
    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    if mode == "full":
        out, top, left = (H + kh - 1, W + kw - 1), 0, 0
    elif mode == "same":
        # scipy centres the window so that the extra row/column of an even
        # kernel falls at the start: offset (k - 1) // 2.
        out, top, left = (H, W), (kh - 1) // 2, (kw - 1) // 2
    elif mode == "valid":
        if H < kh or W < kw:
            raise ValueError(
                "x must be larger than k in both dimensions for mode='valid': "
                f"frame_shape={(H, W)}, kernel shape={(kh, kw)}"
            )
        out, top, left = (H - kh + 1, W - kw + 1), kh - 1, kw - 1
    else:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return Geometry((H, W), (kh, kw), mode, out, top, left)


# Geometries are immutable and few: each construction of a convolver asks
# for one, and after an idle spell building the dataclass cost ~25 us of a
# ~200 us construction (docs/benchmarks.md, issue #15). Errors are not kept.
_known = functools.lru_cache(maxsize=1024)(_geometry)


def output_support(x, taps: np.ndarray, geo: Geometry) -> int:
    """The number of output pixels that the nonzeros of images ``x`` reach, summed over the images.

    An upper bound of their output nonzeros (values that cancel to zero are
    dropped by the engines, so there can only be fewer), exact for the
    support; stored zeros reach nothing. Counted from runs of adjacent
    pixels (:func:`dask_sparseconv.engine.support.support_counts`), so its
    memory follows the nonzeros, not the frame size.

    Parameters
    ----------
    x : scipy.sparse.csr_matrix
        Canonical CSR ``(n, H*W)`` images of ``geo.frame_shape``.
    taps : numpy.ndarray
        ``(kH, kW)`` array; its nonzero entries are the kernel's taps.
    geo : Geometry

    Returns
    -------
    int
    """
    from .engine.support import support_counts  # numba: imported when first needed

    return int(support_counts(x, taps, geo).sum())
