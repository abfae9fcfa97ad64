"""Out-of-core convolution of image stacks as one lazy dask graph.

Two entry points:

* :func:`convolve` returns a lazy dask array: dense ``(n, H_out, W_out)``,
  or ``(n, H_out*W_out)`` with ``scipy.sparse.csr_matrix`` chunks for CSR
  output. Nothing is read until it is computed.
* :func:`convolve_zarr` convolves a zarr stack into a new zarr stack. It
  builds ONE graph::

      kernel ─┐
      source ─┼─> block 0: read -> convolve -> write (+ progress marker) ─┐
      target ─┘   block 1: ...                                            ├─> finalize
                  ...                                                     ┘   (CSR: consolidate,
                                                                               then the completion
                                                                               flag, last)

  and by default computes it on the current scheduler: the active
  ``distributed.Client`` when there is one (dask makes a new client the
  default scheduler), else dask's local threaded scheduler. With
  ``compute=False`` it returns that graph as a :class:`dask.delayed.Delayed`
  (hand it to ``client.compute()`` or call ``.compute()``); computing it
  yields the same :class:`ConvolveSummary`.

Where things run
----------------
The kernel is put in the graph once, as a single key every block task
depends on, so it travels to each worker once per graph. The same holds for
the source and target handles (small picklable objects). The
:class:`~dask_sparseconv.Convolver` — and any Toeplitz matrix an engine
builds — is always built on the worker by the per-process cache
(:mod:`dask_sparseconv.convolver_cache`), never pickled from the client.
The engine's thread count follows the cache's policy:
``max(1, cores // concurrent dask threads on the host)``.

Blocks
------
Images are processed in row blocks (:mod:`dask_sparseconv.row_blocks`):
aligned to the input chunks, sized by ``block_memory`` (default 64 MiB per
task), and at least ``2 x`` the scheduler's thread count of them when the
stack is large enough, so every thread has work. Dense outputs are chunked
by block along the image axis.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse

from .convolver import compute_dtype
from .convolver_cache import get_convolver, kernel_digest
from .geometry import geometry
from .row_blocks import RowBlocks, image_bytes, parse_block_memory, plan_row_blocks
from .validation import (
    check_choice,
    check_dtype,
    check_frame_shape,
    check_kernel,
    check_mode,
    resolve_method_backend,
)

OUTPUT_FORMATS = ("dense", "csr")

#: Blocks per scheduler thread the planner aims for (when the stack allows):
#: enough to even out blocks of unequal cost, few enough that a small job
#: does not pay per-task overhead many times over (the ROI CSR benchmark on
#: 2 workers: 4 blocks 0.20 s, 8 blocks 0.23 s, 11 blocks 0.25 s).
BLOCKS_PER_THREAD = 2


# -- small picklable pieces that travel in the graph -------------------------------
@dataclass(frozen=True)
class _Spec:
    """What every block task needs besides its data: travels by value (tiny)."""

    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    mode: str
    method: str
    backend: str
    dtype: str  # compute / output dtype
    out_format: str
    device: str | None = None
    route: str = "any"  # 'cpu': resolve backend='auto' without an accelerator
    hold_bytes: int = 0  # CSR output: a block result up to this size is held in memory, not staged


@dataclass
class ConvolveSummary:
    """What :func:`convolve_zarr` did.

    Attributes
    ----------
    target : str
        Where the output is.
    format : str
        ``'dense'`` or ``'csr'``.
    n_images : int
    frame_shape, out_shape : tuple of int
    dtype : str
        Output dtype.
    nnz_in, nnz_out : int
        Nonzeros read and written (``nnz_out`` of a dense output counts its
        nonzero pixels).
    blocks : int
        Row blocks (tasks) the stack was cut into.
    block_rows : int
        Images per block.
    elapsed : float
        Wall-clock seconds of the whole graph.
    read_s, convolve_s, write_s : float
        Seconds spent in each stage, summed over blocks (so they add up to
        more than ``elapsed`` when blocks ran in parallel). Consolidation and
        finalisation are in ``finalize_s``.
    extra : dict
        ``worker_pids``, ``engines``, ``workers`` and ``fallbacks`` (which
        engine ran where); for CSR outputs ``blocks_held`` (blocks kept in
        memory for consolidation instead of staged), ``consolidation_parts``
        and ``consolidation_workers``.
    blocks_computed, blocks_skipped : int
        Blocks convolved by this run, and blocks a resumed run found already
        written and verified (re-read, nnz and checksum matching the block's
        record) and did not recompute. ``blocks_computed + blocks_skipped ==
        blocks``.
    resumed : bool
        Whether this run continued an incomplete output.
    """

    target: str
    format: str
    n_images: int
    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    dtype: str
    nnz_in: int
    nnz_out: int
    blocks: int
    block_rows: int
    elapsed: float
    read_s: float = 0.0
    convolve_s: float = 0.0
    write_s: float = 0.0
    finalize_s: float = 0.0
    extra: dict = field(default_factory=dict)
    blocks_computed: int = 0
    blocks_skipped: int = 0
    resumed: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# -- argument checks ---------------------------------------------------------------------
def _check_output_format(output_format: Any) -> str | None:
    if output_format is None:
        return None
    return check_choice("output_format", output_format, OUTPUT_FORMATS)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _common_checks(kernel, mode, method, backend, dtype, output_format, block_memory):
    kernel = check_kernel(kernel)
    mode = check_mode(mode)
    method, backend = _graph_engine(method, backend)
    dtype = check_dtype(dtype)
    output_format = _check_output_format(output_format)
    parse_block_memory(block_memory)
    return kernel, mode, method, backend, dtype, output_format


def _graph_engine(method, backend) -> tuple[str, str]:
    """Check ``(method, backend)`` here and return what the graph carries:
    ``backend='auto'`` stays ``'auto'`` (with the method as asked) so that
    each worker resolves it for its own device (:mod:`dask_sparseconv.devices`)."""
    resolved = resolve_method_backend(method, backend)
    if backend is None or backend == "auto":
        return ("auto" if method in (None, "auto") else resolved[0]), "auto"
    return resolved


def _route_annotations(route: str) -> dict:
    """dask annotations that send the block tasks to GPU workers (``'gpu'``),
    to the workers that advertise no GPU (``'cpu'``), or anywhere (``'any'``).

    GPU workers are those started with ``--resources GPU=n``. dask resources
    cannot say "no GPU", so ``'cpu'`` restricts the blocks to the addresses
    of the workers without that resource, read from the scheduler now.
    """
    check_choice("route", route, ("any", "gpu", "cpu"))
    if route == "any":
        return {}
    client = _active_client()
    if client is None:
        if route == "cpu":
            return {}  # local scheduler: this process, kept off any GPU by spec.route
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


def _scheduler_workers() -> dict[str, int] | None:
    """``{worker address: threads}`` of the active distributed client's
    cluster (one scheduler round trip), or None without one."""
    client = _active_client()
    if client is None:
        return None
    try:
        return {str(a): int(n) for a, n in client.nthreads().items()}
    except Exception:  # a client that cannot answer right now
        return None


def _scheduler_threads(workers: dict[str, int] | None = None) -> int:
    """Threads the scheduler that will run the graph has (for block planning).
    ``workers``: what :func:`_scheduler_workers` returned, if already asked."""
    if workers is None:
        workers = _scheduler_workers()
    if workers and sum(workers.values()):
        return int(sum(workers.values()))
    from .convolver_cache import _local_pool_size

    return _local_pool_size()


def _active_client():
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


# -- the work of one block (runs on a worker) --------------------------------------
def _convolver(spec: _Spec, kernel: np.ndarray):
    # backend='auto' is resolved here, on the worker (GPU -> torch, else CPU)
    return get_convolver(
        spec.frame_shape, kernel, spec.mode, spec.method, spec.backend, spec.dtype, spec.device,
        gpu_device="none" if spec.route == "cpu" else None,
    )


def _engine_info(spec: _Spec, kernel: np.ndarray, conv) -> dict:
    """Which engine ran a block, where, and the fallback that led there (if any)."""
    reason = None
    if spec.backend in (None, "auto") and spec.device is None:
        from .devices import resolve_auto

        res = resolve_auto(spec.frame_shape, kernel, spec.dtype, spec.mode, method=spec.method,
                           gpu_device="none" if spec.route == "cpu" else None)
        reason = res.reason if res.fallback else None
    label = "/".join(p for p in (conv.method, conv.backend, conv.device) if p)
    return {"engine": label, "fallback": reason, "worker": _worker_address()}


def _worker_address() -> str | None:
    """The distributed worker running this task, or None (local schedulers)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None


