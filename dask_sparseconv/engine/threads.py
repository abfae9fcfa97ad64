"""Batch parallelism for CPU engines, safe under concurrent callers.

Numba's ``parallel=True`` runs on a threading layer whose default
(workqueue) aborts when two threads enter parallel regions at once, and dask
workers call a cached convolver from several threads. So the CPU kernels are
serial ``nogil`` functions over a range of images, and the parallelism lives
here: the batch is cut into contiguous ranges, the calling thread computes the
first, and a shared pool of plain Python threads computes the rest with the
GIL released. Pool threads never submit work to the pool, so a saturated pool
delays a call but cannot deadlock it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


_cpus: int | None = None


def default_threads() -> int:
    """Threads a single convolver call may use: the CPUs this process may run on.

    Read once per process (and again in a forked child): every construction
    of a convolver asks, and the system call cost ~10 us of a ~200 us
    construction after an idle spell (docs/benchmarks.md, issue #15). An
    affinity changed later in the process's life is not seen; pass
    ``n_threads`` then.
    """
    global _cpus
    if _cpus is None:
        try:
            _cpus = max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            _cpus = max(1, os.cpu_count() or 1)
    return _cpus


def _forget_cpus() -> None:
    global _cpus
    _cpus = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_cpus)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, default_threads()), thread_name_prefix="dask-sparseconv")
        return _pool


def split_ranges(weights: Sequence[int] | None, n_items: int, n_chunks: int) -> list[tuple[int, int]]:
    """Cut ``range(n_items)`` into at most ``n_chunks`` contiguous ranges.

    With ``weights`` (for example a CSR ``indptr``, length ``n_items + 1``) the
    cuts balance cumulative work rather than item counts.
    """
    n_chunks = max(1, min(n_chunks, n_items))
    if n_chunks == 1:
        return [(0, n_items)]
    if weights is None:
        bounds = [round(i * n_items / n_chunks) for i in range(n_chunks + 1)]
    else:
        import numpy as np

        # integer arithmetic and one searchsorted: this runs on every threaded
        # engine call, where linspace & co. cost a tenth of a small call
        cum = np.asarray(weights, dtype=np.int64) + np.arange(n_items + 1, dtype=np.int64)  # +1 per item: empty rows still cost
        lo, total = int(cum[0]), int(cum[-1]) - int(cum[0])
        targets = [lo + (total * i + n_chunks - 1) // n_chunks for i in range(1, n_chunks)]
        bounds = [0, *np.searchsorted(cum, targets, side="left").tolist(), n_items]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out.append((a, b))
    return out or [(0, n_items)]


def run_ranges(func: Callable[[int, int], T], ranges: list[tuple[int, int]]) -> list[T]:
    """Run ``func(start, stop)`` for each range; the first in this thread. Results in order.

    A range whose pool thread has not started by the time this thread is
    free is taken back and run here: on a busy machine a woken pool thread
    can wait milliseconds for a core, and the call should then cost no
    more than running serially. (This thread should get the slowest range:
    waiting for a pool thread's result costs a wake-up, while a finished
    pool range is picked up at once.)
    """
    if len(ranges) == 1:
        return [func(*ranges[0])]
    pool = _get_pool()
    futures = [pool.submit(func, a, b) for a, b in ranges[1:]]
    results = [func(*ranges[0])]
    for f, (a, b) in zip(futures, ranges[1:]):
        results.append(func(a, b) if f.cancel() else f.result())
    return results
