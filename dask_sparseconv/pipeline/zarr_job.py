"""Store to store: :func:`convolve_zarr` checks its arguments, plans the
job (:mod:`~dask_sparseconv.pipeline.plan`), takes the target's lock,
creates or reopens the output and builds the graph
(:mod:`~dask_sparseconv.pipeline.graph`); by default it also computes it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..kernels import kernel_digest
from ..runtime.cluster import host_threads, route_annotations, scheduler_threads, scheduler_workers
from .bank import check_kernel_names, kernel_records
from .graph import bank_graph, store_graph
from .plan import JobPlan, _plan
from .resume import check_target, resume_blocks
from .spec import BlockSpec, check_bool, check_settings
from .summary import ConvolveSummary, JobInfo, finish_consolidated


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
    plan: JobPlan | None = None,
    boundary: str = "fill",
    fillvalue: float = 0.0,
    correlate: bool = False,
    kernel_names: Any = None,
    level: int | None = None,
    pyramid: int = 0,
    spatial_axes: Any = None,
) -> ConvolveSummary | Any:
    """Convolve a zarr stack into a new zarr stack, out of core.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array or zarr.Group
        Input stack: a dense ``(n, H, W)`` array or an anndata ``csr_matrix``
        group ``(n, H*W)``, local or any fsspec URL (``s3://``, ``memory://``).
    kernel : array_like
        2-D, finite kernel; or a kernel bank ``(K, kH, kW)`` (K kernels of
        one shape, or a list of them), applied in one pass over the input:
        each block is read once and convolved with every kernel. Dense
        output: one ``(n, K, H_out, W_out)`` array; CSR output: one anndata
        ``csr_matrix`` group per kernel under the target group, named by
        ``kernel_names`` (:mod:`dask_sparseconv.pipeline.bank`).
    kernel_names : list of str, optional
        Names of a bank's kernels (default ``'0'``, ``'1'``, ...): the CSR
        member groups and the per-kernel provenance.
    target : str, os.PathLike or zarr store
        Where to write the output (local path, fsspec URL or zarr store). It
        must not overlap the source.
    mode : {'same', 'full', 'valid'}
    boundary, fillvalue, correlate
        The operation, as for :class:`~dask_sparseconv.Convolver`:
        ``scipy.signal.convolve2d``'s boundaries (and the ``scipy.ndimage``
        names), or ``correlate2d`` with ``correlate=True``. Recorded in the
        output's provenance; a resume compares them.
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
    level : int, optional
        When ``source`` is an OME-Zarr image (NGFF 0.4/0.5 ``multiscales``
        group): the pyramid level to convolve (default 0, full resolution),
        read in place. Its last two (spatial) axes are the frame; every other
        axis (``t``, ``c``, ``z``, ...) counts images in C order, so the
        output is ``(prod(other axes), H_out, W_out)`` with the image's axes
        recorded in its provenance (``frame_axes``). See docs/storage.md.
    spatial_axes : pair of str, optional
        For an OME-Zarr source: the two axes that form the frame, rows first
        (default: its last two), e.g. ``("z", "x")``.
    pyramid : int, default 0
        With ``output_format='ome-zarr'``: downsampled levels to write below
        the full-resolution one (level ``j``: the ``2^j x 2^j`` mean), by the
        same block tasks.
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
    plan : JobPlan, optional
        What :func:`~dask_sparseconv.pipeline.plan_job` returned for this
        source and these settings: it is run as it is (re-cut only if the
        scheduler has another number of threads than it was planned for)
        instead of opening and sampling the input again. A plan made for
        another source or other settings is refused (``ValueError``).

    Returns
    -------
    ConvolveSummary or dask.delayed.Delayed

    Raises
    ------
    ValueError, TypeError, FileNotFoundError, FileExistsError
        For bad arguments, all checked before anything is written.
    """
    # 1. everything that can be checked without touching storage
    settings = check_settings(kernel, mode, method, backend, dtype, output_format, block_memory, boundary, fillvalue,
                              correlate)
    names = check_kernel_names(kernel_names, settings.kernel)
    overwrite = check_bool(overwrite, "overwrite")
    compute = check_bool(compute, "compute")
    resume = check_bool(resume, "resume")
    annotations = route_annotations(route)
    if target is None:
        raise TypeError("target must be a local path, an fsspec URL or a zarr store; got None")
    if isinstance(pyramid, bool) or not isinstance(pyramid, (int, np.integer)) or not 0 <= pyramid <= 16:
        raise ValueError(f"pyramid must be an integer from 0 to 16 (downsampled levels); got {pyramid!r}")
    if pyramid and settings.container != "ome-zarr":
        raise ValueError(f"pyramid={pyramid} applies to output_format='ome-zarr' only; got output_format={output_format!r}")
    if plan is not None and not isinstance(plan, JobPlan):
        raise TypeError(f"plan must be a JobPlan from plan_job() or None; got {type(plan).__name__}")
    src_loc, tgt_loc = _resolve_locations(source, target, array, storage_options, target_storage_options)
    check_target(tgt_loc, overwrite, resume)  # refuse a finished or foreign target before reading anything

    # 2. open the source (read-only), check what depends on it, cut it into blocks
    workers = scheduler_workers()
    threads = scheduler_threads(workers)
    if plan is None:
        plan = _plan(source, settings, array=array, storage_options=storage_options, threads=threads, level=level,
                     spatial_axes=spatial_axes)
    else:
        why = plan.mismatch(src_loc.key(), settings)
        if why:
            raise ValueError(f"plan= was made for another job (differs in: {why}); call plan_job() with this "
                             "call's source and settings, or leave plan out")
        plan = plan.with_threads(threads)

    # 3. take the target's lock (the first write), then decide again what the
    #    target is: a run that held the lock may have finished it meanwhile
    from ..storage import check_target_writable

    check_target_writable(tgt_loc, target)  # before the lock: a path under a file, a read-only folder
    held, took_lock = _take_lock(lock, tgt_loc)
    try:
        resume_prov = check_target(tgt_loc, overwrite, resume)
        graph = _build_job(plan, src_loc, tgt_loc, target, resume_prov, overwrite=overwrite, compressor=compressor,
                           route=route, annotations=annotations, workers=workers,
                           target_storage_options=target_storage_options, release=held if took_lock else None,
                           fence=None if held is None else held.token, names=names, pyramid=int(pyramid))
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


def _build_job(plan: JobPlan, src_loc, tgt_loc, target, resume_prov: dict | None, *, overwrite: bool, compressor,
               route: str, annotations: dict, workers: dict[str, int] | None, target_storage_options: dict | None,
               release, fence: str | None = None, names: list[str] | None = None, pyramid: int = 0):
    """Fingerprint the input (refusing a resume whose input changed), create
    or reopen the target, and build the graph. ``fence``: the token of the
    target's lock held for this run; every write of the graph checks it."""
    from ..storage import create_output
    from ..storage.fingerprint import check_unchanged

    src, settings, kernel, blocks = plan.input, plan.settings, plan.kernel, plan.blocks
    fmt = plan.out_format
    fp = plan.fingerprint(plan.threads)
    if resume_prov is not None:
        check_unchanged(resume_prov.get("source_fingerprint"), fp, str(src.location), str(tgt_loc))
    attrs = {
        "source": str(src.location),
        "source_format": src.format,
        "source_frame_shape": list(plan.frame_shape),
        "mode": settings.mode,
        "method": settings.method,
        "backend": settings.backend,
        "kernel_shape": list(kernel.shape),
        "kernel_sha": kernel_digest(kernel),
        **settings.operation.as_attrs(),
    }
    ngff = getattr(src, "ngff", None)
    if ngff is not None:  # an OME-Zarr image: which axes the images were (reshape the output by them)
        lead = [int(v) for v in src.array.shape[:-2]]
        attrs["source_ngff"] = {"version": ngff["version"], "level": ngff["level"],
                                "frame_axes": ngff["frame_axes"], "frame_axes_shape": lead,
                                "spatial_axes": ngff["spatial_axes"], "axes": ngff["read_axes"],
                                "scale": ngff["scale"], "translation": ngff["translation"]}
    if pyramid:
        attrs["ome_pyramid"] = pyramid  # a setting: a resume with another pyramid is another job
    bank = settings.bank
    if bank:
        attrs["kernels"] = kernel_records(kernel, names or [str(k) for k in range(bank)])
    elif kernel.size <= 256:
        attrs["kernel"] = kernel.tolist()
    if resume_prov is not None:
        blocks = resume_blocks(blocks, resume_prov)
    else:
        # recorded, not compared as a setting: a resume compares it with check_unchanged
        attrs["source_fingerprint"] = fp.as_dict()
    if blocks.tiles is not None:  # part of the layout: the output's chunks and records follow the tiles
        if fmt == "csr" and not blocks.tiles.contiguous:
            raise ValueError(f"a CSR output is written tile by tile in order, so its tiles must be whole-width bands "
                             f"or single rows; got tiles of {blocks.tiles.band_rows} x {blocks.tiles.band_cols}")
        attrs["tiles"] = blocks.tiles.as_attrs()
    info = JobInfo(str(tgt_loc), settings.container or fmt, src.n_images, plan.frame_shape, plan.out_shape, plan.out_dtype.name,
                   blocks.block_rows, resumed=resume_prov is not None,
                   lock=None if release is None else (tgt_loc, release.token),
                   kernels=tuple(names) if names else None)
    spec = BlockSpec(plan.frame_shape, plan.out_shape, settings.mode, settings.method, settings.backend,
                     plan.out_dtype.str, fmt, route=route, host_threads=host_threads(workers),
                     operation=settings.operation, bank=bank, expansion=plan.expansion, tiles=blocks.tiles)
    if bank and fmt == "csr":
        return _build_csr_bank(plan, blocks, spec, info, attrs, target, tgt_loc, resume_prov, names or [],
                               overwrite=overwrite, compressor=compressor, annotations=annotations,
                               target_storage_options=target_storage_options, fence=fence)
    out = create_output(
        target,
        settings.container or fmt,  # 'ome-zarr': a dense output inside an NGFF image group
        src.n_images,
        (bank,) + tuple(plan.out_shape) if bank else plan.out_shape,  # a dense bank: (n, K, H_out, W_out)
        plan.out_dtype,
        blocks.bounds,
        storage_options=target_storage_options,
        overwrite=overwrite,
        attrs=attrs,
        # dense: one chunk per block; CSR: indptr in storage's default chunks (one
        # chunk up to 262144 images) rather than one tiny chunk per block
        chunk_rows=blocks.block_rows if fmt == "dense" else None,
        compressor=compressor,
        resume=resume_prov is not None,  # reopens only the same job's output, else ValueError
    )
    if fence is not None:
        out.fence = (tgt_loc, fence)
    if resume_prov is not None and resume_prov.get("consolidated"):
        from dask import delayed

        return delayed(finish_consolidated, pure=False)(out, info, int(resume_prov.get("nnz", 0)))
    done = out.done_blocks() if resume_prov is not None else set()
    return store_graph(src, out, kernel, blocks, spec, info, annotations=annotations, done=done, threads=plan.threads)


