"""A per-process cache of :class:`~dask_sparseconv.Convolver` objects.

Every block task of a pipeline graph needs a convolver for the same frame
shape and kernel. Building one can be expensive (a Toeplitz matrix, a JIT
warm-up, a copy of the kernel to a GPU), so each process — a dask worker, or
the client process under the threaded scheduler — builds it once and keeps it
in this cache. Convolvers are built where they are used and never pickled:
only the kernel travels, once per graph.

The cache is

* **bounded**: least recently used entries are dropped beyond
  :func:`set_cache_size` entries (default 8, or the environment variable
  ``DASK_SPARSECONV_CACHE_SIZE``);
* **thread-safe**, with a lock per key, so that concurrent misses for the
  same key (several worker threads starting their first block at once) build
  the convolver only once while the others wait for it;
* **observable**: :func:`cache_stats` returns hits, misses, builds, evictions
  and the current size; ``cache_stats(reset=True)`` (or
  :func:`reset_cache_stats`) zeroes the counters and :func:`clear_cache` also
  drops the entries.

Thread policy (avoid oversubscription)
--------------------------------------
A CPU engine parallelises one call over ``n_threads`` threads, and dask runs
several block tasks at once. The engine thread count is therefore

    n_threads = max(1, cores // concurrent_tasks)

where ``cores`` is the number of CPUs this process may run on
(``os.sched_getaffinity``) and ``concurrent_tasks`` is

* inside a ``distributed`` worker: the dask threads of every worker on
  the same host (asked of the scheduler once a minute; a LocalCluster of
  2 processes x 1 thread on 2 cores gives 2, so each process's engines get
  1 thread), or the worker's own thread count when the scheduler cannot
  say;
* in a thread of dask's local threaded scheduler: the size of its pool
  (``dask.config.get('num_workers')``, else ``dask.system.CPU_COUNT``),
  which by default makes engines single-threaded and lets dask's threads
  carry the parallelism;
* in the main thread (the synchronous scheduler, or a direct call): 1, so
  the engine uses every core.

An explicit ``n_threads`` always wins. The thread count is part of the cache
key, so a process that runs under different schedulers keeps one convolver
per policy.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..convolver import Convolver
from ..engine.threads import default_threads
from ..kernels import kernel_digest
from ..operation import DEFAULT, Operation
from ..validation import check_kernels, check_positive_int

_DEFAULT_SIZE = 8

_lock = threading.Lock()
_entries: "OrderedDict[tuple, Convolver]" = OrderedDict()
_key_locks: dict[tuple, threading.Lock] = {}
_stats = {"hits": 0, "misses": 0, "builds": 0, "evictions": 0}


def _initial_size() -> int:
    raw = os.environ.get("DASK_SPARSECONV_CACHE_SIZE")
    if raw is None:
        return _DEFAULT_SIZE
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"DASK_SPARSECONV_CACHE_SIZE must be a positive integer; got {raw!r}") from None
    return check_positive_int(value, "DASK_SPARSECONV_CACHE_SIZE")


_maxsize = _initial_size()


# -- thread policy ----------------------------------------------------------
def _current_worker():
    """The ``distributed`` worker running this thread's task, or None."""
    try:
        from distributed import get_worker
    except ImportError:  # distributed not installed
        return None
    try:
        return get_worker()
    except ValueError:  # not inside a worker task
        return None


# A worker's peers on its host, from the scheduler: ``{worker address:
# (time read, threads on that host)}``. Re-read after _HOST_TTL seconds so a
# cluster that grows or shrinks is followed.
_HOST_TTL = 60.0
_host_threads: dict[str, tuple[float, int]] = {}


