"""The work of one block, as it runs on a worker: read -> convolve -> write.

:func:`run_block` is the body of the block tasks of
:func:`~dask_sparseconv.convolve_zarr` for dense outputs, and
:func:`run_kept_blocks` checks the blocks a resumed one finds written (CSR
outputs split the work into compute and write:
:mod:`~dask_sparseconv.pipeline.csr_chain`); the
lazy :func:`~dask_sparseconv.convolve` uses :func:`convolve_array_block` and
:func:`convolve_source_block`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse

from ..runtime.cache import get_convolver
from ..runtime.cluster import worker_address
from ..storage.base import io_context
from .spec import BlockSpec


@dataclass
class BlockStats:
    """What a block task reports (small: it travels to the finishing tasks)."""

    index: int
    start: int
    stop: int
    nnz_in: int
    nnz_out: int
    t_start: float
    read_s: float
    convolve_s: float
    write_s: float
    pid: int
    skipped: bool = False
    engine: str = "?"
    fallback: str | None = None
    worker: str | None = None
    counts: Any = None  # CSR outputs: the block's nnz per image (int64), for the final indptr

    # block tasks returned dicts before: code that reads ``stats["nnz_out"]`` keeps working
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def block_convolver(spec: BlockSpec, kernel: np.ndarray, *, frame_shape: tuple[int, int] | None = None,
                    mode: str | None = None, operation=None):
    """The worker's cached convolver of a block (``frame_shape``, ``mode``,
    ``operation``: a tile's window instead of the job's frames)."""
    # backend='auto' is resolved here, on the worker (GPU -> torch, else CPU)
    return get_convolver(
        frame_shape or spec.frame_shape, kernel, mode or spec.mode, spec.method, spec.backend, spec.dtype, spec.device,
        n_threads=_engine_threads(spec), gpu_device="none" if spec.route == "cpu" else None,
        operation=spec.operation if operation is None else operation,
    )


def _engine_threads(spec: BlockSpec) -> int | None:
    """Engine threads from the per-host thread counts the job carries (None:
    unknown here, the cache's policy asks the scheduler)."""
    address = worker_address()
    if not spec.host_threads or address is None:
        return None
    from ..runtime.cache import engine_threads
    from ..runtime.cluster import host_of

    n = dict(spec.host_threads).get(host_of(address))
    return engine_threads(concurrent=n) if n else None


def engine_info(spec: BlockSpec, kernel: np.ndarray, conv) -> dict:
    """Which engine ran a block, where, and the fallback that led there (if any)."""
    reason = None
    if spec.backend in (None, "auto") and spec.device is None:
        from ..runtime.devices import resolve_auto

        res = resolve_auto(spec.frame_shape, kernel, spec.dtype, spec.mode, method=spec.method,
                           gpu_device="none" if spec.route == "cpu" else None)
        reason = res.reason if res.fallback else None
    # method='auto' with a low-rank kernel weighs the separable path per call (engine/separable.py)
    method = "direct|separable" if getattr(conv, "auto_separable", False) else conv.method
    label = "/".join(p for p in (method, conv.backend, conv.device) if p)
    return {"engine": label, "fallback": reason, "worker": worker_address()}


#: A dense output block is computed as CSR (and scattered into zeros by the
#: writer) when its output can hold at most this share of nonzero pixels
#: (input nonzeros x the planner's sampled expansion, else x taps, the worst
#: case): the CSR result is cheap to make for sparse outputs, and the writer
#: digests its nonzeros instead of every pixel (timings in docs/benchmarks.md).
#: With the worst case, a kernel bank of 4 Gaussians up to 19 x 19 on ROI
#: frames went the dense way at 3x the convolution time.
SPARSE_RESULT_SHARE = 1 / 8


def apply(conv, csr: scipy.sparse.csr_matrix, spec: BlockSpec, sparse_ok: bool = False):
    """Convolve a block. ``sparse_ok``: a dense output may come back as CSR
    when it is sparse (for writers, which accept either).

    A kernel bank (``spec.bank`` = K) reads and prepares the block once for
    its K kernels. Dense output: one ``(n, K, H_out, W_out)`` array (or CSR
    ``(n, K*H_out*W_out)``, kernel-major, when sparse); CSR output: a list
    of K CSR results."""
    n = csr.shape[0]
    if spec.out_format == "dense":
        Ho, Wo = spec.out_shape
        taps = int(np.count_nonzero(conv.kernel))  # a bank: the K kernels' taps together
        reach = taps if spec.expansion is None else min(taps, spec.expansion * spec.outputs)
        if sparse_ok and csr.nnz * reach <= SPARSE_RESULT_SHARE * n * Ho * Wo * spec.outputs:
            res = conv(csr, out="csr", batched=True)
            return scipy.sparse.hstack(res, format="csr") if spec.bank else res
        res = conv(csr, out="dense", batched=True)
        if spec.bank:
            return np.stack([r.reshape(n, Ho, Wo) for r in res], axis=1)
        return np.ascontiguousarray(res).reshape((n,) + tuple(spec.out_shape))
    return conv(csr, out="csr", batched=True)


def to_csr_rows(block, spec: BlockSpec) -> scipy.sparse.csr_matrix:
    """A block of images (dense (b,H,W)/(b,H*W), or sparse (b,H*W)) as (b, H*W) CSR."""
    H, W = spec.frame_shape
    if scipy.sparse.issparse(block):
        return scipy.sparse.csr_matrix(block)
    arr = np.asarray(block)
    return scipy.sparse.csr_matrix(arr.reshape(arr.shape[0], H * W))


def _one_array(res, spec: BlockSpec):
    """A lazy array's block: a CSR bank's K results side by side, ``(rows,
    K*H_out*W_out)`` (the lazy bank's K arrays are column slices of it)."""
    return scipy.sparse.hstack(res, format="csr") if spec.bank and spec.out_format == "csr" else res


def convolve_array_block(block, kernel, spec: BlockSpec):
    """map_blocks body for in-memory / dask-array inputs."""
    return _one_array(apply(block_convolver(spec, kernel), to_csr_rows(block, spec), spec), spec)


def convolve_source_block(src, kernel, start: int, stop: int, spec: BlockSpec):
    """Lazy-array body for store inputs: read a block and convolve it."""
    return _one_array(apply(block_convolver(spec, kernel), src.read_block(start, stop), spec), spec)


def read_convolve(src, spec: BlockSpec, kernel, index: int, start: int, stop: int, sparse_ok: bool):
    """Read and convolve block ``index``: ``(input nonzeros, result, seconds
    reading, seconds convolving, engine info)``. A block of tiles
    (``spec.tiles``) reads each tile's window as it convolves it: its time
    counts as convolving."""
    p0 = time.perf_counter()
    if spec.tiles is not None:
        from .tile_tasks import convolve_tiles

        try:
            nnz_in, res, conv = convolve_tiles(src, spec, kernel, start, stop)
        except OSError as exc:
            raise io_context(exc, f"reading tiles {start}-{stop - 1} (block {index}) of {src.location}") from exc
        return nnz_in, res, 0.0, time.perf_counter() - p0, engine_info(spec, kernel, conv)
    try:
        csr = src.read_block(start, stop)
    except OSError as exc:
        raise io_context(exc, f"reading block {index} (images {start}-{stop - 1}) of {src.location}") from exc
    p1 = time.perf_counter()
    conv = block_convolver(spec, kernel)
    res = apply(conv, csr, spec, sparse_ok=sparse_ok)
    p2 = time.perf_counter()
    return int(csr.nnz), res, p1 - p0, p2 - p1, engine_info(spec, kernel, conv)


def verified_stats(out, index: int, start: int, stop: int) -> BlockStats | None:
    """The stats of a written block whose data still matches its record
    (``verify_block`` of the output, its re-read timed as the read stage);
    ``None``: compute the block again."""
    t0, p0 = time.time(), time.perf_counter()
    rec = out.verify_block(index)
    if rec is None:
        return None
    return BlockStats(index, start, stop, int(rec.get("nnz_in", 0)), int(rec["nnz"]), t0, time.perf_counter() - p0,
                      0.0, 0.0, os.getpid(), skipped=True, engine="skipped (verified)", counts=rec.get("counts"))


def run_block(job: tuple, kernel, index: int, start: int, stop: int) -> BlockStats:
    """convolve_zarr's block task for dense outputs: read -> convolve -> write one block.

    ``job``: ``(source, output, spec)``, one graph node shared by every block
    (passing them separately made dask traverse the spec for each block).
    Blocks a resumed run finds written are :func:`run_kept_blocks`'."""
    src, out, spec = job
    t0 = time.time()
    nnz_in, res, read_s, conv_s, engine = read_convolve(src, spec, kernel, index, start, stop, sparse_ok=True)
    p2 = time.perf_counter()
    # the writer counts what it wrote (nonzero pixels, from the same pass as the block's digest)
    try:
        nnz_out = int(out.write_block(index, start, stop, res, record={"nnz_in": nnz_in}))
    except OSError as exc:  # a full disk, a lost mount: say what was being written where
        raise io_context(exc, f"writing block {index} (images {start}-{stop - 1}) to {out.location}") from exc
    return BlockStats(index, start, stop, nnz_in, nnz_out, t0, read_s, conv_s, time.perf_counter() - p2,
                      os.getpid(), **engine)


def run_kept_blocks(job: tuple, kernel, blocks: list):
    """A resumed dense job's written blocks ``[(index, start, stop), ...]``,
    checked in one task: each is kept when it still matches its record
    (``verify_block`` of the output), else computed and written again here.
    Returns a :class:`~dask_sparseconv.pipeline.csr_chain.SegmentResult`
    (no carry) of their stats, in order.

    One task for several blocks: a task costs a scheduler round trip (~5-7 ms
    on a 2-worker cluster), about twice what checking a block does."""
    from .csr_chain import SegmentResult

    stats = []
    for index, start, stop in blocks:
        kept = verified_stats(job[1], index, start, stop)
        stats.append(kept if kept is not None else run_block(job, kernel, index, start, stop))
    return SegmentResult(None, stats)