def _build_csr_bank(plan: JobPlan, blocks, spec: BlockSpec, info: JobInfo, attrs: dict, target, tgt_loc,
                    resume_prov: dict | None, names: list[str], *, overwrite: bool, compressor, annotations: dict,
                    target_storage_options: dict | None, fence: str | None = None):
    """A CSR bank's parent group and K member outputs (created, or reopened
    to resume), and its graph: one compute per block feeding K write-once
    chains (:func:`~dask_sparseconv.pipeline.bank.bank_chain_graph`)."""
    import dataclasses

    from ..storage import create_output
    from ..storage.bank_group import BankGroup
    from ..storage.dense_store import layout_attrs

    src, kernel = plan.input, plan.kernel
    layout = layout_attrs("csr", src.n_images, plan.out_shape, plan.out_dtype, blocks.bounds)
    if resume_prov is None:
        parent = BankGroup.create(tgt_loc, names, attrs, layout, overwrite=overwrite)
    else:
        want = {**{k: v for k, v in attrs.items() if k != "source_fingerprint"}, **layout}
        from ..storage.progress import jsonable

        diff = sorted(k for k, v in jsonable(want).items() if resume_prov.get(k) != v)
        if diff:
            raise ValueError(f"cannot resume {tgt_loc}: it was written with different settings ({', '.join(diff)}); "
                             "pass overwrite=True to start over")
        parent = BankGroup.reopen(tgt_loc, names)
    members = []
    for name, rec in zip(names, attrs["kernels"]):
        member_attrs = {k: v for k, v in attrs.items() if k not in ("kernels", "kernel_shape", "kernel_sha")}
        member_attrs.update(kernel_shape=rec["kernel_shape"], kernel_sha=rec["kernel_sha"], bank_member=name)
        if "kernel" in rec:
            member_attrs["kernel"] = rec["kernel"]
        members.append(create_output(target, "csr", src.n_images, plan.out_shape, plan.out_dtype, blocks.bounds,
                                     storage_options=target_storage_options, overwrite=False, attrs=member_attrs,
                                     compressor=compressor, array=name, resume=resume_prov is not None))
    if fence is not None:
        for m in members:
            m.fence = (tgt_loc, fence)
    done = set.intersection(*(m.done_blocks() for m in members)) if resume_prov is not None else set()
    member_spec = dataclasses.replace(spec, bank=0)
    return bank_graph(src, parent, members, kernel, names, blocks, spec, member_spec, info, annotations=annotations,
                      done=done, threads=plan.threads)


def _resolve_locations(source, target, array, storage_options, target_storage_options):
    """The source and target locations; refuse a target that overlaps the source."""
    from ..storage.location import resolve_location, stores_overlap

    src_loc = resolve_location(source, array, storage_options, name="source")
    tgt_loc = resolve_location(target, None, target_storage_options, name="target")
    if stores_overlap(tgt_loc, src_loc):
        raise ValueError(
            f"target {tgt_loc} overlaps the source {src_loc} (one is the other or lies inside it); "
            "writing there would modify the input: choose a separate target"
        )
    return src_loc, tgt_loc


def _take_lock(lock, tgt_loc):
    """``(the JobLock to hold, whether this call took it)`` for ``lock=``."""
    from ..storage.job_lock import JobLock

    if lock is False or lock is None:
        return None, False
    if isinstance(lock, JobLock):
        if lock.target.key() != tgt_loc.key():
            raise ValueError(f"lock= holds the lock of {lock.target}, not of the target {tgt_loc}")
        return lock, False
    if lock is not True:
        raise TypeError(f"lock must be True, False or a JobLock held for the target; got {lock!r}")
    return JobLock.acquire(tgt_loc, what="convolve_zarr"), True