def _threads_on_host(worker) -> int | None:
    """Dask threads of every worker on this worker's host (None if unknown).

    One ``identity`` call to the scheduler, cached per process: a
    LocalCluster of 2 processes x 1 thread on 2 cores must give each
    process's engines 1 thread, not the 2 cores it sees.
    """
    import time as _time

    addr = getattr(worker, "address", None)
    if not addr:
        return None
    now = _time.monotonic()
    hit = _host_threads.get(addr)
    if hit is not None and now - hit[0] < _HOST_TTL:
        return hit[1]
    try:
        from distributed.utils import sync

        info = sync(worker.loop, worker.scheduler.identity, callback_timeout=5)
        workers = info.get("workers", {})
        host = workers[addr]["host"]
        n = sum(int(w.get("nthreads", 0) or 0) for w in workers.values() if w.get("host") == host)
    except Exception:  # no scheduler answer (closing, old version): fall back to this worker's threads
        return None
    if n < 1:
        return None
    _host_threads[addr] = (now, n)
    return n


def concurrent_tasks() -> int:
    """How many block tasks run at once on the cores this process shares, per the thread policy."""
    worker = _current_worker()
    if worker is not None:
        state = getattr(worker, "state", None)
        own = getattr(state, "nthreads", None) or getattr(worker, "nthreads", None) or 1
        return max(1, int(own), int(_threads_on_host(worker) or 0))
    if threading.current_thread() is threading.main_thread():
        return 1
    from .cluster import local_threads

    return local_threads()


