"""Planning a job: open the input, estimate what one image costs from the
data, cut the stack into row blocks. :func:`plan_job` is public: the CLI's
``--dry-run`` shows the plan it returns, and :func:`~dask_sparseconv.convolve_zarr`
runs it (``plan=``) instead of planning again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..convolver import compute_dtype
from ..geometry import Geometry
from ..kernels import kernel_digest
from ..row_blocks import RowBlocks, image_bytes, plan_row_blocks
from ..runtime.cluster import scheduler_threads
from .estimates import matrix_expansion, source_estimates
from .spec import Settings, check_settings

#: Blocks per scheduler thread the planner aims for when the stack is small
#: enough that the block budget alone would give fewer: every thread gets
#: work, and a small job pays each block's fixed costs (its tasks, record,
#: marker and, for CSR outputs, its link of the carry chain) once per thread.
#: Two per thread would even out blocks of unequal cost, but measured slower
#: on every small job tried (docs/benchmarks.md, "Figures behind the code").
BLOCKS_PER_THREAD = 1


def plan_blocks(*, n_images: int, chunk_rows: int, frame_shape: tuple[int, int], out_shape: tuple[int, int],
                in_dtype: Any, out_dtype: Any, in_format: str, out_format: str, kernel: np.ndarray,
                block_memory: int, threads: int, nnz_per_image: float | None = None,
                expansion: float | None = None, fill_nnz: int = 0, tiles: bool = False,
                spatial_chunk: tuple[int, int] | None = None, untiled: str | None = None) -> RowBlocks:
    """Row blocks for a stack on ``threads`` scheduler threads.

    ``nnz_per_image`` and ``expansion`` (output nonzeros per input nonzero)
    are the estimates of :mod:`~dask_sparseconv.pipeline.estimates`; without
    them the worst case is assumed. ``fill_nnz``: output nonzeros a nonzero
    ``fillvalue`` adds to every image, empty ones included.

    ``tiles``: when one image does not fit ``block_memory``, cut images into
    tiles (:mod:`dask_sparseconv.tiles`; ``spatial_chunk``: a dense input's
    chunk ``(rows, cols)`` within a frame, which tiles follow when they can)
    instead of refusing; the blocks then count tiles. ``untiled``: why
    images are not tiled here, added to the error when one does not fit.
    """
    kernel_size = int(np.count_nonzero(np.any(kernel != 0, axis=0) if kernel.ndim == 3 else kernel)) or 1

    def cost(frame: tuple[int, int], out: tuple[int, int], nnz: float | None, fill: int) -> int:
        return image_bytes(
            frame, out, np.dtype(in_dtype).itemsize, np.dtype(out_dtype).itemsize, in_format=in_format,
            out_format=out_format, nnz_per_image=nnz,
            # a bank (K, kH, kW): K outputs, each reached through at most the union of the kernels' taps
            kernel_size=kernel_size,
            nnz_out_per_image=None if expansion is None or nnz is None else nnz * expansion,
            fill_nnz=fill, outputs=int(kernel.shape[0]) if kernel.ndim == 3 else 1,
        )

    per_image = cost(frame_shape, out_shape, nnz_per_image, fill_nnz)
    min_blocks = BLOCKS_PER_THREAD * max(1, int(threads))
    if tiles and per_image > block_memory:
        from ..tiles import plan_tiles

        return plan_tiles(n_images, frame_shape, out_shape, kernel.shape[-2:], block_memory, min_blocks, cost,
                          nnz_per_image, fill_nnz, out_format, spatial_chunk)
    try:
        return plan_row_blocks(n_images, chunk_rows, per_image, block_memory,
                               min_blocks=min_blocks, strict_chunks=(in_format == "dense"))
    except ValueError as exc:
        if untiled and per_image > block_memory:
            raise ValueError(f"{exc} ({untiled})") from None
        raise


@dataclass
class JobPlan:
    """What a store-to-store job will do, worked out before anything is written.

    Attributes
    ----------
    input : StackInput
        The opened (read-only) input stack.
    settings : Settings
        The checked kernel, mode, method, backend, dtype, output format and block budget.
    geometry : Geometry
        Frame, kernel and output shapes.
    out_format : str
        ``'dense'`` or ``'csr'`` (the input's format unless asked otherwise).
    out_dtype : numpy.dtype
    nnz_per_image, expansion : float or None
        The estimates the blocks were sized by (sampled from the data).
    threads : int
        Scheduler threads the blocks were planned for.
    blocks : RowBlocks
    """

    input: Any
    settings: Settings
    geometry: Geometry
    out_format: str
    out_dtype: np.dtype
    nnz_per_image: float | None
    expansion: float | None
    threads: int
    blocks: RowBlocks
    _fingerprint: Any = field(default=None, repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return int(self.input.n_images)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.geometry.frame_shape

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.geometry.out_shape

    @property
    def kernel(self) -> np.ndarray:
        return self.settings.kernel

    @property
    def source(self) -> str:
        return str(self.input.location)

    def with_threads(self, threads: int) -> "JobPlan":
        """The same plan for another scheduler size (the estimates are reused)."""
        if int(threads) == self.threads:
            return self
        return dataclasses.replace(self, threads=int(threads), blocks=_blocks_for(self.input, self.settings,
                                   self.geometry, self.out_format, self.out_dtype, int(threads), self.nnz_per_image,
                                   self.expansion))

    def fingerprint(self, threads: int | None = None):
        """The input's content fingerprint (computed once per plan; see
        :mod:`dask_sparseconv.storage.fingerprint`)."""
        if self._fingerprint is None:
            from ..storage.fingerprint import fingerprint

            self._fingerprint = fingerprint(self.input.store_location, scheduler_threads=threads or self.threads)
        return self._fingerprint

    def mismatch(self, source_key: Any, settings: Settings) -> str | None:
        """Why this plan is not one for ``source_key`` and ``settings`` (None: it is)."""
        mine, theirs = self.settings, settings
        diffs = []
        if self.input.store_location.key() != source_key:
            diffs.append(f"source {self.source}")
        if kernel_digest(mine.kernel) != kernel_digest(theirs.kernel):
            diffs.append("kernel")
        for name in ("mode", "method", "backend", "dtype", "output_format", "block_memory", "operation"):
            if getattr(mine, name) != getattr(theirs, name):
                diffs.append(f"{name}={getattr(mine, name)!r}")
        return ", ".join(diffs) or None


#: why a job's images are not cut into tiles, for the error when one does not fit a block
LAZY_UNTILED = ("the lazy convolve() computes whole images; convolve_zarr() cuts images larger than a block into "
                "tiles")
_UNTILED = "images are not cut into tiles for kernel banks or OME-Zarr outputs"


def _blocks_for(src, settings: Settings, geo: Geometry, out_format: str, out_dtype: np.dtype, threads: int,
                nnz_per_image: float | None, expansion: float | None, lazy: bool = False) -> RowBlocks:
    """Blocks of a store job (``lazy``: for the lazy convolve(), whose tasks compute whole images)."""
    if nnz_per_image is None and src.nnz is not None and src.n_images:
        nnz_per_image = src.nnz / src.n_images
    chunks = getattr(src, "chunks", None)
    tiles = not lazy and tiles_possible(settings, src)
    return plan_blocks(n_images=int(src.n_images), chunk_rows=int(src.chunk_rows), frame_shape=geo.frame_shape,
                       out_shape=geo.out_shape, in_dtype=src.dtype, out_dtype=out_dtype, in_format=src.format,
                       out_format=out_format, kernel=settings.kernel, block_memory=settings.block_memory,
                       threads=threads, nnz_per_image=nnz_per_image, expansion=expansion,
                       fill_nnz=settings.fill_nnz(geo) if out_format == "csr" else 0,
                       tiles=tiles, spatial_chunk=(int(chunks[-2]), int(chunks[-1])) if chunks else None,
                       untiled=None if tiles else LAZY_UNTILED if lazy else _UNTILED)


def tiles_possible(settings: Settings, src: Any) -> bool:
    """Whether a job's images may be cut into tiles when one does not fit a
    block: one kernel (a bank's tiles are not built), and an output whose
    writer takes tiles (not OME-Zarr, whose pyramid levels are made from
    whole images)."""
    return settings.kernel.ndim == 2 and settings.container is None and hasattr(src, "read_frame_rows")


def plan_job(source: Any, kernel: Any, mode: str = "same", *, output_format: str | None = None,
             method: str = "auto", backend: str | None = "auto", dtype: Any = None, block_memory: Any = None,
             array: str | None = None, storage_options: dict | None = None,
             threads: int | None = None, boundary: str = "fill", fillvalue: float = 0.0,
             correlate: bool = False, level: int | None = None, spatial_axes: Any = None) -> JobPlan:
    """Plan a store-to-store job without writing anything.

    Opens the input read-only, checks what depends on it (the kernel fits the
    frame in ``valid`` mode, CSR indices are in range, the stack is not
    empty), samples it for the estimates blocks are sized by, and cuts it
    into row blocks.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, zarr.Group or an opened input
        As for :func:`~dask_sparseconv.convolve_zarr`.
    kernel, mode, output_format, method, backend, dtype, block_memory, array, storage_options, level, spatial_axes
        As for :func:`~dask_sparseconv.convolve_zarr`.
    boundary, fillvalue, correlate
        As for :class:`~dask_sparseconv.Convolver`.
    threads : int, optional
        Scheduler threads to plan for (default: the active scheduler's).

    Returns
    -------
    JobPlan
        Hand it to ``convolve_zarr(..., plan=plan)`` to run exactly this plan.

    Raises
    ------
    ValueError, TypeError, FileNotFoundError
        For bad arguments or an input that cannot be convolved.
    """
    settings = check_settings(kernel, mode, method, backend, dtype, output_format, block_memory, boundary, fillvalue,
                              correlate)
    return _plan(source, settings, array=array, storage_options=storage_options, threads=threads, level=level,
                 spatial_axes=spatial_axes)


def _plan(source: Any, settings: Settings, *, array: str | None, storage_options: dict | None,
          threads: int | None, level: int | None = None, spatial_axes: Any = None) -> JobPlan:
    from ..storage import StackInput, open_input

    src = source if isinstance(source, StackInput) else open_input(source, array=array, storage_options=storage_options,
                                                                      level=level, spatial_axes=spatial_axes)
    fs = (int(src.frame_shape[0]), int(src.frame_shape[1]))
    geo = settings.window(fs)  # ValueError for 'valid' with a kernel larger than the frame
    src.check_indices()  # CSR: out-of-range indices fail here, before any target exists
    if src.n_images == 0:
        raise ValueError(f"source {src.location} holds no images (shape[0] == 0); nothing to convolve")
    out_dtype = compute_dtype(src.dtype, settings.dtype)
    fmt = settings.output_format or src.format
    threads = int(threads) if threads else scheduler_threads()
    nnz_per_image, expansion = source_estimates(src, settings.taps, geo, fmt)
    blocks = _blocks_for(src, settings, geo, fmt, out_dtype, threads, nnz_per_image, expansion)
    return JobPlan(src, settings, geo, fmt, out_dtype, nnz_per_image, expansion, threads, blocks)


def plan_matrix(n_images: int, frame_shape: tuple[int, int], csr: Any, settings: Settings, geo: Geometry,
                in_dtype: Any, out_dtype: np.dtype, out_format: str, threads: int, chunk_rows: int = 1,
                untiled: str | None = LAZY_UNTILED, tiles: bool = False) -> RowBlocks:
    """Row blocks for an in-memory CSR stack ``(n, H*W)`` (``tiles``: may
    cut images into tiles, as a store job would; else whole images,
    ``untiled`` says why)."""
    expansion = matrix_expansion(csr, settings.taps, geo) if out_format == "csr" else None
    return plan_blocks(n_images=n_images, chunk_rows=chunk_rows, frame_shape=frame_shape, out_shape=geo.out_shape,
                       in_dtype=in_dtype, out_dtype=out_dtype, in_format="csr", out_format=out_format,
                       kernel=settings.kernel, block_memory=settings.block_memory, threads=threads,
                       nnz_per_image=(csr.nnz / n_images) if n_images else None, expansion=expansion,
                       fill_nnz=settings.fill_nnz(geo) if out_format == "csr" else 0, untiled=untiled,
                       tiles=tiles and settings.kernel.ndim == 2 and settings.container is None)
