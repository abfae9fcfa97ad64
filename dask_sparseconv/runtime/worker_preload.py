"""What the command's fork server loads before it forks a local worker.

Imported once, in the fork server process of :mod:`.forkserver`: the
modules a worker and its block tasks import, and the compiled functions a
block calls in every job (the direct engine's CSR path, the dense reader's
gather, the dense writer's digest), loaded from numba's cache or compiled.
A worker forked from the server starts with all of it in memory.

Nothing here starts a thread or touches a store (no zarr reads or writes, no
torch): a child forked from a process with threads can inherit a lock that
no thread of its own will ever release. Nothing here raises either: the
server would die with it and no worker could start (the command then
starts its workers the usual way, see :func:`.forkserver.start_cluster`).
"""

from __future__ import annotations

import gc
import os
import signal

from dask_sparseconv.runtime.forkserver import UNBLOCK_SIGINT


def warm() -> None:
    """Import the worker's modules and load the compiled functions every job calls."""
    import distributed.nanny  # noqa: F401  (the worker process's entry point)
    import distributed.worker  # noqa: F401
    import numpy as np

    import dask_sparseconv.cli.main  # noqa: F401  (re-run as the child's __mp_main__)
    import dask_sparseconv.pipeline  # noqa: F401  (block tasks)
    from dask_sparseconv.convolver import Convolver
    from dask_sparseconv.storage.dense_store import dense_to_csr
    from dask_sparseconv.storage.progress import nonzero_digest

    for dtype in (np.float32, np.float64):
        frame = np.zeros((2, 64), dtype=dtype)
        frame[0, 9] = 1
        x = dense_to_csr(frame)
        kernel = np.ones((3, 3), dtype=dtype)
        conv = Convolver((8, 8), kernel, mode="same", method="direct", backend="numba", dtype=dtype)
        y = conv(x)
        nonzero_digest(y.indices.astype(np.int64), y.data)


# Ctrl-C in a terminal reaches the whole process group, this server too:
# the command stops the run (and the server with it), so the server ignores
# it for good rather than print a traceback beside the command's one line,
# and so do the workers forked from here (multiprocessing gives them the
# server's handler; see worker_signals for why workers ignore it).
signal.signal(signal.SIGINT, signal.SIG_IGN)
# forkserver.start blocked it across the server's launch, so that one
# arriving during Python's start-up waits; ignored now, it is dropped
if os.environ.pop(UNBLOCK_SIGINT, None) == "1":
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
# The load creates a few hundred thousand objects that all stay alive
# (modules, numba's typing registries, LLVM wrappers): the collector's passes
# over them while it runs free next to nothing and cost ~0.35 s of its ~2 s
# of CPU here. Off while loading, on again for the workers forked after.
gc.disable()
try:
    warm()
except Exception:  # a worker then imports and loads what it needs itself
    pass
finally:
    # The children share these objects: kept out of the collector's walks,
    # their pages are not written (copied) by every collection in every worker.
    gc.freeze()
    gc.enable()
