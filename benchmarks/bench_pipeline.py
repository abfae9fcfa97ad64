"""Pipeline benchmark (issue #3): convolve_zarr against its I/O floor and dask-image.

One LocalCluster (2 workers x 1 thread, processes), one run, three numbers per
workload, each the median of ``--repeats`` timed runs:

* **ours**: ``dask_sparseconv.convolve_zarr(source, kernel, target)`` with
  default settings (output format = input format);
* **floor**: a plain dask copy of OUR output store into a new store with the
  same chunks and codecs (``da.from_zarr`` -> ``da.store`` into a zarr array
  created like ours; ``to_zarr`` would merge a 1-D array's chunks when the
  last one is partial), i.e. the cost of
  reading and writing the output bytes with no convolution at all;
* **dask-image**: ``dask_image.ndfilters.convolve(da.from_zarr(dense_stack),
  kernel[None], mode='constant', cval=0)`` written with ``to_zarr``, on the
  dense stack (the same store our dense->dense run reads). Kernels are odd,
  so ndimage's origin equals convolve2d's ``'same'`` window.

Workloads:

1. ROI footprints: 2000 frames 512x512 float32, each with 0-3 soft disks of
   radius 8 (~0.1 % nonzero), 7x7 Gaussian (sigma 1.5): CSR store -> CSR
   store, and dense -> dense;
2. uniform: 2000 frames 256x256 float32, density 0.01, 5x5 kernel, dense -> dense.

Targets (issue #3): ROI CSR->CSR >= 20x faster than dask-image and within 2x
of its floor; ROI dense->dense >= 3x faster than dask-image and within 1.3x of
its floor; uniform dense->dense >= 1.2x faster than dask-image and within 1.3x
of its floor.

The table's ``ours/floor`` is the ratio of the medians; ``paired`` is the
median of the per-repeat ratios (ours and its floor run back to back, so it
moves less with load from other users of a shared machine). Warm-up runs
(tiny stacks, not timed) cover all three contenders, the floor's copy
included.

The time split of our runs (read / convolve / write / finalize) comes from the
per-block stage timers that ``convolve_zarr`` returns in its summary (summed
over blocks, so they show shares of task time, not wall time).

Usage::

    python benchmarks/bench_pipeline.py            # full sizes (several minutes)
    python benchmarks/bench_pipeline.py --quick    # small sizes, for development
    python benchmarks/bench_pipeline.py --json results.json --repeats 5
    python benchmarks/bench_pipeline.py --scale    # CSR at 10k/40k/200k frames (issue #16; csr_scale.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def roi_csr(n: int, H: int, W: int, radius: int = 8, max_disks: int = 3, seed: int = 0) -> scipy.sparse.csr_matrix:
    """``n`` frames with 0..max_disks soft disks (value 1 - (d/r)^2 inside radius r), as CSR (n, H*W)."""
    rng = np.random.default_rng(seed)
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    d2 = (dy**2 + dx**2) / radius**2
    inside = d2 < 1
    sdy, sdx, sval = dy[inside], dx[inside], (1 - d2[inside]).astype(np.float32)
    counts = rng.integers(0, max_disks + 1, n)
    frame = np.repeat(np.arange(n), counts)
    cy = rng.integers(radius, H - radius, frame.size)
    cx = rng.integers(radius, W - radius, frame.size)
    rows = np.repeat(frame, sdy.size)
    cols = ((cy[:, None] + sdy[None]) * W + (cx[:, None] + sdx[None])).ravel()
    vals = np.tile(sval, frame.size) * np.repeat(rng.uniform(0.5, 1.5, frame.size).astype(np.float32), sdy.size)
    m = scipy.sparse.coo_matrix((vals, (rows, cols)), shape=(n, H * W)).tocsr()
    m.sum_duplicates()
    return m


def _densify(csr_block, H, W):
    return np.asarray(csr_block.toarray(), dtype=np.float32).reshape(-1, H, W)


def _uniform_block(seed, rows, H, W, density):
    rng = np.random.default_rng(seed)
    x = np.zeros((rows, H, W), np.float32)
    k = int(round(rows * H * W * density))
    flat = rng.choice(rows * H * W, size=k, replace=False)
    x.reshape(-1)[flat] = rng.random(k, dtype=np.float32) + 0.1
    return x


def write_dense_with_to_zarr(path, blocks, H, W, chunk):
    """Write a dense stack with dask's ``to_zarr`` from delayed (rows, H, W) blocks."""
    import dask.array as da

    parts = [da.from_delayed(d, shape=(rows, H, W), dtype=np.float32) for d, rows in blocks]
    arr = da.concatenate(parts, axis=0).rechunk((chunk, H, W))
    arr.to_zarr(path, overwrite=True)
    return path


# ---------------------------------------------------------------------------
# the three contenders
# ---------------------------------------------------------------------------
def _rm(path):
    shutil.rmtree(path, ignore_errors=True)


def run_ours(src, kernel, target):
    from dask_sparseconv import convolve_zarr

    _rm(target)
    t0 = time.perf_counter()
    summary = convolve_zarr(src, kernel, target)
    return time.perf_counter() - t0, summary


