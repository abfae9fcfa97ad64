"""Drop-in replacement for ``sparse_convolution.Toeplitz_convolution2d`` (version 0.4.2).

::

    # before
    from sparse_convolution import Toeplitz_convolution2d
    # after
    from dask_sparseconv import Toeplitz_convolution2d

Same constructor (arguments, order, defaults), same call
(``conv(x, batching=True, mode=None)``), same attributes, same output kinds
(dense in, ndarray out; sparse in, sparse out), same error texts. The work
is done by :class:`dask_sparseconv.Convolver` and its engines. Deliberate
differences are listed in ``docs/compat.md``; the main ones:

* argument errors are :class:`ConvolutionArgumentError`, which is both a
  ``ValueError`` and an ``AssertionError`` (the peer used ``assert``), so
  ``except AssertionError`` and ``except ValueError`` both keep working;
* sparse results are always canonical ``scipy.sparse.csr_matrix`` (sorted,
  no duplicates, no stored zeros, int32 indices when they fit), where the
  peer returned CSC or COO for some methods;
* an integer kernel with floating-point images computes in float64 instead of
  truncating the images to integers.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import numpy as np
import scipy.sparse

from .convolver import Convolver
from .operation import DEFAULT, check_operation
from .validation import VALID_BACKENDS as _VALID
from .validation import module_available

__all__ = ["Toeplitz_convolution2d", "ConvolutionArgumentError", "ConvolutionArgumentTypeError", "VALID_BACKENDS"]

#: Valid (method -> backends), in the peer's order of methods (the cells are the engine registry's).
VALID_BACKENDS = {m: _VALID[m] for m in ("precomputed", "lazy", "gather_scatter", "direct")}

_MODES = ("full", "same", "valid")
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_SHAPE_NUMBERS = (int, float, np.integer, np.floating)


class ConvolutionArgumentError(ValueError, AssertionError):
    """A bad argument to :class:`Toeplitz_convolution2d`.

    ``sparse_convolution`` 0.4.2 checked arguments with ``assert``, so code
    written for it catches ``AssertionError``; new code catches
    ``ValueError``. This class is both.
    """


class ConvolutionArgumentTypeError(ConvolutionArgumentError, TypeError):
    """An argument of the wrong type; also a ``TypeError``."""


def _fail(message: str, type_error: bool = False):
    raise (ConvolutionArgumentTypeError if type_error else ConvolutionArgumentError)(message)


class Toeplitz_convolution2d:
    """Convolve 2-D images with a 2-D kernel; API of ``sparse_convolution`` 0.4.2.

    Semantics are those of ``scipy.signal.convolve2d(image, k, mode)``.

    Parameters
    ----------
    x_shape : tuple of int
        ``(H, W)`` of the images.
    k : np.ndarray
        2-D kernel (copied).
    mode : {'same', 'full', 'valid'}, default 'same'
        Output window; can be overridden per call.
    dtype : numpy dtype, optional
        Data type of the computation. ``None``: the kernel's dtype (see
        ``docs/compat.md`` for integer kernels).
    verbose : bool or int, default False
        If > 0 and ``method='precomputed'``, print a warning when the
        Toeplitz matrix would hold ``>= 1e8`` entries.
    method : {'direct', 'precomputed', 'lazy', 'gather_scatter'}, default 'direct'
    max_buffer_bytes : int, default 256 MiB
        Bound on the dense scratch buffers of the engines that use one.
    backend : {None, 'numpy', 'numba', 'torch'}
        ``None``: ``'numba'`` for ``direct`` (and for ``gather_scatter`` when
        numba is installed), else ``'numpy'``.
    device : str, optional
        Torch device for ``backend='torch'``; ``None``: CUDA when available,
        else CPU. Ignored (but stored) for other backends.
    boundary, fillvalue, correlate : keyword only
        Extras the peer does not have: ``scipy.signal.convolve2d``'s boundary
        conditions and ``correlate2d``, as for
        :class:`~dask_sparseconv.Convolver`. The defaults compute what the
        peer computes.

    Examples
    --------
    >>> import numpy as np, scipy.sparse
    >>> conv = Toeplitz_convolution2d(x_shape=(100, 30), k=np.ones((3, 3)), mode='same')
    >>> conv(x=scipy.sparse.csr_matrix(np.eye(5, 3000)), batching=True).shape
    (5, 3000)
    """

    def __init__(
        self,
        x_shape: Tuple[int, int],
        k: np.ndarray,
        mode: str = "same",
        dtype: Optional[np.dtype] = None,
        verbose: Union[bool, int] = False,
        method: str = "direct",
        max_buffer_bytes: int = 256 * 1024 * 1024,
        backend: Optional[str] = None,
        device: Optional[str] = None,
        *,
        boundary: str = "fill",
        fillvalue: float = 0.0,
        correlate: bool = False,
    ):
        self._args = dict(
            x_shape=x_shape, k=k, mode=mode, dtype=dtype, verbose=verbose, method=method,
            max_buffer_bytes=max_buffer_bytes, backend=backend, device=device,
            boundary=boundary, fillvalue=fillvalue, correlate=correlate,
        )
        # -- the peer's checks, in the peer's order, with the peer's texts --
        # (a tuple of two positive ints, the usual case, passes them all: one
        # test instead of a dozen, since a seed-style grid builds a convolver
        # per point and construction there runs with cold caches)
        if type(x_shape) is tuple and len(x_shape) == 2 and type(x_shape[0]) is int and type(x_shape[1]) is int \
                and x_shape[0] >= 1 and x_shape[1] >= 1:
            pass
        elif not isinstance(x_shape, (tuple, list)):
            _fail(f"x_shape must be a tuple. Found: {type(x_shape)}", True)
        else:
            for s in x_shape:
                if not isinstance(s, _SHAPE_NUMBERS) or isinstance(s, bool):
                    _fail(f"x_shape must be a tuple of integers. Found: {[type(s) for s in x_shape]}", True)
            if len(x_shape) != 2:
                _fail(f"x_shape must be a tuple of integers of length 2 (H, W). Found: {tuple(x_shape)!r}")
            for s in x_shape:
                if not (s >= 1 and float(s).is_integer()):  # NaN fails the first test, inf the second
                    _fail(f"x_shape must be a tuple of integers >= 1. Found: {tuple(x_shape)!r}")
            x_shape = (int(x_shape[0]), int(x_shape[1]))

        if not isinstance(k, np.ndarray):
            if hasattr(k, "detach") and hasattr(k, "cpu"):  # a torch tensor
                k = k.detach().cpu().numpy()
            else:
                _fail("k must be a numpy array", True)
        if k.ndim != 2:
            _fail("k must be a 2D array")

        if not isinstance(mode, str):
            _fail("mode must be a string", True)
        if mode not in _MODES:
            _fail("mode must be 'full', 'same', or 'valid'")

        if not isinstance(method, str):
            _fail("method must be a string", True)
        if method not in VALID_BACKENDS:
            _fail(f"method must be one of {list(VALID_BACKENDS.keys())}. Got: {method!r}")

        if mode == "valid" and not (x_shape[0] >= k.shape[0] and x_shape[1] >= k.shape[1]):
            _fail("x must be larger than k in both dimensions for mode='valid'")

        has_numba = module_available("numba")
        if backend is None:
            if method == "direct":
                if not has_numba:
                    _fail(
                        "method='direct' requires numba. Install numba or use "
                        "method='gather_scatter' / method='precomputed'."
                    )
                backend = "numba"
            elif method == "gather_scatter":
                backend = "numba" if has_numba else "numpy"
            else:
                backend = "numpy"
        if not (isinstance(backend, str) and backend in VALID_BACKENDS[method]):
            _fail(f"backend={backend!r} is not valid for method={method!r}. Valid backends: {VALID_BACKENDS[method]}")
        if backend == "numba" and not has_numba:
            _fail("backend='numba' requires numba to be installed")
        if backend == "torch" and not module_available("torch"):
            _fail("backend='torch' requires torch to be installed")

        if device is None and backend == "torch":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"

        # -- checks the peer did not make (clear errors instead of late failures) --
        if dtype is not None:
            try:
                dt = np.dtype(dtype)
            except TypeError:
                _fail(f"dtype must be None or a numpy dtype; got {dtype!r}", True)
            if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer) or dt == np.bool_):
                _fail(f"dtype must be a real numeric dtype; got {dt}")
        if type(max_buffer_bytes) is int:  # the default: no abc or numpy call
            if max_buffer_bytes < 1:
                _fail(f"max_buffer_bytes must be a positive number of bytes; got {max_buffer_bytes!r}")
        elif isinstance(max_buffer_bytes, (bool, np.bool_)) or not isinstance(max_buffer_bytes, numbers.Real) or not (
            np.isfinite(max_buffer_bytes) and max_buffer_bytes >= 1
        ):
            _fail(f"max_buffer_bytes must be a positive number of bytes; got {max_buffer_bytes!r}")

        if verbose > 0 and method == "precomputed":
            n_nz_expected = x_shape[0] * x_shape[1] * k.shape[0] * k.shape[1]
            if n_nz_expected >= 1e8:
                print(
                    "Warning: Expected number of non-zero elements in the "
                    "Toeplitz matrix is large.\n"
                    f"(x_shape[0]*x_shape[1]*k.shape[0]*k.shape[1]) = "
                    f"{n_nz_expected} non-zero elements.\n"
                    "This will likely be slow and have a large memory "
                    "footprint.\n"
                    "Consider using method='lazy' or 'gather_scatter'."
                )

        # -- the peer's attributes --
        self.k = k.copy()
        self.mode = mode
        self.x_shape = x_shape
        self.method = method
        self.dtype = k.dtype if dtype is None else dtype
        self.max_buffer_bytes = max_buffer_bytes
        self.backend = backend
        self.device = device

        # -- the work: a Convolver; precomputed builds its matrix now, as the peer did --
        # The peer casts the kernel to ``dtype`` before anything else (so with
        # dtype=float32 the taps are float32 values even where the product is
        # promoted to float64): do the same.
        kernel = self.k if dtype is None else self.k.astype(np.dtype(dtype))
        try:
            # checked above, with the peer's texts; the compute dtype is chosen
            # per call by _dtypes() and inputs are cast before the call
            # the peer has no boundary, fillvalue or correlate: extra keywords,
            # checked with this package's texts
            # the defaults skip the checks (~4 us of a ~13 us construction)
            operation = DEFAULT if boundary == "fill" and type(fillvalue) in (int, float) and fillvalue == 0 \
                and correlate is False else \
                check_operation(boundary, fillvalue, correlate)
            self.convolver = Convolver._checked(
                x_shape, kernel, mode, method, backend, device if backend == "torch" else None, int(max_buffer_bytes),
                operation,
            )
        except TypeError as exc:
            raise ConvolutionArgumentTypeError(str(exc)) from exc
        except ValueError as exc:
            raise ConvolutionArgumentError(str(exc)) from exc
        if method == "precomputed":
            plan = self.convolver._plan(mode)  # boundaries: the padded frame, in 'valid' mode
            engine = self.convolver.engine(self._dtypes(self.k.dtype)[0], plan.engine_shape)
            engine.toeplitz(plan.engine_mode)

    # -- dtypes ------------------------------------------------------------
    def _dtypes(self, x_dtype) -> tuple[np.dtype, np.dtype]:
        """(compute dtype, result dtype) for an input of ``x_dtype``.

        Follows the peer: compute in ``self.dtype`` (the kernel's dtype when
        ``dtype=None``); ``precomputed``/``numpy`` promotes with the input
        dtype (scipy's product upcasts); torch computes in float32 unless
        float64 is asked for. Integer ``self.dtype`` (an integer kernel):
        computed in float64, returned in that integer dtype when the images
        are integer or boolean too (exact), else float64 (the peer truncated
        floating-point images to integers there).
        """
        want = np.dtype(self.dtype)
        x_dtype = np.dtype(x_dtype)
        if self.backend == "torch":
            d = np.dtype(np.float64) if want == np.float64 else np.dtype(np.float32)
            return d, d
        if self.method == "precomputed" and self.backend == "numpy":
            want = np.promote_types(want, x_dtype)
        if want in _FLOATS:
            return want, want
        if want == np.float16:
            return np.dtype(np.float32), np.dtype(np.float32)
        if np.issubdtype(want, np.integer) and (np.issubdtype(x_dtype, np.integer) or x_dtype == np.bool_):
            return np.dtype(np.float64), want
        return np.dtype(np.float64), np.dtype(np.float64)

    # -- calling -------------------------------------------------------------
    def __call__(
        self,
        x: Union[np.ndarray, scipy.sparse.csc_matrix, scipy.sparse.csr_matrix],
        batching: bool = True,
        mode: Optional[str] = None,
    ) -> Union[np.ndarray, scipy.sparse.csr_matrix]:
        """Convolve ``x`` with the kernel.

        Parameters
        ----------
        x : ndarray or scipy.sparse matrix/array
            ``batching=True``: flattened images, ``(n_images, H*W)``.
            ``batching=False``: one image, ``(H, W)``.
        batching : bool, default True
        mode : str, optional
            Override the mode given at construction.

        Returns
        -------
        ndarray or scipy.sparse.csr_matrix
            Dense for dense ``x``, CSR for sparse ``x``;
            ``(n_images, H_out*W_out)`` when batching, else ``(H_out, W_out)``.
        """
        if mode is None:
            mode = self.mode
        if not (isinstance(mode, str) and mode in _MODES):
            _fail(f"mode must be 'full', 'same', or 'valid'. Got: {mode!r}")
        if mode == "valid" and not (self.x_shape[0] >= self.k.shape[0] and self.x_shape[1] >= self.k.shape[1]):
            _fail("x must be larger than k in both dimensions for mode='valid'")

        issparse = scipy.sparse.issparse(x)
        if not issparse and not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise ConvolutionArgumentTypeError(
                    f"x must be a numpy array or a scipy.sparse matrix; got {type(x).__name__}"
                ) from exc
        if x.dtype.kind not in "biuf":  # bool, integers, floats
            _fail(f"x must hold real numbers; got dtype {x.dtype}", True)

        H, W = self.x_shape
        if batching:
            expected_dim = H * W
            if x.ndim != 2:
                _fail(f"When batching=True, x must be 2D (n_arrays, x_shape[0]*x_shape[1]); got shape {x.shape}")
            if x.shape[1] != expected_dim:
                _fail(
                    f"When batching=True, x.shape[1] ({x.shape[1]}) must equal "
                    f"x_shape[0]*x_shape[1] ({expected_dim})"
                )
        elif tuple(x.shape) != (H, W):
            _fail(f"When batching=False, x.shape ({x.shape}) must equal x_shape ({self.x_shape})")

        compute, result = self._dtypes(x.dtype)
        if x.dtype != compute:  # the Convolver computes in the input's float dtype
            x = x.astype(compute)
        # checked above with the peer's texts: straight to the work
        conv = self.convolver
        out = conv._convolve(x, "csr" if issparse else "dense", conv.geometry(mode), "batch" if batching else "single",
                             compute)
        if result != compute:
            out = out.astype(result)
        return out

    # -- pickling: rebuild from the arguments (the Convolver holds locks) --
    def __getstate__(self):
        return dict(self._args)

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"Toeplitz_convolution2d(x_shape={self.x_shape}, k.shape={self.k.shape}, mode={self.mode!r}, "
            f"method={self.method!r}, backend={self.backend!r}, dtype={self.dtype!r}, device={self.device!r})"
        )
