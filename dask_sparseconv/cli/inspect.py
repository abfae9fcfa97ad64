"""Checking a workflow against the data it names, without computing anything: :func:`inspect_workflow`
returns a :class:`Plan`, whose ``job`` is the :class:`~dask_sparseconv.pipeline.JobPlan` the run executes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cluster import local_threads
from .errors import EXIT_RUNTIME, EXIT_USAGE, RUNNING, CLIError, interrupted_before_output, interrupted_what
from .report import fmt_int, fmt_shape, say


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


def load_or_exit(path: str):
    """Load a workflow; schema problems become a usage error (exit 2)."""
    from ..workflow import WorkflowError, load_workflow

    try:
        return load_workflow(path)
    except WorkflowError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def path_exists(path: str, storage_options: dict) -> bool:
    from ..workflow import is_url

    if not is_url(path) or path.startswith("file://"):
        return os.path.exists(path[len("file://") :] if path.startswith("file://") else path)
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(path, storage_options=storage_options or {})
    return bool(paths) and fs.exists(paths[0])


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
    from ..convolver import compute_dtype
    from ..geometry import geometry
    from ..workflow import WorkflowError

    problems: list[tuple[str, str]] = []
    overwrite = wf.output.overwrite if overwrite is None else overwrite
    inp = wf.input
    src = None
    sample_pending = False
    n_images = 0
    frame_shape = (1, 1)
    in_dtype, in_format, chunk_rows, nnz, exact = np.dtype(np.float32), "dense", 1, None, False
    try:
        exists = path_exists(inp.path, inp.storage_options)
    except PermissionError as exc:
        raise _access_refused("input", inp.path, exc) from None
    except Exception as exc:  # bad storage options, unknown protocol, ...
        problems.append(("input.path", f"cannot check {inp.path!r}: {exc}"))
        exists = None
    if exists is False and inp.sample is not None:
        from ..sample_data import SAMPLE_CHUNK_ROWS, sample_stack

        s = inp.sample
        sample_pending = True
        n_images, frame_shape, in_format = s.n_images, tuple(s.frame_shape), s.format
        csr = sample_stack(s.kind, s.n_images, s.frame_shape, max_rois=s.max_rois, radius=s.radius, nnz=s.nnz,
                           mean_cluster=s.mean_cluster, seed=s.seed)
        nnz, exact = int(csr.nnz), True
        if in_format == "csr":  # written with write_csr_stack's default chunks
            from ..storage.csr_store import DEFAULT_CHUNK_NNZ, csr_chunk_rows

            chunk_rows = csr_chunk_rows(n_images, nnz, max(1, min(DEFAULT_CHUNK_NNZ, nnz)),
                                        min(DEFAULT_CHUNK_NNZ, n_images + 1))
        else:
            chunk_rows = min(SAMPLE_CHUNK_ROWS, max(1, n_images))
    elif exists is False:
        problems.append(("input.path", f"{inp.path} does not exist"))
    elif exists:
        from ..storage import open_input

        try:
            src = open_input(inp.path, array=inp.array, storage_options=inp.storage_options or None, level=inp.level,
                             spatial_axes=inp.spatial_axes)
        except Exception as exc:  # the storage layer words its errors for users
            key = "input.array" if inp.array is not None and "array" in str(exc) else \
                "input.level" if inp.level is not None and "level" in str(exc) else \
                "input.spatial_axes" if inp.spatial_axes is not None and "spatial_axes" in str(exc) else "input.path"
            problems.append((key, f"cannot open {inp.path}: {exc}"))
        else:
            n_images, frame_shape = int(src.n_images), tuple(int(v) for v in src.frame_shape)
            in_dtype, in_format, chunk_rows = np.dtype(src.dtype), src.format, int(src.chunk_rows)
            try:
                from ..storage import describe_stack

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
            out_shape = geometry(frame_shape, wf.kernel.array.shape[-2:], wf.mode).out_shape
        except ValueError:
            problems.append(
                ("kernel", f"kernel of shape {fmt_shape(wf.kernel.array.shape[-2:])} is larger than the {fmt_shape(frame_shape)} "
                           "frames; mode: valid needs a kernel no larger than the frame (use mode: same or full)")
            )
    threads = local_threads(wf.cluster)
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
        target_exists = path_exists(wf.output.path, wf.output.storage_options)
    except PermissionError as exc:
        raise _access_refused("output", wf.output.path, exc) from None
    except Exception as exc:
        problems.append(("output.path", f"cannot check {wf.output.path!r}: {exc}"))
        target_exists = False
    if not target_exists and not problems_about(problems, "output.path"):
        try:  # a local target under a regular file or in a read-only folder, a missing bucket: refuse before starting
            from ..storage import check_target_writable, resolve_location

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
                block_memory=wf.block.memory, boundary=wf.boundary, fillvalue=wf.fillvalue, correlate=wf.correlate)


def _plan_job(wf, src, threads: int, problems: list[tuple[str, str]]):
    """:func:`~dask_sparseconv.pipeline.plan_job` for the opened input. A block
    budget too small for one image is a problem of block.memory; an input the
    job cannot use (indices out of range, no images) is refused as the run
    refuses it, in one line; a chunk that cannot be read is a problem of
    input.path (the run would fail on it too)."""
    from ..pipeline import plan_job

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
    from ..pipeline.plan import plan_matrix
    from ..pipeline.spec import check_settings

    settings = check_settings(wf.kernel.array, **{k: v for k, v in _job_settings(wf).items()})
    geo = settings.window(frame_shape)
    # the run tiles the stack once written, as it would any store: so does its plan
    return plan_matrix(n_images, frame_shape, csr, settings, geo, in_dtype, out_dtype, out_format, threads,
                       chunk_rows=chunk_rows, untiled=None, tiles=True)


def _input_change(job, src, target: str, prov: dict) -> str | None:
    """Why an incomplete output cannot be resumed from ``src`` as it is now
    (its input changed since the run that wrote it started), or None.
    ``job``: the JobPlan (its fingerprint is then reused by the run)."""
    from ..storage.fingerprint import InputChangedError, check_unchanged, fingerprint

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
        from ..storage import resolve_location
        from ..storage.job_lock import read_lock, stale_reason

        rec = read_lock(resolve_location(path, None, storage_options or None, name="target"))
    except Exception:
        return None
    return rec if rec is not None and stale_reason(rec) is None else None


def problems_about(problems: list[tuple[str, str]], key: str) -> bool:
    return any(k == key for k, _ in problems)


def _target_prov(path: str, storage_options: dict) -> dict | None:
    """The dask_sparseconv provenance of an existing output, or None."""
    try:
        from ..storage import progress, resolve_location

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
        from ..storage import resolve_location, written_blocks

        node = resolve_location(path, None, storage_options or None).open(mode="r")
        done = len({i for i in written_blocks(node) if i < int(prov.get("n_blocks", 0))})
    except Exception:
        pass
    return {"done": done, "n_blocks": prov.get("n_blocks"), "provenance": prov}


def _access_refused(section: str, path: str, exc: PermissionError) -> CLIError:
    """The store refused our credentials (S3: 403 Forbidden, SignatureDoesNotMatch): a runtime
    failure of the environment (exit 1), reported at once, before anything is written."""
    return CLIError(
        f"{section}.path: the store refused access to {path} ({exc}): check the credentials in "
        f"{section}.storage_options or the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile)",
        EXIT_RUNTIME,
    )


def inspect_or_exit(wf, **kw) -> Plan:
    from ..workflow import WorkflowError

    try:
        return inspect_workflow(wf, **kw)
    except WorkflowError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def ensure_input(plan: Plan, overwrite: bool | None) -> Plan:
    """Generate the sample stack the workflow asks for, then reopen the input."""
    if not plan.sample_pending:
        return plan
    from ..sample_data import ensure_sample

    wf = plan.wf
    s = wf.input.sample
    say(f"input {wf.input.path} does not exist: generating the sample stack "
         f"({fmt_int(s.n_images)} images of {fmt_shape(s.frame_shape)}, {s.format})")
    try:
        ensure_sample(wf.input.path, s)
    except Exception as exc:
        raise CLIError(f"could not write the sample stack to {wf.input.path}: {exc}") from exc
    return inspect_or_exit(wf, overwrite=overwrite)


def output_state(path: str, opts: dict) -> str:
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


def interrupted_message(exc: KeyboardInterrupt) -> str:
    what = interrupted_what(exc)
    out = RUNNING.get("output")
    if out is None:
        return interrupted_before_output(exc)
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