def _copy_array_like(src_arr, dst_path):
    """A new zarr array at dst_path with src_arr's shape, chunks, dtype and codecs."""
    import zarr

    kw = dict(shape=src_arr.shape, chunks=src_arr.chunks, dtype=src_arr.dtype, fill_value=src_arr.fill_value,
              compressors=src_arr.compressors, filters=src_arr.filters, overwrite=True)
    if src_arr.metadata.zarr_format == 3:
        kw["serializer"] = src_arr.serializer
    return zarr.create_array(dst_path, zarr_format=src_arr.metadata.zarr_format, **kw)


def run_floor(our_output, target):
    """Plain dask copy of our output store: from_zarr -> store, same chunks/codecs."""
    import dask.array as da
    import zarr

    _rm(target)
    node = zarr.open(our_output, mode="r")
    t0 = time.perf_counter()
    if isinstance(node, zarr.Array):
        pairs = [(node, target)]
    else:  # CSR group: copy its three arrays
        zarr.open_group(target, mode="w").attrs.update(dict(node.attrs))
        pairs = [(node[name], os.path.join(target, name)) for name in ("data", "indices", "indptr")]
    # da.store rather than to_zarr: to_zarr rechunks a 1-D array whose last
    # chunk is partial into one chunk (dask 2026.8), which is not a plain copy
    sources = [da.from_zarr(a, chunks=a.chunks) for a, _ in pairs]
    targets = [_copy_array_like(a, p) for a, p in pairs]
    da.store(sources, targets, lock=False)
    return time.perf_counter() - t0


