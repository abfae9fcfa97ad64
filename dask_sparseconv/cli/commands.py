"""The commands: ``run``, ``validate``, ``info``, ``preview``, ``schema``, ``compile``, registered by name in :data:`COMMANDS`."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import Any, Iterator

from .cluster import confirm_local_workers, dashboard_text, local_worker_env, open_client
from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, PROG, RUNNING, CLIError
from .inspect import Plan, ensure_input, inspect_or_exit, load_or_exit, output_state, path_exists
from .progress import run_graph
from .report import (
    describe_cluster,
    describe_lines,
    fmt_int,
    fmt_shape,
    print_plan,
    print_summary,
    say,
    say_err,
    target_note,
)


def cmd_validate(args) -> int:
    wf = load_or_exit(args.workflow)
    plan = inspect_or_exit(wf)
    say(f"OK: {args.workflow}")
    src = f"{wf.input.path}" + (" (will be generated from input.sample)" if plan.sample_pending else "")
    say(f"  input:   {src}: {plan.in_format}, {fmt_int(plan.n_images)} images of {fmt_shape(plan.frame_shape)}, {plan.in_dtype}")
    say(f"  kernel:  {wf.kernel.description}, {fmt_shape(wf.kernel.array.shape[-2:])}; mode {wf.mode}, "
        f"{wf.operation.describe()}")
    say(f"  output:  {wf.output.path}: {plan.out_format}, {fmt_shape(plan.out_shape)}, {plan.out_dtype}"
         + target_note(plan))
    say(f"  cluster: {describe_cluster(wf.cluster)}")
    return EXIT_OK


def cmd_run(args) -> int:
    if not args.dry_run:
        # the local workers' server, launched by main before this module was
        # imported (launch_local_workers), is checked against dask's config
        confirm_local_workers(args.workflow, args.verbose)
    wf = load_or_exit(args.workflow)
    overwrite = True if args.restart else None
    plan = inspect_or_exit(wf, overwrite=overwrite, allow_complete=bool(args.dry_run))
    if args.dry_run:
        print_plan(plan, f"dry run of {args.workflow} (nothing is computed or written):")
        return EXIT_OK
    # the lock first: a second run of this job is refused before it starts a cluster
    with _job_lock(wf) as lock:
        return _run_locked(args, wf, overwrite, plan, lock)


@contextlib.contextmanager
def _job_lock(wf) -> Iterator[Any]:
    """Hold the output's lock (renewed in the background) while the run goes on."""
    from ..storage import resolve_location
    from ..storage.job_lock import JobLock, LockStaleWarning, TargetLockedError

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
            say_err(f"warning: {w.message}")
    with lock:
        yield lock


def _run_locked(args, wf, overwrite, plan: Plan, lock) -> int:
    plan = ensure_input(plan, overwrite)
    from ..pipeline import convolve_zarr

    print_plan(plan, f"running {args.workflow}:")
    if wf.cluster.address is None:  # workers spawned rather than forked inherit these from here
        os.environ.update(local_worker_env(wf.cluster, args.verbose))
    RUNNING["output"] = (wf.output.path, wf.output.storage_options)  # for the message if interrupted
    with open_client(wf.cluster, wf.source) as client:
        say(f"dashboard: {dashboard_text(client)}")
        if not client.nthreads():
            say(f"waiting up to {wf.cluster.timeout:g} s for a worker to join the scheduler")
            try:
                client.wait_for_workers(1, timeout=wf.cluster.timeout)
            except (TimeoutError, OSError):
                raise CLIError(f"the scheduler at {wf.cluster.address} has no workers; start some with "
                               f"`dask worker {wf.cluster.address}`") from None
        info = client.nthreads()
        say(f"cluster: {len(info)} worker{'s' if len(info) != 1 else ''}, {sum(info.values())} threads")
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
                boundary=wf.boundary,
                fillvalue=wf.fillvalue,
                correlate=wf.correlate,
                kernel_names=wf.kernel.names,
                overwrite=bool(wf.output.overwrite or args.restart),
                compute=False,
                array=wf.input.array,
                level=wf.input.level,
                spatial_axes=wf.input.spatial_axes,
                pyramid=wf.output.pyramid,
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
            summary = run_graph(client, graph, plan.blocks.n_blocks if plan.blocks else 0)
        except Exception:
            say_err(f"note: {output_state(wf.output.path, wf.output.storage_options)}")
            raise
        elapsed = time.perf_counter() - t0
    print_summary(summary, plan, elapsed)
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
    from ..storage import describe_stack

    opts = _parse_storage_options(args.storage_option)
    store = args.store
    try:
        exists = path_exists(store, opts)
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
        say(line)
    return EXIT_OK


