"""Kernel banks in a store job: several kernels over one read of each block.

A bank is a kernel argument of shape ``(K, kH, kW)``. Each block is read,
converted to canonical CSR and given its boundary ghosts once; each kernel's
engine then runs over it in memory (:class:`~dask_sparseconv.Convolver`
with a 3-D kernel). What is written:

* dense output: one ``(n, K, H_out, W_out)`` array, chunked by block with
  all K kernels in each chunk, so a block is one write as for one kernel
  (the graph of :mod:`~dask_sparseconv.pipeline.graph`, unchanged);
* CSR output: one anndata ``csr_matrix`` group per kernel under the target
  group, named by the kernel's name, each a complete output of its own
  (provenance, markers, the write-once chain of
  :mod:`~dask_sparseconv.pipeline.csr_chain`). Each block's compute task
  feeds the K chains (:func:`bank_chain_graph`).

Both carry per-kernel provenance: ``kernels: [{name, kernel_sha, kernel}]``
on the output (dense) or the parent group, and each CSR member's own
``kernel_sha``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from ..kernels import kernel_digest
from .csr_chain import (
    _CARRY_PRIORITY,
    _WRITE_PRIORITY,
    VERIFY_PIECE,
    BlockResult,
    SegmentResult,
    carry_block,
    lag,
    resume_segment,
    segment_carry,
    segment_stats,
    verify_blocks,
    write_block,
    written_runs,
)
from .tasks import BlockStats, read_convolve

#: What a kernel's name may be: a zarr node name that is also a plain file name.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_kernel_names(names: Any, kernel: np.ndarray) -> list[str] | None:
    """The kernels' names of a bank (default ``'0'``, ``'1'``, ...); None
    for one 2-D kernel, which takes no names."""
    if kernel.ndim != 3:
        if names is not None:
            raise ValueError(f"kernel_names is for a kernel bank (a 3-D kernel (K, kH, kW)); got a 2-D kernel and "
                             f"kernel_names={names!r}")
        return None
    K = int(kernel.shape[0])
    if names is None:
        return [str(k) for k in range(K)]
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"kernel_names must be a list of {K} strings; got {names!r}")
    names = list(names)
    if len(names) != K:
        raise ValueError(f"kernel_names must name each of the {K} kernels; got {len(names)} names: {names!r}")
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name) or name.startswith("__"):
            raise ValueError(f"kernel_names: {name!r} is not a usable name; use letters, digits, '_', '-' and '.' "
                             "(up to 64, not starting with '.', '-' or '__')")
    if len(set(names)) != K:
        raise ValueError(f"kernel_names must be distinct; got {names!r}")
    return names


def kernel_records(kernel: np.ndarray, names: list[str]) -> list[dict]:
    """Per-kernel provenance of a bank: name, digest, values when small."""
    out = []
    for name, k in zip(names, kernel):
        rec: dict[str, Any] = {"name": name, "kernel_sha": kernel_digest(k), "kernel_shape": list(k.shape)}
        if k.size <= 256:
            rec["kernel"] = k.tolist()
        out.append(rec)
    return out


# -- CSR banks: K chains fed by one compute per block ----------------------------------------------


def compute_bank_block(job: tuple, kernel, index: int, start: int, stop: int, gate: Any = None) -> list:
    """Read and convolve block ``index`` with every kernel of the bank: one
    :class:`~dask_sparseconv.pipeline.csr_chain.BlockResult` per kernel.
    ``job``: ``(source, member outputs, bank spec)``; ``gate``: only waited for."""
    import os
    import time

    from ..storage.csr_store.output import canonical_result

    src, outs, spec = job
    t0 = time.time()
    nnz_in, res, read_s, conv_s, engine = read_convolve(src, spec, kernel, index, start, stop, sparse_ok=False)
    results = []
    for k, (out, r) in enumerate(zip(outs, res)):
        r = canonical_result(r, stop - start, out.n_cols, index)
        # the read and the convolution are the block's, counted once (on kernel 0)
        stats = BlockStats(index, start, stop, nnz_in if k == 0 else 0, int(r.nnz), t0,
                           read_s if k == 0 else 0.0, conv_s if k == 0 else 0.0, 0.0, os.getpid(),
                           counts=np.diff(r.indptr).astype(np.int64), **engine)
        results.append(BlockResult(stats, r))
    return results


def carry_all(outs: list, results: list, prevs: list | None) -> list:
    """The K kernels' carries after a block, in one task: one chain of small
    tasks instead of K (each link costs a scheduler round trip)."""
    return [carry_block(out, res, None if prevs is None else prev)
            for out, res, prev in zip(outs, results, prevs or [None] * len(outs))]


def write_all(members_job: tuple, kernel, results: list, prevs: list | None, after: Any = None) -> list:
    """A block's writes for the K kernels, in one task (the block's key):
    :func:`~dask_sparseconv.pipeline.csr_chain.write_block` of each result
    after the carries of the block before. One task, not K: at 63 blocks of
    4 kernels the extra tasks cost ~1 s of a 3.7 s job on 2 workers.
    ``members_job``: ``(source, member outputs, one-kernel spec)``."""
    src, outs, spec = members_job
    return [write_block((src, out, spec), kernel[k], results[k], None if prevs is None else prevs[k], after)
            for k, out in enumerate(outs)]


def segment_carries(*segments) -> list:
    """The K kernels' carries after a run of kept blocks."""
    return [segment_carry(seg) for seg in segments]


def member_carry(prevs: list | None, k: int):
    return None if prevs is None else prevs[k]


