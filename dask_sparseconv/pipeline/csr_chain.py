"""The graph of a job with a CSR output: each value computed once and written once.

A block's values go at an offset that is the nnz of every block before it
(see :mod:`dask_sparseconv.storage.csr_store.output`). Per block ``i``::

    compute i   read -> convolve; result held in the worker's memory
    carry i     (carry i-1, compute i) -> the values past block i's last chunk
                boundary, and the offset of block i+1: small, the only chain
    write i     (compute i, carry i-1) -> every chunk that ends inside block i,
                written by the worker holding the result; in parallel with
                the other blocks' writes

and ``compute i`` waits for ``write i-L`` (``L``: the lag, twice the
cluster's threads), so that at most about ``L`` results wait in memory for
their offsets however the scheduler orders the blocks. The ``write`` tasks
carry the block keys (:func:`~dask_sparseconv.pipeline.graph.block_key`), so
progress counts blocks that are on disk.

Three things keep the chain moving on a distributed cluster. ``write i``
also waits for ``carry i`` (whose value it does not use): a carry first
fetches the previous one from another worker, and in that gap a one-thread
worker used to start the block's 20 ms write, so that every step of the
chain waited for a write. Priorities: carries before writes before
computes, computes in block order. Sizes: :func:`dask.sizeof.sizeof` of a :class:`BlockResult` is its CSR's
bytes (an unregistered object reads as ~50 bytes), so the scheduler places
a block's carry and write on the worker that holds its result instead of
moving the result to them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from ..storage.base import io_context
from .tasks import BlockStats, apply, block_convolver, read_convolve, verified_stats


@dataclasses.dataclass
class BlockResult:
    """A computed block on its worker: its stats and its CSR result
    (``None`` for a block a resumed run verified and skipped)."""

    stats: BlockStats
    csr: Any = None


@sizeof.register(BlockResult)
def _sizeof_block_result(result: BlockResult) -> int:
    csr = result.csr
    held = 0 if csr is None else int(csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes)
    return held + int(result.stats.counts.nbytes if result.stats.counts is not None else 0) + 512


# task priorities (higher first on a worker and in the scheduler's queue):
# carries, then writes, then computes in block order (compute i: -i)
_CARRY_PRIORITY = 2
_WRITE_PRIORITY = 1


def lag(threads: int) -> int:
    """Blocks a compute may run ahead of the last finished write."""
    return max(2, 2 * int(threads))


def compute_block(job: tuple, kernel, index: int, start: int, stop: int, check: bool = False,
                  gate: Any = None) -> BlockResult:
    """Read and convolve block ``index``; keep the result for its carry and
    write. ``check`` (resume: its marker was set when the graph was built):
    return the block's recorded counts instead when its record and chunks
    check out. ``gate``: the write ``lag`` blocks back (only waited for)."""
    src, out, spec = job
    t0 = time.time()
    skipped = verified_stats(out, index, start, stop) if check else None
    if skipped is not None:
        return BlockResult(skipped)
    csr, res, read_s, conv_s, engine = read_convolve(src, spec, kernel, index, start, stop, sparse_ok=False)
    from ..storage.csr_store.output import canonical_result

    res = canonical_result(res, stop - start, out.n_cols, index)
    stats = BlockStats(index, start, stop, int(csr.nnz), int(res.nnz), t0, read_s, conv_s, 0.0, os.getpid(),
                       counts=np.diff(res.indptr).astype(np.int64), **engine)
    return BlockResult(stats, res)


def carry_block(out, result: BlockResult, prev):
    """The carry after a block (see :meth:`CSROutput.carry`)."""
    return out.carry(result.stats.index, prev, result.csr, result.stats.counts)


def write_block(job: tuple, kernel, result: BlockResult, prev, after: Any = None) -> BlockStats:
    """Write the chunks that end in a block; returns its stats (with the write time).
    ``after``: the block's own carry, only waited for (see the module's docstring)."""
    src, out, spec = job
    stats = result.stats
    if result.csr is None:
        return stats

    def produce(f0: int, f1: int):  # a resumed run: the values a skipped block left in its carry
        return apply(block_convolver(spec, kernel), src.read_block(f0, f1), spec)

    p0 = time.perf_counter()
    try:
        out.write_chunks(stats.index, prev, result.csr, produce=produce, record={"nnz_in": stats.nnz_in})
    except OSError as exc:  # a full disk, a lost mount: say what was being written where
        raise io_context(exc, f"writing block {stats.index} (images {stats.start}-{stats.stop - 1}) "
                              f"to {out.location}") from exc
    return dataclasses.replace(stats, write_s=time.perf_counter() - p0)


def chain_graph(g, job, kernel, out, bounds, done: set[int], annotations: dict, token: str,
                threads: int, prefix: str, block_key) -> list:
    """Add a CSR job's chain to ``g`` (a :class:`~dask_sparseconv.pipeline.graph.TaskGraph`;
    ``job``, ``kernel``, ``out``: references to its data nodes); returns the
    write tasks' references (their values: :class:`BlockStats`), in block order."""
    L = lag(threads)
    writes: list = []
    prev = None
    last = len(bounds) - 1
    for i, (start, stop) in enumerate(bounds):
        gate = writes[i - L] if i >= L else None
        # route: only the computes are restricted
        res = g.add(f"{prefix}-compute-{token}-{i:06d}", compute_block, job, kernel, i, start, stop, i in done, gate,
                    annotations={"priority": -i, **(annotations or {})})
        before = prev
        if i < last:
            prev = g.add(f"{prefix}-carry-{token}-{i:06d}", carry_block, out, res, before,
                         annotations={"priority": _CARRY_PRIORITY})
        writes.append(g.add(block_key(token, i), write_block, job, kernel, res, before, prev if i < last else None,
                            annotations={"priority": _WRITE_PRIORITY}))
    return writes
