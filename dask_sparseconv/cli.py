"""The ``dask-sparseconv`` command line.

Commands::

    dask-sparseconv run WORKFLOW.yaml [--dry-run] [--verbose] [--restart]
    dask-sparseconv validate WORKFLOW.yaml
    dask-sparseconv info STORE [--array A] [--storage-option k=v ...]
    dask-sparseconv preview WORKFLOW.yaml --images 0,1,2 -o preview.png

Exit codes: 0 success, 1 runtime failure (a task failed, the scheduler could
not be reached, ...), 2 usage or validation error (bad arguments, a workflow
with problems, a missing input, an existing output). Errors are one clear
message on stderr; a Python traceback is printed only with ``--verbose``.
See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import ssl
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

PROG = "dask-sparseconv"
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """An error to report as one message and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.message = message
        self.code = code


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------
def _version() -> str:
    from . import __version__

    return __version__


def _out(*parts: Any) -> None:
    print(*parts, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _int(n: int | float) -> str:
    return f"{int(n):,}"


def _shape(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _bytes(n: float) -> str:
    from .workflow import format_bytes

    return format_bytes(n)


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{int(m)} min {s:04.1f} s"
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m):02d} min"


def _is_numba_error(exc: BaseException) -> bool:
    for cls in type(exc).__mro__:
        if (cls.__module__ or "").startswith("numba"):
            return True
    return False


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hide library warnings and dask/distributed log chatter unless --verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        yield
        return
    loggers = [logging.getLogger(n) for n in ("distributed", "dask", "tornado", "asyncio", "numba")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def _load(path: str):
    """Load a workflow; schema problems become a usage error (exit 2)."""
    from .workflow import WorkflowError, load_workflow

    try:
        return load_workflow(path)
    except WorkflowError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


# ---------------------------------------------------------------------------
# inspecting a workflow's input and output (validate, dry-run, run, preview)
# ---------------------------------------------------------------------------
@dataclass
class Plan:
    """What a workflow will do, worked out without computing anything."""

    wf: Any
    src: Any  # opened input, or None when a sample will be generated
    sample_pending: bool
    n_images: int
    frame_shape: tuple[int, int]
    in_dtype: np.dtype
    in_format: str
    chunk_rows: int
    nnz: int | None
    nnz_exact: bool
    out_shape: tuple[int, int]
    out_format: str
    out_dtype: np.dtype
    blocks: Any  # RowBlocks or None when the block budget is too small
    threads: int
    target_exists: bool
    resume: dict | None = None  # an incomplete output to continue: {"done": blocks written, "n_blocks": ...}
    complete: dict | None = None  # provenance of a finished output that would be left as it is (dry run)
    locked_by: dict | None = None  # lock record of a run writing the target now
    job: Any = None  # the JobPlan of an existing input (run as it is by convolve_zarr)

    @property
    def density(self) -> float | None:
        px = self.n_images * self.frame_shape[0] * self.frame_shape[1]
        return None if self.nnz is None or not px else self.nnz / px


def _path_exists(path: str, storage_options: dict) -> bool:
    from .workflow import is_url

    if not is_url(path) or path.startswith("file://"):
        return os.path.exists(path[len("file://") :] if path.startswith("file://") else path)
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(path, storage_options=storage_options or {})
    return bool(paths) and fs.exists(paths[0])


def _local_threads(cluster) -> int:
    if cluster.address is not None:
        return 1  # unknown until connected; see describe_cluster
    n_workers = cluster.n_workers or _default_n_workers(cluster.threads_per_worker)
    return n_workers * cluster.threads_per_worker


def _default_n_workers(threads_per_worker: int) -> int:
    from .engine.threads import default_threads

    return max(1, default_threads() // max(1, threads_per_worker))


def inspect_workflow(wf, *, overwrite: bool | None = None, allow_complete: bool = False) -> Plan:
    """Check a loaded workflow against the data it names.

    Checks that the input exists and opens as a 3-D dense stack or a CSR
    group (or will be generated from ``input.sample``), that the kernel fits
    the frame in ``valid`` mode, that the block budget holds one image, and
    that the output does not exist unless overwriting (or is an incomplete
    output to resume, whose input has not changed since). Every problem is
    collected and raised together as a :class:`WorkflowError`.

    ``allow_complete`` (``--dry-run``): a finished output is no problem; the
    plan says it would be left as it is.
    """
    from .convolver import compute_dtype
    from .geometry import geometry
    from .workflow import WorkflowError

    problems: list[tuple[str, str]] = []
    overwrite = wf.output.overwrite if overwrite is None else overwrite
    inp = wf.input
    src = None
    sample_pending = False
    n_images = 0
    frame_shape = (1, 1)
    in_dtype, in_format, chunk_rows, nnz, exact = np.dtype(np.float32), "dense", 1, None, False
    try:
        exists = _path_exists(inp.path, inp.storage_options)
    except Exception as exc:  # bad storage options, unknown protocol, ...
        problems.append(("input.path", f"cannot check {inp.path!r}: {exc}"))
        exists = None
    if exists is False and inp.sample is not None:
        from .sample_data import SAMPLE_CHUNK_ROWS, sample_rois

        s = inp.sample
        sample_pending = True
        n_images, frame_shape, in_format = s.n_images, tuple(s.frame_shape), s.format
        csr = sample_rois(s.n_images, s.frame_shape, max_rois=s.max_rois, radius=s.radius, seed=s.seed)
        nnz, exact = int(csr.nnz), True
        if in_format == "csr":  # written with write_csr_stack's default chunks
            from .storage.csr_store import DEFAULT_CHUNK_NNZ, csr_chunk_rows

            chunk_rows = csr_chunk_rows(n_images, nnz, max(1, min(DEFAULT_CHUNK_NNZ, nnz)),
                                        min(DEFAULT_CHUNK_NNZ, n_images + 1))
        else:
            chunk_rows = min(SAMPLE_CHUNK_ROWS, max(1, n_images))
    elif exists is False:
        problems.append(("input.path", f"{inp.path} does not exist"))
    elif exists:
        from .storage import open_input

        try:
            src = open_input(inp.path, array=inp.array, storage_options=inp.storage_options or None)
        except Exception as exc:  # the storage layer words its errors for users
            key = "input.array" if inp.array is not None and "array" in str(exc) else "input.path"
            problems.append((key, f"cannot open {inp.path}: {exc}"))
        else:
            n_images, frame_shape = int(src.n_images), tuple(int(v) for v in src.frame_shape)
            in_dtype, in_format, chunk_rows = np.dtype(src.dtype), src.format, int(src.chunk_rows)
            try:
                from .storage import describe_stack

                desc = describe_stack(inp.path, array=inp.array, storage_options=inp.storage_options or None)
                nnz, exact = int(desc["nnz"]), bool(desc["nnz_exact"])
            except Exception as exc:
                problems.append(("input.path", f"cannot read {inp.path}: {exc}"))
    out_format = wf.output.format or in_format
    out_dtype = compute_dtype(in_dtype, wf.dtype)
    out_shape = frame_shape
    blocks = None
    have_input = src is not None or sample_pending
    if have_input:
        try:
            out_shape = geometry(frame_shape, wf.kernel.array.shape, wf.mode).out_shape
        except ValueError:
            problems.append(
                ("kernel", f"kernel of shape {_shape(wf.kernel.array.shape)} is larger than the {_shape(frame_shape)} "
                           "frames; mode: valid needs a kernel no larger than the frame (use mode: same or full)")
            )
    threads = _local_threads(wf.cluster)
    job = None
    if have_input and not any(k == "kernel" for k, _ in problems):
        # the planner the run uses, with the estimates it makes (sampled from the data): the plan shown is the plan run
        try:
            if src is not None:
                job = _plan_job(wf, src, threads, problems)
                blocks = job.blocks if job is not None else None
            else:
                blocks = _plan_sample(wf, csr, n_images, chunk_rows, frame_shape, in_dtype, out_dtype, out_format,
                                      threads)
        except ValueError as exc:
            problems.append(("block.memory", str(exc).replace("block_memory=", "").replace("block_memory", "block.memory")))
    try:
        target_exists = _path_exists(wf.output.path, wf.output.storage_options)
    except Exception as exc:
        problems.append(("output.path", f"cannot check {wf.output.path!r}: {exc}"))
        target_exists = False
    if not target_exists and not problems_about(problems, "output.path"):
        try:  # a local target under a regular file or in a read-only folder: refuse before starting anything
            from .storage import check_target_writable, resolve_location

            loc = resolve_location(wf.output.path, None, wf.output.storage_options or None, name="target")
            check_target_writable(loc, wf.output.path)
        except (OSError, ValueError, TypeError) as exc:
            problems.append(("output.path", str(exc)))
    resume = complete = None
    if target_exists and not overwrite:
        resume = _resumable(wf.output.path, wf.output.storage_options)
        prov = _target_prov(wf.output.path, wf.output.storage_options) if resume is None else None
        if resume is not None and src is not None:
            changed = _input_change(job, src, wf.output.path, resume.get("provenance") or {})
            if changed:
                problems.append(("input.path", changed))
        if resume is None and allow_complete and prov is not None and prov.get("complete"):
            complete = prov
        elif resume is None:
            problems.append(
                ("output.path", f"{wf.output.path} already exists{_existing_kind(wf.output.path, wf.output.storage_options)}; "
                                "it is left as it is: set output.overwrite: true (or pass --restart to run) to replace it")
            )
    if problems:
        raise WorkflowError(problems, wf.source)
    return Plan(wf, src, sample_pending, n_images, frame_shape, in_dtype, in_format, chunk_rows, nnz, exact,
                out_shape, out_format, out_dtype, blocks, threads, target_exists, resume=resume, complete=complete,
                locked_by=_lock_holder(wf.output.path, wf.output.storage_options), job=job)


def _job_settings(wf) -> dict:
    return dict(mode=wf.mode, output_format=wf.output.format, method=wf.method, backend=wf.backend, dtype=wf.dtype,
                block_memory=wf.block.memory)


def _plan_job(wf, src, threads: int, problems: list[tuple[str, str]]):
    """:func:`~dask_sparseconv.pipeline.plan_job` for the opened input. A block
    budget too small for one image is a problem of block.memory; an input the
    job cannot use (indices out of range, no images) is refused as the run
    refuses it, in one line; a chunk that cannot be read is a problem of
    input.path (the run would fail on it too)."""
    from .pipeline import plan_job

    try:
        return plan_job(src, wf.kernel.array, threads=threads, **_job_settings(wf))
    except (ValueError, TypeError) as exc:
        if "block_memory" in str(exc):
            raise
        raise CLIError(f"{wf.source}: {exc}", EXIT_USAGE) from exc
    except Exception as exc:
        problems.append(("input.path", f"cannot read {wf.input.path}: {exc}"))
    return None


def _plan_sample(wf, csr, n_images, chunk_rows, frame_shape, in_dtype, out_dtype, out_format, threads: int):
    """The blocks of a sample stack not generated yet (planned from the matrix it will hold)."""
    from .geometry import geometry
    from .pipeline.plan import plan_matrix
    from .pipeline.spec import check_settings

    settings = check_settings(wf.kernel.array, **{k: v for k, v in _job_settings(wf).items()})
    geo = geometry(frame_shape, wf.kernel.array.shape, wf.mode)
    return plan_matrix(n_images, frame_shape, csr, settings, geo, in_dtype, out_dtype, out_format, threads,
                       chunk_rows=chunk_rows)


def _input_change(job, src, target: str, prov: dict) -> str | None:
    """Why an incomplete output cannot be resumed from ``src`` as it is now
    (its input changed since the run that wrote it started), or None.
    ``job``: the JobPlan (its fingerprint is then reused by the run)."""
    from .storage.fingerprint import InputChangedError, check_unchanged, fingerprint

    try:
        fp = job.fingerprint() if job is not None else fingerprint(src.store_location)
        check_unchanged(prov.get("source_fingerprint"), fp, str(src.location), target)
    except InputChangedError as exc:
        return f"{exc} (it is left as it is)"
    except Exception:  # unreadable now: the run reports it
        return None
    return None


def _lock_holder(path: str, storage_options: dict) -> dict | None:
    """The lock record of a run writing ``path`` now (stale locks do not count), or None."""
    try:
        from .storage import resolve_location
        from .storage.job_lock import read_lock, stale_reason

        rec = read_lock(resolve_location(path, None, storage_options or None, name="target"))
    except Exception:
        return None
    return rec if rec is not None and stale_reason(rec) is None else None


def problems_about(problems: list[tuple[str, str]], key: str) -> bool:
    return any(k == key for k, _ in problems)


def _target_prov(path: str, storage_options: dict) -> dict | None:
    """The dask_sparseconv provenance of an existing output, or None."""
    try:
        from .storage import progress, resolve_location

        return progress.provenance(resolve_location(path, None, storage_options or None).open(mode="r"))
    except Exception:  # not a zarr store, unreadable
        return None


def _existing_kind(path: str, storage_options: dict) -> str:
    prov = _target_prov(path, storage_options)
    if prov is None:
        return " (not an output of dask-sparseconv)"
    return " and is complete" if prov.get("complete") else ""


def _resumable(path: str, storage_options: dict) -> dict | None:
    """``{"done", "n_blocks"}`` when ``path`` holds an incomplete output of this
    package (an interrupted run to resume; whether it is the same job is
    checked when the run starts), else None."""
    prov = _target_prov(path, storage_options)
    if prov is None or prov.get("complete"):
        return None
    done = None
    try:
        from .storage import progress, resolve_location

        node = resolve_location(path, None, storage_options or None).open(mode="r")
        done = len({i for i in progress.done_blocks(node) if i < int(prov.get("n_blocks", 0))})
    except Exception:
        pass
    return {"done": done, "n_blocks": prov.get("n_blocks"), "provenance": prov}


def _target_note(plan: Plan) -> str:
    if plan.locked_by is not None:
        from .storage.job_lock import describe_holder

        return f" (being written by another run now: {describe_holder(plan.locked_by)}; a run would be refused)"
    if plan.complete is not None:
        return (f" (complete, written {plan.complete.get('completed', '?')}; it would be left as it is: "
                "pass --restart to recompute it)")
    if plan.resume is not None:
        r = plan.resume
        written = f"{r['done']} of {r['n_blocks']} blocks written" if r.get("done") is not None else "partly written"
        return f" (incomplete, {written}; will resume: written blocks are verified and kept)"
    return " (exists; will be replaced)" if plan.target_exists else ""


def _inspect(wf, **kw) -> Plan:
    from .workflow import WorkflowError

    try:
        return inspect_workflow(wf, **kw)
    except WorkflowError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def _ensure_input(plan: Plan, overwrite: bool | None) -> Plan:
    """Generate the sample stack the workflow asks for, then reopen the input."""
    if not plan.sample_pending:
        return plan
    from .sample_data import ensure_sample

    wf = plan.wf
    s = wf.input.sample
    _out(f"input {wf.input.path} does not exist: generating the sample stack "
         f"({_int(s.n_images)} images of {_shape(s.frame_shape)}, {s.format})")
    try:
        ensure_sample(wf.input.path, s)
    except Exception as exc:
        raise CLIError(f"could not write the sample stack to {wf.input.path}: {exc}") from exc
    return _inspect(wf, overwrite=overwrite)


def _describe_cluster(cluster) -> str:
    route = getattr(cluster, "route", "any")
    text = _describe_cluster_only(cluster)
    return text if route == "any" else f"{text}; blocks on {route.upper()} workers only"


def _describe_cluster_only(cluster) -> str:
    if cluster.address is not None:
        tls = " (TLS)" if cluster.security is not None else ""
        return f"existing scheduler at {cluster.address}{tls}, connect timeout {cluster.timeout:g} s"
    n = cluster.n_workers or _default_n_workers(cluster.threads_per_worker)
    sized = "" if cluster.n_workers else " (sized to this machine)"
    mem = cluster.memory_limit
    mem_txt = "auto" if mem == "auto" else "no limit" if mem is None else _bytes(mem)
    return (f"local cluster: {n} worker process{'es' if n != 1 else ''} x {cluster.threads_per_worker} "
            f"thread{'s' if cluster.threads_per_worker != 1 else ''}{sized}, memory limit {mem_txt} per worker")


def _print_plan(plan: Plan, header: str) -> None:
    wf = plan.wf
    dens = plan.density
    if dens is None:
        dens_txt = "unknown"
    else:
        dens_txt = f"{dens * 100:.3g}% ({_int(plan.nnz)} nonzeros, {'exact' if plan.nnz_exact else 'estimated from a sample of chunks'})"
    src_note = " (to be generated from input.sample)" if plan.sample_pending else ""
    _out(header)
    _out(f"  input:        {wf.input.path}{src_note}")
    _out(f"                {plan.in_format}, {_int(plan.n_images)} images of {_shape(plan.frame_shape)}, {plan.in_dtype}")
    _out(f"  density:      {dens_txt}")
    k = wf.kernel.array
    _out(f"  kernel:       {wf.kernel.description}, {_shape(k.shape)}")
    _out(f"  convolution:  mode {wf.mode}, method {wf.method}, backend {wf.backend}")
    if plan.blocks is not None:
        b = plan.blocks
        threads = f"{plan.threads} scheduler thread{'s' if plan.threads != 1 else ''}"
        if wf.cluster.address is not None:
            threads = "1 scheduler thread; a larger cluster may split finer"
        _out(f"  row blocks:   {_int(b.n_blocks)} of up to {_int(b.block_rows)} images ({threads})")
        _out(f"  memory/block: about {_bytes(b.estimated_block_bytes)} (budget {_bytes(wf.block.memory)})")
    _out(f"  output:       {wf.output.path}" + _target_note(plan))
    _out(f"                {plan.out_format}, {_int(plan.n_images)} images of {_shape(plan.out_shape)}, {plan.out_dtype}")
    _out(f"  cluster:      {_describe_cluster(wf.cluster)}")


# ---------------------------------------------------------------------------
# running on a cluster
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def open_client(cluster, source: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` for the workflow's ``cluster`` section.

    ``address`` connects to a running scheduler (failing after
    ``cluster.timeout`` seconds with a clear message); otherwise a
    ``LocalCluster`` of worker processes is started and closed afterwards.
    """
    from distributed import Client, LocalCluster

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
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = cluster.n_workers or _default_n_workers(cluster.threads_per_worker)
    kwargs = {
        "n_workers": n_workers,
        "threads_per_worker": cluster.threads_per_worker,
        "memory_limit": cluster.memory_limit if cluster.memory_limit is not None else 0,
        "processes": True,
        "dashboard_address": cluster.dashboard_address,
    }
    try:
        lc = LocalCluster(**kwargs)
    except Exception as exc:
        raise CLIError(f"could not start a local dask cluster ({n_workers} workers): {exc}") from exc
    try:
        with Client(lc, set_as_default=True) as client:
            yield client
    finally:
        lc.close()


def _dashboard(client) -> str:
    from .validation import module_available

    if not module_available("bokeh"):
        return "not available (pip install 'dask-sparseconv[dashboard]', i.e. bokeh>=3.1, to get one)"
    link = getattr(client, "dashboard_link", None)
    return link or "not available"


class ProgressReporter:
    """Block progress: a redrawn bar on a terminal, plain periodic lines otherwise."""

    def __init__(self, total: int, stream=None, tty: bool | None = None, interval: float = 2.0, width: int = 30):
        self.total = max(0, int(total))
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.width = width
        self.t0 = time.perf_counter()
        self._last_line = -math.inf
        self._last_pct = -1
        self.done = 0

    def _text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = ""
        if 0 < self.done < self.total:
            eta = f", about {_seconds(elapsed / self.done * (self.total - self.done))} left"
        return f"{self.done}/{self.total} blocks ({pct:.0f}%), {_seconds(elapsed)} elapsed{eta}"

    def update(self, done: int) -> None:
        self.done = int(done)
        now = time.perf_counter()
        if self.tty:
            filled = int(round(self.width * self.done / self.total)) if self.total else self.width
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self._text()}\033[K")
            self.stream.flush()
            return
        pct10 = int(10 * self.done / self.total) if self.total else 10
        if self.done == self.total or now - self._last_line >= self.interval or pct10 > self._last_pct:
            self.stream.write(f"progress: {self._text()}\n")
            self.stream.flush()
            self._last_line, self._last_pct = now, pct10

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _run_graph(client, graph, n_blocks: int) -> Any:
    """Compute the pipeline's graph on ``client``, reporting block progress.

    The block tasks (keys ``sparseconv-block-*``) are computed alongside the
    final summary task so that each one's completion can be followed.
    """
    from dask.delayed import Delayed
    from distributed import as_completed

    hlg = graph.__dask_graph__()
    block_keys = [k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-")]
    block_objs = [Delayed(k, hlg) for k in block_keys]
    futures = client.compute([graph] + block_objs, optimize_graph=False)
    final, blocks = futures[0], futures[1:]
    progress = ProgressReporter(len(blocks) or n_blocks)
    progress.update(0)
    done = 0
    try:
        for fut in as_completed(blocks):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            done += 1
            progress.update(done)
        summary = final.result()
    finally:
        progress.close()
        for f in futures:
            f.release()
    return summary


def _print_summary(summary, plan: Plan, elapsed: float) -> None:
    n = summary.n_images
    rate = n / elapsed if elapsed > 0 else float("inf")
    nnz_rate = summary.nnz_in / elapsed if elapsed > 0 else float("inf")
    _out("done:")
    _out(f"  images:     {_int(n)} ({_shape(summary.frame_shape)} -> {_shape(summary.out_shape)}, mode {plan.wf.mode})")
    _out(f"  nnz:        {_int(summary.nnz_in)} in -> {_int(summary.nnz_out)} out")
    _out(f"  blocks:     {_int(summary.blocks)} of up to {_int(summary.block_rows)} images")
    if getattr(summary, "resumed", False):
        _out(f"  resumed:    {_int(summary.blocks_computed)} blocks computed, {_int(summary.blocks_skipped)} skipped "
             "(already written and verified)")
    _out(f"  time:       {_seconds(elapsed)}")
    _out(f"  throughput: {rate:,.1f} images/s, {nnz_rate:,.0f} input nonzeros/s")
    _out(f"  output:     {summary.target} ({summary.format}, {summary.dtype})")
    engines = (summary.extra or {}).get("engines") or {}
    if engines:
        _out("  engines:    " + ", ".join(f"{label} ({_int(k)} block{'s' if k != 1 else ''})"
                                          for label, k in sorted(engines.items())))
    for reason in (summary.extra or {}).get("fallbacks") or ():
        _err(f"warning: device fallback on a worker: {reason}")


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------
def cmd_validate(args) -> int:
    wf = _load(args.workflow)
    plan = _inspect(wf)
    _out(f"OK: {args.workflow}")
    src = f"{wf.input.path}" + (" (will be generated from input.sample)" if plan.sample_pending else "")
    _out(f"  input:   {src}: {plan.in_format}, {_int(plan.n_images)} images of {_shape(plan.frame_shape)}, {plan.in_dtype}")
    _out(f"  kernel:  {wf.kernel.description}, {_shape(wf.kernel.array.shape)}; mode {wf.mode}")
    _out(f"  output:  {wf.output.path}: {plan.out_format}, {_shape(plan.out_shape)}, {plan.out_dtype}"
         + _target_note(plan))
    _out(f"  cluster: {_describe_cluster(wf.cluster)}")
    return EXIT_OK


def cmd_run(args) -> int:
    wf = _load(args.workflow)
    overwrite = True if args.restart else None
    plan = _inspect(wf, overwrite=overwrite, allow_complete=bool(args.dry_run))
    if args.dry_run:
        _print_plan(plan, f"dry run of {args.workflow} (nothing is computed or written):")
        return EXIT_OK
    # the lock first: a second run of this job is refused before it starts a cluster
    with _job_lock(wf) as lock:
        return _run_locked(args, wf, overwrite, plan, lock)


@contextlib.contextmanager
def _job_lock(wf) -> Iterator[Any]:
    """Hold the output's lock (renewed in the background) while the run goes on."""
    from .storage import resolve_location
    from .storage.job_lock import JobLock, LockStaleWarning, TargetLockedError

    loc = resolve_location(wf.output.path, None, wf.output.storage_options or None, name="target")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LockStaleWarning)
        try:
            lock = JobLock.acquire(loc, what=f"{PROG} run {wf.source}")
        except TargetLockedError as exc:
            raise CLIError(f"output.path: {exc}", EXIT_RUNTIME) from None
        except OSError as exc:
            raise CLIError(f"output.path: cannot create the lock beside {wf.output.path}: {exc}", EXIT_RUNTIME) from None
    for w in caught:
        if issubclass(w.category, LockStaleWarning):
            _err(f"warning: {w.message}")
    with lock:
        yield lock


def _run_locked(args, wf, overwrite, plan: Plan, lock) -> int:
    plan = _ensure_input(plan, overwrite)
    from .pipeline import convolve_zarr

    _print_plan(plan, f"running {args.workflow}:")
    if not args.verbose:
        # Local worker processes inherit these: their task-failure logs and
        # warnings would otherwise print tracebacks on our stderr.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    _RUNNING["output"] = (wf.output.path, wf.output.storage_options)  # for the message if interrupted
    with open_client(wf.cluster, wf.source) as client:
        _out(f"dashboard: {_dashboard(client)}")
        if not client.nthreads():
            _out(f"waiting up to {wf.cluster.timeout:g} s for a worker to join the scheduler")
            try:
                client.wait_for_workers(1, timeout=wf.cluster.timeout)
            except (TimeoutError, OSError):
                raise CLIError(f"the scheduler at {wf.cluster.address} has no workers; start some with "
                               f"`dask worker {wf.cluster.address}`") from None
        info = client.nthreads()
        _out(f"cluster: {len(info)} worker{'s' if len(info) != 1 else ''}, {sum(info.values())} threads")
        t0 = time.perf_counter()
        try:
            graph = convolve_zarr(
                wf.input.path,
                wf.kernel.array,
                wf.output.path,
                wf.mode,
                output_format=wf.output.format,
                method=wf.method,
                backend=wf.backend,
                dtype=wf.dtype,
                block_memory=wf.block.memory,
                overwrite=bool(wf.output.overwrite or args.restart),
                compute=False,
                array=wf.input.array,
                storage_options=wf.input.storage_options or None,
                target_storage_options=wf.output.storage_options or None,
                compressor=None if wf.output.compressor == "none" else "default",
                route=wf.cluster.route,
                lock=lock,
                plan=plan.job,
            )
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as exc:
            raise CLIError(f"{wf.source}: {exc}", EXIT_USAGE) from exc
        try:
            summary = _run_graph(client, graph, plan.blocks.n_blocks if plan.blocks else 0)
        except Exception:
            _err(f"note: {_output_state(wf.output.path, wf.output.storage_options)}")
            raise
        elapsed = time.perf_counter() - t0
    _print_summary(summary, plan, elapsed)
    return EXIT_OK


def _parse_storage_options(items: list[str] | None) -> dict:
    import yaml

    opts: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--storage-option must look like key=value; got {item!r}", EXIT_USAGE)
        key, value = item.split("=", 1)
        if not key:
            raise CLIError(f"--storage-option must look like key=value; got {item!r}", EXIT_USAGE)
        try:
            opts[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            opts[key] = value
    return opts


def cmd_info(args) -> int:
    from .storage import describe_stack

    opts = _parse_storage_options(args.storage_option)
    store = args.store
    try:
        exists = _path_exists(store, opts)
    except Exception as exc:
        raise CLIError(f"cannot check {store!r}: {exc}", EXIT_USAGE) from None
    if not exists:
        raise CLIError(f"{store} does not exist", EXIT_USAGE)
    try:
        d = describe_stack(store, array=args.array, storage_options=opts or None)
    except Exception as exc:
        raise CLIError(f"cannot open {store}: {exc}", EXIT_USAGE) from None
    done = d["done_blocks"] if "done_blocks" in d else _done_blocks(store, args.array, opts, d)
    for line in describe_lines(d, store, args.array, done):
        _out(line)
    return EXIT_OK


def _done_blocks(store: str, array: str | None, opts: dict, d: dict) -> int | None:
    """Blocks already written to an incomplete output of this package."""
    if d.get("complete") is not False:
        return None
    try:
        from .storage import progress, resolve_location

        node = resolve_location(store, array, opts or None).open(mode="r")
        return len(progress.done_blocks(node))
    except Exception:
        return None


def _chunks_text(chunks: Any) -> str:
    if isinstance(chunks, dict):
        return ", ".join(f"{k} {tuple(v)}" for k, v in chunks.items())
    return str(tuple(chunks)) if chunks is not None else "?"


def describe_lines(d: dict, store: str, array: str | None, done: int | None = None) -> list[str]:
    """Lines ``info`` prints for a :func:`~dask_sparseconv.storage.describe_stack` summary."""
    n, (H, W) = int(d["n_images"]), tuple(int(v) for v in d["frame_shape"])
    codec = d.get("codec")
    if isinstance(codec, dict):
        codecs = set(codec.values())
        codec = codecs.pop() if len(codecs) == 1 else ", ".join(f"{k}: {v}" for k, v in codec.items())
    if d.get("nnz") is None:
        nnz_line, dens_line = "not counted (incomplete output)", "not counted"
    else:
        how = "exact" if d.get("nnz_exact") else f"estimated from {_int(d.get('sampled_images', 0))} of {_int(n)} images"
        nnz_line, dens_line = f"{_int(d['nnz'])} ({how})", f"{float(d['density']) * 100:.4g}%"
    lines = [
        f"store:      {d.get('location', store)}" + (f" (array {array})" if array else ""),
        f"format:     {d['format']}" + (" (anndata csr_matrix group)" if d["format"] == "csr" else ""),
        f"images:     {_int(n)} of {_shape((H, W))}",
        f"shape:      {tuple(d['shape'])}",
        f"dtype:      {d['dtype']}",
    ]
    if "chunks" in d:
        lines.append(f"chunks:     {_chunks_text(d.get('chunks'))}")
    if "codec" in d:
        lines.append(f"codec:      {codec or 'none'}")
    if "zarr_format" in d:
        lines.append(f"zarr:       format {d['zarr_format']}")
    lines += [f"nnz:        {nnz_line}", f"density:    {dens_line}"]
    if d.get("index_dtypes"):
        lines.append("indices:    " + ", ".join(f"{k} {v}" for k, v in d["index_dtypes"].items()))
    prov = d.get("provenance")
    if prov:
        lines.append(f"provenance: written by dask-sparseconv {prov.get('version', '')}".rstrip())
        for k in ("source", "mode", "method", "backend", "kernel_shape", "kernel_sha", "dtype", "block_rows",
                  "n_blocks", "created", "completed"):
            if k in prov:
                lines.append(f"  {k + ':':<14}{prov[k]}")
        if prov.get("complete"):
            lines.append("state:      complete")
        else:
            total = d.get("n_blocks") or prov.get("n_blocks")
            part = f"; {done} of {total} blocks written" if done is not None and total else ""
            lines.append(f"state:      INCOMPLETE (the run that wrote it did not finish{part}; "
                         "run the workflow again to resume it, or with --restart to start over)")
    else:
        lines.append("provenance: none (not written by dask-sparseconv)")
    return lines


def cmd_preview(args) -> int:
    from .preview import render_preview

    wf = _load(args.workflow)
    try:
        images = [int(p) for p in args.images.split(",") if p.strip() != ""]
    except ValueError:
        raise CLIError(f"--images must be comma-separated image indices such as 0,1,2; got {args.images!r}", EXIT_USAGE) from None
    if not images:
        raise CLIError("--images needs at least one image index", EXIT_USAGE)
    plan = _inspect(wf, overwrite=True)  # preview never writes the output
    plan = _ensure_input(plan, True)
    bad = [i for i in images if not -plan.n_images <= i < plan.n_images]
    if bad:
        raise CLIError(f"--images: {', '.join(map(str, bad))} out of range for a stack of {plan.n_images} images "
                       f"(valid: 0..{plan.n_images - 1})", EXIT_USAGE)
    images = [i % plan.n_images for i in images]
    img = render_preview(plan.src, wf, images, scale=args.scale, labels=not args.no_labels)
    out = args.output
    try:
        img.save(out, format="PNG")
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write {out}: {exc}") from None
    _out(f"wrote {out}: {img.width} x {img.height} px, {len(images)} image{'s' if len(images) != 1 else ''} "
         f"({', '.join(map(str, images))}), input left, {wf.mode} convolution right")
    return EXIT_OK


# ---------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: exit 2, no traceback
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Out-of-core sparse 2D convolution of zarr image stacks on dask "
        "(scipy.signal.convolve2d semantics).",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage or validation error. "
        "See docs/cli.md and docs/workflow_reference.md.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def verbose(sp):
        sp.add_argument("-v", "--verbose", action="store_true", help="log progress details and show full tracebacks on errors")

    r = sub.add_parser("run", help="run a workflow", description="Run the convolution a workflow file describes.")
    r.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan (input, density, row blocks, memory, output, cluster) without computing or writing")
    r.add_argument("--restart", action="store_true",
                   help="start over: replace an existing (complete or partial) output, as output.overwrite: true does. "
                        "Without it an interrupted run's partial output is resumed (written blocks are verified and kept) "
                        "and a complete output is refused")
    verbose(r)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a workflow and the data it names",
                       description="Check a workflow file and its input and output: every problem is reported at once.")
    v.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    verbose(v)
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("info", help="describe a zarr stack", description="Describe a dense or CSR zarr stack.")
    i.add_argument("store", metavar="STORE", help="path or URL of the zarr store")
    i.add_argument("--array", default=None, help="array or group inside the store")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                   help="fsspec option for URLs (repeatable); the value is read as YAML (true, 3, text)")
    verbose(i)
    i.set_defaults(func=cmd_info)

    pv = sub.add_parser("preview", help="render input frames beside their convolution into a PNG",
                        description="Convolve a few images in this process and save them side by side as a PNG.")
    pv.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file")
    pv.add_argument("--images", default="0", help="comma-separated image indices (default: 0); negative counts from the end")
    pv.add_argument("-o", "--output", default="preview.png", help="PNG file to write (default: preview.png)")
    pv.add_argument("--scale", type=int, default=1, choices=range(1, 9), metavar="N", help="enlarge each pixel N times (1-8)")
    pv.add_argument("--no-labels", action="store_true", help="leave out the text labels")
    verbose(pv)
    pv.set_defaults(func=cmd_preview)
    return p


#: what ``run`` is writing, for the message after an interruption
_RUNNING: dict[str, Any] = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same orderly unwinding as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds it like Ctrl-C (clients and local
    clusters are closed by their ``with`` blocks) instead of killing it mid-write."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test thread)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _output_state(path: str, opts: dict) -> str:
    """What a failed or interrupted run left at ``path``, and what to do next."""
    prov = _target_prov(path, opts)
    if prov is None:
        return f"nothing usable was written to {path}"
    if prov.get("complete"):
        return f"the output {path} was completed before the failure; it is complete"
    r = _resumable(path, opts)
    state = f" ({r['done']} of {r['n_blocks']} blocks written)" if r is not None and r.get("done") is not None else ""
    return (f"the output {path} is incomplete{state} and marked so: once the cause below is fixed, run the same "
            "workflow again to resume (written blocks are verified and kept), or with --restart to start over")


def failure_line(exc: BaseException, verbose: bool = False) -> str:
    """One line naming a runtime failure's cause: its type, its message (or,
    for an exception without one, where it was raised), and how to see more."""
    text = " ".join(str(exc).split())
    if not text:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" raised in {tb.tb_frame.f_code.co_name} ({os.path.basename(tb.tb_frame.f_code.co_filename)}:" \
                f"{tb.tb_lineno})" if tb is not None else ""
        text = f"{exc!r}{where}"
    hint = "" if verbose else " (--verbose shows the traceback)"
    return f"error: {type(exc).__name__}: {text}{hint}"


def _interrupted_message(exc: KeyboardInterrupt) -> str:
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    out = _RUNNING.get("output")
    if out is None:
        return f"{what}; nothing was left half-done"
    path, opts = out
    state = ""
    prov = _target_prov(path, opts)
    if prov is not None and prov.get("complete"):
        return f"{what} after the output {path} was completed; it is complete"
    r = _resumable(path, opts)
    if r is not None and r.get("done") is not None:
        state = f" ({r['done']} of {r['n_blocks']} blocks written)"
    return (f"{what}; the output {path} is incomplete{state} and marked so: run the same workflow again to resume "
            "(written blocks are verified and kept), or with --restart to start over")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    verbose = getattr(args, "verbose", False)
    _RUNNING.clear()
    try:
        with _sigterm_unwinds(), _quiet(verbose):
            return int(args.func(args) or 0)
    except CLIError as exc:
        if verbose and exc.__cause__ is not None and not _is_numba_error(exc.__cause__):
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        _err(f"error: {exc.message}")
        return exc.code
    except BrokenPipeError:  # e.g. `dask-sparseconv info X | head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUNTIME
    except KeyboardInterrupt as exc:
        try:
            _err(f"error: {_interrupted_message(exc)}")
        except KeyboardInterrupt:  # a second Ctrl-C while describing the output
            _err("error: interrupted; the output is incomplete: run the same workflow again to resume")
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a runtime failure: one message, traceback only when asked
        if _is_numba_error(exc):
            _err(
                "error: the numba engine failed on this input "
                f"({type(exc).__name__}); this is a bug in dask-sparseconv - please report it. "
                "As a workaround set backend: numpy (and method: gather_scatter or precomputed) in the workflow."
            )
            return EXIT_RUNTIME
        if verbose:
            traceback.print_exc(file=sys.stderr)
        _err(failure_line(exc, verbose))  # the cause, always the last line
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
