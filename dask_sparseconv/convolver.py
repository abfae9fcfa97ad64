"""The in-memory face of the package: :class:`Convolver`.

A convolver is built once for a frame shape and a kernel, and then called on
batches of images. It normalises whatever it is given (CSR, CSC, COO, dense,
a single image or a stack) into the canonical CSR form the engines expect,
picks or builds the engine for the call's dtype, and shapes the result back
like the input.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
import scipy.sparse

from .boundaries import Extension, add_frame, fill_frame
from .engine import Engine, engine_class, separable
from .engine.threads import default_threads
from .geometry import Geometry
from .operation import DEFAULT, Operation, check_operation
from .validation import (
    check_choice,
    check_dtype,
    check_frame_shape,
    check_kernel,
    check_kernels,
    check_mode,
    check_positive_int,
    resolve_method_backend,
)

OutKind = Literal["csr", "dense"]


def compute_dtype(input_dtype: np.dtype, requested: np.dtype | None) -> np.dtype:
    """The dtype a call computes in: ``requested``, else float32 for float32
    (and float16) input, float64 for everything else."""
    if requested is not None:
        return np.dtype(requested)
    # constants, not np.dtype(...) calls: this runs on every construction
    return _F32 if np.dtype(input_dtype) in _TO_F32 else _F64


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_TO_F32 = (_F32, np.dtype(np.float16))


def as_canonical_csr(x: Any, n_cols: int, dtype: np.dtype, name: str = "x") -> scipy.sparse.csr_matrix:
    """Return ``x`` (2-D sparse or dense, ``n_cols`` columns) as canonical CSR of ``dtype``.

    Never modifies ``x``: canonicalisation and casting work on copies, and
    index arrays are shared rather than copied when they are already usable.
    """
    if type(x) is scipy.sparse.csr_matrix and x.dtype == dtype and x.shape[1] == n_cols and x.has_canonical_format:
        return x  # what the engines take, as it is
    if scipy.sparse.issparse(x):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D; got a sparse array of shape {x.shape}")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise TypeError(f"{name} must be real; got complex dtype {x.dtype}")
        if x.dtype != dtype and not (x.format == "csr" and x.has_canonical_format):
            # Sum duplicates in the compute dtype, not the input's (float32 or
            # small-int sums would round or wrap). astype copies: x is untouched.
            x = x.astype(dtype)
        if x.format == "csr":
            csr = scipy.sparse.csr_matrix(x, copy=False) if not isinstance(x, scipy.sparse.csr_matrix) else x
        else:
            csr = scipy.sparse.csr_matrix(x.tocsr())
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()  # sorts indices too
    else:
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D here; got shape {arr.shape}")
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise TypeError(f"{name} must be real; got complex dtype {arr.dtype}")
        csr = scipy.sparse.csr_matrix(arr.astype(dtype, copy=False))
    if csr.shape[1] != n_cols:
        raise ValueError(f"{name} must have {n_cols} columns (H*W); got shape {csr.shape}")
    if np.iscomplexobj(csr.data):
        raise TypeError(f"{name} must be real; got complex dtype {csr.data.dtype}")
    if csr.data.dtype != dtype:
        csr = scipy.sparse.csr_matrix((csr.data.astype(dtype), csr.indices, csr.indptr), shape=csr.shape, copy=False)
        csr.has_sorted_indices = True
        csr.has_canonical_format = True
    return csr


class _ModePlan:
    """How one mode is computed: the engine's frame and mode, and what is
    done around the engine's call (padding with ghosts, a fill frame)."""

    __slots__ = ("geo", "extension", "engine_shape", "engine_mode", "fills")

    def __init__(self, geo: Geometry, op: Operation):
        self.geo = geo
        kh, kw = geo.kernel_shape
        # correlate2d's 'same' window for even kernels is no mode of the engines
        standard = geo.mode != "same" or (geo.top, geo.left) == ((kh - 1) // 2, (kw - 1) // 2)
        self.extension: Extension | None = None
        self.engine_shape, self.engine_mode = geo.frame_shape, geo.mode
        if geo.mode != "valid" and (op.boundary != "fill" or not standard):
            self.extension = Extension(geo, op.boundary)
            self.engine_shape, self.engine_mode = self.extension.frame_shape, "valid"
        # dtype -> the fill frame (built on first use)
        self.fills: dict[np.dtype, scipy.sparse.csr_matrix] | None = {} if op.fillvalue != 0 else None


class Convolver:
    """Convolve batches of sparse 2-D images with one dense 2-D kernel.

    Semantics are those of ``scipy.signal.convolve2d(image, kernel, mode,
    boundary, fillvalue)`` (or ``correlate2d`` with ``correlate=True``),
    computed only where the images are nonzero.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)`` of every image.
    kernel : array_like
        2-D, non-empty, finite kernel. It is copied; later changes to the
        caller's array do not affect the convolver. A 3-D array
        ``(K, kH, kW)`` (or a list of ``K`` kernels of one shape) is a
        kernel bank: each call prepares its input once and returns a list of
        ``K`` results, one per kernel (``members[k]`` is kernel ``k``'s
        convolver).
    mode : {'same', 'full', 'valid'}, default 'same'
        Output window, as in ``scipy.signal.convolve2d``.
    method : {'auto', 'direct', 'precomputed', 'lazy', 'gather_scatter', 'separable'}, default 'auto'
        ``'auto'`` is ``'direct'`` (numba) when numba is installed, else
        ``'gather_scatter'`` (numpy). With numba and a kernel of low rank
        (a Gaussian, a box, a difference of Gaussians) ``'auto'`` weighs the
        separable path for each call and takes it when it is cheaper for
        that batch (``auto_separable`` is then True). ``'separable'`` forces
        it: the kernel as ``rank`` pairs of 1-D passes
        (:mod:`dask_sparseconv.engine.separable`; results agree with the 2-D
        path to float rounding, docs/engine.md).
    backend : {'auto', 'numba', 'numpy', 'torch'}, default 'auto'
        Must implement ``method``; see :data:`dask_sparseconv.engine.REGISTRY`.
    dtype : {None, 'float32', 'float64'}, default None
        Compute and output dtype. ``None`` follows the input: float32 in
        gives float32 out, anything else float64.
    device : str, optional
        Torch device (``'cpu'``, ``'cuda'``, ``'cuda:0'``); default CUDA when
        available. Only for ``backend='torch'``.
    n_threads : int, optional
        Threads one call may use (CPU engines). Default: the CPUs this
        process may run on. Inside dask workers the pipeline sets it to
        ``cores // dask threads on the host`` so the two never oversubscribe.
    max_buffer_bytes : int, default 256 MiB
        Scratch-memory bound for engines with a dense accumulator.
    boundary : {'fill', 'wrap', 'symm', 'mirror', 'nearest'}, default 'fill'
        How the images continue past their edges, as in
        ``scipy.signal.convolve2d`` (``'fill'``, ``'wrap'``, ``'symm'``) and
        ``scipy.ndimage`` (``'mirror'``, ``'nearest'``; its names
        ``'constant'``, ``'reflect'`` and ``'grid-wrap'`` are accepted for
        ``'fill'``, ``'symm'`` and ``'wrap'``). All but a nonzero fill keep
        the output sparse: the padding repeats nonzeros, computed from them
        alone (:mod:`dask_sparseconv.boundaries`). Unused in ``'valid'`` mode.
    fillvalue : float, default 0
        The constant of ``boundary='fill'``. A nonzero value adds one fixed
        frame to every image (nonzero within ``k - 1`` pixels of the edges).
    correlate : bool, default False
        Compute ``scipy.signal.correlate2d`` instead (the kernel is not
        flipped; the ``'same'`` window is centred as scipy centres it).

    Examples
    --------
    >>> import numpy as np, scipy.sparse
    >>> conv = Convolver((64, 64), np.ones((3, 3)), mode="same")
    >>> x = scipy.sparse.random(10, 64 * 64, density=0.01, format="csr", random_state=0)
    >>> conv(x).shape
    (10, 4096)
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        kernel: Any,
        mode: str = "same",
        method: str = "auto",
        backend: str | None = "auto",
        dtype: Any = None,
        device: str | None = None,
        n_threads: int | None = None,
        max_buffer_bytes: int = 256 * 1024**2,
        boundary: str = "fill",
        fillvalue: float = 0.0,
        correlate: bool = False,
    ):
        frame_shape = check_frame_shape(frame_shape)
        auto = method is None or method == "auto"
        method, backend = resolve_method_backend(method, backend)
        # numba's engines run next: a compiled finiteness check is cheaper there
        kernel = check_kernels(kernel, compiled=backend == "numba")
        mode = check_mode(mode)
        dtype = check_dtype(dtype)
        n_threads = check_positive_int(n_threads, "n_threads", allow_none=True)
        max_buffer_bytes = check_positive_int(max_buffer_bytes, "max_buffer_bytes")
        if device is not None and backend != "torch":
            raise ValueError(f"device is only used by backend='torch'; got device={device!r} with backend={backend!r}")
        op = DEFAULT if boundary == "fill" and type(fillvalue) in (int, float) and fillvalue == 0 and correlate is False else \
            check_operation(boundary, fillvalue, correlate)
        self._setup(frame_shape, kernel, mode, method, backend, dtype, device, n_threads, max_buffer_bytes, op, auto)

    @classmethod
    def _checked(cls, frame_shape: tuple[int, int], kernel: np.ndarray, mode: str, method: str, backend: str,
                 device: str | None, max_buffer_bytes: int, operation: Operation = DEFAULT) -> "Convolver":
        """A convolver from arguments the caller has checked: the drop-in class,
        which checks them with the peer's texts (a new convolver is built per
        grid point in the seed's benchmark, so checking twice is paid there).
        ``kernel`` is checked here (finite, real, non-empty) and copied."""
        self = cls.__new__(cls)
        self._setup(frame_shape, check_kernel(kernel, compiled=backend == "numba"), mode, method, backend, None, device,
                    None, max_buffer_bytes, operation)
        return self

    def _setup(self, frame_shape, kernel, mode, method, backend, dtype, device, n_threads, max_buffer_bytes,
               operation: Operation = DEFAULT, auto: bool = False) -> None:
        self.frame_shape = frame_shape
        self.kernel = kernel
        self.operation = operation
        self.mode = mode
        self.method, self.backend = method, backend
        self.dtype = dtype
        self.n_threads = n_threads or default_threads()
        self.max_buffer_bytes = max_buffer_bytes
        self.device = self._resolve_device(device) if backend == "torch" else None
        # raises for 'valid' with a too-large kernel; kept, as every call needs it
        plan = _ModePlan(operation.window(frame_shape, kernel.shape[-2:], mode), operation)
        self._plans = {mode: plan}
        self._engines: dict[tuple, Engine] = {}
        self._lock = threading.Lock()
        self.members: list[Convolver] | None = None
        #: whether calls weigh the separable path (method='auto', a low-rank kernel; a bank: any member)
        self.auto_separable: bool = False
        if kernel.ndim == 3:
            # a kernel bank: one convolver per kernel; a call prepares the input once for all
            self.members = [self._member(k, auto) for k in kernel]
            self.auto_separable = any(bool(m.auto_separable) for m in self.members)
            return
        self._taps = operation.engine_kernel(kernel)  # what the engines convolve with
        # method='auto' with a low-rank kernel: each call picks the 2-D or the separable path
        self.auto_separable = bool(auto and (method, backend) == ("direct", "numba")
                                   and separable.worth_trying(self._taps))
        # Build eagerly for the likely dtype so that init-time work (a
        # Toeplitz matrix) happens here, not on the first call.
        eng = self.engine(self.dtype or compute_dtype(self.kernel.dtype, None), plan.engine_shape)
        prepare = getattr(eng, "prepare", None)  # per-mode set-up (Toeplitz engines)
        if prepare is not None:
            prepare(plan.engine_mode)

    def _member(self, kernel: np.ndarray, auto: bool) -> "Convolver":
        """The convolver of one kernel of a bank (arguments already checked)."""
        member = Convolver.__new__(Convolver)
        member._setup(self.frame_shape, kernel, self.mode, self.method, self.backend, self.dtype, self.device,
                      self.n_threads, self.max_buffer_bytes, self.operation, auto)
        return member

    @property
    def bank_size(self) -> int | None:
        """``K`` for a kernel bank ``(K, kH, kW)``, None for one 2-D kernel."""
        return None if self.members is None else len(self.members)

    @staticmethod
    def _resolve_device(device: str | None) -> str:
        import torch

        if device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0'; got {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for but CUDA is not available on this machine")
        return str(dev)

    # -- engines ---------------------------------------------------------
    def engine(self, dtype: np.dtype, frame_shape: tuple[int, int] | None = None) -> Engine:
        """The engine computing in ``dtype`` on ``frame_shape`` (default: the
        convolver's; a padded frame for boundaries), built on first use and kept."""
        if self.members is not None:
            raise TypeError("a kernel bank has one engine per kernel: use conv.members[k].engine(...)")
        dtype = np.dtype(dtype)
        key = (dtype, frame_shape or self.frame_shape)
        eng = self._engines.get(key)
        if eng is None:
            with self._lock:
                eng = self._engines.get(key)
                if eng is None:
                    cls = separable.AutoSeparable if self.auto_separable else engine_class(self.method, self.backend)
                    # the taps as they are: the engine casts them when its
                    # dtype differs, and shares them (read by all, written by
                    # none) when it does not, one copy less per convolver
                    eng = cls(
                        key[1],
                        self._taps,
                        dtype,
                        device=self.device,
                        n_threads=self.n_threads,
                        max_buffer_bytes=self.max_buffer_bytes,
                    )
                    self._engines[key] = eng
        return eng

    def _plan(self, mode: str | None) -> _ModePlan:
        if mode is None:
            mode = self.mode
        plan = self._plans.get(mode) if isinstance(mode, str) else None
        if plan is None:
            mode = check_mode(mode)
            plan = self._plans[mode] = _ModePlan(self.operation.window(self.frame_shape, self.kernel.shape[-2:], mode),
                                                 self.operation)
        return plan

    def geometry(self, mode: str | None = None) -> Geometry:
        """Output geometry for ``mode`` (default: the convolver's)."""
        return self._plan(mode).geo

    def fill_frame(self, dtype: Any = np.float64, mode: str | None = None) -> scipy.sparse.csr_matrix | None:
        """What ``fillvalue`` adds to every output image, as one CSR row
        ``(1, H_out*W_out)`` (None when ``fillvalue`` is 0; a list of them,
        one per kernel, for a kernel bank)."""
        if self.members is not None:
            return [m.fill_frame(dtype, mode) for m in self.members]
        plan = self._plan(mode)
        if plan.fills is None:
            return None
        dtype = np.dtype(dtype)
        frame = plan.fills.get(dtype)
        if frame is None:
            frame = plan.fills[dtype] = fill_frame(self._taps, plan.geo, self.operation.fillvalue, dtype)
        return frame

    @property
    def out_shape(self) -> tuple[int, int]:
        """``(H_out, W_out)`` for the convolver's mode."""
        return self.geometry().out_shape

    @property
    def nbytes(self) -> int:
        """Memory held between calls (kernel, Toeplitz matrices)."""
        if self.members is not None:
            return sum(m.nbytes for m in self.members)
        return sum(e.nbytes() for e in self._engines.values())

    # -- calling ---------------------------------------------------------
    def __call__(self, x: Any, out: OutKind | None = None, mode: str | None = None, batched: bool | None = None):
        """Convolve ``x``.

        Parameters
        ----------
        x : sparse matrix/array or ndarray
            A batch ``(n_images, H*W)`` (any scipy.sparse format or dense), a
            single image ``(H, W)``, or a dense stack ``(n_images, H, W)``.
        out : {None, 'csr', 'dense'}
            Result kind. ``None``: CSR for sparse input, dense for dense input.
        mode : str, optional
            Override the convolver's mode for this call.
        batched : bool, optional
            Force reading a 2-D ``x`` as a batch (True) or one image (False);
            needed only when ``H == 1`` makes the two shapes coincide.

        Returns
        -------
        scipy.sparse.csr_matrix or ndarray, or a list of them
            Laid out like the input: ``(n_images, H_out*W_out)`` for a batch,
            ``(H_out, W_out)`` for one image, ``(n_images, H_out, W_out)`` for
            a stack. CSR results are canonical with exact zeros dropped. A
            kernel bank returns a list of ``K`` such results, one per kernel.
        """
        geo = self.geometry(mode)
        sparse_in = scipy.sparse.issparse(x)
        if out is None:
            out = "csr" if sparse_in else "dense"
        check_choice("out", out, ("csr", "dense"))
        H, W = self.frame_shape
        if not sparse_in and not isinstance(x, np.ndarray):
            if hasattr(x, "__array__") or isinstance(x, (list, tuple)):
                x = np.asarray(x)
            else:
                raise TypeError(f"x must be a scipy.sparse matrix/array or a numpy array; got {type(x).__name__}")
        shape = tuple(x.shape)
        layout = self._layout(shape, batched)
        if out == "csr" and layout == "stack":  # refuse before computing, not after
            raise ValueError("out='csr' needs a 2-D batch (n_images, H*W) or one image; got a 3-D stack (use out='dense')")
        if x.dtype.kind not in "biuf":  # bool, integers, floats
            raise TypeError(f"x must hold real numbers; got dtype {x.dtype}")
        if layout == "stack":
            x = np.asarray(x).reshape(shape[0], H * W)
        return self._convolve(x, out, geo, layout, compute_dtype(x.dtype, self.dtype))

    def _convolve(self, x: Any, out: OutKind, geo: Geometry, layout: str, dtype: np.dtype):
        """The work of a call whose arguments are checked: ``x`` is a batch
        ``(n, H*W)`` (``layout`` 'batch' or 'stack') or one image (``'single'``)
        of real numbers, computed in ``dtype``. The drop-in class checks its
        calls with the peer's texts and comes in here. A kernel bank prepares
        the input once (canonical CSR, boundary ghosts) for all its kernels."""
        H, W = self.frame_shape
        if layout == "single":
            x = x.reshape(1, H * W) if scipy.sparse.issparse(x) else np.asarray(x).reshape(1, H * W)
        csr = as_canonical_csr(x, H * W, dtype)
        plan = self._plans.get(geo.mode) or self._plan(geo.mode)
        if plan.extension is not None:
            csr = plan.extension(csr)
        if self.members is not None:
            return [m._apply(csr, out, geo, layout, dtype, m._plan(geo.mode)) for m in self.members]
        return self._apply(csr, out, geo, layout, dtype, plan)

    def _apply(self, csr: scipy.sparse.csr_matrix, out: OutKind, geo: Geometry, layout: str, dtype: np.dtype,
               plan: _ModePlan):
        """The engine's call on a prepared batch ``csr`` (canonical, extended
        by the plan's ghosts), its fill frame, and the result's layout."""
        eng = self.engine(dtype, plan.engine_shape)
        n = csr.shape[0]
        frame = None if plan.fills is None else self.fill_frame(dtype, geo.mode)
        if out == "dense":
            res = eng.to_dense(csr, plan.engine_mode)
            if frame is not None:
                res.reshape(n, -1)[:, frame.indices] += frame.data
            if layout == "batch":
                return res.reshape(n, geo.out_pixels)
            if layout == "single":
                return res.reshape(geo.out_shape)
            return res
        res = eng.to_csr(csr, plan.engine_mode)
        if frame is not None:
            res = add_frame(res, frame)
        if layout == "single":
            res = scipy.sparse.csr_matrix(res.reshape(geo.out_shape))
        return res

    def _layout(self, shape: tuple[int, ...], batched: bool | None) -> str:
        H, W = self.frame_shape
        if len(shape) == 3:
            if shape[1:] != (H, W):
                raise ValueError(f"x as a stack must have shape (n_images, {H}, {W}); got {shape}")
            return "stack"
        if len(shape) != 2:
            raise ValueError(
                f"x must be a batch (n_images, {H * W}), an image {(H, W)} or a stack (n, {H}, {W}); got shape {shape}"
            )
        is_batch = shape[1] == H * W
        is_single = shape == (H, W)
        if batched is True:
            if not is_batch:
                raise ValueError(f"x as a batch (batched=True) must have shape (n_images, {H * W}); got {shape}")
            return "batch"
        if batched is False:
            if not is_single:
                raise ValueError(f"x as one image (batched=False) must have shape {(H, W)}; got {shape}")
            return "single"
        if is_batch:
            return "batch"
        if is_single:
            return "single"
        raise ValueError(
            f"x must be a batch (n_images, {H * W}) or an image {(H, W)} for frame_shape={(H, W)}; got shape {shape}"
        )

    def __repr__(self) -> str:
        bank = "" if self.members is None else f", bank of {len(self.members)} kernels"
        op = "" if self.operation.is_default else (
            f", boundary={self.operation.boundary!r}, fillvalue={self.operation.fillvalue!r}, "
            f"correlate={self.operation.correlate!r}")
        return (
            f"Convolver(frame_shape={self.frame_shape}, kernel_shape={self.kernel.shape[-2:]}, mode={self.mode!r}, "
            f"method={self.method!r}, backend={self.backend!r}, dtype={self.dtype}, device={self.device!r}{op}{bank})"
        )