#: A dense output block is computed as CSR (and scattered into zeros by the
#: writer) when its output can hold at most this share of nonzero pixels
#: (input nonzeros x taps, the worst case): the CSR result is cheap to make
#: for sparse outputs, and the writer digests its nonzeros instead of every
#: pixel (16 ROI frames of 512 x 512: ~1.5 ms against ~6.7 ms).
SPARSE_RESULT_SHARE = 1 / 8


def _apply(conv, csr: scipy.sparse.csr_matrix, spec: _Spec, sparse_ok: bool = False):
    """Convolve a block. ``sparse_ok``: a dense output may come back as CSR
    when it is sparse (for writers, which accept either)."""
    n = csr.shape[0]
    if spec.out_format == "dense":
        Ho, Wo = spec.out_shape
        taps = int(np.count_nonzero(conv.kernel))
        if sparse_ok and csr.nnz * taps <= SPARSE_RESULT_SHARE * n * Ho * Wo:
            return conv(csr, out="csr", batched=True)
        res = conv(csr, out="dense", batched=True)
        return np.ascontiguousarray(res).reshape((n,) + tuple(spec.out_shape))
    return conv(csr, out="csr", batched=True)


def _to_csr_rows(block, spec: _Spec) -> scipy.sparse.csr_matrix:
    """A block of images (dense (b,H,W)/(b,H*W), or sparse (b,H*W)) as (b, H*W) CSR."""
    H, W = spec.frame_shape
    if scipy.sparse.issparse(block):
        return scipy.sparse.csr_matrix(block)
    arr = np.asarray(block)
    return scipy.sparse.csr_matrix(arr.reshape(arr.shape[0], H * W))


def _convolve_array_block(block, kernel, spec: _Spec):
    """map_blocks body for in-memory / dask-array inputs."""
    conv = _convolver(spec, kernel)
    return _apply(conv, _to_csr_rows(block, spec), spec)


def _convolve_source_block(src, kernel, start: int, stop: int, spec: _Spec):
    """Lazy-array body for store inputs: read a block and convolve it."""
    conv = _convolver(spec, kernel)
    return _apply(conv, src.read_block(start, stop), spec)


def _run_block(job: tuple, kernel, index: int, start: int, stop: int, check: bool = False) -> dict:
    """convolve_zarr body: read -> convolve -> write one block; returns small stats.

    ``job``: ``(source, output, spec)``, one graph node shared by every block
    (passing them separately made dask traverse the spec dataclass for each
    block: ~0.6 ms of graph building per block).

    ``check`` (resume: the block's marker was set when the graph was built):
    re-read the written block first and skip the work when it matches the
    record stored with it (see ``verify_block`` in the storage outputs)."""
    src, out, spec = job
    t0 = time.time()
    if check:
        p0 = time.perf_counter()
        rec = out.verify_block(index)
        if rec is not None:
            return {
                "index": index, "start": start, "stop": stop, "nnz_in": int(rec.get("nnz_in", 0)),
                "nnz_out": int(rec["nnz"]), "t_start": t0, "read_s": time.perf_counter() - p0,
                "convolve_s": 0.0, "write_s": 0.0, "pid": os.getpid(), "skipped": True, "engine": "skipped (verified)",
            }
    p0 = time.perf_counter()
    try:
        csr = src.read_block(start, stop)
    except OSError as exc:
        raise _with_context(exc, f"reading block {index} (images {start}-{stop - 1}) of {src.location}") from exc
    p1 = time.perf_counter()
    conv = _convolver(spec, kernel)
    res = _apply(conv, csr, spec, sparse_ok=True)
    p2 = time.perf_counter()
    engine = _engine_info(spec, kernel, conv)
    held = None
    if spec.hold_bytes and spec.out_format == "csr" and _csr_bytes(res) <= spec.hold_bytes:
        nnz_out, held = out.hold_block(index, start, stop, res)
    else:
        # the writer counts what it wrote (CSR: the staged nnz consolidation checks;
        # dense: nonzero pixels, from the same pass as the block's digest)
        try:
            nnz_out = int(out.write_block(index, start, stop, res, record={"nnz_in": int(csr.nnz)}))
        except OSError as exc:  # a full disk, a lost mount: say what was being written where
            raise _with_context(exc, f"writing block {index} (images {start}-{stop - 1}) to {out.location}") from exc
    p3 = time.perf_counter()
    return {
        "held": held,
        "index": index,
        "start": start,
        "stop": stop,
        "nnz_in": int(csr.nnz),
        "nnz_out": nnz_out,
        "t_start": t0,
        "read_s": p1 - p0,
        "convolve_s": p2 - p1,
        "write_s": p3 - p2,
        "pid": os.getpid(),
        "skipped": False,
        **engine,
    }


