"""Fill numba's on-disk cache with the compiled functions jobs use, ahead of the first job.

A fresh install has no compiled code: the first process that calls an engine
compiles it (the direct engine's CSR path alone takes ~20 s per variant on a
2-core machine), and every process that starts before that cache is written
compiles it again. On a cluster whose workers start together on a fresh
install, each worker pays it on its first block. ``dask-sparseconv compile``
(:func:`precompile`) does the work once, in parallel processes, before any
job.

Each registered task exercises one group of variants through the public API
on a tiny input and checks the result against ``scipy.signal``, so a
broken cache or a miscompiled variant is reported here rather than in a job.
Variants a task does not reach (unusual index dtypes, say) are still
compiled on first use, as before.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable

#: name -> task; registered with :func:`task`, run by :func:`precompile`
TASKS: dict[str, Callable[[], None]] = {}


def task(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Register a compile task under ``name``."""

    def register(fn: Callable[[], None]) -> Callable[[], None]:
        TASKS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class TaskResult:
    """One task's outcome: its name, wall seconds, and the error text (None when it passed)."""

    name: str
    seconds: float
    error: str | None = None


# -- the tasks ---------------------------------------------------------------

def _check(got, want, what: str) -> None:
    import numpy as np

    got = got.toarray() if hasattr(got, "toarray") else np.asarray(got)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{what}: the compiled result differs from scipy.signal")


