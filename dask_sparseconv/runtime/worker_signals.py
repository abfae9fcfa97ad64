"""Loaded into each of the command's local workers (distributed's worker
``preload``): Ctrl-C is the command's to handle, not the workers'.

In a terminal, Ctrl-C reaches the whole foreground process group, the
command's worker processes too. A worker that handled it (asyncio's runner
turns it into a cancelled main task) printed a ``KeyboardInterrupt``
traceback per worker above the command's one line. The command stops its
cluster itself when interrupted, so its workers ignore SIGINT: those forked
from the warm server from birth (:mod:`.worker_preload` leaves it ignored),
spawned ones from the moment this preload runs.

Only the command's own local cluster loads it (``cli/cluster.py``); a
user's workers and ``LocalCluster`` objects of a notebook are not touched.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process (distributed calls this on start)."""
    if threading.current_thread() is threading.main_thread():  # where signal handlers may be set
        signal.signal(signal.SIGINT, signal.SIG_IGN)
