"""The engines' thread helpers: batch splits and the CPU count a call may use."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import scipy.signal
import scipy.sparse

from dask_sparseconv import Convolver
from dask_sparseconv.engine.threads import default_threads


def _child(queue) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    conv = Convolver((8, 9), np.ones((3, 3)), mode="same")
    x = np.zeros((2, 8, 9))
    x[0, 3, 4], x[1, 7, 8] = 1.0, 2.0
    out = conv(scipy.sparse.csr_matrix(x.reshape(2, -1))).toarray().reshape(2, 8, 9)
    ok = all(np.allclose(out[i], scipy.signal.convolve2d(x[i], np.ones((3, 3)), mode="same")) for i in range(2))
    queue.put((default_threads(), conv.n_threads, ok))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 CPUs to narrow the affinity")
def test_the_cpu_count_is_read_again_in_a_forked_child():
    """The CPUs a call may use are read once per process: a forked child
    (a dask worker forked from a server, say) with a narrower affinity
    must read its own, not inherit its parent's count."""
    parent = default_threads()
    assert parent == len(os.sched_getaffinity(0)) >= 2
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    threads, conv_threads, ok = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert (threads, conv_threads, ok) == (1, 1, True)
    assert default_threads() == parent