def _frames(n: int, shape: tuple[int, int], dtype, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = (rng.random((n, *shape)) < 0.05) * rng.uniform(-1, 1, (n, *shape))
    return x.astype(dtype)


def _direct(dtype, index_dtype) -> None:
    import numpy as np
    import scipy.signal
    import scipy.sparse

    from dask_sparseconv.convolver import Convolver
    from dask_sparseconv.engine.direct import DirectNumba

    x = _frames(6, (24, 20), dtype)
    csr = scipy.sparse.csr_matrix(x.reshape(6, -1))
    # scipy narrows index arrays that fit int32 when it builds a matrix, so
    # int64 ones are set afterwards, as a batch past 2**31 values has them
    csr.indices, csr.indptr = csr.indices.astype(index_dtype), csr.indptr.astype(index_dtype)
    # a small kernel (no runs of taps) and a wide one (the run loop): two compiled variants
    for kernel in (np.arange(9.0).reshape(3, 3) - 4, np.ones((3, 9))):
        kernel = kernel.astype(dtype)
        want = np.stack([scipy.signal.convolve2d(f, kernel, mode="same") for f in x]).reshape(6, -1)
        for n_threads, serial_work in ((1, None), (2, 0)):  # one compiled call; the batch cut into ranges
            conv = Convolver(x.shape[1:], kernel, mode="same", method="direct", backend="numba", n_threads=n_threads)
            eng = conv.engine(np.dtype(dtype))
            if isinstance(eng, DirectNumba):
                eng.serial_work = serial_work
            _check(conv(csr), want, f"direct {np.dtype(dtype)} CSR")
            _check(conv(csr, out="dense"), want, f"direct {np.dtype(dtype)} dense")
    if np.dtype(index_dtype) == np.int64:
        _huge_frame(dtype)


def _huge_frame(dtype) -> None:
    """A frame past 2**31 pixels (int64 output indices too): two images with
    one small blob each, checked against ``scipy.signal`` around the blob."""
    import numpy as np
    import scipy.signal
    import scipy.sparse

    from dask_sparseconv.convolver import Convolver
    from dask_sparseconv.engine.direct import DirectNumba

    H = W = 50_000
    r0 = c0 = 25_000
    blob = _frames(1, (6, 7), np.float64, seed=5)[0] + np.eye(6, 7)  # not empty
    kernel = (np.arange(15.0).reshape(3, 5) - 7).astype(dtype)
    rr, cc = np.nonzero(blob)
    pos = (rr + r0).astype(np.int64) * W + cc + c0
    one = scipy.sparse.csr_matrix((blob[rr, cc].astype(dtype), pos, np.array([0, pos.size])), shape=(1, H * W))
    x = scipy.sparse.vstack([one, one]).tocsr()
    # 'same' output (i, j) is the blob's full convolution at (i - r0 + 1, j - c0 + 2)
    full = scipy.signal.convolve2d(blob, kernel.astype(np.float64), mode="full")
    fr, fc = np.nonzero(full)
    want = dict(zip(((fr + r0 - 1) * W + fc + c0 - 2).tolist(), full[fr, fc].tolist()))
    for n_threads, serial_work in ((1, None), (2, 0)):
        conv = Convolver((H, W), kernel, mode="same", method="direct", backend="numba", n_threads=n_threads)
        eng = conv.engine(np.dtype(dtype))
        if isinstance(eng, DirectNumba):
            eng.serial_work = serial_work
        y = conv(x)
        for row in range(2):
            got = dict(zip(y.indices[y.indptr[row]:y.indptr[row + 1]].tolist(),
                           y.data[y.indptr[row]:y.indptr[row + 1]].tolist()))
            keys = sorted(got.keys() | want.keys())
            if y.indices.dtype != np.int64 or not np.allclose(
                    [got.get(k, 0.0) for k in keys], [want.get(k, 0.0) for k in keys], rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"direct {np.dtype(dtype)}, a frame past 2**31 pixels: the compiled result "
                                   "differs from scipy.signal")


# One group per dtype, and per index dtype: int64-indexed batches (more than
# 2**31 values, or frames past 2**31 pixels) are rare, but a worker meeting
# one without its group compiles for ~30 s. Names as ``--only`` takes them.
for _dtype, _index, _name in (("float64", "int32", "direct float64"), ("float32", "int32", "direct float32"),
                              ("float64", "int64", "direct float64, int64 indices"),
                              ("float32", "int64", "direct float32, int64 indices")):
    task(_name)(functools.partial(_direct, _dtype, _index))


@task("boundaries, separable, gather_scatter")
def _other_paths() -> None:
    import numpy as np
    import scipy.signal
    import scipy.sparse

    from dask_sparseconv.convolver import Convolver

    for dtype in (np.float64, np.float32):
        x = _frames(4, (20, 18), dtype, seed=1)
        csr = scipy.sparse.csr_matrix(x.reshape(4, -1))
        gauss = np.outer([1.0, 2.0, 1.0], [1.0, 4.0, 6.0, 4.0, 1.0]).astype(dtype)
        want = np.stack([scipy.signal.convolve2d(f, gauss, mode="same", boundary="symm") for f in x]).reshape(4, -1)
        _check(Convolver(x.shape[1:], gauss, boundary="symm", method="direct")(csr), want, "boundary='symm'")
        want = np.stack([scipy.signal.convolve2d(f, gauss, mode="same") for f in x]).reshape(4, -1)
        _check(Convolver(x.shape[1:], gauss, method="separable")(csr), want, "separable")
        _check(Convolver(x.shape[1:], gauss, method="gather_scatter", backend="numba")(csr), want, "gather_scatter")


@task("storage readers and digests")
def _storage() -> None:
    import numpy as np
    import scipy.sparse

    from dask_sparseconv.storage.dense_store import dense_to_csr
    from dask_sparseconv.storage.progress import dense_digest, nonzero_digest, verify_digest

    # the dtypes stacks are usually stored in (the reader compiles one variant per dtype)
    for dtype in (np.float32, np.float64, np.uint8, np.uint16, np.int32, np.bool_):
        flat = (_frames(3, (8, 12), np.float64, seed=3) * 100).astype(dtype).reshape(3, -1)
        got = dense_to_csr(flat)
        want = scipy.sparse.csr_matrix(flat)
        if got.shape != want.shape or (got != want).nnz or got.dtype != flat.dtype:
            raise RuntimeError(f"dense reader {np.dtype(dtype)}: the compiled result differs from scipy.sparse")
    for dtype in (np.float32, np.float64):  # a written block's record, and its check on resume
        flat = _frames(2, (8, 12), dtype, seed=4).reshape(-1)
        positions = np.flatnonzero(flat)
        record = nonzero_digest(positions.astype(np.int64), flat[positions])
        if record is None or record[0] != positions.size or not verify_digest(flat, *record) \
                or dense_digest(flat)[0] != positions.size:
            raise RuntimeError(f"block digests {np.dtype(dtype)}: the compiled digests disagree")


# -- running them ------------------------------------------------------------

def _run_one(name: str) -> TaskResult:
    t0 = time.perf_counter()
    try:
        TASKS[name]()
    except Exception as exc:  # reported by name; the other tasks still run
        return TaskResult(name, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return TaskResult(name, time.perf_counter() - t0)


def precompile(names: Iterable[str] | None = None, jobs: int | None = None,
               on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Compile (or load) the functions jobs use into numba's on-disk cache.

    Parameters
    ----------
    names : iterable of str, optional
        Tasks of :data:`TASKS` to run; default all of them.
    jobs : int, optional
        Processes to run them in; default one per task, at most the CPUs this
        process may use. ``1`` runs them here, one after the other.
    on_result : callable, optional
        Called with each :class:`TaskResult` as it finishes (for progress).

    Returns
    -------
    list of TaskResult
        In the order they finished. A task whose check failed has ``error`` set.
    """
    names = list(TASKS) if names is None else list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown compile task(s) {unknown}; choose from {list(TASKS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer or None; got {jobs!r}")
    if jobs is None:
        from ..engine.threads import default_threads

        jobs = max(1, min(len(names), default_threads()))
    results: list[TaskResult] = []

    def done(res: TaskResult) -> None:
        results.append(res)
        if on_result is not None:
            on_result(res)

    if jobs == 1:
        for name in names:
            done(_run_one(name))
        return results
    # spawned, not forked: a fresh interpreter per process, as a worker has
    with ProcessPoolExecutor(max_workers=min(jobs, len(names)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_one, name) for name in names]
        for fut in as_completed(futures):
            done(fut.result())
    return results


def write_bytecode() -> tuple[int, str | None]:
    """Write the package's Python bytecode (``__pycache__/*.pyc``) where it
    is missing or out of date; returns ``(modules written, error or None)``.

    pip writes it when it installs the package, but an editable install (a
    clone) gets none until Python writes it on import, and Python never
    does where ``PYTHONDONTWRITEBYTECODE`` is set (as on many CI images and
    containers): every process then compiles the package's modules again,
    ~0.2 s each for a command, its workers' server and every spawned worker
    (measured on the 2-core machine of docs/benchmarks.md). A read-only
    installation is left as it is, with the reason.
    """
    import compileall
    import importlib.util
    import io
    from contextlib import redirect_stdout

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def stamps() -> dict[str, int | None]:
        # compileall decides what is stale (from the source time recorded in
        # each .pyc); what it wrote is read back from the files it touched
        pycs = (importlib.util.cache_from_source(os.path.join(folder, f))
                for folder, _, files in os.walk(package) for f in files if f.endswith(".py"))
        return {p: os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in pycs}

    before = stamps()
    out = io.StringIO()
    with redirect_stdout(out):  # compileall prints each failure; it is returned instead
        ok = compileall.compile_dir(package, quiet=1)
    if not ok:
        lines = out.getvalue().strip().splitlines()
        return 0, lines[-1] if lines else "compileall failed"
    return sum(before[p] != t for p, t in stamps().items()), None


def cache_location() -> str:
    """Where numba writes this package's cache, in words: ``NUMBA_CACHE_DIR``
    when set, else the ``__pycache__`` folders beside the package's sources
    (numba falls back to a per-user folder when those are read-only)."""
    import numba

    where = getattr(numba.config, "CACHE_DIR", "")
    if where:
        return str(where)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"the __pycache__ folders under {package}"


__all__ = ["TASKS", "TaskResult", "cache_location", "precompile", "task", "write_bytecode"]