def bank_segment(*segments: SegmentResult) -> SegmentResult:
    """The key task of a run of kept blocks: per block, the K kernels' stats."""
    return SegmentResult(None, [list(per_block) for per_block in zip(*(seg.stats for seg in segments))])


def bank_chain_graph(g, bank_job, kernel, members_job, member_jobs: list, member_kernels: list, outs, bounds,
                     done: set[int], annotations: dict, token: str, threads: int, prefix: str, block_key) -> list:
    """Add a CSR bank's K chains to ``g`` (a :class:`~dask_sparseconv.pipeline.graph.TaskGraph`);
    returns the block tasks' references (their values: lists of K :class:`BlockStats`,
    or for a run of kept blocks a :class:`SegmentResult` of such lists).
    ``outs``: a reference to the list of the K member outputs.

    As :func:`~dask_sparseconv.pipeline.csr_chain.chain_graph`, with one
    compute task per block for all kernels, one carry task (the K kernels'
    carries: one chain, not K) and one write task for the K kernels, the
    block's key (progress counts blocks written by every kernel; ``compute
    i`` waits for ``block i - L``). ``members_job``: a reference to
    ``(source, member outputs, one-kernel spec)``; ``member_jobs`` and
    ``member_kernels``: one reference per kernel, for resumed segments.
    ``done``: blocks written in every member; the others are computed and
    written again in all of them."""
    # Twice a single chain's lag: a bank's block is written by one task doing
    # K writes, longer than its compute, and with the single-kernel lag the
    # computes waited for the writes (4 Gaussians, 63 blocks on 2 workers:
    # 3.3 s, 2.9 s with twice the lag). Each held result is within the
    # planner's block budget, which counts the K outputs.
    L = 2 * lag(threads)
    K = len(member_jobs)
    blocks: list = [None] * len(bounds)  # per block: what a compute L blocks on waits for
    tasks: list = []
    prev = None  # the K carries after the last block added (one task)
    last = len(bounds) - 1
    for a, b, written in written_runs(len(bounds), done):
        if written:
            tag = f"{token}-{a:06d}"
            segs = []
            for k in range(K):
                pieces = [g.add(f"{prefix}-verify{k}-{tag}-{p:06d}", verify_blocks, member_jobs[k],
                                [(i, *bounds[i]) for i in range(p, min(p + VERIFY_PIECE, b))],
                                annotations={"priority": _CARRY_PRIORITY})
                          for p in range(a, b, VERIFY_PIECE)]
                mine = None if prev is None else g.add(f"{prefix}-carryin{k}-{tag}", member_carry, prev, k,
                                                       annotations={"priority": _CARRY_PRIORITY})
                segs.append(g.add(f"{prefix}-segment{k}-{tag}", resume_segment, member_jobs[k], member_kernels[k],
                                  mine, *pieces, annotations={"priority": _CARRY_PRIORITY}))
            if b <= last:
                prev = g.add(f"{prefix}-carry-{token}-{b - 1:06d}", segment_carries, *segs,
                             annotations={"priority": _CARRY_PRIORITY})
            tasks.append(g.add(block_key(token, a, b), bank_segment, *segs, annotations={"priority": _WRITE_PRIORITY}))
            continue
        for i in range(a, b):
            start, stop = bounds[i]
            gate = blocks[i - L] if i >= L and (i - L) not in done else None
            res = g.add(f"{prefix}-compute-{token}-{i:06d}", compute_bank_block, bank_job, kernel, i, start, stop, gate,
                        annotations={"priority": -i, **(annotations or {})})
            before = prev
            if i < last:
                prev = g.add(f"{prefix}-carry-{token}-{i:06d}", carry_all, outs, res, before,
                             annotations={"priority": _CARRY_PRIORITY})
            blocks[i] = g.add(block_key(token, i), write_all, members_job, kernel, res, before,
                              prev if i < last else None, annotations={"priority": _WRITE_PRIORITY})
            tasks.append(blocks[i])
    return tasks


def combined_stats(per_kernel: list) -> BlockStats:
    """One block's stats over the K kernels: read and convolution once, the
    outputs' nonzeros and write times added up."""
    first = per_kernel[0]
    return dataclasses.replace(first, nnz_in=max(s.nnz_in for s in per_kernel),
                               nnz_out=int(sum(s.nnz_out for s in per_kernel)),
                               read_s=max(s.read_s for s in per_kernel),
                               convolve_s=max(s.convolve_s for s in per_kernel),
                               write_s=float(sum(s.write_s for s in per_kernel)), counts=None)


def finish_bank(parent, outs: list, info, names: list[str], *blocks: list):
    """The last task of a CSR bank job: finish every member (indptr, its
    completion flag), then the parent group's completion flag; the summary."""
    import time

    from .summary import summarize

    blocks = tuple(segment_stats(blocks))
    p0 = time.perf_counter()
    for k, out in enumerate(outs):
        out.finish(sorted((b[k] for b in blocks), key=lambda s: s.index), info.resumed)
    per_kernel_nnz = [int(sum(b[k].nnz_out for b in blocks)) for k in range(len(outs))]
    parent.finish(per_kernel_nnz)
    summary = summarize(parent, info, [combined_stats(b) for b in blocks], time.perf_counter() - p0)
    summary.kernels = list(names)
    summary.nnz_per_kernel = per_kernel_nnz
    info.release_lock()
    return summary


__all__ = ["bank_chain_graph", "check_kernel_names", "compute_bank_block", "finish_bank", "kernel_records"]