def _done_blocks(store: str, array: str | None, opts: dict, d: dict) -> int | None:
    """Blocks already written to an incomplete output of this package."""
    if d.get("complete") is not False:
        return None
    try:
        from ..storage import resolve_location, written_blocks

        node = resolve_location(store, array, opts or None).open(mode="r")
        return len(written_blocks(node))
    except Exception:
        return None


#: The largest frame ``preview`` draws (pixels): it holds input and output frames dense in memory.
PREVIEW_MAX_PIXELS = 64 * 1024**2


def cmd_preview(args) -> int:
    from ..preview import render_preview

    wf = load_or_exit(args.workflow)
    try:
        images = [int(p) for p in args.images.split(",") if p.strip() != ""]
    except ValueError:
        raise CLIError(f"--images must be comma-separated image indices such as 0,1,2; got {args.images!r}", EXIT_USAGE) from None
    if not images:
        raise CLIError("--images needs at least one image index", EXIT_USAGE)
    plan = inspect_or_exit(wf, overwrite=True)  # preview never writes the output
    plan = ensure_input(plan, True)
    bad = [i for i in images if not -plan.n_images <= i < plan.n_images]
    if bad:
        raise CLIError(f"--images: {', '.join(map(str, bad))} out of range for a stack of {plan.n_images} images "
                       f"(valid: 0..{plan.n_images - 1})", EXIT_USAGE)
    images = [i % plan.n_images for i in images]
    H, W = (int(v) for v in plan.frame_shape)
    if H * W > PREVIEW_MAX_PIXELS:  # preview draws whole frames, in memory: a 100,000^2 raster would be 40 GB
        raise CLIError(f"preview draws whole frames; frames of {H} x {W} pixels are too large for a preview "
                       f"(limit: {PREVIEW_MAX_PIXELS:,} pixels per frame). Run the workflow (frames larger than a "
                       "block are convolved in tiles) and look at a window of the output", EXIT_USAGE)
    from ..runtime.collector import resume as resume_collector

    resume_collector()  # the start-up is over: the preview computes
    img = render_preview(plan.src, wf, images, scale=args.scale, labels=not args.no_labels)
    out = args.output
    try:
        img.save(out, format="PNG")
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write {out}: {exc}") from None
    say(f"wrote {out}: {img.width} x {img.height} px, {len(images)} image{'s' if len(images) != 1 else ''} "
         f"({', '.join(map(str, images))}), input left, {wf.mode} convolution right")
    return EXIT_OK


#: The commands, by name: ``main`` runs ``COMMANDS[args.command](args)``.
def cmd_schema(args) -> int:
    """Print the JSON schema of a workflow file (or write it to ``--output``)."""
    import json

    from ..workflow import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise CLIError(f"cannot write {args.output}: {exc}", EXIT_USAGE) from None
        say(f"wrote the workflow schema to {args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_compile(args) -> int:
    """Compile the engines into numba's on-disk cache (:mod:`dask_sparseconv.runtime.precompile`)."""
    from ..runtime.precompile import TASKS, cache_location, precompile, write_bytecode

    names = args.only or list(TASKS)
    for name in names:
        if name not in TASKS:
            raise CLIError(f"--only: unknown group {name!r}; choose from {', '.join(map(repr, TASKS))}", EXIT_USAGE)
    from ..runtime.collector import resume as resume_collector

    resume_collector()  # compiling every engine is long work, with garbage of its own
    written, problem = write_bytecode()
    if problem is not None:  # a read-only installation: the engines still compile
        say_err(f"note: the package's Python bytecode was not written: {problem}")
    elif written:
        say(f"wrote the Python bytecode of {written} module(s) of the package")
    say(f"compiling {len(names)} group(s) of numba functions into {cache_location()}")
    t0 = time.perf_counter()
    failed = []

    def report(res) -> None:
        if res.error is None:
            say(f"  {res.name}: {res.seconds:.1f} s")
        else:
            failed.append(res)
            say_err(f"  {res.name}: FAILED after {res.seconds:.1f} s: {res.error}")

    precompile(names, jobs=args.jobs, on_result=report)
    if failed:
        raise CLIError(f"compile: {len(failed)} of {len(names)} group(s) failed, first {failed[0].name!r}: "
                       f"{failed[0].error}", EXIT_RUNTIME)
    say(f"done in {time.perf_counter() - t0:.1f} s; jobs now load these from the cache")
    return EXIT_OK


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "validate": cmd_validate, "info": cmd_info, "preview": cmd_preview,
            "schema": cmd_schema}
