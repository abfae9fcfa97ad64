"""What the pipeline asks of the scheduler that will run its graph: the
active client, its workers and threads, where GPU workers are, and where to
place the tasks that follow the blocks."""

from __future__ import annotations

from typing import Any

from ..validation import check_choice
from .devices import ROUTES


def active_client() -> Any:
    """The distributed client dask would compute on now, or None."""
    try:
        import dask
        from distributed import get_client
    except ImportError:
        return None
    sched = dask.config.get("scheduler", None)
    if sched not in (None, "dask.distributed", "distributed"):
        return None
    try:
        return get_client()
    except ValueError:
        return None


def scheduler_workers() -> dict[str, int] | None:
    """``{worker address: threads}`` of the active distributed client's
    cluster (one scheduler round trip), or None without one."""
    client = active_client()
    if client is None:
        return None
    try:
        return {str(a): int(n) for a, n in client.nthreads().items()}
    except Exception:  # a client that cannot answer right now
        return None


def local_threads() -> int:
    """Threads of dask's local threaded scheduler (``num_workers`` or the CPU count)."""
    import dask
    from dask.system import CPU_COUNT

    n = dask.config.get("num_workers", None)
    try:
        return max(1, int(n)) if n else max(1, int(CPU_COUNT))
    except (TypeError, ValueError):
        return max(1, int(CPU_COUNT))


def scheduler_threads(workers: dict[str, int] | None = None) -> int:
    """Threads the scheduler that will run the graph has (for block planning).
    ``workers``: what :func:`scheduler_workers` returned, if already asked."""
    if workers is None:
        workers = scheduler_workers()
    if workers and sum(workers.values()):
        return int(sum(workers.values()))
    return local_threads()


def host_of(address: str) -> str:
    """The host part of a worker address (``tcp://10.0.0.5:40123`` -> ``10.0.0.5``)."""
    try:
        from distributed.comm import get_address_host

        return str(get_address_host(address))
    except Exception:  # an address distributed cannot parse: the text before the port
        return address.split("://", 1)[-1].rsplit(":", 1)[0]


def host_threads(workers: dict[str, int] | None) -> tuple[tuple[str, int], ...]:
    """``((host, dask threads of every worker on it), ...)`` of a cluster, for
    the job to carry: each worker then sizes its engines' threads from it
    instead of asking the scheduler itself (see :mod:`dask_sparseconv.runtime.cache`)."""
    per_host: dict[str, int] = {}
    for address, n in (workers or {}).items():
        host = host_of(address)
        per_host[host] = per_host.get(host, 0) + max(0, int(n))
    return tuple(sorted(per_host.items()))


def worker_address() -> str | None:
    """The distributed worker running this task, or None (local schedulers)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


def route_annotations(route: str) -> dict:
    """dask annotations that send the block tasks to GPU workers (``'gpu'``),
    to the workers that advertise no GPU (``'cpu'``), or anywhere (``'any'``).

    GPU workers are those started with ``--resources GPU=n``. dask resources
    cannot say "no GPU", so ``'cpu'`` restricts the blocks to the addresses
    of the workers without that resource, read from the scheduler now.
    """
    check_choice("route", route, ROUTES)
    if route == "any":
        return {}
    client = active_client()
    if client is None:
        if route == "cpu":
            return {}  # local scheduler: this process, kept off any GPU by the block spec's route
        raise ValueError("route='gpu' needs a distributed.Client connected to workers started with "
                         "`dask worker <scheduler> --resources GPU=1`; no client is active")
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    gpu = sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) > 0)
    if route == "gpu":
        if not gpu:
            raise ValueError(f"route='gpu': none of the {len(workers)} workers advertises a GPU; start GPU workers "
                             "with `dask worker <scheduler> --resources GPU=1`")
        return {"resources": {"GPU": 1}}
    cpu = sorted(set(workers) - set(gpu))
    if not cpu:
        raise ValueError(f"route='cpu': all {len(workers)} workers advertise a GPU resource; start CPU workers "
                         "without --resources GPU=..., or use route='any'")
    return {"workers": cpu, "allow_other_workers": False}
