"""Argument checks shared by every user-facing entry point.

Each check raises ``ValueError`` or ``TypeError`` with a message that names
the argument, the value given, and what is allowed, so the API, the workflow
loader and the CLI all report bad input the same way.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Iterable, Literal, overload

import numpy as np

from .engine import REGISTRY
from .geometry import MODES

#: Methods and backends, in the order the engine registry lists them.
METHODS = tuple(dict.fromkeys(m for m, _ in REGISTRY))
BACKENDS = ("numpy", "numba", "torch")

#: Which backends implement which method (read from :data:`dask_sparseconv.engine.REGISTRY`).
VALID_BACKENDS: dict[str, tuple[str, ...]] = {
    m: tuple(b for b in BACKENDS if (m, b) in REGISTRY) for m in METHODS
}

TORCH_INSTALL_HINT = "install the CPU build with `pip install torch==2.13.0` or a CUDA build"

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed`` strings, else raise."""
    allowed = tuple(allowed)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {allowed}; got {_short(value)} ({type(value).__name__})")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def check_mode(mode: Any, name: str = "mode") -> str:
    """Validate a convolution mode."""
    return check_choice(name, mode, MODES)


def check_frame_shape(frame_shape: Any, name: str = "frame_shape") -> tuple[int, int]:
    """Validate ``(H, W)``: two positive integers."""
    if type(frame_shape) is tuple and len(frame_shape) == 2:  # the common case, checked cheaply
        H, W = frame_shape
        if type(H) is int and type(W) is int and H >= 1 and W >= 1:
            return frame_shape
    if isinstance(frame_shape, (str, bytes)) or not hasattr(frame_shape, "__len__"):
        raise TypeError(f"{name} must be a pair of positive integers (H, W); got {_short(frame_shape)}")
    if len(frame_shape) != 2:
        raise ValueError(f"{name} must have exactly 2 entries (H, W); got {_short(frame_shape)}")
    out = []
    for v in frame_shape:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, numbers.Real)):
            raise TypeError(f"{name} must be a pair of positive integers (H, W); got {_short(frame_shape)}")
        if not float(v).is_integer() or float(v) < 1:
            raise ValueError(f"{name} must be a pair of positive integers (H, W); got {_short(frame_shape)}")
        out.append(int(float(v)))
    return (out[0], out[1])


_compiled_finite = None


def _all_finite(arr: np.ndarray, compiled: bool) -> bool:
    """Whether the 2-D array ``arr`` holds only finite values.

    ``compiled``: by the loop of :mod:`dask_sparseconv.finite` (float32 and
    float64), for callers about to run numba's compiled engines anyway; a
    process's first compiled function costs it ~0.3 s of numba's start-up,
    which checks made elsewhere (a job's planning on the client) must not
    pay. Otherwise numpy's isfinite and a reduce (not ``.all()``, which goes
    through a Python wrapper).
    """
    global _compiled_finite
    # native float32/float64 only: numba refuses other byte orders (a kernel read from a FITS file)
    if compiled and arr.dtype.char in "fd" and arr.dtype.isnative:
        if _compiled_finite is None:  # imported once: an import statement per check is measurable here
            from .finite import all_finite

            _compiled_finite = all_finite
        return bool(_compiled_finite(arr))
    return bool(np.logical_and.reduce(np.isfinite(arr), axis=None))


def check_kernel(kernel: Any, name: str = "kernel", *, compiled: bool = False) -> np.ndarray:
    """Validate a kernel: a non-empty, finite, real 2-D array. Returns a copy.

    ``compiled=True`` checks finiteness with a compiled loop: for callers
    that run numba's engines next (see :func:`_all_finite`)."""
    if type(kernel) is np.ndarray:
        arr = kernel.copy()
    else:
        if hasattr(kernel, "detach") and hasattr(kernel, "cpu"):  # a torch tensor
            kernel = kernel.detach().cpu().numpy()
        if isinstance(kernel, (str, bytes)) or kernel is None:
            raise TypeError(f"{name} must be a 2-D array of numbers; got {_short(kernel)}")
        try:
            arr = np.array(kernel, copy=True)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be a 2-D array of numbers; got {_short(kernel)} ({exc})") from None
    # dtype kinds: b bool, i/u integers, f floats; c complex, O objects, U/S strings, M/m times
    kind = arr.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} must be real; got complex dtype {arr.dtype}")
    if kind not in "biuf":
        raise TypeError(f"{name} must be a 2-D array of real numbers; got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty; got shape {arr.shape}")
    if kind == "f" and not _all_finite(arr, compiled):
        raise ValueError(f"{name} must hold only finite values; got NaN or inf in a kernel of shape {arr.shape}")
    return arr


