"""What a job computes besides the kernel and the mode: convolution or
correlation, and the boundary condition (:class:`Operation`).

Both reduce to what every engine already does, a zero-filled convolution in
one of the three modes, so every method and backend supports them:

* correlation is convolution with the kernel flipped on both axes; only the
  ``'same'`` window moves (``scipy.signal.correlate2d`` centres it at
  ``k // 2``, convolution at ``(k - 1) // 2``: they differ for even sizes);
* a boundary other than zero fill pads each image with ghost copies of its
  nonzeros (:mod:`dask_sparseconv.boundaries`) and convolves the padded frame
  in ``'valid'`` mode; a nonzero ``fillvalue`` adds one fixed frame.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .boundaries import BOUNDARIES, canonical_boundary
from .geometry import Geometry, geometry


@dataclass(frozen=True)
class Operation:
    """The operation applied with a kernel (hashable: part of cache keys and
    graph specs).

    Attributes
    ----------
    boundary : str
        ``'fill'``, ``'wrap'``, ``'symm'``, ``'mirror'`` or ``'nearest'``
        (aliases already resolved).
    fillvalue : float
        The constant of ``boundary='fill'``.
    correlate : bool
        Correlation (``scipy.signal.correlate2d``) instead of convolution.
    """

    boundary: str = "fill"
    fillvalue: float = 0.0
    correlate: bool = False

    @property
    def is_default(self) -> bool:
        """Zero-filled convolution: what the engines compute as they are."""
        return self.boundary == "fill" and self.fillvalue == 0 and not self.correlate

    def engine_kernel(self, kernel: np.ndarray) -> np.ndarray:
        """The kernel the engines convolve with (flipped for correlation)."""
        return np.ascontiguousarray(kernel[::-1, ::-1]) if self.correlate else kernel

    def window(self, frame_shape: tuple[int, int], kernel_shape: tuple[int, int], mode: str) -> Geometry:
        """The output window of ``mode``: that of convolution, with the
        ``'same'`` offsets of correlation when correlating."""
        geo = geometry(frame_shape, kernel_shape, mode)
        if self.correlate and mode == "same":
            kh, kw = geo.kernel_shape
            geo = Geometry(geo.frame_shape, geo.kernel_shape, mode, geo.out_shape, kh // 2, kw // 2)
        return geo

    def as_attrs(self) -> dict[str, Any]:
        """The provenance entries (recorded with every output; a resume compares them)."""
        return {"boundary": self.boundary, "fillvalue": self.fillvalue, "correlate": self.correlate}

    def describe(self) -> str:
        """A few words for the CLI: ``'correlation, boundary symm'``."""
        op = "correlation" if self.correlate else "convolution"
        if self.boundary == "fill":
            return f"{op}, zero fill" if self.fillvalue == 0 else f"{op}, fill {self.fillvalue:g}"
        return f"{op}, boundary {self.boundary}"


DEFAULT = Operation()


def check_operation(boundary: Any = "fill", fillvalue: Any = 0, correlate: Any = False,
                    names: tuple[str, str, str] = ("boundary", "fillvalue", "correlate")) -> Operation:
    """Validate the three keywords; ``names`` are what a message calls them
    (the workflow passes its keys).

    Raises
    ------
    TypeError, ValueError
        Naming the argument, the value and what is allowed. A nonzero
        ``fillvalue`` with another boundary than ``'fill'`` is refused
        (scipy ignores it silently; here it would be a setting without effect).
    """
    b_name, f_name, c_name = names
    if not isinstance(boundary, str):
        raise TypeError(f"{b_name} must be a string, one of {BOUNDARIES}; got {boundary!r} ({type(boundary).__name__})")
    if boundary not in BOUNDARIES:
        raise ValueError(f"{b_name} must be one of {BOUNDARIES}; got {boundary!r}")
    boundary = canonical_boundary(boundary)
    if isinstance(fillvalue, (bool, np.bool_)) or not isinstance(fillvalue, numbers.Real):
        raise TypeError(f"{f_name} must be a real number; got {fillvalue!r} ({type(fillvalue).__name__})")
    fill = float(fillvalue)
    if not math.isfinite(fill):
        raise ValueError(f"{f_name} must be finite; got {fillvalue!r}")
    if fill != 0 and boundary != "fill":
        raise ValueError(f"{f_name}={fillvalue!r} is only used with {b_name}='fill'; got {b_name}={boundary!r} "
                         f"(leave {f_name} at 0)")
    if not isinstance(correlate, (bool, np.bool_)):
        raise TypeError(f"{c_name} must be True or False; got {correlate!r}")
    return Operation(boundary, fill + 0.0, bool(correlate))  # + 0.0: -0.0 is 0
