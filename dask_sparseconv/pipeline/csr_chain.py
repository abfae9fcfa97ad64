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
computes, computes in block order. Sizes: :func:`dask.sizeof.sizeof` of a
:class:`BlockResult` is its CSR's bytes (an unregistered object reads as
~50 bytes), so the scheduler places a block's carry and write on the worker
that holds its result instead of moving the result to them.

A resumed run replaces each run of blocks whose markers are set by parallel
``verify`` tasks and one ``segment`` task that moves the carry over them
(and redoes, in place, a block that fails its check); each block key is
one key for the whole run, whose value is the segment (progress counts it as
its blocks: :func:`~dask_sparseconv.pipeline.graph.key_blocks`). A tiny task
per written block, as before, cost the scheduler and the client a round trip
each: 281 of the 505 tasks of a resumed CSR job (docs/benchmarks.md).
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
    """A computed block on its worker: its stats and its canonical CSR result."""

    stats: BlockStats
    csr: Any


@sizeof.register(BlockResult)
def _sizeof_block_result(result: BlockResult) -> int:
    csr = result.csr
    held = int(csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes)
    return held + int(result.stats.counts.nbytes if result.stats.counts is not None else 0) + 512


@dataclasses.dataclass
class SegmentResult:
    """A resumed run of written blocks, carried over: the carry after its
    last block and each block's stats (verified, or redone and written)."""

    carry: Any
    stats: list


# task priorities (higher first on a worker and in the scheduler's queue):
# carries, then writes, then computes in block order (compute i: -i)
_CARRY_PRIORITY = 2
_WRITE_PRIORITY = 1
#: written blocks one verify task checks (a block: ~7 ms on this machine, docs/benchmarks.md)
VERIFY_PIECE = 16


def lag(threads: int) -> int:
    """Blocks a compute may run ahead of the last finished write."""
    return max(2, 2 * int(threads))


def _convolved(src, spec, kernel, out, index: int, start: int, stop: int) -> BlockResult:
    t0 = time.time()
    nnz_in, res, read_s, conv_s, engine = read_convolve(src, spec, kernel, index, start, stop, sparse_ok=False)
    from ..storage.csr_store.output import canonical_result

    res = canonical_result(res, stop - start, out.n_cols, index)
    stats = BlockStats(index, start, stop, nnz_in, int(res.nnz), t0, read_s, conv_s, 0.0, os.getpid(),
                       counts=np.diff(res.indptr).astype(np.int64), **engine)
    return BlockResult(stats, res)


def compute_block(job: tuple, kernel, index: int, start: int, stop: int, gate: Any = None) -> BlockResult:
    """Read and convolve block ``index``; keep the result for its carry and
    write. ``gate``: the write ``lag`` blocks back (only waited for)."""
    src, out, spec = job
    return _convolved(src, spec, kernel, out, index, start, stop)


def carry_block(out, result: BlockResult, prev):
    """The carry after a block (see :meth:`CSROutput.carry`)."""
    return out.carry(result.stats.index, prev, result.csr, result.stats.counts)


def _write(job: tuple, kernel, result: BlockResult, prev) -> BlockStats:
    src, out, spec = job
    stats = result.stats

    def produce(f0: int, f1: int):  # a resumed run: the values skipped blocks left in the carry
        if spec.tiles is not None:  # f0, f1 count tiles
            from .tile_tasks import convolve_tiles

            return convolve_tiles(src, spec, kernel, f0, f1)[1]
        return apply(block_convolver(spec, kernel), src.read_block(f0, f1), spec)

    p0 = time.perf_counter()
    try:
        out.write_chunks(stats.index, prev, result.csr, produce=produce, record={"nnz_in": stats.nnz_in})
    except OSError as exc:  # a full disk, a lost mount: say what was being written where
        raise io_context(exc, f"writing block {stats.index} (images {stats.start}-{stats.stop - 1}) "
                              f"to {out.location}") from exc
    return dataclasses.replace(stats, write_s=time.perf_counter() - p0)


def write_block(job: tuple, kernel, result: BlockResult, prev, after: Any = None) -> BlockStats:
    """Write the chunks that end in a block; returns its stats (with the write time).
    ``after``: the block's own carry, only waited for (see the module's docstring)."""
    return _write(job, kernel, result, prev)