def check_kernels(kernel: Any, name: str = "kernel", *, compiled: bool = False) -> np.ndarray:
    """Validate one kernel (2-D) or a kernel bank ``(K, kH, kW)``: ``K >= 1``
    kernels of one shape, each non-empty, finite and real. Returns a copy.
    ``compiled`` as for :func:`check_kernel` (one 2-D kernel only)."""
    if type(kernel) is np.ndarray and kernel.ndim == 2:
        return check_kernel(kernel, name, compiled=compiled)
    if isinstance(kernel, (list, tuple)) and kernel and all(np.ndim(k) == 2 for k in kernel):
        shapes = {np.shape(k) for k in kernel}
        if len(shapes) > 1:
            raise ValueError(f"{name}: the kernels of a bank must share one shape; got shapes {sorted(shapes)} "
                             "(pad the smaller ones with zeros)")
    arr = np.asarray(kernel) if not isinstance(kernel, (str, bytes)) and kernel is not None else None
    if arr is None or arr.dtype == object or arr.ndim != 3:
        return check_kernel(kernel, name)  # 2-D, or the 2-D check's message
    if arr.shape[0] == 0:
        raise ValueError(f"{name} as a kernel bank (K, kH, kW) must hold at least one kernel; got shape {arr.shape}")
    for k in range(arr.shape[0]):
        check_kernel(arr[k], f"{name}[{k}]")
    return arr.copy()


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype | None:
    """Validate a compute dtype: ``None``, float32 or float64."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be None, 'float32' or 'float64'; got {_short(dtype)}") from None
    if dt not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be None, 'float32' or 'float64'; got {dt}")
    return dt


@overload
def check_positive_int(value: Any, name: str, *, allow_none: Literal[False] = False) -> int: ...
@overload
def check_positive_int(value: Any, name: str, *, allow_none: bool) -> int | None: ...
def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Validate a positive integer (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or int(value) < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}; got {_short(value)}")
    return int(value)


def check_bytes(value: Any, name: str | None = None, *, minimum: int = 1, example: str = "64MiB") -> int:
    """A size in bytes: an integer (or a whole float) or a string such as
    ``'64MiB'``, ``'200 MB'`` (parsed by :func:`dask.utils.parse_bytes`).

    ``TypeError`` for a value of the wrong type, ``ValueError`` for a string
    that is no size or a size below ``minimum``; the message starts with
    ``"<name> must be"`` (``"expected"`` without a name).
    """
    head = f"{name} must be" if name else "expected"
    what = f"a number of bytes or a size such as {example!r}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, numbers.Real)):
        raise TypeError(f"{head} {what}; got {_short(value)}")
    if isinstance(value, str):
        from dask.utils import parse_bytes

        try:
            n = parse_bytes(value)
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"{head} {what}; got {value!r}") from None
    elif isinstance(value, numbers.Integral):
        n = int(value)
    elif float(value).is_integer():
        n = int(float(value))
    else:
        raise TypeError(f"{head} a whole number of bytes or a size such as {example!r}; got {value!r}")
    if n < minimum:
        bound = "a positive" if minimum == 1 else f"at least {minimum} bytes, a"
        raise ValueError(f"{head} {bound} number of bytes; got {value!r}")
    return int(n)


@functools.cache
def module_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it.

    Asked once per process and name: ``find_spec`` walks ``sys.path`` (tens of
    microseconds), and every new convolver asks for numba and torch."""
    import importlib.util

    return importlib.util.find_spec(name) is not None


def resolve_method_backend(method: Any, backend: Any) -> tuple[str, str]:
    """Resolve ``'auto'``/``None`` method and backend to an implemented pair.

    ``method='auto'`` means ``'direct'`` when numba is installed, otherwise
    ``'gather_scatter'`` (a :class:`~dask_sparseconv.Convolver` built with
    ``'auto'`` may still take the separable path per call for a low-rank
    kernel). ``backend=None``/``'auto'`` means numba for
    ``direct`` and ``gather_scatter`` when numba is installed, numpy otherwise.
    """
    has_numba = module_available("numba")
    if method is None or method == "auto":
        method = "direct" if has_numba else "gather_scatter"
    check_choice("method", method, ("auto",) + METHODS)
    if backend is None or backend == "auto":
        if method in ("direct", "gather_scatter", "separable") and has_numba:
            backend = "numba"
        elif method in ("direct", "separable"):
            raise ValueError(f"method={method!r} requires numba, which is not installed; install numba or use "
                             "method='gather_scatter'")
        else:
            backend = "numpy"
    check_choice("backend", backend, ("auto",) + BACKENDS)
    if backend not in VALID_BACKENDS[method]:
        raise ValueError(
            f"backend={backend!r} is not valid for method={method!r}; valid backends: {VALID_BACKENDS[method]}"
        )
    if not module_available(backend):
        raise ValueError(
            f"backend={backend!r} was asked for but {backend} is not installed; "
            + (TORCH_INSTALL_HINT if backend == "torch" else f"install {backend}")
        )
    return method, backend
