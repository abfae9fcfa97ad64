"""Named kernels and kernel files.

Every named kernel is a float64 2-D array normalised to sum 1, so that
convolving with it averages (blurs) rather than scales:

>>> from dask_sparseconv import kernels
>>> kernels.gaussian(1.0).shape
(7, 7)
>>> round(float(kernels.box(3).sum()), 12)
1.0

Bad parameters raise ``ValueError`` (or ``TypeError`` for the wrong type)
with a message naming the parameter, so the workflow loader and the command
line can pass the message straight to the user.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np

from .validation import check_kernel

__all__ = ["gaussian", "box", "disk", "load_kernel_file", "kernel_digest", "KERNEL_FILE_SUFFIXES"]

#: Suffixes :func:`load_kernel_file` understands.
KERNEL_FILE_SUFFIXES = (".npy", ".txt", ".csv", ".tsv")

#: Largest side a named kernel may have; a bigger one is almost surely a typo
#: (sigma given in pixels squared, say) and would make every engine slow.
MAX_KERNEL_SIDE = 1025


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _positive_real(value: Any, name: str) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a positive number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return value


def _side(value: Any, name: str, *, odd: bool = False) -> int:
    if not _is_real(value) or int(value) != value:
        raise TypeError(f"{name} must be a positive integer; got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value}")
    if value > MAX_KERNEL_SIDE:
        raise ValueError(f"{name} must be at most {MAX_KERNEL_SIDE}; got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd so that the kernel has a centre pixel; got {value}")
    return value


def _pair(value: Any, name: str, *, odd: bool = False) -> tuple[int, int]:
    """An int or a length-2 sequence of ints -> (h, w)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one integer or a pair [height, width]; got {list(value)!r}")
        return (_side(value[0], f"{name}[0]", odd=odd), _side(value[1], f"{name}[1]", odd=odd))
    s = _side(value, name, odd=odd)
    return (s, s)


def gaussian(sigma: float | tuple[float, float], size: int | tuple[int, int] | None = None) -> np.ndarray:
    """A 2-D Gaussian kernel normalised to sum 1.

    Parameters
    ----------
    sigma : float or (float, float)
        Standard deviation in pixels; a pair gives ``(sigma_y, sigma_x)``.
    size : int or (int, int), optional
        Odd side length(s). Default ``2 * ceil(3 * sigma) + 1`` per axis, which
        keeps more than 99.7 % of the mass.

    Returns
    -------
    ndarray, float64, shape ``(h, w)``
    """
    if isinstance(sigma, (list, tuple, np.ndarray)):
        if len(sigma) != 2:
            raise ValueError(f"sigma must be one number or a pair [sigma_y, sigma_x]; got {list(sigma)!r}")
        sy, sx = _positive_real(sigma[0], "sigma[0]"), _positive_real(sigma[1], "sigma[1]")
    else:
        sy = sx = _positive_real(sigma, "sigma")
    if size is None:
        h, w = 2 * math.ceil(3 * sy) + 1, 2 * math.ceil(3 * sx) + 1
        if max(h, w) > MAX_KERNEL_SIDE:
            raise ValueError(
                f"sigma={sigma!r} gives a kernel side of {max(h, w)} (> {MAX_KERNEL_SIDE}); use a smaller sigma or give size"
            )
    else:
        h, w = _pair(size, "size", odd=True)
    y = np.arange(h, dtype=np.float64) - (h - 1) / 2
    x = np.arange(w, dtype=np.float64) - (w - 1) / 2
    k = np.exp(-0.5 * (y[:, None] / sy) ** 2 - 0.5 * (x[None, :] / sx) ** 2)
    return k / k.sum()


def box(size: int | tuple[int, int]) -> np.ndarray:
    """A box (mean) filter of ``size`` (int or ``(h, w)``), normalised to sum 1."""
    h, w = _pair(size, "size")
    return np.full((h, w), 1.0 / (h * w), dtype=np.float64)


def disk(radius: float) -> np.ndarray:
    """A flat disk of ``radius`` pixels, normalised to sum 1.

    The kernel is ``2 * floor(radius) + 1`` pixels square; a pixel is inside
    when its centre lies within ``radius`` of the kernel centre.
    """
    r = _positive_real(radius, "radius")
    half = int(math.floor(r))
    if 2 * half + 1 > MAX_KERNEL_SIDE:
        raise ValueError(f"radius must give a kernel side of at most {MAX_KERNEL_SIDE}; got radius={radius!r}")
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    k = ((yy * yy + xx * xx) <= r * r + 1e-9).astype(np.float64)
    return k / k.sum()


def load_kernel_file(path: str | os.PathLike) -> np.ndarray:
    """Load a 2-D kernel from ``.npy`` (never unpickling) or text (``.txt``, ``.csv``, ``.tsv``).

    Text files hold one kernel row per line; ``.csv`` is comma separated,
    ``.txt`` whitespace separated, ``.tsv`` tab separated; lines starting
    with ``#`` are comments.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file cannot be read as a finite 2-D numeric array (a pickled
        object array included: it is refused, not loaded).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in KERNEL_FILE_SUFFIXES:
        raise ValueError(f"kernel file {str(p)!r}: unknown suffix {p.suffix!r}; use one of {', '.join(KERNEL_FILE_SUFFIXES)}")
    if not p.exists():
        raise FileNotFoundError(f"kernel file {str(p)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"kernel file {str(p)!r} is a directory, not a file")
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise ValueError(
                    f"kernel file {str(p)!r} holds a pickled object array, which is refused for safety; "
                    "save a plain numeric array with np.save(path, np.asarray(kernel, dtype=float))"
                ) from None
            raise ValueError(f"kernel file {str(p)!r} is not a readable .npy file: {exc}") from None
        except (OSError, EOFError) as exc:
            raise ValueError(f"kernel file {str(p)!r} is not a readable .npy file: {exc}") from None
        if not isinstance(arr, np.ndarray):  # np.load on an .npz returns NpzFile
            raise ValueError(f"kernel file {str(p)!r} is not a single-array .npy file")
    else:
        delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
        try:
            arr = np.loadtxt(p, delimiter=delimiter, dtype=np.float64, ndmin=2, comments="#")
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"kernel file {str(p)!r} is not a table of numbers: {exc}") from None
    try:
        return check_kernel(arr, name=f"kernel file {str(p)!r}")
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def kernel_digest(kernel: np.ndarray) -> str:
    """A content hash of a kernel (shape, dtype and bytes): the identity the
    convolver cache, device choices, graph keys and provenance all use."""
    k = np.ascontiguousarray(kernel)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((k.shape, k.dtype.str)).encode())
    h.update(k.tobytes())
    return h.hexdigest()
