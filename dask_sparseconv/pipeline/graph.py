"""The dask graph of a store-to-store job, and the names of its keys.

::

    kernel ─┐
    job    ─┼─> block 0: run_block (read -> convolve -> write) ─┐
            │   block 1: ...                                     ├─> finish (completion flag; CSR: indptr)
            └─> ...                                              ┘

A resumed dense job's written blocks are checked (and kept) by one task per
piece of ``VERIFY_PIECE`` of them (:func:`~.tasks.run_kept_blocks`), whose
key stands for all of its blocks (:func:`block_key`).

CSR outputs replace each block task by compute -> carry / write
(:mod:`~dask_sparseconv.pipeline.csr_chain`): a block's values go at an
offset that the blocks before it decide.

Every key carries one job token, so the CLI (and tests) find a job's block
tasks with :func:`block_keys`. A store job writes, so its token is unique
per graph built; lazy arrays (:mod:`~dask_sparseconv.pipeline.lazy`) use
content tokens instead so that identical calls share work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..kernels import kernel_digest
from ..row_blocks import RowBlocks
from .csr_chain import VERIFY_PIECE, chain_graph, segment_stats, written_runs
from .spec import BlockSpec
from .summary import JobInfo, summarize
from .tasks import run_block, run_kept_blocks

PREFIX = "sparseconv"
#: Priority of a resumed dense job's checks of its written blocks (block tasks: 0, higher first).
KEPT_PRIORITY = -1


class TaskGraph:
    """A graph built one task at a time, each task its own layer (as
    :func:`dask.delayed` names them), in time linear in the tasks.

    Chaining :func:`dask.delayed` calls merges every earlier layer into each
    new call's graph: building a CSR chain of 800 blocks that way took 2.6 s
    of the client's time, here 0.08 s (docs/benchmarks.md, "Figures behind
    the code"). ``add`` returns a :class:`~dask._task_spec.TaskRef` to pass
    to later tasks.
    """

    def __init__(self, *nodes) -> None:
        from dask.highlevelgraph import MaterializedLayer

        self.layers: dict[str, Any] = {}
        self.dependencies: dict[str, set[str]] = {}
        for node in nodes:  # data nodes (job, kernel, target): unannotated, whatever annotate() was active
            for name, layer in node.__dask_graph__().layers.items():
                self.layers[name] = MaterializedLayer(dict(layer))
                self.dependencies[name] = set()

    def add(self, key: str, func, *args, annotations: dict | None = None):
        from dask._task_spec import Task, TaskRef
        from dask.highlevelgraph import MaterializedLayer

        task = Task(key, func, *args)
        self.layers[key] = MaterializedLayer({key: task}, annotations=dict(annotations) if annotations else None)
        self.dependencies[key] = {str(d) for d in task.dependencies}
        return TaskRef(key)

    def delayed(self, key: str):
        """The :class:`~dask.delayed.Delayed` of ``key`` over the whole graph."""
        from dask.delayed import Delayed
        from dask.highlevelgraph import HighLevelGraph

        return Delayed(key, HighLevelGraph(self.layers, self.dependencies))


def block_key(token: str, i: int, stop: int | None = None) -> str:
    """The key of block ``i``'s task, or of one task that stands for blocks
    ``[i, stop)`` (a resumed run's written blocks, carried over together)."""
    if stop is None or stop == i + 1:
        return f"{PREFIX}-block-{token}-{i:06d}"
    return f"{PREFIX}-block-{token}-{i:06d}-{stop:06d}"


def key_blocks(key: str) -> int:
    """How many blocks a block key (:func:`block_key`) stands for."""
    *_, a, b = str(key).rsplit("-", 2)
    return int(b) - int(a) if len(a) == len(b) == 6 and a.isdigit() and b.isdigit() else 1


def kernel_node(kernel: np.ndarray):
    """The kernel as one graph key (content-named): it travels to each worker once per graph."""
    from dask import delayed

    return delayed(kernel, name=f"{PREFIX}-kernel-{kernel_digest(kernel)}", traverse=False)


def block_keys(graph: Any) -> list[str]:
    """The block task keys of a graph built by :func:`store_graph`, in block order."""
    key = str(graph.key)
    token = key.rsplit("-", 1)[-1] if key.startswith(f"{PREFIX}-finish-") else None
    prefix = f"{PREFIX}-block-{token}-" if token else f"{PREFIX}-block-"
    return sorted(k for k in graph.__dask_graph__() if isinstance(k, str) and k.startswith(prefix))


def store_graph(src, out, kernel: np.ndarray, blocks: RowBlocks, spec: BlockSpec, info: JobInfo, *,
                annotations: dict | None = None, done: set[int] | None = None, threads: int = 1):
    """One Delayed whose result is the job's :class:`~dask_sparseconv.ConvolveSummary`."""
    import uuid

    import dask
    from dask import delayed

    token = uuid.uuid4().hex  # a store job writes: never share its tasks with another graph's
    knode = kernel_node(kernel)
    job_node = delayed((src, out, spec), name=f"{PREFIX}-job-{token}", traverse=False)
    out_node = delayed(out, name=f"{PREFIX}-target-{token}", traverse=False)
    finish_key = f"{PREFIX}-finish-{token}"
    if out.chained:
        from dask._task_spec import TaskRef

        g = TaskGraph(job_node, knode, out_node)
        writes = chain_graph(g, TaskRef(job_node.key), TaskRef(knode.key), TaskRef(out_node.key), blocks.bounds,
                             done or set(), annotations or {}, token, threads, PREFIX, block_key)
        g.add(finish_key, finish_job, TaskRef(out_node.key), info, *writes)
        return g.delayed(finish_key)
    else:
        run = delayed(run_block, pure=False)
        run_kept = delayed(run_kept_blocks, pure=False)
        bounds = blocks.bounds
        stats = []
        with dask.annotate(**(annotations or {})):  # route: only the block tasks are restricted
            for a, b, written in written_runs(len(bounds), done or set()):
                if not written:
                    stats += [run(job_node, knode, i, *bounds[i], dask_key_name=block_key(token, i)) for i in range(a, b)]
                    continue
                # a resumed run's written blocks: checked (and kept) in pieces,
                # one key each, after the blocks to compute: a worker that has
                # no block left checks them while the other ends its last one
                with dask.annotate(priority=KEPT_PRIORITY):
                    for p in range(a, b, VERIFY_PIECE):
                        q = min(p + VERIFY_PIECE, b)
                        stats.append(run_kept(job_node, knode, [(i, *bounds[i]) for i in range(p, q)],
                                              dask_key_name=block_key(token, p, q)))
    # stats go as separate arguments: dask unpacks Delayed arguments cheaply,
    # but optimises a list of them, at a cost that grows with the blocks
    # (figures: docs/benchmarks.md, "Figures behind the code")
    return delayed(finish_job, pure=False)(out_node, info, *stats, dask_key_name=finish_key)


def bank_graph(src, parent, members: list, kernel: np.ndarray, names: list[str], blocks: RowBlocks, spec: BlockSpec,
               member_spec: BlockSpec, info: JobInfo, *, annotations: dict | None = None, done: set[int] | None = None,
               threads: int = 1):
    """:func:`store_graph` of a CSR kernel bank (:mod:`~dask_sparseconv.pipeline.bank`):
    one Delayed whose result is the job's summary."""
    import uuid

    from dask import delayed
    from dask._task_spec import TaskRef

    from .bank import bank_chain_graph, finish_bank

    token = uuid.uuid4().hex
    knode = kernel_node(kernel)
    bank_job = delayed((src, members, spec), name=f"{PREFIX}-job-{token}", traverse=False)
    member_jobs = [delayed((src, m, member_spec), name=f"{PREFIX}-job{k}-{token}", traverse=False)
                   for k, m in enumerate(members)]
    member_kernels = [kernel_node(k) for k in kernel]
    members_job = delayed((src, members, member_spec), name=f"{PREFIX}-jobs-{token}", traverse=False)
    parent_node = delayed(parent, name=f"{PREFIX}-target-{token}", traverse=False)
    outs_node = delayed(members, name=f"{PREFIX}-targets-{token}", traverse=False)
    g = TaskGraph(bank_job, members_job, knode, parent_node, outs_node, *member_jobs, *member_kernels)
    ref = lambda node: TaskRef(node.key)  # noqa: E731
    block_refs = bank_chain_graph(g, ref(bank_job), ref(knode), ref(members_job), [ref(j) for j in member_jobs],
                                  [ref(k) for k in member_kernels], ref(outs_node), blocks.bounds, done or set(),
                                  annotations or {}, token, threads, PREFIX, block_key)
    finish_key = f"{PREFIX}-finish-{token}"
    g.add(finish_key, finish_bank, ref(parent_node), ref(outs_node), info, list(names), *block_refs)
    return g.delayed(finish_key)


def finish_job(out, info: JobInfo, *results):
    """The graph's last task: ``results`` are the block tasks' (a block's
    :class:`~dask_sparseconv.pipeline.tasks.BlockStats`, or a resumed
    segment's :class:`~dask_sparseconv.pipeline.csr_chain.SegmentResult`)."""
    import time

    stats = segment_stats(results)
    p0 = time.perf_counter()
    out.finish(sorted(stats, key=lambda s: s.index), info.resumed)
    summary = summarize(out, info, stats, time.perf_counter() - p0)
    info.release_lock()
    return summary
