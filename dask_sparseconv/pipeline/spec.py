"""What a block task needs besides its data, and the argument checks shared
by :func:`~dask_sparseconv.convolve`, :func:`~dask_sparseconv.convolve_zarr`
and :func:`~dask_sparseconv.pipeline.plan_job`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import Geometry
from ..operation import DEFAULT, Operation, check_operation
from ..row_blocks import parse_block_memory
from ..tiles import TileGrid
from ..validation import check_choice, check_dtype, check_kernels, check_mode, resolve_method_backend


@dataclass(frozen=True)
class BlockSpec:
    """Everything a block task needs besides its data: travels by value (tiny)."""

    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    mode: str
    method: str
    backend: str
    dtype: str  # compute / output dtype
    out_format: str
    device: str | None = None
    route: str = "any"  # 'cpu': resolve backend='auto' without an accelerator
    host_threads: tuple[tuple[str, int], ...] = ()  # (host, dask threads on it) of the cluster the job was built for
    operation: Operation = DEFAULT  # boundary, fill value, correlation
    bank: int = 0  # K for a kernel bank (K, kH, kW): a block's result holds K outputs; 0 for one kernel
    expansion: float | None = None  # sampled output nonzeros per input nonzero (per kernel), if known
    tiles: TileGrid | None = None  # frames larger than a block: blocks count tiles (bands of output rows)

    def geometry(self, kernel: np.ndarray) -> Geometry:
        """The output window of the job's mode and operation on whole frames."""
        return self.operation.window(self.frame_shape, kernel.shape[-2:], self.mode)

    @property
    def outputs(self) -> int:
        """Output images per input image: ``K`` for a kernel bank, else 1."""
        return self.bank or 1


@dataclass(frozen=True)
class Settings:
    """The checked arguments of a convolution job."""

    kernel: np.ndarray
    mode: str
    method: str
    backend: str
    dtype: np.dtype | None
    output_format: str | None
    block_memory: int
    operation: Operation = DEFAULT
    #: where a dense result is stored when that is not a plain array:
    #: 'ome-zarr' (an NGFF image group); ``output_format`` is then 'dense'
    container: str | None = None

    @property
    def bank(self) -> int:
        """``K`` for a kernel bank ``(K, kH, kW)``, 0 for one 2-D kernel."""
        return int(self.kernel.shape[0]) if self.kernel.ndim == 3 else 0

    @property
    def outputs(self) -> int:
        """Output images per input image: ``K`` for a bank, else 1."""
        return self.bank or 1

    def window(self, frame_shape: tuple[int, int]) -> Geometry:
        """The output geometry on frames of ``frame_shape`` (raises for
        ``'valid'`` with a kernel larger than the frame)."""
        return self.operation.window(frame_shape, self.kernel.shape[-2:], self.mode)

    @property
    def taps(self) -> np.ndarray:
        """The kernel as the engines apply it (flipped for correlation):
        what the planner's output estimates sample with (a bank: each of its
        kernels, ``(K, kH, kW)``)."""
        if self.kernel.ndim == 3:
            return np.stack([self.operation.engine_kernel(k) for k in self.kernel])
        return self.operation.engine_kernel(self.kernel)

    def fill_nnz(self, geo: Geometry) -> int:
        """Nonzeros a nonzero ``fillvalue`` adds to every output image (the
        largest over a bank's kernels)."""
        if self.operation.fillvalue == 0:
            return 0
        from ..boundaries import fill_frame

        kernels = self.kernel if self.kernel.ndim == 3 else [self.kernel]
        return max(int(fill_frame(self.operation.engine_kernel(k), geo, self.operation.fillvalue, np.float64).nnz)
                   for k in kernels)


def output_formats() -> tuple[str, ...]:
    from ..storage import FORMATS

    return tuple(FORMATS)


def check_output_format(output_format: Any) -> str | None:
    if output_format is None:
        return None
    return check_choice("output_format", output_format, output_formats())


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_settings(kernel: Any, mode: Any, method: Any, backend: Any, dtype: Any, output_format: Any,
                   block_memory: Any, boundary: Any = "fill", fillvalue: Any = 0, correlate: Any = False) -> Settings:
    """Every argument that can be checked without touching storage."""
    kernel = check_kernels(kernel)
    mode = check_mode(mode)
    method, backend = graph_engine(method, backend)
    fmt = check_output_format(output_format)
    container = None
    if fmt == "ome-zarr":  # computed as dense, stored in an NGFF image group
        if kernel.ndim == 3:
            raise ValueError("output_format='ome-zarr' takes one kernel; a kernel bank writes 'dense' "
                             "(n, K, H_out, W_out) or 'csr' (one group per kernel)")
        fmt, container = "dense", "ome-zarr"
    return Settings(kernel, mode, method, backend, check_dtype(dtype), fmt, parse_block_memory(block_memory),
                    check_operation(boundary, fillvalue, correlate), container)


def graph_engine(method: Any, backend: Any) -> tuple[str, str]:
    """Check ``(method, backend)`` here and return what the graph carries:
    ``backend='auto'`` stays ``'auto'`` (with the method as asked) so that
    each worker resolves it for its own device (:mod:`dask_sparseconv.runtime.devices`)."""
    resolved = resolve_method_backend(method, backend)
    if backend is None or backend == "auto":
        return ("auto" if method in (None, "auto") else resolved[0]), "auto"
    return resolved


def check_real(dt: Any) -> None:
    dt = np.dtype(dt)
    if not (np.issubdtype(dt, np.number) or dt == np.bool_) or np.issubdtype(dt, np.complexfloating):
        raise TypeError(f"x must hold real numbers; got dtype {dt}")
