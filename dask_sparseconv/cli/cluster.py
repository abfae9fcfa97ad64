"""The cluster a run computes on (a local one or a scheduler address), and following the graph's block tasks."""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import Any, Iterator

from .errors import CLIError


def launch_local_workers(path: str, verbose: bool) -> None:
    """Launch the fork server of a local cluster's workers
    (:mod:`dask_sparseconv.runtime.forkserver`) if the workflow at ``path``
    asks for a local cluster: called by ``main`` for ``run`` as soon as the
    arguments are parsed, before the commands (numpy) and dask are imported,
    since the server's load (~1.5 s on the other core) is what a local run
    waits for first. Its environment is guessed without dask's config;
    :func:`confirm_local_workers` checks it."""
    section = local_cluster_section(path)
    if section is not None:
        from ..runtime import forkserver

        forkserver.start(env=local_worker_env(section, verbose, guess=True), guess=True)


def confirm_local_workers(path: str, verbose: bool) -> None:
    """Keep the server :func:`launch_local_workers` launched when the
    environment computed from dask's config is the one it guessed; else it
    is started again with the right one (or the workers are spawned)."""
    section = local_cluster_section(path)
    if section is not None:
        from ..runtime import forkserver

        forkserver.confirm(env=local_worker_env(section, verbose))


def local_cluster_section(path: str) -> dict | None:
    """The workflow file's ``cluster`` section when it names no
    ``address`` (a local cluster), read before the file's full check
    (0.3-0.7 s: pydantic, and the storage code for an output format);
    None otherwise: anything odd says no, and the check then reports it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        cluster = data.get("cluster") or {}
        return cluster if isinstance(cluster, dict) and cluster.get("address") is None else None
    except Exception:
        return None


def local_worker_env(cluster: Any, verbose: bool, guess: bool = False) -> dict[str, str]:
    """Environment for local worker processes: glibc's allocator set to reuse
    a block's memory (:mod:`dask_sparseconv.runtime.allocator`; not under a
    small ``memory_limit``); without ``--verbose``, quiet logs, since their
    task-failure logs and warnings would otherwise print tracebacks on our
    stderr. Variables the user set are left as they are.

    ``cluster``: the workflow's ``cluster`` section, checked or as read.
    ``guess=True``: without importing dask, taking its config to hold no
    allocator settings of the user's (see :func:`launch_local_workers`)."""
    from ..runtime.allocator import block_worker_malloc, worker_memory_limit

    section = cluster if isinstance(cluster, dict) else vars(cluster)
    try:
        limit = worker_memory_limit(section.get("memory_limit", "auto"), int(section.get("threads_per_worker") or 1),
                                    guess=guess)
        env = block_worker_malloc(memory_limit=limit, config={} if guess else None)
    except (ValueError, TypeError):  # an odd value, which the workflow's check reports
        env = {}
    if not verbose:
        env.update({"DASK_LOGGING__DISTRIBUTED": "critical", "PYTHONWARNINGS": "ignore"})
    return {k: v for k, v in env.items() if k not in os.environ}


def local_threads(cluster) -> int:
    if cluster.address is not None:
        return 1  # unknown until connected; see describe_cluster
    n_workers = cluster.n_workers or default_n_workers(cluster.threads_per_worker)
    return n_workers * cluster.threads_per_worker


def default_n_workers(threads_per_worker: int) -> int:
    from ..engine.threads import default_threads

    return max(1, default_threads() // max(1, threads_per_worker))


@contextlib.contextmanager
def open_client(cluster, source: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for the workflow's ``cluster`` section.

    ``address`` connects to a running scheduler (failing after
    ``cluster.timeout`` seconds with a clear message); otherwise a
    ``LocalCluster`` of worker processes is started (forked from the warm
    server of :mod:`dask_sparseconv.runtime.forkserver` when the command
    started it) and closed afterwards.
    """
    from distributed import Client

    from ..runtime.collector import resume as resume_collector
    from ..runtime.forkserver import start_cluster

    where = f" (cluster.address in {source})" if source else ""
    if cluster.address is not None:
        kwargs: dict[str, Any] = {"timeout": cluster.timeout, "set_as_default": True}
        if cluster.security is not None:
            from distributed.security import Security

            kwargs["security"] = Security(
                tls_ca_file=cluster.security.ca_file,
                tls_client_cert=cluster.security.cert_file,
                tls_client_key=cluster.security.key_file,
                require_encryption=True,
            )
        try:
            client = Client(cluster.address, **kwargs)
        except ssl.SSLError as exc:
            raise CLIError(
                f"TLS setup for {cluster.address} failed{where}: {exc}; check the files in cluster.security"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise CLIError(
                f"cannot reach the dask scheduler at {cluster.address} within {cluster.timeout:g} s{where}: {exc}. "
                "Start one with `dask scheduler` and `dask worker <address>`, or remove cluster.address to use a "
                "local cluster."
            ) from None
        except ValueError as exc:
            raise CLIError(f"cannot connect to {cluster.address}{where}: {exc}") from None
        resume_collector()
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = cluster.n_workers or default_n_workers(cluster.threads_per_worker)
    kwargs = {
        "n_workers": n_workers,
        "threads_per_worker": cluster.threads_per_worker,
        "memory_limit": cluster.memory_limit if cluster.memory_limit is not None else 0,
        "processes": True,
        "dashboard_address": cluster.dashboard_address,
        "preload": worker_preloads(),
    }
    try:
        lc = start_cluster(**kwargs)
    except Exception as exc:
        raise CLIError(f"could not start a local dask cluster ({n_workers} workers): {exc}") from exc
    try:
        with Client(lc, set_as_default=True) as client:
            resume_collector()
            yield client
            # reached only when the command's work ended without an error
            from ..runtime.process_exit import freeze_workers

            freeze_workers(client)
    finally:
        lc.close()


def worker_preloads() -> list[str]:
    """The local workers' preloads: the user's (``distributed.worker.preload``
    in dask's config, which an explicit list would otherwise replace) and
    ours, which makes them ignore Ctrl-C: the command handles it and stops
    them (:mod:`dask_sparseconv.runtime.worker_signals`)."""
    import dask

    users = dask.config.get("distributed.worker.preload", default=None) or []
    if isinstance(users, str):
        users = [users]
    return [*users, "dask_sparseconv.runtime.worker_signals"]


def dashboard_text(client) -> str:
    from ..validation import module_available

    if not module_available("bokeh"):
        return "not available (pip install 'dask-sparseconv[dashboard]', i.e. bokeh>=3.1, to get one)"
    link = getattr(client, "dashboard_link", None)
    return link or "not available"
