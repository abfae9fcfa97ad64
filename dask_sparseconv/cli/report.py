"""What the command line prints: plans, progress, summaries and store descriptions."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .cluster import _default_n_workers

if TYPE_CHECKING:
    from .inspect import Plan


def _out(*parts: Any) -> None:
    print(*parts, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _int(n: int | float) -> str:
    return f"{int(n):,}"


def _shape(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _bytes(n: float) -> str:
    from ..workflow import format_bytes

    return format_bytes(n)


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{int(m)} min {s:04.1f} s"
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m):02d} min"


def _print_plan(plan: Plan, header: str) -> None:
    wf = plan.wf
    dens = plan.density
    if dens is None:
        dens_txt = "unknown"
    else:
        how = "exact" if plan.nnz_exact else "estimated from a sample of chunks"
        dens_txt = f"{dens * 100:.3g}% ({_int(plan.nnz)} nonzeros, {how})"
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


def _chunks_text(chunks: Any) -> str:
    if isinstance(chunks, dict):
        return ", ".join(f"{k} {tuple(v)}" for k, v in chunks.items())
    return str(tuple(chunks)) if chunks is not None else "?"


def _target_note(plan: Plan) -> str:
    if plan.locked_by is not None:
        from ..storage.job_lock import describe_holder

        return f" (being written by another run now: {describe_holder(plan.locked_by)}; a run would be refused)"
    if plan.complete is not None:
        return (f" (complete, written {plan.complete.get('completed', '?')}; it would be left as it is: "
                "pass --restart to recompute it)")
    if plan.resume is not None:
        r = plan.resume
        written = f"{r['done']} of {r['n_blocks']} blocks written" if r.get("done") is not None else "partly written"
        return f" (incomplete, {written}; will resume: written blocks are verified and kept)"
    return " (exists; will be replaced)" if plan.target_exists else ""


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
