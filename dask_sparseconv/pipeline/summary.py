"""What a job did: :class:`ConvolveSummary`, built by the graph's last task."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class JobLayout:
    """Where a job writes and the shape of what it writes (shared by the
    summary and the graph's job description)."""

    target: str
    format: str
    n_images: int
    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    dtype: str


@dataclass
class ConvolveSummary(JobLayout):
    """What :func:`convolve_zarr` did.

    Attributes
    ----------
    target : str
        Where the output is.
    format : str
        ``'dense'`` or ``'csr'``.
    n_images : int
    frame_shape, out_shape : tuple of int
    dtype : str
        Output dtype.
    nnz_in, nnz_out : int
        Nonzeros read and written (``nnz_out`` of a dense output counts its
        nonzero pixels).
    blocks : int
        Row blocks (tasks) the stack was cut into.
    block_rows : int
        Images per block.
    elapsed : float
        Wall-clock seconds of the whole graph.
    read_s, convolve_s, write_s : float
        Seconds spent in each stage, summed over blocks (so they add up to
        more than ``elapsed`` when blocks ran in parallel). The last task
        (a CSR output's ``indptr``, the completion flag) is ``finalize_s``.
    extra : dict
        ``worker_pids``, ``engines``, ``workers`` and ``fallbacks`` (which
        engine ran where).
    blocks_computed, blocks_skipped : int
        Blocks convolved by this run, and blocks a resumed run found already
        written and verified (re-read, nnz and checksum matching the block's
        record) and did not recompute. ``blocks_computed + blocks_skipped ==
        blocks``.
    resumed : bool
        Whether this run continued an incomplete output.
    kernels : list of str or None
        A kernel bank's kernel names (None for one kernel).
    nnz_per_kernel : list of int or None
        A CSR bank's nonzeros written per kernel (``nnz_out`` is their sum).
    """

    nnz_in: int
    nnz_out: int
    blocks: int
    block_rows: int
    elapsed: float
    read_s: float = 0.0
    convolve_s: float = 0.0
    write_s: float = 0.0
    finalize_s: float = 0.0
    extra: dict = field(default_factory=dict)
    blocks_computed: int = 0
    blocks_skipped: int = 0
    resumed: bool = False
    kernels: list | None = None
    nnz_per_kernel: list | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class JobInfo(JobLayout):
    """What the graph's last task needs to summarise a job (travels in the graph)."""

    block_rows: int
    resumed: bool = False
    lock: tuple | None = None  # (target location, token): released by the last task when the builder took it
    kernels: tuple | None = None  # a kernel bank's kernel names

    def release_lock(self) -> None:
        """Delete the target's lock if the graph's builder took it (``compute=False``:
        nobody else is there to release it once the job is done)."""
        if self.lock:
            from ..storage.job_lock import release_token

            release_token(*self.lock)


def summarize(out: Any, info: JobInfo, stats: Sequence[Any], finish_s: float) -> ConvolveSummary:
    """The summary of a job from its blocks' stats."""
    stats = sorted(stats, key=lambda s: s.index)
    t_first = min((s.t_start for s in stats), default=time.time())
    return ConvolveSummary(
        target=str(out.location),
        format=info.format,
        n_images=info.n_images,
        frame_shape=info.frame_shape,
        out_shape=info.out_shape,
        dtype=info.dtype,
        nnz_in=int(sum(s.nnz_in for s in stats)),
        nnz_out=int(sum(s.nnz_out for s in stats)),
        blocks=len(stats),
        block_rows=info.block_rows,
        elapsed=time.time() - t_first,
        read_s=float(sum(s.read_s for s in stats)),
        convolve_s=float(sum(s.convolve_s for s in stats)),
        write_s=float(sum(s.write_s for s in stats)),
        finalize_s=finish_s,
        extra={"worker_pids": sorted({s.pid for s in stats}), **engine_summary(stats)},
        blocks_computed=sum(1 for s in stats if not s.skipped),
        blocks_skipped=sum(1 for s in stats if s.skipped),
        resumed=info.resumed,
        kernels=list(info.kernels) if info.kernels else None,
    )


def finish_consolidated(out: Any, info: JobInfo, nnz: int) -> ConvolveSummary:
    """Resume of an output whose last task had written everything (the run
    stopped while cleaning up): only the cleanup and the completion flag remain."""
    p0 = time.perf_counter()
    out.finalize()
    n_blocks = len(out.block_bounds)
    summary = ConvolveSummary(
        target=str(out.location), format=info.format, n_images=info.n_images,
        frame_shape=info.frame_shape, out_shape=info.out_shape, dtype=info.dtype,
        nnz_in=0, nnz_out=int(nnz), blocks=n_blocks, block_rows=info.block_rows, elapsed=0.0,
        finalize_s=time.perf_counter() - p0, blocks_computed=0, blocks_skipped=n_blocks, resumed=True,
    )
    info.release_lock()
    return summary


def engine_summary(stats: Sequence[Any]) -> dict:
    """Blocks per engine, per worker, and the distinct fallbacks (for the summary)."""
    engines: dict[str, int] = {}
    workers: dict[str, dict] = {}
    for s in stats:
        engines[s.engine] = engines.get(s.engine, 0) + 1
        w = workers.setdefault(str(s.worker or f"pid {s.pid}"), {"pid": s.pid, "blocks": 0, "engines": {}})
        w["blocks"] += 1
        w["engines"][s.engine] = w["engines"].get(s.engine, 0) + 1
    fallbacks = sorted({s.fallback for s in stats if s.fallback})
    return {"engines": engines, "workers": workers, "fallbacks": fallbacks}
