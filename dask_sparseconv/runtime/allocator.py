"""The memory allocator of the command's local workers.

distributed starts every worker with glibc's ``MALLOC_TRIM_THRESHOLD_`` set
(65536, its ``distributed.nanny.pre-spawn-environ``), so that freed memory
goes back to the system at once. Setting any of glibc's thresholds also
turns off its *dynamic* mmap threshold, so every allocation over 128 KiB is
mapped afresh and its pages faulted in and zeroed on first touch: a block
task allocates its input, result and encoded chunks (tens of MB each) anew
for every block. On the resume benchmark's jobs, clean commands take
0.74-0.87 of the time they took under it (medians of 5 runs; 0.84-0.88 as
medians of pairs; docs/benchmarks.md, "Workers' allocator").

The command's own local workers start instead with glibc's allocator
serving blocks up to :data:`MMAP_THRESHOLD` from its heap and keeping up to
:data:`TRIM_THRESHOLD` of it freed at the heap's top for the next block:
the default block budget's arrays are reused, not faulted in again. This is
the same trade glibc makes by itself in a process that frees a large block
(its dynamic thresholds then rise to 32 / 64 MiB), with room for one default
block. A worker holds at most that much more than it would under
distributed's setting.

A choice of the user's stands: a ``MALLOC_*`` variable in the command's
environment, or in ``distributed.nanny.pre-spawn-environ`` of dask's config,
leaves these alone. So does a worker memory limit under
:data:`MIN_MEMORY_LIMIT`: near its limit a worker is paused or restarted on
its resident memory, in which freed memory kept for reuse would count.
"""

from __future__ import annotations

import os

#: Allocations up to this size come from glibc's heap (the default block budget).
MMAP_THRESHOLD = 64 << 20
#: Freed memory at the top of the heap kept for reuse (glibc's dynamic rule: 2x the mmap threshold).
TRIM_THRESHOLD = 128 << 20
#: Workers limited to less memory than this keep distributed's setting.
MIN_MEMORY_LIMIT = 2 << 30


def block_worker_malloc(environ: dict[str, str] | None = None, config: dict | None = None,
                        memory_limit: int | None = None) -> dict[str, str]:
    """The ``MALLOC_*`` variables a local block worker should start with
    (``{}`` when the user chose the allocator's settings, or when the
    worker's memory limit is under :data:`MIN_MEMORY_LIMIT`).

    ``environ``: the command's environment (default ``os.environ``);
    ``config``: ``distributed.nanny.pre-spawn-environ`` as the user set it
    (default: read from dask's config, where distributed's own default
    ``MALLOC_TRIM_THRESHOLD_`` does not count as a choice);
    ``memory_limit``: each worker's limit in bytes, None for none
    (:func:`worker_memory_limit`).
    """
    if memory_limit is not None and memory_limit < MIN_MEMORY_LIMIT:
        return {}
    environ = os.environ if environ is None else environ
    if config is None:
        config = _user_pre_spawn_environ()
    if any(k.startswith("MALLOC_") for k in environ) or any(
            k.startswith("MALLOC_") and v is not None for k, v in config.items()):
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def worker_memory_limit(memory_limit, threads_per_worker: int = 1, guess: bool = False) -> int | None:
    """Each local worker's memory limit in bytes as ``LocalCluster`` sets
    it from the workflow's ``cluster.memory_limit`` (None or 0: no limit;
    ``'auto'``: the machine's memory times the worker's share of its cores;
    else a size such as ``'2GiB'``). Raises ValueError for what is none of
    these (the workflow's check then reports it).

    ``guess=True`` reads a size without importing dask (for the fork
    server's early launch, :func:`dask_sparseconv.runtime.forkserver.start`,
    which checks it against this function's exact answer afterwards)."""
    if memory_limit is None or memory_limit == 0:
        return None
    if memory_limit == "auto":
        # distributed's own rule (its parse_memory_limit), computed here
        # because importing distributed would delay the fork server by ~0.25 s
        cores = os.cpu_count() or 1
        share = min(1.0, max(1, int(threads_per_worker)) / cores)
        return int(_machine_memory() * share)
    if guess:
        value = _guess_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
    else:
        from dask.utils import parse_bytes

        value = parse_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
    return None if value == 0 else value


#: Units of a size, as dask's ``parse_bytes`` reads them (case aside).
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50}


def _guess_bytes(text: str) -> int:
    """A size such as ``'2GiB'`` or ``'1.5 GB'`` in bytes (ValueError when it is not one)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _machine_memory() -> int:
    """Physical memory, or the cgroup (v2) limit of this process when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            text = f.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def _user_pre_spawn_environ() -> dict:
    """``distributed.nanny.pre-spawn-environ`` of dask's config without
    distributed's own defaults (which it adds when it is imported)."""
    import dask.config

    from .forkserver import distributed_defaults

    current = dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}
    defaults = distributed_defaults()
    return {k: v for k, v in current.items() if k not in defaults or str(defaults[k]) != str(v)}