def run_dask_image(dense_src, kernel, target):
    import dask.array as da
    from dask_image import ndfilters

    _rm(target)
    t0 = time.perf_counter()
    x = da.from_zarr(dense_src)  # the store's own chunks
    y = ndfilters.convolve(x, np.asarray(kernel, dtype=np.float32)[None], mode="constant", cval=0.0)
    y.to_zarr(target, overwrite=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
@dataclass
class Row:
    workload: str
    ours: list = field(default_factory=list)
    floor: list = field(default_factory=list)
    dask_image: list = field(default_factory=list)
    split: dict = field(default_factory=dict)
    blocks: int = 0
    block_rows: int = 0
    target_speedup: float = 0.0
    target_floor: float = 0.0

    def med(self, name):
        v = getattr(self, name)
        return statistics.median(v) if v else float("nan")


def check_against_dask_image(ours_path, dimg_path, frames):
    """Not timed: our output equals dask-image's on a few frames."""
    import zarr

    from dask_sparseconv import open_stack

    ref = zarr.open_array(dimg_path, mode="r")
    ours = open_stack(ours_path)
    for i in frames:
        a = ours[i : i + 1].compute()
        a = a.toarray().reshape(ref.shape[1:]) if scipy.sparse.issparse(a) else np.asarray(a)[0]
        np.testing.assert_allclose(a, ref[i], rtol=1e-4, atol=1e-5)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # the CSR-at-scale table has its own sizes and options
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import csr_scale

        return csr_scale.main([a for a in argv if a != "--scale"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (200 frames) for development")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 3, quick 2)")
    ap.add_argument("--frames", type=int, default=None, help="frames per workload (default 2000, quick 200)")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temporary directory, removed)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--only", choices=["roi", "uniform"], default=None, help="run one workload family")
    ap.add_argument("--scale", action="store_true", help="the CSR-at-scale table instead (see csr_scale.py)")
    args = ap.parse_args(argv)

    import dask
    from distributed import Client, LocalCluster

    n = args.frames or (200 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-")
    os.makedirs(workdir, exist_ok=True)
    p = lambda name: os.path.join(workdir, name)  # noqa: E731

    print(f"bench_pipeline: {n} frames per workload, {repeats} repeats, workdir {workdir}", flush=True)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = Client(cluster)
    rows: list[Row] = []
    try:
        from dask_sparseconv.storage import write_csr_stack, write_dense_stack

        # -- warm-up (JIT compile, imports) on every worker, not timed --------
        warm = np.zeros((8, 32, 32), np.float32)
        warm[:, 10, 10] = 1
        write_dense_stack(p("warm.zarr"), warm, overwrite=True)
        write_csr_stack(p("warm_csr.zarr"), scipy.sparse.csr_matrix(warm.reshape(8, -1)), (32, 32), overwrite=True)
        for k in (gaussian_kernel(7, 1.5), gaussian_kernel(5, 1.0)):
            run_ours(p("warm.zarr"), k, p("warm_out.zarr"))
            run_floor(p("warm_out.zarr"), p("warm_floor.zarr"))  # CSR copy path
            run_ours(p("warm_csr.zarr"), k, p("warm_out.zarr"))
            run_floor(p("warm_out.zarr"), p("warm_floor.zarr"))  # dense copy path
            run_dask_image(p("warm.zarr"), k, p("warm_out.zarr"))
        # (the floor is warmed up too: its first da.store in a session used to
        # cost 0.5-1.3 s of one-off setup, which landed in the first timed run)

        workloads = []
        if args.only in (None, "roi"):
            H = W = 512
            t0 = time.perf_counter()
            csr = roi_csr(n, H, W, seed=1)
            write_csr_stack(p("roi_csr.zarr"), csr, (H, W), overwrite=True)
            step = 16
            blocks = [(dask.delayed(_densify)(csr[a : a + step], H, W), min(step, n - a)) for a in range(0, n, step)]
            write_dense_with_to_zarr(p("roi_dense.zarr"), blocks, H, W, chunk=16)
            print(f"ROI data: {csr.nnz / (n * H * W) * 100:.3f}% nonzero, written in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            k7 = gaussian_kernel(7, 1.5)
            workloads.append(("ROI CSR->CSR 512x512", p("roi_csr.zarr"), p("roi_dense.zarr"), k7, 20.0, 2.0))
            workloads.append(("ROI dense->dense 512x512", p("roi_dense.zarr"), p("roi_dense.zarr"), k7, 3.0, 1.3))
        if args.only in (None, "uniform"):
            H = W = 256
            t0 = time.perf_counter()
            step = 64
            blocks = [(dask.delayed(_uniform_block)(1000 + a, min(step, n - a), H, W, 0.01), min(step, n - a))
                      for a in range(0, n, step)]
            write_dense_with_to_zarr(p("uni_dense.zarr"), blocks, H, W, chunk=64)
            print(f"uniform data written in {time.perf_counter() - t0:.1f} s", flush=True)
            k5 = gaussian_kernel(5, 1.0)
            workloads.append(("uniform 1% dense->dense 256x256", p("uni_dense.zarr"), p("uni_dense.zarr"), k5, 1.2, 1.3))

        dimg_times: dict[str, list] = {}
        for name, src, dense_src, kernel, target_speedup, target_floor in workloads:
            row = Row(name, target_speedup=target_speedup, target_floor=target_floor)
            out, floor_out, dimg_out = p("ours_out.zarr"), p("floor_out.zarr"), p("dimg_out.zarr")
            splits = []
            for r in range(repeats):
                t, summary = run_ours(src, kernel, out)
                row.ours.append(t)
                splits.append(summary)
                row.floor.append(run_floor(out, floor_out))
                key = (dense_src, kernel.shape)
                if key not in dimg_times or len(dimg_times[key]) <= r:
                    dimg_times.setdefault(key, []).append(run_dask_image(dense_src, kernel, dimg_out))
                    if r == 0:
                        check_against_dask_image(out, dimg_out, [0, n // 2, n - 1])
                print(f"  {name} run {r + 1}/{repeats}: ours {t:.2f} s, floor {row.floor[-1]:.2f} s, "
                      f"dask-image {dimg_times[key][r]:.2f} s", flush=True)
            row.dask_image = dimg_times[(dense_src, kernel.shape)][:repeats]
            row.blocks, row.block_rows = splits[-1].blocks, splits[-1].block_rows
            tot = {s: statistics.median(getattr(x, s) for x in splits) for s in ("read_s", "convolve_s", "write_s", "finalize_s")}
            row.split = tot
            rows.append(row)
            for path in (out, floor_out):
                _rm(path)
    finally:
        client.close()
        cluster.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- report ---------------------------------------------------------------
    print()
    head = (f"{'workload':34s} {'ours s':>8s} {'floor s':>8s} {'dask-image s':>13s} {'ours/floor':>11s} {'paired':>7s} "
            f"{'dask-image/ours':>16s}  targets")
    print(head)
    print("-" * len(head))
    results = []
    for r in rows:
        o, f, d = r.med("ours"), r.med("floor"), r.med("dask_image")
        of, do = o / f, d / o
        # ours and floor of one repeat run back to back: their ratio is less
        # sensitive to load from other users of a shared machine
        paired = statistics.median(a / b for a, b in zip(r.ours, r.floor))
        ok_f = "ok" if of <= r.target_floor else "MISS"
        ok_d = "ok" if do >= r.target_speedup else "MISS"
        print(f"{r.workload:34s} {o:8.2f} {f:8.2f} {d:13.2f} {of:11.2f} {paired:7.2f} {do:16.1f}  "
              f"<= {r.target_floor}x floor: {ok_f}; >= {r.target_speedup}x dask-image: {ok_d}")
        results.append(dict(workload=r.workload, ours=r.ours, floor=r.floor, dask_image=r.dask_image, ours_median=o,
                            floor_median=f, dask_image_median=d, ours_over_floor=of, ours_over_floor_paired=paired,
                            dask_image_over_ours=do,
                            target_floor=r.target_floor, target_speedup=r.target_speedup, blocks=r.blocks,
                            block_rows=r.block_rows, split=r.split))
    print()
    print("time split of our runs (per-block stage timers summed over tasks, median run):")
    for r in rows:
        s = r.split
        total = sum(s.values()) or 1.0
        print(f"  {r.workload:34s} " + ", ".join(f"{k[:-2]} {v:6.2f} s ({100 * v / total:4.1f}%)" for k, v in s.items())
              + f"  [{r.blocks} blocks of {r.block_rows}]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(frames=n, repeats=repeats, results=results), fh, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
