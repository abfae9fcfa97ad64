"""Python's garbage collector in the command's own process during its start-up.

The command's start-up (importing distributed, zarr, numba, pydantic and
this package, checking the workflow, planning the job, starting a local
cluster) creates a few hundred thousand objects, nearly all of which stay
alive for the whole command. The collector's passes over them free next to
nothing and cost ~0.2 s of the ~1.5 s of start-up CPU here (its fork server
the same, ~0.35 s: :mod:`.worker_preload`; figures in docs/benchmarks.md,
"Resume: the command's start-up cut again"). So the ``dask-sparseconv``
command pauses the collector before anything is imported (:func:`pause`,
from :func:`dask_sparseconv.cli.main.console_main`) and resumes it when the
long-running part begins (:func:`resume`: the job's client is connected, a
preview starts computing, ``compile`` starts compiling), with the
start-up's objects frozen out of its walks. The short commands
(``validate``, ``info``, ``schema``) end before any such point, so the
collector never runs in them: what they create is bounded by the
workflow and the stores' metadata (and the few chunks ``validate``
samples).

Code that calls :func:`dask_sparseconv.cli.main` itself keeps its collector
as it is: :func:`resume` only undoes a :func:`pause` of this process.
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Turn the collector off for the start-up, unless it is off already."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """Undo :func:`pause` (no-op without one): freeze what exists now, then
    turn the collector back on."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


def paused() -> bool:
    """Whether :func:`pause` turned the collector off and :func:`resume` has not yet turned it on."""
    return _paused


__all__ = ["pause", "paused", "resume"]