def _with_context(exc: OSError, doing: str) -> OSError:
    """``exc`` again (same class and errno) with what was being done when it
    happened: an ``[Errno 28] No space left on device`` alone does not say
    which store filled up."""
    text = exc.strerror or str(exc) or type(exc).__name__
    name = f": {exc.filename!r}" if exc.filename else ""
    try:
        return type(exc)(exc.errno, f"{text}{name} while {doing}") if exc.errno else type(exc)(f"{text} while {doing}")
    except Exception:  # an OSError subclass with another constructor
        return OSError(exc.errno, f"{text}{name} while {doing}")


def _csr_bytes(res) -> int:
    """Bytes a block's result takes held in memory (``HeldBlock``); a dense
    result (a CSR output fed by a dense-only engine) is never held."""
    if not scipy.sparse.issparse(res):
        return 1 << 62
    return int(res.nnz) * (res.data.itemsize + res.indices.itemsize) + 8 * (res.shape[0] + 1)


def _hold_bytes(blocks: RowBlocks, out_format: str) -> int:
    """Per-block cap for holding CSR results in memory instead of staging
    them: the whole output may take one block's memory budget, so a worker
    (which fetches every held block for its consolidation part) holds at
    most that on top of its block. Larger outputs stage every block."""
    if out_format != "csr" or not blocks.bounds:
        return 0
    return int(blocks.block_memory) // len(blocks.bounds)


def _consolidate_part(out, part: int, n_parts: int, *stats: dict) -> float:
    """CSR output, after every block: run share ``part`` of ``n_parts`` of
    the consolidation tasks (each part plans the same tasks from the blocks'
    nnz and deals them the same way; the final arrays already exist).
    Blocks held in memory come with their stats. Returns its seconds and
    where it ran."""
    p0 = time.perf_counter()
    stats = sorted(stats, key=lambda s: s["index"])
    held = {s["index"]: s["held"] for s in stats if s.get("held") is not None}
    # every block's stats are here, so every block was written or held: no marker listing
    tasks = out.consolidation_tasks([s["nnz_out"] for s in stats], require_written=False)
    for task in _share(tasks, n_parts)[part]:
        # no consolidation marks: a resumed run plans and runs every task
        # again (finalize then needs none), so they would only be written
        try:
            task(held, mark=False)
        except OSError as exc:
            raise _with_context(exc, f"writing {task.kind} values {task.lo}-{task.hi - 1} of {out.location}") from exc
    return {"seconds": time.perf_counter() - p0, "worker": _worker_address()}


#: Relative cost per element of a consolidation task, by array: float data
#: compresses slower than indices (measured ~12 ms vs ~8.5 ms per 256k-value
#: chunk of the ROI benchmark's output); indptr chunks are short.
_CONSOLIDATION_COST = {"data": 1.4, "indices": 1.0, "indptr": 1.0}


def _share(tasks: list, n_parts: int) -> list[list]:
    """Deal consolidation tasks to ``n_parts`` parts, largest first, each to
    the least loaded part (deterministic: every part computes the same
    split). Round-robin gave one part all the data chunks: 77 vs 51 ms."""
    def cost(t) -> float:
        return (t.hi - t.lo) * _CONSOLIDATION_COST.get(t.kind, 1.0)

    load = [0.0] * n_parts
    shares: list[list] = [[] for _ in range(n_parts)]
    for t in sorted(tasks, key=lambda t: (-cost(t), t.index)):
        k = min(range(n_parts), key=lambda j: (load[j], j))
        shares[k].append(t)
        load[k] += cost(t)
    return shares


def _finalize(out, stats: list[dict], info: dict, consolidation: list | None = None) -> ConvolveSummary:
    """Last task: (CSR: finish consolidation, drop staging) and set the
    completion flag, then summarise."""
    p0 = time.perf_counter()
    stats = sorted(stats, key=lambda s: s["index"])
    block_nnz = [s["nnz_out"] for s in stats]
    if consolidation is None:
        out.finalize(block_nnz=block_nnz)
    else:  # the parts ran every consolidation task
        staged = bool(info.get("resumed")) or any(s.get("held") is None for s in stats)
        out.finalize(block_nnz=block_nnz, consolidated=True, staged=staged)
    p1 = time.perf_counter()
    t_first = min((s["t_start"] for s in stats), default=time.time())
    return ConvolveSummary(
        target=str(getattr(out, "location", info["target"])),
        format=info["format"],
        n_images=info["n_images"],
        frame_shape=tuple(info["frame_shape"]),
        out_shape=tuple(info["out_shape"]),
        dtype=info["dtype"],
        nnz_in=int(sum(s["nnz_in"] for s in stats)),
        nnz_out=int(sum(block_nnz)),
        blocks=len(stats),
        block_rows=info["block_rows"],
        elapsed=time.time() - t_first,
        read_s=float(sum(s["read_s"] for s in stats)),
        convolve_s=float(sum(s["convolve_s"] for s in stats)),
        write_s=float(sum(s["write_s"] for s in stats)),
        finalize_s=p1 - p0 + float(sum(c["seconds"] for c in consolidation or ())),
        extra={"worker_pids": sorted({s["pid"] for s in stats}), "consolidation_parts": len(consolidation or ()),
               "consolidation_workers": sorted({c["worker"] for c in consolidation or () if c["worker"]}),
               "blocks_held": sum(1 for s in stats if s.get("held") is not None), **_engine_summary(stats)},
        blocks_computed=sum(1 for s in stats if not s.get("skipped")),
        blocks_skipped=sum(1 for s in stats if s.get("skipped")),
        resumed=bool(info.get("resumed")),
    )


def _finish_consolidated(out, info: dict, nnz: int) -> ConvolveSummary:
    """Resume of a CSR output whose consolidation had finished (the run
    stopped while deleting staging): only the cleanup and the flag remain."""
    p0 = time.perf_counter()
    out.finalize()
    n_blocks = len(out.block_bounds)
    summary = ConvolveSummary(
        target=str(getattr(out, "location", info["target"])), format=info["format"], n_images=info["n_images"],
        frame_shape=tuple(info["frame_shape"]), out_shape=tuple(info["out_shape"]), dtype=info["dtype"],
        nnz_in=0, nnz_out=int(nnz), blocks=n_blocks, block_rows=info["block_rows"], elapsed=0.0,
        finalize_s=time.perf_counter() - p0, blocks_computed=0, blocks_skipped=n_blocks, resumed=True,
    )
    _release_lock(info)
    return summary