def verify_blocks(job: tuple, bounds: list) -> list:
    """Check written blocks ``[(index, start, stop), ...]`` against their
    records: ``[(stats or None (redo it), (index, start, stop)), ...]``."""
    return [(verified_stats(job[1], i, start, stop), (i, start, stop)) for i, start, stop in bounds]


def resume_segment(job: tuple, kernel, prev, *pieces: list) -> SegmentResult:
    """Carry over a run of blocks a resumed run found written (``pieces``:
    :func:`verify_blocks` of its parts, in order): a verified block only
    moves the carry on; one that failed its check is computed and written
    here, where its offset is known."""
    src, out, spec = job
    stats: list = []
    for piece in pieces:
        for s, (i, start, stop) in piece:
            if s is None:  # damaged since the marker was read: redo it in place
                res = _convolved(src, spec, kernel, out, i, start, stop)
                s = _write(job, kernel, res, prev)
                prev = out.carry(i, prev, res.csr, res.stats.counts)
            else:
                prev = out.carry(i, prev, None, s.counts)
            stats.append(s)
    return SegmentResult(prev, stats)


def segment_carry(segment: SegmentResult):
    return segment.carry


def segment_stats(results) -> list:
    """Block tasks' values, one entry per block: a :class:`SegmentResult`
    stands for its blocks."""
    out: list = []
    for r in results:
        if isinstance(r, SegmentResult):
            out.extend(r.stats)
        else:
            out.append(r)
    return out


def written_runs(n: int, done: set[int]) -> list[tuple[int, int, bool]]:
    """``[(a, b, written), ...]``: blocks ``[a, b)`` all in ``done`` or none."""
    out: list[tuple[int, int, bool]] = []
    a = 0
    for i in range(1, n + 1):
        if i == n or (i in done) != (a in done):
            out.append((a, i, a in done))
            a = i
    return out


def chain_graph(g, job, kernel, out, bounds, done: set[int], annotations: dict, token: str,
                threads: int, prefix: str, block_key) -> list:
    """Add a CSR job's chain to ``g`` (a :class:`~dask_sparseconv.pipeline.graph.TaskGraph`;
    ``job``, ``kernel``, ``out``: references to its data nodes); returns the
    block tasks' references in block order (their values: a block's
    :class:`BlockStats`, or a :class:`SegmentResult` for a run of written blocks).

    Blocks a resumed run finds written (``done``) are not links of the chain:
    each run of them is verified in parallel pieces and carried over by one
    task (:func:`resume_segment`), since a chain link costs a scheduler round
    trip (~7 ms on a 2-worker cluster) however little it does."""
    L = lag(threads)
    writes: list = [None] * len(bounds)  # per block: what a compute L blocks on waits for
    tasks: list = []
    prev = None
    last = len(bounds) - 1
    for a, b, written in written_runs(len(bounds), done):
        if written:
            tag = f"{token}-{a:06d}"
            pieces = [g.add(f"{prefix}-verify-{tag}-{p:06d}", verify_blocks, job,
                            [(i, *bounds[i]) for i in range(p, min(p + VERIFY_PIECE, b))],
                            annotations={"priority": _CARRY_PRIORITY})
                      for p in range(a, b, VERIFY_PIECE)]
            seg = g.add(block_key(token, a, b), resume_segment, job, kernel, prev, *pieces,
                        annotations={"priority": _CARRY_PRIORITY})
            tasks.append(seg)
            if b <= last:
                prev = g.add(f"{prefix}-carry-{token}-{b - 1:06d}", segment_carry, seg,
                             annotations={"priority": _CARRY_PRIORITY})
            continue
        for i in range(a, b):
            start, stop = bounds[i]
            # the gate bounds the results held in memory; a written block holds none
            gate = writes[i - L] if i >= L and (i - L) not in done else None
            # route: only the computes are restricted
            res = g.add(f"{prefix}-compute-{token}-{i:06d}", compute_block, job, kernel, i, start, stop, gate,
                        annotations={"priority": -i, **(annotations or {})})
            before = prev
            if i < last:
                prev = g.add(f"{prefix}-carry-{token}-{i:06d}", carry_block, out, res, before,
                             annotations={"priority": _CARRY_PRIORITY})
            writes[i] = g.add(block_key(token, i), write_block, job, kernel, res, before, prev if i < last else None,
                              annotations={"priority": _WRITE_PRIORITY})
            tasks.append(writes[i])
    return tasks