def engine_threads(cores: int | None = None, concurrent: int | None = None) -> int:
    """Threads one engine call may use here: ``max(1, cores // concurrent)``.

    ``concurrent``: block tasks running at once on this host, when the caller
    knows it (a job carries its cluster's per-host thread counts); default
    :func:`concurrent_tasks`, which may ask the scheduler."""
    cores = default_threads() if cores is None else max(1, int(cores))
    return max(1, cores // (max(1, int(concurrent)) if concurrent else concurrent_tasks()))


# -- keys ---------------------------------------------------------------------
def cache_key(
    frame_shape: tuple[int, int],
    kernel: np.ndarray,
    mode: str,
    method: str,
    backend: str,
    dtype: Any,
    device: str | None,
    n_threads: int,
    operation: Operation = DEFAULT,
) -> tuple:
    """The key under which a convolver is cached."""
    return (
        operation,
        (int(frame_shape[0]), int(frame_shape[1])),
        tuple(np.shape(kernel)),
        kernel_digest(kernel),
        mode,
        method,
        backend,
        None if dtype is None else np.dtype(dtype).str,
        device,
        int(n_threads),
    )


# -- the cache ----------------------------------------------------------------
def get_convolver(
    frame_shape: tuple[int, int],
    kernel: Any,
    mode: str = "same",
    method: str = "auto",
    backend: str | None = "auto",
    dtype: Any = None,
    device: str | None = None,
    n_threads: int | None = None,
    *,
    gpu_device: str | None = None,
    operation: Operation = DEFAULT,
) -> Convolver:
    """Return the cached convolver for these arguments, building it on a miss.

    Arguments are those of :class:`~dask_sparseconv.Convolver` (``operation``:
    its ``boundary``, ``fillvalue`` and ``correlate``, checked). ``n_threads``
    defaults to :func:`engine_threads` (see the module's thread policy).
    Concurrent calls with the same key build once; the others wait and reuse
    the result.

    ``backend='auto'`` (or None) without a ``device`` is resolved *here, in
    this process* by :func:`dask_sparseconv.runtime.devices.resolve_auto`: torch on
    this process's GPU when it has one and the engine fits, else the CPU
    default. The cache key holds the resolved method, backend and device.
    ``gpu_device`` is passed to the resolver (``'none'`` keeps this call on
    the CPU; ``'cpu'`` simulates an accelerator, see :mod:`~dask_sparseconv.runtime.devices`).
    """
    from ..validation import check_dtype, check_mode, resolve_method_backend

    kernel = np.asarray(kernel)
    if kernel.dtype == object or kernel.ndim not in (2, 3):
        kernel = check_kernels(kernel)
    mode = check_mode(mode)
    dtype = check_dtype(dtype)
    asked_auto = method is None or method == "auto"
    if (backend is None or backend == "auto") and device is None:
        from .devices import resolve_auto

        method, backend, device, _reason = resolve_auto(frame_shape, kernel, dtype, mode, method=method,
                                                        gpu_device=gpu_device)
    method, backend = resolve_method_backend(method, backend)
    if asked_auto and (method, backend) == ("direct", "numba"):
        method = "auto"  # the Convolver may then take the separable path per call (low-rank kernels)
    n_threads = engine_threads() if n_threads is None else check_positive_int(n_threads, "n_threads")
    key = cache_key(frame_shape, kernel, mode, method, backend, dtype, device, n_threads, operation)

    with _lock:
        conv = _entries.get(key)
        if conv is not None:
            _entries.move_to_end(key)
            _stats["hits"] += 1
            return conv
        _stats["misses"] += 1
        key_lock = _key_locks.setdefault(key, threading.Lock())

    with key_lock:
        with _lock:  # built by another thread while we waited?
            conv = _entries.get(key)
            if conv is not None:
                _entries.move_to_end(key)
                return conv
        try:
            conv = Convolver(
                frame_shape, kernel, mode=mode, method=method, backend=backend, dtype=dtype, device=device,
                n_threads=n_threads, boundary=operation.boundary, fillvalue=operation.fillvalue,
                correlate=operation.correlate,
            )
            if conv.backend == "torch" and str(conv.device).startswith("cpu"):
                _cap_torch_threads(n_threads)
            with _lock:
                _stats["builds"] += 1
                _entries[key] = conv
                _entries.move_to_end(key)
                _evict_locked()
        finally:
            with _lock:
                _key_locks.pop(key, None)
    return conv


def _cap_torch_threads(n_threads: int) -> None:
    """Keep torch's CPU intra-op pool within this process's engine-thread
    share. torch's setting is process-wide, so it is only ever lowered, to the
    same ``cores // concurrent tasks`` the numba engines use; otherwise every
    dask thread would run a torch op on all cores at once."""
    import torch

    if torch.get_num_threads() > n_threads:
        torch.set_num_threads(n_threads)


def _evict_locked() -> None:
    while len(_entries) > _maxsize:
        _entries.popitem(last=False)
        _stats["evictions"] += 1


def _scratch_nbytes() -> int:
    direct = sys.modules.get("dask_sparseconv.engine.direct")  # not loaded: no scratch kept
    return int(direct.scratch_nbytes()) if direct is not None else 0


def cache_stats(reset: bool = False) -> dict[str, int]:
    """Counters of this process's convolver cache.

    Returns a dict with ``hits``, ``misses``, ``builds``, ``evictions``,
    ``size`` (convolvers held now), ``maxsize``, ``nbytes`` (memory the held
    convolvers keep between calls), ``scratch_nbytes`` (the frame scratch
    this process's threads keep for the direct engine, shared by every
    convolver: at most 4 frame sizes and 32 MiB a thread) and ``pid``. With
    ``reset=True`` the counters are zeroed after being read (entries are
    kept).

    On a cluster, gather every worker's stats with
    ``client.run(dask_sparseconv.cache_stats)``.
    """
    with _lock:
        out = dict(_stats)
        out["size"] = len(_entries)
        out["maxsize"] = _maxsize
        out["nbytes"] = int(sum(c.nbytes for c in _entries.values()))
        out["scratch_nbytes"] = _scratch_nbytes()
        out["pid"] = os.getpid()
        if reset:
            for k in _stats:
                _stats[k] = 0
    return out


def reset_cache_stats() -> None:
    """Zero the hit/miss/build/eviction counters (entries are kept)."""
    cache_stats(reset=True)


def clear_cache() -> None:
    """Drop every cached convolver and zero the counters."""
    with _lock:
        _entries.clear()
        for k in _stats:
            _stats[k] = 0


def set_cache_size(maxsize: int) -> int:
    """Set the maximum number of cached convolvers; returns the previous value."""
    global _maxsize
    maxsize = check_positive_int(maxsize, "maxsize")
    with _lock:
        previous, _maxsize = _maxsize, maxsize
        _evict_locked()
    return previous


__all__ = [
    "cache_key",
    "cache_stats",
    "clear_cache",
    "concurrent_tasks",
    "engine_threads",
    "get_convolver",
    "reset_cache_stats",
    "set_cache_size",
]