def _engine_summary(stats: list[dict]) -> dict:
    """Blocks per engine, per worker, and the distinct fallbacks (for the summary)."""
    engines: dict[str, int] = {}
    workers: dict[str, dict] = {}
    for s in stats:
        label = s.get("engine", "?")
        engines[label] = engines.get(label, 0) + 1
        w = workers.setdefault(str(s.get("worker") or f"pid {s['pid']}"), {"pid": s["pid"], "blocks": 0, "engines": {}})
        w["blocks"] += 1
        w["engines"][label] = w["engines"].get(label, 0) + 1
    fallbacks = sorted({s["fallback"] for s in stats if s.get("fallback")})
    return {"engines": engines, "workers": workers, "fallbacks": fallbacks}


# -- inputs ------------------------------------------------------------------------------
def _is_store_like(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    mod = type(x).__module__ or ""
    return mod.startswith("zarr")


#: Safety factor on a sampled density (other chunks may be denser).
_DENSITY_SAFETY = 2.0


#: CSR output estimate: at most this many images are sampled, holding at most
#: this many scatter positions (nonzeros x taps) and output pixels (bytes of
#: the boolean map): ~1 ms on the client; and the safety factor on the
#: sampled ratio (other parts of the stack may spread more).
_EXPANSION_SAMPLE_IMAGES = 16
_EXPANSION_MAX_POSITIONS = 1 << 16
_EXPANSION_MAX_PIXELS = 1 << 23
_EXPANSION_SAFETY = 2.0


def _sample_rows(n_images: int, geo) -> int:
    """Images per sample of the output estimate (0: frames too large to sample)."""
    return min(_EXPANSION_SAMPLE_IMAGES, n_images, _EXPANSION_MAX_PIXELS // max(1, geo.out_pixels))


def _sample_expansion(samples, kernel: np.ndarray, geo) -> float | None:
    """Output nonzeros per input nonzero, estimated from the first sample
    (CSR row blocks, taken lazily from ``samples``) that holds nonzeros,
    times a safety factor and never above the kernel's tap count (the worst
    case, right for scattered pixels; clustered ones reach far fewer output
    pixels: ~2 per input pixel for the ROI benchmark's disks with 49 taps).

    Only the first images of a sample that fit the limits above are used.
    ``None`` when no sample holds nonzeros, or one image alone is over the
    limits: the planner then assumes the worst case."""
    from .geometry import output_support

    taps = int(np.count_nonzero(kernel))
    if taps == 0:
        return None
    for block in samples:
        block = block[: _sample_rows(block.shape[0], geo)]
        if block.nnz == 0:
            continue
        fit = int(np.searchsorted(block.indptr, _EXPANSION_MAX_POSITIONS // taps, side="right")) - 1
        if fit < 1:
            return None
        block = block[:fit]
        if block.nnz:
            return min(float(taps), _EXPANSION_SAFETY * output_support(block, kernel, geo) / block.nnz)
    return None


def _sample_starts(n_images: int, rows: int) -> list[int]:
    """Where the samples of a stack begin: its start, then its middle."""
    return list(dict.fromkeys((0, max(0, min(n_images // 2, n_images - rows)))))


def _matrix_expansion(csr: scipy.sparse.csr_matrix, kernel: np.ndarray, geo) -> float | None:
    """:func:`_sample_expansion` of an in-memory CSR stack ``(n, H*W)``."""
    n = int(csr.shape[0])
    rows = _sample_rows(n, geo)
    return _sample_expansion((csr[a:a + rows] for a in _sample_starts(n, rows)), kernel, geo) if rows else None


def _source_estimates(src, kernel: np.ndarray, geo, out_format: str) -> tuple[float | None, float | None]:
    """``(nonzeros per image, output nonzeros per input nonzero)`` of a store
    source, for sizing its row blocks (either may be None: not needed, or
    unknown).

    CSR stores know their nonzeros; their sparsity pattern (``indptr`` and
    ``indices``, no values) is sampled for the output estimate, which only
    CSR outputs need. A dense store's nonzeros per image come from its first
    and middle chunk (read on the client, times a safety factor: reading two
    chunks is cheap next to the job, and far better than assuming every pixel
    is nonzero, which would make blocks several times too small and split
    input chunks needlessly); the output estimate reuses those chunks.
    """
    n = int(src.n_images)
    if n == 0:
        return None, None
    rows = _sample_rows(n, geo) if out_format == "csr" else 0
    if src.nnz is not None:
        if not rows:
            return src.nnz / n, None
        samples = (src.read_pattern(a, a + rows) for a in _sample_starts(n, rows))
        return src.nnz / n, _sample_expansion(samples, kernel, geo)
    c = max(1, int(src.chunk_rows))
    blocks = [src.read_block(a, min(a + c, n)) for a in sorted({0, ((n // c) // 2) * c})]
    rows_read = sum(blk.shape[0] for blk in blocks)
    nnz_per_image = _DENSITY_SAFETY * sum(int(blk.nnz) for blk in blocks) / rows_read
    return nnz_per_image, (_sample_expansion(blocks, kernel, geo) if rows else None)


def _plan(n_images, chunk_rows, frame_shape, out_shape, in_dtype, out_dtype, in_format, out_format, nnz, kernel,
          block_memory, nnz_per_image=None, threads: int | None = None, expansion: float | None = None) -> RowBlocks:
    """Row blocks for a stack; ``expansion``: output nonzeros per input
    nonzero (:func:`_sample_expansion`), else the worst case is assumed."""
    if nnz_per_image is None and nnz is not None and n_images:
        nnz_per_image = nnz / n_images
    per_image = image_bytes(
        frame_shape,
        out_shape,
        np.dtype(in_dtype).itemsize,
        np.dtype(out_dtype).itemsize,
        in_format=in_format,
        out_format=out_format,
        nnz_per_image=nnz_per_image,
        kernel_size=int(np.count_nonzero(kernel)) or 1,
        nnz_out_per_image=None if expansion is None or nnz_per_image is None else nnz_per_image * expansion,
    )
    return plan_row_blocks(
        n_images,
        chunk_rows,
        per_image,
        block_memory,
        min_blocks=BLOCKS_PER_THREAD * (threads or _scheduler_threads()),
        strict_chunks=(in_format == "dense"),
    )


def _kernel_node(kernel: np.ndarray):
    from dask import delayed

    return delayed(kernel, name=f"sparseconv-kernel-{kernel_digest(kernel)}", traverse=False)


def _handle_node(obj, prefix: str):
    from dask import delayed
    from dask.base import tokenize

    return delayed(obj, name=f"{prefix}-{tokenize(prefix, id(obj), time.time_ns())}", traverse=False)


def convolve(
    x: Any,
    kernel: Any,
    mode: str = "same",
    *,
    method: str = "auto",
    backend: str | None = "auto",
    dtype: Any = None,
    output_format: str | None = None,
    block_memory: Any = None,
    frame_shape: tuple[int, int] | None = None,
    array: str | None = None,
    storage_options: dict | None = None,
):
    """Convolve every image of a stack with ``kernel``, lazily.

    Semantics are those of ``scipy.signal.convolve2d(image, kernel, mode)``
    applied to each image.

    Parameters
    ----------
    x : str, os.PathLike, zarr.Array, zarr.Group, dask.array.Array, numpy.ndarray or scipy.sparse matrix
        The stack: a zarr store (path or URL, dense ``(n, H, W)`` array or
        anndata-style CSR group; ``array`` picks a member of a group), a dask
        or numpy array ``(n, H, W)``, or a sparse matrix / 2-D dask array
        ``(n, H*W)`` together with ``frame_shape``.
    kernel : array_like
        2-D, finite kernel.
    mode : {'same', 'full', 'valid'}
    method, backend, dtype
        As for :class:`~dask_sparseconv.Convolver`.
    output_format : {None, 'dense', 'csr'}
        ``'dense'``: a ``(n, H_out, W_out)`` dask array of ndarrays.
        ``'csr'``: a ``(n, H_out*W_out)`` dask array whose chunks are
        ``scipy.sparse.csr_matrix`` (computing it gives one CSR matrix).
        Default: the input's format (CSR stores and sparse matrices give CSR,
        everything else dense).
    block_memory : int or str, optional
        Memory budget of one block task (default 64 MiB).
    frame_shape : tuple of int, optional
        ``(H, W)``, required for ``(n, H*W)`` inputs.
    array, storage_options
        Passed to the store opener for zarr inputs.

    Returns
    -------
    dask.array.Array
        Chunked by row block along the image axis.
    """
    import dask.array as da

    kernel, mode, method, backend, dtype, output_format = _common_checks(
        kernel, mode, method, backend, dtype, output_format, block_memory
    )
    if frame_shape is not None:
        frame_shape = check_frame_shape(frame_shape)

    if _is_store_like(x):
        from .storage import open_input

        src = open_input(x, array=array, storage_options=storage_options)
        fs = tuple(src.frame_shape)
        if frame_shape is not None and frame_shape != fs:
            raise ValueError(f"frame_shape={frame_shape} does not match the store's frame shape {fs}")
        geo = geometry(fs, kernel.shape, mode)
        out_dtype = compute_dtype(src.dtype, dtype)
        fmt = output_format or src.format
        nnz_per_image, expansion = _source_estimates(src, kernel, geo, fmt)
        blocks = _plan(src.n_images, src.chunk_rows, fs, geo.out_shape, src.dtype, out_dtype, src.format, fmt, src.nnz,
                       kernel, block_memory, nnz_per_image, expansion=expansion)
        spec = _Spec(fs, geo.out_shape, mode, method, backend, out_dtype.str, fmt)
        return _source_array(src, kernel, blocks, spec)

    if array is not None or storage_options is not None:
        raise ValueError("array= and storage_options= apply only when x is a zarr store (path, URL or zarr object)")

    if scipy.sparse.issparse(x):
        if x.ndim != 2:
            raise ValueError(f"a sparse x must be 2-D (n_images, H*W); got shape {x.shape}")
        if frame_shape is None:
            raise ValueError("frame_shape=(H, W) is required when x is a sparse matrix of shape (n_images, H*W)")
        H, W = frame_shape
        if x.shape[1] != H * W:
            raise ValueError(f"x must have H*W = {H * W} columns for frame_shape={frame_shape}; got shape {x.shape}")
        _check_real(x.dtype)
        geo = geometry(frame_shape, kernel.shape, mode)
        out_dtype = compute_dtype(x.dtype, dtype)
        fmt = output_format or "csr"
        csr = scipy.sparse.csr_matrix(x)
        expansion = _matrix_expansion(csr, kernel, geo) if fmt == "csr" else None
        blocks = _plan(csr.shape[0], 1, frame_shape, geo.out_shape, x.dtype, out_dtype, "csr", fmt, csr.nnz, kernel,
                       block_memory, expansion=expansion)
        spec = _Spec(frame_shape, geo.out_shape, mode, method, backend, out_dtype.str, fmt)
        return _sparse_array(csr, kernel, blocks, spec)

    if isinstance(x, da.Array):
        arr = x
    elif isinstance(x, np.ndarray):
        arr = None
    elif hasattr(x, "__array__"):
        x = np.asarray(x)
        arr = None
    else:
        raise TypeError(
            "x must be a zarr store (path, URL, zarr.Array/Group), a dask or numpy array (n, H, W), "
            f"or a scipy.sparse matrix (n, H*W) with frame_shape; got {type(x).__name__}"
        )
    _check_real(x.dtype)
    if x.ndim == 3:
        fs = (int(x.shape[1]), int(x.shape[2]))
        if frame_shape is not None and frame_shape != fs:
            raise ValueError(f"frame_shape={frame_shape} does not match x's frame shape {fs}")
    elif x.ndim == 2 and frame_shape is not None:
        fs = frame_shape
        if x.shape[1] != fs[0] * fs[1]:
            raise ValueError(f"x must have H*W = {fs[0] * fs[1]} columns for frame_shape={fs}; got shape {x.shape}")
    else:
        raise ValueError(
            f"x must be a stack (n_images, H, W), or (n_images, H*W) with frame_shape; got shape {x.shape}"
        )
    fs = check_frame_shape(fs)
    geo = geometry(fs, kernel.shape, mode)
    out_dtype = compute_dtype(x.dtype, dtype)
    in_sparse = arr is not None and scipy.sparse.issparse(getattr(arr, "_meta", None))
    fmt = output_format or ("csr" if in_sparse else "dense")
    n = int(x.shape[0])
    if arr is None:
        chunk_rows = 1
        arr = da.from_array(x, chunks=(max(n, 1),) + x.shape[1:])
    else:
        chunk_rows = int(max(arr.chunks[0])) if arr.chunks[0] else 1
    blocks = _plan(n, chunk_rows, fs, geo.out_shape, x.dtype, out_dtype, "csr" if in_sparse else "dense", fmt, None,
                   kernel, block_memory)
    spec = _Spec(fs, geo.out_shape, mode, method, backend, out_dtype.str, fmt)
    arr = arr.rechunk((blocks.chunks,) + tuple((s,) for s in arr.shape[1:])) if n else arr
    return _map_array(arr, kernel, blocks, spec)


def _check_real(dt) -> None:
    dt = np.dtype(dt)
    if not (np.issubdtype(dt, np.number) or dt == np.bool_) or np.issubdtype(dt, np.complexfloating):
        raise TypeError(f"x must hold real numbers; got dtype {dt}")


def _meta(spec: _Spec):
    dt = np.dtype(spec.dtype)
    if spec.out_format == "dense":
        return np.empty((0, 0, 0), dtype=dt)
    return scipy.sparse.csr_matrix((0, spec.out_shape[0] * spec.out_shape[1]), dtype=dt)


def _out_block_shape(rows: int, spec: _Spec) -> tuple[int, ...]:
    Ho, Wo = spec.out_shape
    return (rows, Ho, Wo) if spec.out_format == "dense" else (rows, Ho * Wo)


def _map_array(arr, kernel, blocks: RowBlocks, spec: _Spec):
    Ho, Wo = spec.out_shape
    if spec.out_format == "dense":
        chunks = (blocks.chunks or (0,), (Ho,), (Wo,))
    else:
        chunks = (blocks.chunks or (0,), (Ho * Wo,))
    kernel_node = _kernel_node(kernel)
    if arr.ndim == 3:
        drop, new = ((), ()) if spec.out_format == "dense" else ((2,), ())
    else:
        drop, new = ((), (2,)) if spec.out_format == "dense" else ((), ())
    return arr.map_blocks(
        _convolve_array_block,
        kernel_node,
        spec,
        chunks=chunks,
        drop_axis=drop,
        new_axis=new,
        dtype=np.dtype(spec.dtype),
        meta=_meta(spec),
        name=f"sparseconv-{spec.mode}",
    )


def _from_tasks(delayed_blocks, blocks: RowBlocks, spec: _Spec):
    import dask.array as da

    meta = _meta(spec)
    if not delayed_blocks:
        if spec.out_format == "dense":
            return da.zeros((0,) + tuple(spec.out_shape), dtype=spec.dtype)
        return da.from_array(scipy.sparse.csr_matrix(_out_block_shape(0, spec), dtype=spec.dtype), asarray=False)
    parts = [
        da.from_delayed(d, shape=_out_block_shape(stop - start, spec), dtype=np.dtype(spec.dtype), meta=meta)
        for d, (start, stop) in zip(delayed_blocks, blocks.bounds)
    ]
    return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _source_array(src, kernel, blocks: RowBlocks, spec: _Spec):
    from dask import delayed

    kernel_node = _kernel_node(kernel)
    src_node = _handle_node(src, "sparseconv-source")
    func = delayed(_convolve_source_block, pure=True)
    tasks = [
        func(src_node, kernel_node, start, stop, spec, dask_key_name=f"sparseconv-block-{src_node.key}-{i}")
        for i, (start, stop) in enumerate(blocks.bounds)
    ]
    return _from_tasks(tasks, blocks, spec)


def _sparse_array(csr, kernel, blocks: RowBlocks, spec: _Spec):
    from dask import delayed
    from dask.base import tokenize

    kernel_node = _kernel_node(kernel)
    token = tokenize(csr.shape, csr.nnz, id(csr), time.time_ns())
    func = delayed(_convolve_array_block, pure=True)
    tasks = []
    for i, (start, stop) in enumerate(blocks.bounds):
        part = delayed(csr[start:stop], name=f"sparseconv-input-{token}-{i}", traverse=False)
        tasks.append(func(part, kernel_node, spec, dask_key_name=f"sparseconv-block-{token}-{i}"))
    return _from_tasks(tasks, blocks, spec)


# -- store to store ----------------------------------------------------------------------
def _resolve_locations(source, target, array, storage_options, target_storage_options):
    """The source and target locations; refuse a target that overlaps the source."""
    from .storage.location import resolve_location, stores_overlap

    src_loc = resolve_location(source, array, storage_options, name="source")
    tgt_loc = resolve_location(target, None, target_storage_options, name="target")
    if stores_overlap(tgt_loc, src_loc):
        raise ValueError(
            f"target {tgt_loc} overlaps the source {src_loc} (one is the other or lies inside it); "
            "writing there would modify the input: choose a separate target"
        )
    return src_loc, tgt_loc


def _check_target(tgt_loc, overwrite: bool, resume: bool) -> dict | None:
    """Refuse a target that exists without ``overwrite`` (with ``resume``:
    unless it is an incomplete output of this package). Returns the
    provenance of the incomplete output to resume, or None."""
    if overwrite or not tgt_loc.exists():
        return None
    prov = _target_provenance(tgt_loc)
    if prov is None:
        raise FileExistsError(f"target {tgt_loc} already exists (not an output of dask_sparseconv); "
                              "pass overwrite=True to replace it")
    if prov.get("complete"):
        raise FileExistsError(f"target {tgt_loc} already exists and is complete (written {prov.get('completed', '?')}); "
                              "it is left as it is: pass overwrite=True to replace it")
    if not resume:
        raise FileExistsError(f"target {tgt_loc} already exists and holds an incomplete run; pass resume=True to "
                              "continue it or overwrite=True to start over")
    return prov


def _take_lock(lock, tgt_loc):
    """``(the JobLock to hold, whether this call took it)`` for ``lock=``."""
    from .storage.job_lock import JobLock

    if lock is False or lock is None:
        return None, False
    if isinstance(lock, JobLock):
        if lock.target.key() != tgt_loc.key():
            raise ValueError(f"lock= holds the lock of {lock.target}, not of the target {tgt_loc}")
        return lock, False
    if lock is not True:
        raise TypeError(f"lock must be True, False or a JobLock held for the target; got {lock!r}")
    return JobLock.acquire(tgt_loc, what="convolve_zarr"), True


def _target_provenance(tgt_loc) -> dict | None:
    """The dask_sparseconv attribute of an existing target, or None."""
    from .storage import progress

    try:
        return progress.provenance(tgt_loc.open(mode="r"))
    except Exception:  # not a zarr store, unreadable metadata
        return None


def _resume_blocks(blocks: RowBlocks, prov: dict) -> RowBlocks:
    """The block plan of the run being resumed, when it still fits the memory
    budget and the input chunks (so a cluster of another size can resume);
    else ``blocks`` (and the resume check then reports the block size)."""
    import dataclasses

    rows = prov.get("block_rows")
    if not isinstance(rows, int) or rows < 1 or prov.get("n_images") != blocks.n_images:
        return blocks
    if rows * blocks.bytes_per_image > blocks.block_memory:
        return blocks
    candidate = dataclasses.replace(blocks, block_rows=rows)
    return candidate if candidate.aligned or not blocks.aligned else blocks


def convolve_zarr(
    source: Any,
    kernel: Any,
    target: Any,
    mode: str = "same",
    *,
    output_format: str | None = None,
    method: str = "auto",
    backend: str | None = "auto",
    dtype: Any = None,
    block_memory: Any = None,
    overwrite: bool = False,
    resume: bool = True,
    compute: bool = True,
    array: str | None = None,
    storage_options: dict | None = None,
    target_storage_options: dict | None = None,
    compressor: Any = "default",
    route: str = "any",
    lock: Any = True,
):
    """Convolve a zarr stack into a new zarr stack, out of core.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array or zarr.Group
        Input stack: a dense ``(n, H, W)`` array or an anndata ``csr_matrix``
        group ``(n, H*W)``, local or any fsspec URL (``s3://``, ``memory://``).
    kernel : array_like
        2-D, finite kernel.
    target : str, os.PathLike or zarr store
        Where to write the output (local path, fsspec URL or zarr store). It
        must not overlap the source.
    mode : {'same', 'full', 'valid'}
    output_format : {None, 'dense', 'csr'}
        Default: the source's format. Dense output is computed by the
        engines' dense path directly (no CSR in between).
    method, backend, dtype
        As for :class:`~dask_sparseconv.Convolver`.
    block_memory : int or str, optional
        Memory budget per block task, e.g. ``'64MiB'`` (the default).
    overwrite : bool, default False
        Replace an existing target. Without it an existing target is an
        error, except an incomplete one when ``resume`` is on.
    resume : bool, default True
        When ``target`` holds an incomplete output of this package (an
        interrupted or failed run) written by the same job -- same source,
        kernel, mode, method, backend, output format, dtype and shapes, per
        its provenance attribute -- continue it: every block whose done
        marker is set is re-read and checked against the record written
        with it (nnz and checksum of its values) and skipped if it matches;
        the other blocks are computed. A different job's output is refused
        (``ValueError`` listing the differences), and so is one whose input
        changed since it was started (``InputChangedError``, a ValueError:
        every job records a content fingerprint of its input, see
        docs/reliability.md); a complete output is never modified
        (``FileExistsError``) unless ``overwrite=True``.
    compute : bool, default True
        ``True``: run now on the current scheduler (the active
        ``distributed.Client`` if any, else the threaded scheduler) and
        return a :class:`ConvolveSummary`. ``False``: return the graph as a
        :class:`dask.delayed.Delayed` whose result is that summary — e.g.
        ``summary = client.compute(d).result()``. The target store is
        created (empty, marked incomplete) when the graph is built.
    array : str, optional
        Member of ``source`` to read when it is a group holding several.
    storage_options, target_storage_options : dict, optional
        fsspec options for the source and the target.
    compressor : 'default', None or a zarr codec
        Codec of the output arrays.
    route : {'any', 'gpu', 'cpu'}, default 'any'
        Which workers run the block tasks: any; only workers that advertise
        a GPU (``dask worker ... --resources GPU=1``; each block holds one
        unit of it); or only workers that advertise none (their addresses are
        read from the scheduler when the graph is built). With
        ``backend='auto'`` every worker picks its engine itself (torch on its
        GPU, numba on CPUs); ``'cpu'`` also keeps GPU-capable processes on
        their CPU engines. See docs/gpu.md.
    lock : bool or JobLock, default True
        Take the target's lock (``<target>.lock`` beside it, created with an
        if-absent condition) before writing, so that a second run of the
        same job is refused at once (:class:`~dask_sparseconv.storage.job_lock.TargetLockedError`
        naming the host, pid and start time of the run holding it) instead
        of racing this one. It is renewed while this call computes and
        deleted when it returns; with ``compute=False`` the graph's last
        task deletes it. A :class:`~dask_sparseconv.storage.job_lock.JobLock`
        already held for this target (the CLI's) is used as it is.
        ``False`` takes no lock. A stale lock (its process gone, or not
        renewed for 10 minutes on another host) is taken over with a
        warning. See docs/reliability.md.

    Returns
    -------
    ConvolveSummary or dask.delayed.Delayed

    Raises
    ------
    ValueError, TypeError, FileNotFoundError, FileExistsError
        For bad arguments, all checked before anything is written.
    """
    # 1. everything that can be checked without touching storage
    kernel, mode, method, backend, dtype, output_format = _common_checks(
        kernel, mode, method, backend, dtype, output_format, block_memory
    )
    overwrite = _check_bool(overwrite, "overwrite")
    compute = _check_bool(compute, "compute")
    annotations = _route_annotations(route)
    if target is None:
        raise TypeError("target must be a local path, an fsspec URL or a zarr store; got None")
    resume = _check_bool(resume, "resume")
    src_loc, tgt_loc = _resolve_locations(source, target, array, storage_options, target_storage_options)
    _check_target(tgt_loc, overwrite, resume)  # refuse a finished or foreign target before reading anything

    # 2. open the source (read-only) and check what depends on it
    from .storage import open_input

    src = open_input(source, array=array, storage_options=storage_options)
    fs = tuple(int(v) for v in src.frame_shape)
    geo = geometry(fs, kernel.shape, mode)  # ValueError for 'valid' with a kernel larger than the frame
    if src.format == "csr":
        src.check_indices()  # out-of-range indices fail here, before the target exists
    if src.n_images == 0:
        raise ValueError(f"source {src.location} holds no images (shape[0] == 0); nothing to convolve")
    out_dtype = compute_dtype(src.dtype, dtype)
    fmt = output_format or src.format
    workers = _scheduler_workers()
    nnz_per_image, expansion = _source_estimates(src, kernel, geo, fmt)
    blocks = _plan(src.n_images, src.chunk_rows, fs, geo.out_shape, src.dtype, out_dtype, src.format, fmt, src.nnz,
                   kernel, block_memory, nnz_per_image, threads=_scheduler_threads(workers), expansion=expansion)

    # 3. take the target's lock (the first write), then decide again what the
    #    target is: a run that held the lock may have finished it meanwhile
    from .storage import _check_target_writable

    _check_target_writable(tgt_loc, target)  # before the lock: a path under a file, a read-only folder
    held, took_lock = _take_lock(lock, tgt_loc)
    try:
        resume_prov = _check_target(tgt_loc, overwrite, resume)
        graph = _build_job(src, src_loc, tgt_loc, target, kernel, mode, method, backend, fmt, out_dtype, geo, blocks,
                           resume_prov, overwrite, compressor, route, annotations, workers, target_storage_options,
                           release=held if took_lock else None)
    except BaseException:
        if took_lock:
            held.release()
        raise
    if not compute:
        return graph  # its last task releases the lock this call took
    import dask

    t0 = time.perf_counter()
    try:
        if took_lock:
            held.start_renewing()
        (summary,) = dask.compute(graph)
    finally:
        if took_lock:
            held.release()
    summary.elapsed = time.perf_counter() - t0
    return summary


def _build_job(src, src_loc, tgt_loc, target, kernel, mode, method, backend, fmt, out_dtype, geo, blocks,
               resume_prov, overwrite, compressor, route, annotations, workers, target_storage_options, release):
    """Fingerprint the input (refusing a resume whose input changed), create
    or reopen the target, and build the graph."""
    from .storage import create_output
    from .storage.fingerprint import check_unchanged, fingerprint

    fs = tuple(int(v) for v in src.frame_shape)
    fp = fingerprint(src_loc, scheduler_threads=_scheduler_threads(workers))
    if resume_prov is not None:
        check_unchanged(resume_prov.get("source_fingerprint"), fp, str(src.location), str(tgt_loc))
    attrs = {
        "source": str(src.location),
        "source_format": src.format,
        "source_frame_shape": list(fs),
        "mode": mode,
        "method": method,
        "backend": backend,
        "kernel_shape": list(kernel.shape),
        "kernel_sha": kernel_digest(kernel),
    }
    if kernel.size <= 256:
        attrs["kernel"] = kernel.tolist()
    if resume_prov is not None:
        blocks = _resume_blocks(blocks, resume_prov)
    else:
        # recorded, not compared as a setting: a resume compares it with check_unchanged
        attrs["source_fingerprint"] = fp.as_dict()
    out = create_output(
        target,
        fmt,
        src.n_images,
        geo.out_shape,
        out_dtype,
        blocks.bounds,
        storage_options=target_storage_options,
        overwrite=overwrite,
        attrs=attrs,
        # dense: one chunk per block; CSR: indptr in storage's default chunks (one
        # chunk up to 262144 images) rather than one tiny chunk (and one
        # consolidation task) per block
        chunk_rows=blocks.block_rows if fmt == "dense" else None,
        compressor=compressor,
        resume=resume_prov is not None,  # reopens only the same job's output, else ValueError
    )
    lock_token = None if release is None else (tgt_loc, release.token)
    done = out.done_blocks() if resume_prov is not None else set()
    if resume_prov is not None and fmt == "csr" and resume_prov.get("consolidated"):
        from dask import delayed

        info = {"target": str(tgt_loc), "format": fmt, "n_images": src.n_images, "frame_shape": fs,
                "out_shape": geo.out_shape, "dtype": out_dtype.name, "block_rows": blocks.block_rows,
                "lock": lock_token}
        return delayed(_finish_consolidated, pure=False)(out, info, int(resume_prov.get("nnz", 0)))
    spec = _Spec(fs, geo.out_shape, mode, method, backend, out_dtype.str, fmt, route=route,
                 hold_bytes=_hold_bytes(blocks, fmt))
    return _store_graph(src, out, kernel, blocks, spec, str(tgt_loc), annotations, done=done,
                        resumed=resume_prov is not None, workers=workers, lock_token=lock_token)


def _store_graph(src, out, kernel, blocks: RowBlocks, spec: _Spec, target: str, annotations: dict | None = None,
                 *, done: set | None = None, resumed: bool = False, workers: dict[str, int] | None = None,
                 lock_token: tuple | None = None):
    from dask import delayed
    from dask.base import tokenize

    token = tokenize(target, spec, blocks.block_rows, time.time_ns())
    kernel_node = _kernel_node(kernel)
    job_node = delayed((src, out, spec), name=f"sparseconv-job-{token}", traverse=False)
    out_node = delayed(out, name=f"sparseconv-target-{token}", traverse=False)
    run = delayed(_run_block, pure=False)
    import dask

    with dask.annotate(**(annotations or {})):  # route: only the block tasks are restricted
        stats = [
            run(job_node, kernel_node, i, start, stop, i in (done or ()), dask_key_name=f"sparseconv-block-{token}-{i:06d}")
            for i, (start, stop) in enumerate(blocks.bounds)
        ]
    info = {
        "target": target,
        "format": spec.out_format,
        "n_images": blocks.n_images,
        "frame_shape": spec.frame_shape,
        "out_shape": spec.out_shape,
        "dtype": np.dtype(spec.dtype).name,
        "block_rows": blocks.block_rows,
        "resumed": resumed,
        "lock": lock_token,  # (target location, token): released by the last task
    }
    parts = None
    if spec.out_format == "csr":
        # the number of final chunks depends on the total nnz, known only after
        # the blocks: a fixed number of tasks each plan them (cheap, from the
        # blocks' nnz) and write a disjoint share of whole chunks, in parallel
        n_parts = max(1, min(2 * _scheduler_threads(workers), 64))
        part = delayed(_consolidate_part, pure=False)
        # stats go as separate arguments: dask unpacks Delayed arguments
        # cheaply, but optimises a list of them (~60 ms per call at 200 blocks)
        parts = []
        for k, where in enumerate(_part_placement(n_parts, workers)):
            with dask.annotate(**where):
                parts.append(part(out_node, k, n_parts, *stats, dask_key_name=f"sparseconv-consolidate-{token}-{k}"))
    return delayed(_finalize_job, pure=False)(out_node, info, len(stats), *stats, *(parts or ()),
                                              dask_key_name=f"sparseconv-finalize-{token}")


def _part_placement(n_parts: int, workers: dict[str, int] | None) -> list[dict]:
    """dask annotations spreading the consolidation parts over the workers in
    proportion to their threads, as a preference only (``allow_other_workers``:
    a part still runs if its worker is gone, or on a cluster the graph was
    not built against).

    Every part depends on every block, so the scheduler places them by where
    the blocks' results are: with held blocks (megabytes) it put three of
    four parts on one worker of two, which then ran them one after another."""
    slots = [a for a, n in sorted((workers or {}).items()) for _ in range(max(0, n))]
    if len(slots) < 2:
        return [{}] * n_parts
    return [{"workers": [slots[k % len(slots)]], "allow_other_workers": True} for k in range(n_parts)]


def _finalize_job(out, info: dict, n_blocks: int, *results):
    """The graph's last task: ``results`` are the blocks' stats, then the consolidation parts' reports."""
    summary = _finalize(out, list(results[:n_blocks]), info, list(results[n_blocks:]) or None)
    _release_lock(info)
    return summary


def _release_lock(info: dict) -> None:
    """Delete the target's lock if the graph's builder took it (``compute=False``:
    nobody else is there to release it once the job is done)."""
    if info.get("lock"):
        from .storage.job_lock import release_token

        release_token(*info["lock"])


__all__ = ["ConvolveSummary", "convolve", "convolve_zarr"]
