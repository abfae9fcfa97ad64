"""What the command line prints: plans, progress, summaries and store descriptions."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .cluster import default_n_workers

if TYPE_CHECKING:
    from .inspect import Plan


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def say_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_shape(shape) -> str:
    return " x ".join(str(int(s)) for s in shape)


def fmt_bytes(n: float) -> str:
    from ..workflow import format_bytes

    return format_bytes(n)


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{int(m)} min {s:04.1f} s"
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m):02d} min"


def print_plan(plan: Plan, header: str) -> None:
    wf = plan.wf
    dens = plan.density
    if dens is None:
        dens_txt = "unknown"
    else:
        how = "exact" if plan.nnz_exact else "estimated from a sample of chunks"
        dens_txt = f"{dens * 100:.3g}% ({fmt_int(plan.nnz)} nonzeros, {how})"
    src_note = " (to be generated from input.sample)" if plan.sample_pending else ""
    say(header)
    say(f"  input:        {wf.input.path}{src_note}")
    say(f"                {plan.in_format}, {fmt_int(plan.n_images)} images of {fmt_shape(plan.frame_shape)}, {plan.in_dtype}")
    say(f"  density:      {dens_txt}")
    k = wf.kernel.array
    say(f"  kernel:       {wf.kernel.description}, {fmt_shape(k.shape[-2:])}")
    say(f"  operation:    {wf.operation.describe()}, mode {wf.mode}, method {wf.method}, backend {wf.backend}")
    if plan.blocks is not None:
        b = plan.blocks
        threads = f"{plan.threads} scheduler thread{'s' if plan.threads != 1 else ''}"
        if wf.cluster.address is not None:
            threads = "1 scheduler thread; a larger cluster may split finer"
        if b.tiles is not None:  # images larger than a block: blocks of tiles
            say(f"  tiles:        {b.tiles.describe()}: one image does not fit the block budget")
            say(f"  blocks:       {fmt_int(b.n_blocks)} of up to {fmt_int(b.block_rows)} tiles ({threads})")
        else:
            say(f"  row blocks:   {fmt_int(b.n_blocks)} of up to {fmt_int(b.block_rows)} images ({threads})")
        say(f"  memory/block: about {fmt_bytes(b.estimated_block_bytes)} (budget {fmt_bytes(wf.block.memory)})")
    say(f"  output:       {wf.output.path}" + target_note(plan))
    say(f"                {plan.out_format}, {fmt_int(plan.n_images)} images of {fmt_shape(plan.out_shape)}, {plan.out_dtype}")
    names = getattr(wf.kernel, "names", None)
    if names:
        layout = (f"one csr_matrix group per kernel: {', '.join(names)}" if plan.out_format == "csr"
                  else f"one array (n, {len(names)}, H_out, W_out), kernels {', '.join(names)}")
        say(f"                {layout}")
    say(f"  cluster:      {describe_cluster(wf.cluster)}")


def print_summary(summary, plan: Plan, elapsed: float) -> None:
    n = summary.n_images
    rate = n / elapsed if elapsed > 0 else float("inf")
    nnz_rate = summary.nnz_in / elapsed if elapsed > 0 else float("inf")
    say("done:")
    say(f"  images:     {fmt_int(n)} ({fmt_shape(summary.frame_shape)} -> {fmt_shape(summary.out_shape)}, mode {plan.wf.mode})")
    say(f"  nnz:        {fmt_int(summary.nnz_in)} in -> {fmt_int(summary.nnz_out)} out")
    unit = "tiles" if getattr(plan.blocks, "tiles", None) is not None else "images"
    say(f"  blocks:     {fmt_int(summary.blocks)} of up to {fmt_int(summary.block_rows)} {unit}")
    if getattr(summary, "resumed", False):
        say(f"  resumed:    {fmt_int(summary.blocks_computed)} blocks computed, {fmt_int(summary.blocks_skipped)} skipped "
             "(already written and verified)")
    say(f"  time:       {fmt_seconds(elapsed)}")
    say(f"  throughput: {rate:,.1f} images/s, {nnz_rate:,.0f} input nonzeros/s")
    say(f"  output:     {summary.target} ({summary.format}, {summary.dtype})")
    if getattr(summary, "kernels", None):
        per = getattr(summary, "nnz_per_kernel", None) or [None] * len(summary.kernels)
        say("  kernels:    " + ", ".join(f"{name}" + (f" ({fmt_int(n)} nonzeros)" if n is not None else "")
                                          for name, n in zip(summary.kernels, per)))
    engines = (summary.extra or {}).get("engines") or {}
    if engines:
        say("  engines:    " + ", ".join(f"{label} ({fmt_int(k)} block{'s' if k != 1 else ''})"
                                          for label, k in sorted(engines.items())))
    for reason in (summary.extra or {}).get("fallbacks") or ():
        say_err(f"warning: device fallback on a worker: {reason}")


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
        how = "exact" if d.get("nnz_exact") else f"estimated from {fmt_int(d.get('sampled_images', 0))} of {fmt_int(n)} images"
        nnz_line, dens_line = f"{fmt_int(d['nnz'])} ({how})", f"{float(d['density']) * 100:.4g}%"
    kernels = d.get("kernels")
    if kernels:
        fmt_text = (f"{d['format']}, a kernel bank: one {fmt_shape((H, W))} output per kernel"
                    + (" (one anndata csr_matrix group per kernel)" if d["format"] == "csr"
                       else f" (one array (n, {len(kernels)}, H_out, W_out))"))
    else:
        fmt_text = f"{d['format']}" + (" (anndata csr_matrix group)" if d["format"] == "csr" else "")
    lines = [
        f"store:      {d.get('location', store)}" + (f" (array {array})" if array else ""),
        f"format:     {fmt_text}",
        f"images:     {fmt_int(n)} of {fmt_shape((H, W))}",
        f"shape:      {tuple(d['shape'])}",
        f"dtype:      {d['dtype']}",
    ]
    if kernels:
        lines.append(f"kernels:    {len(kernels)}: {', '.join(kernels)}")
    ngff = d.get("ngff")
    if ngff:
        axes = ", ".join(f"{a.get('name')}" + (f" ({a['type']}" + (f", {a['unit']}" if a.get("unit") else "") + ")"
                                                if a.get("type") else "") for a in ngff["axes"])
        frames = " x ".join(str(a) for a in ngff["frame_axes"]) or "none"
        lines[1] = f"format:     OME-Zarr image (NGFF {ngff['version']}), read as a dense stack"
        lines.append(f"axes:       {axes}; images run over {frames}, frames are the last two")
        lines.append("levels:     " + ", ".join(f"{i}: {lv['path']} {tuple(lv['shape'])}"
                                              + (" (read)" if i == ngff["level"] else "")
                                              for i, lv in enumerate(ngff["levels"])))
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
        for k in ("source", "mode", "boundary", "fillvalue", "correlate", "method", "backend", "kernel_shape",
                  "kernel_sha", "dtype", "block_rows",
                  "n_blocks", "created", "completed"):
            if k in prov:
                lines.append(f"  {k + ':':<14}{prov[k]}")
        tiles = prov.get("tiles")
        if isinstance(tiles, dict):  # written in tiles: blocks count tiles
            lines.append(f"  {'tiles:':<14}{tiles.get('per_image')} per image, up to {tiles.get('band_rows')} x "
                         f"{tiles.get('band_cols')} output pixels each")
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


def target_note(plan: Plan) -> str:
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


def describe_cluster(cluster) -> str:
    route = getattr(cluster, "route", "any")
    text = describe_cluster_only(cluster)
    return text if route == "any" else f"{text}; blocks on {route.upper()} workers only"


def describe_cluster_only(cluster) -> str:
    if cluster.address is not None:
        tls = " (TLS)" if cluster.security is not None else ""
        return f"existing scheduler at {cluster.address}{tls}, connect timeout {cluster.timeout:g} s"
    n = cluster.n_workers or default_n_workers(cluster.threads_per_worker)
    sized = "" if cluster.n_workers else " (sized to this machine)"
    mem = cluster.memory_limit
    mem_txt = "auto" if mem == "auto" else "no limit" if mem is None else fmt_bytes(mem)
    return (f"local cluster: {n} worker process{'es' if n != 1 else ''} x {cluster.threads_per_worker} "
            f"thread{'s' if cluster.threads_per_worker != 1 else ''}{sized}, memory limit {mem_txt} per worker")
