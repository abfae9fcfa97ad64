"""The command's local workers, forked from a warm server instead of spawned.

A spawned worker is a new interpreter: before its first block it imports
distributed, numpy, zarr, numba and this package and loads the compiled
engine, ~0.5 s of CPU per worker that a small job or a resumed one pays in
full (docs/benchmarks.md, "Resume"). Python's fork server does that once: the
command starts it (:func:`start`) as soon as it knows it will start a local
cluster, the server imports :mod:`.worker_preload` on the other core while the
client plans the job, and each worker is then forked from it ready to work.

Only the command's own local cluster uses it (:func:`start_cluster`); a
user's cluster, and ``LocalCluster`` objects made in a notebook, are not
touched. Where the server cannot start (no ``forkserver`` start method, or
any error), workers are spawned as before.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

#: The module the fork server imports before it forks a worker.
PRELOAD = "dask_sparseconv.runtime.worker_preload"

_started = False


def start(env: dict[str, str] | None = None) -> bool:
    """Start the fork server in the background (once per process); True when
    local workers can be forked from it.

    The workers inherit the server's environment: this process's, taken
    now, plus ``env`` (which this process does not keep).
    """
    global _started
    if _started:
        return True
    try:
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return False
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
        previous = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            forkserver.ensure_running()  # returns once the server is launched, not loaded
        finally:
            for k, v in previous.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    except Exception:
        return False
    _started = True
    return True


def start_cluster(**kwargs: Any):
    """A ``distributed.LocalCluster(**kwargs)`` whose workers are forked from
    the server when :func:`start` has started it, else spawned. A cluster
    whose forked workers fail to start is started again with spawned ones."""
    import dask
    from distributed import LocalCluster

    if _started:
        import distributed.utils

        # distributed sets its own preload on first use of a fork server,
        # importing pandas and others into this process to do it (0.14 s
        # here); the server already runs with ours, so skip that
        if hasattr(distributed.utils, "_forkserver_preload_set"):
            distributed.utils._forkserver_preload_set = True
        try:
            with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
                return LocalCluster(**kwargs)
        except Exception:
            pass
    return LocalCluster(**kwargs)


__all__ = ["PRELOAD", "start", "start_cluster"]
