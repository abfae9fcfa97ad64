"""The command's local workers, forked from a warm server instead of spawned.

A spawned worker is a new interpreter: before its first block it imports
distributed, numpy, zarr, numba and this package (~0.9 s here) and loads the
compiled engine (~0.25 s), which a small job or a resumed one pays in full
(docs/benchmarks.md, "Resume: workers forked from a warm server"). Python's
fork server does that once: the command starts it (:func:`start`) as soon as
it knows it will start a local cluster, the server imports
:mod:`.worker_preload` on the other core while the client plans the job,
and each worker is then forked from it ready to work.

Only the command's own local cluster uses it (:func:`start_cluster`); a
user's cluster, and ``LocalCluster`` objects made in a notebook, are not
touched. Where the server cannot start (other systems than Linux, or any
error), workers are spawned as before; so they are when the user has chosen
a start method in dask's config (``distributed.worker.multiprocessing-method``
other than its default ``spawn``), or set ``DASK_SPARSECONV_FORK_WORKERS=0``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any

#: Set to 0 to have the command's local workers spawned, as before the fork server.
OPT_OUT = "DASK_SPARSECONV_FORK_WORKERS"

#: The module the fork server imports before it forks a worker.
PRELOAD = "dask_sparseconv.runtime.worker_preload"

#: Set in the server's environment when :func:`start` blocked Ctrl-C across
#: its launch: the preload unblocks it once it ignores it.
UNBLOCK_SIGINT = "_DASK_SPARSECONV_UNBLOCK_SIGINT"

_started = False
#: The environment a server launched with ``start(guess=True)`` got, until :func:`confirm` checks it.
_guessed_env: dict[str, str] | None = None
_stop_registered = False


def distributed_defaults() -> dict:
    """distributed's default ``distributed.nanny.pre-spawn-environ``, read
    from its ``distributed.yaml`` without importing it (``{}`` when it is
    not installed)."""
    return dict(_distributed_defaults())


@functools.lru_cache(maxsize=1)
def _distributed_defaults() -> dict:
    # read once per process: the command asks before the server starts and
    # again when it starts it (~10 ms a read, on the server's critical path)
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("distributed")
    if spec is None or spec.origin is None:
        return {}
    with open(os.path.join(os.path.dirname(spec.origin), "distributed.yaml"), encoding="utf-8") as f:
        # libyaml's parser when PyYAML has it: 1.6 ms against 19 ms for this
        # file (same constructors, so the same values), on the server's launch
        data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return data["distributed"]["nanny"]["pre-spawn-environ"] or {}


def spawn_environ(user_config: bool = True) -> dict[str, str]:
    """What distributed sets in the environment just before it spawns a
    worker: ``distributed.nanny.pre-spawn-environ`` (by default glibc's
    ``MALLOC_TRIM_THRESHOLD_`` and one OpenMP/BLAS thread) and a fixed
    ``PYTHONHASHSEED``, with variables already set left as they are.

    They must be there when a process starts (glibc reads the first when it
    sets up, numpy the others when it loads), so a worker forked from the
    server can only get them from the server's start. Read without importing
    distributed (0.24 s before the server could start): its defaults from
    its ``distributed.yaml``, the user's settings from dask's config
    (``user_config=False``: none, and dask is not imported).
    """
    defaults = distributed_defaults()
    user: dict = {}
    if user_config:
        import dask.config

        user = dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}
    wanted = {**defaults, **user}
    env = {k: os.environ.get(k, str(v)) for k, v in wanted.items() if v is not None}
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = os.environ.get("PYTHONHASHSEED") or "6640"  # distributed's choice, for its shuffles
    return env


def start(env: dict[str, str] | None = None, *, guess: bool = False) -> bool:
    """Start the fork server in the background (once per process); True when
    local workers can be forked from it.

    The workers inherit the server's environment: this process's, taken
    now, with :func:`spawn_environ` and ``env`` added (this process keeps
    neither).

    ``guess=True`` launches it before dask is imported (0.15-0.25 s sooner on
    a 2-core machine, and the launch is on the critical path of a local
    run), taking dask's config to hold nothing of the user's; ``env`` is then
    a guess as well. :func:`confirm` must follow, once the real environment
    is known: it keeps the server only when the guess was right.
    """
    global _started, _guessed_env, _stop_registered
    if _started:
        return True
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        # Linux only: macOS has the start method, but forking a process that
        # has loaded system frameworks (numpy's Accelerate BLAS) is unsafe
        # there, which is why Python spawns by default on macOS
        if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
            return False
        if not guess and _user_method() != "spawn":
            return False  # the user's choice stands
        full = {**spawn_environ(user_config=not guess), **(env or {})}
        _launch(full)
    except Exception:
        return False
    _started = True
    _guessed_env = full if guess else None
    if not _stop_registered:
        _stop_registered = True
        atexit.register(stop, os.getpid())
    return True


def confirm(env: dict[str, str] | None = None) -> bool:
    """After ``start(guess=True)``: read dask's config and keep the server only
    if the user chose no other start method and the environment it was
    launched with is the one :func:`spawn_environ` and ``env`` give now;
    otherwise stop it and start it again as :func:`start` does (a user's
    ``pre-spawn-environ``, or a memory limit the guess read otherwise).
    Returns what :func:`start` returns; without a guessed launch, :func:`start`."""
    global _started, _guessed_env
    guessed, _guessed_env = _guessed_env, None
    if not _started or guessed is None:
        return start(env)
    try:
        method = _user_method()
        exact = {**spawn_environ(), **(env or {})}
    except Exception:
        method, exact = None, None
    if method == "spawn" and exact == guessed:
        return True
    stop()
    _started = False
    return start(env) if method is not None else False


def _user_method() -> str:
    import dask.config

    return str(dask.config.get("distributed.worker.multiprocessing-method", default="spawn"))


def _launch(env: dict[str, str]) -> None:
    """Launch Python's fork server with our preload and ``env`` added to its environment."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    env = dict(env)
    # Ctrl-C reaches the whole process group. The server ignores it while
    # it loads (worker_preload), but Python's own start-up comes first: a
    # Ctrl-C there printed a KeyboardInterrupt traceback from the server
    # beside the command's one line. Blocked here, across the launch, the
    # signal is blocked in the server from its first instruction (the
    # mask is inherited through fork and exec) until the preload ignores
    # it; in this process a Ctrl-C meanwhile waits, it is not lost.
    # (multiprocessing's resource tracker, which the server needs, is
    # started first: its start unblocks SIGINT when it is done)
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # Linux only, checked by the caller
    if signal.SIGINT not in blocked:
        env[UNBLOCK_SIGINT] = "1"
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        forkserver.ensure_running()  # returns once the server is launched, not loaded
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop(owner: int | None = None) -> None:
    """Stop the fork server now, whatever it is doing (registered at exit
    by :func:`start`; ``owner``: only in that process).

    Left alone, the server outlives a command that exits early (a workflow
    refused after the launch, Ctrl-C): it finishes its preload (~1.5 s of a
    core) before it sees that its parent is gone, and it holds the command's
    stdout and stderr open until then, so a pipe reading them (``| tee``, a
    test's ``capture_output``) waited that long for its end. After a run
    the server is idle and exits either way; the workers it forked belong
    to the cluster, which is closed by then."""
    if owner is not None and owner != os.getpid():
        return
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)  # it ignores SIGINT (worker_preload), not this
    except ProcessLookupError:
        pass
    try:
        server._stop()  # closes its alive pipe, reaps it, removes its socket
    except (OSError, AttributeError):
        pass


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
        # a failed fork is logged by every nanny with a traceback, on the
        # command's stderr; it is handled here (spawned workers instead), so
        # nothing of it is logged (the spawned attempt logs as usual)
        previous = logging.root.manager.disable
        logging.disable(logging.ERROR)
        try:
            with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
                return LocalCluster(**kwargs)
        except Exception:
            pass
        finally:
            logging.disable(previous)
    return LocalCluster(**kwargs)


__all__ = ["OPT_OUT", "PRELOAD", "confirm", "spawn_environ", "start", "start_cluster", "stop"]
