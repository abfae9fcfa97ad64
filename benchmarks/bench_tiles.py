"""Frames larger than a block (issue #13): tiles, against the floor and against dask-image.

Two workloads, each on a local cluster of 2 worker processes x 1 thread with
``memory_limit='1GiB'``, every setting of ours at its default (the 64 MiB
block budget included):

1. ``--raster``: one 100,000 x 100,000 frame holding 10 million clustered
   nonzeros (:func:`dask_sparseconv.sample_data.sample_raster`, a
   population-raster-like generator), 7 x 7 Gaussian (sigma 1), anndata CSR
   in and CSR out.

   * **ours**: ``convolve_zarr(source, kernel, target)``;
   * **floor**: a plain dask copy of OUR output store (same chunks and
     codecs): reading and writing the output bytes, no convolution.

   Checked, untimed: the whole output against the in-memory engine on the
   whole frame (computed from the nonzeros in this process; must be
   identical), and 4 windows of 600 x 600 output pixels around random
   nonzeros against ``scipy.signal.convolve2d`` on the input window with
   its halo.

2. ``--dense``: one dense 40,000 x 40,000 float32 frame, 0.1 % nonzero
   (uniformly placed), zarr chunks (1, 4096, 4096), Gaussian sigma 2
   (13 x 13), dense out.

   * **ours**: ``convolve_zarr(source, kernel, target)``;
   * **dask-image**: ``dask_image.ndfilters.convolve(da.from_zarr(source),
     kernel, mode='constant')`` written with ``to_zarr`` (its chunks are
     the input's).

   Checked, untimed: both outputs agree on 6 windows of 512 x 512.

Each workload runs on its own new cluster, after an untimed warm-up job of
the same kind (compilation, imports). Peak worker RSS is sampled
(``psutil``, every 20 ms) over each run, both workers; the table shows the
highest, and the workers' RSS at the start (after glibc's ``malloc_trim``).

Targets (issue #13): raster completes, exact, peak worker RSS under the
limit, ours/floor <= 2; dense: >= 5x faster than dask-image with peak worker
RSS <= half of dask-image's.

Usage::

    python benchmarks/bench_tiles.py                   # both, at the issue's sizes
    python benchmarks/bench_tiles.py --raster          # only the raster
    python benchmarks/bench_tiles.py --dense --dense-size 20000   # smaller dense frame
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

import numpy as np
import scipy.signal
import scipy.sparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pipeline import run_dask_image, run_floor, run_ours  # noqa: E402
from csr_scale import PeakRSS, trim_worker_heaps  # noqa: E402


def _timed(client, pids, fn, *args):
    start = trim_worker_heaps(client)
    with PeakRSS(pids) as peak:
        t0 = time.perf_counter()
        out = fn(*args)
        t = time.perf_counter() - t0
    return t, out, peak.peak, start


def check_raster(out_path, frame, shape, kernel, windows=4, half=300, seed=0):
    """Untimed: the tiled output equals the whole-frame engine, and scipy on windows."""
    from dask_sparseconv import Convolver, open_stack

    H, W = shape
    ours = scipy.sparse.csr_matrix(open_stack(out_path).compute(scheduler="sync"))  # here, not on a 1 GiB worker
    whole = Convolver(shape, kernel, mode="same")(frame, out="csr")
    diff = ours - whole
    max_whole = float(abs(diff).max()) if diff.nnz else 0.0
    rng = np.random.default_rng(seed)
    kh, kw = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    rows = ours.getrow(0)
    max_scipy = 0.0
    for p in rng.choice(frame.indices, windows, replace=False):
        cy, cx = divmod(int(p), W)
        y0, y1 = max(0, cy - half), min(H, cy + half)
        x0, x1 = max(0, cx - half), min(W, cx + half)
        # input rows/cols the window depends on, zero outside the frame
        r0, r1, c0, c1 = y0 + top - kh + 1, y1 + top, x0 + left - kw + 1, x1 + left
        pad = np.zeros((r1 - r0, c1 - c0), np.float64)
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, H), max(c0, 0), min(c1, W)
        band = frame[:, rr0 * W: rr1 * W].toarray().reshape(rr1 - rr0, W)[:, cc0:cc1]
        pad[rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0] = band
        ref = scipy.signal.convolve2d(pad, kernel, mode="valid")
        got = rows[:, y0 * W: y1 * W].toarray().reshape(y1 - y0, W)[:, x0:x1]
        max_scipy = max(max_scipy, float(np.abs(got - ref).max()))
    return max_whole, max_scipy


def write_dense_frame(path, size, chunk, density, seed=0):
    """A (1, size, size) float32 zarr array written chunk by chunk (never whole in memory)."""
    import zarr

    z = zarr.create_array(path, shape=(1, size, size), chunks=(1, chunk, chunk), dtype="float32", fill_value=0,
                          overwrite=True)
    rng = np.random.default_rng(seed)
    nnz = 0
    for r in range(0, size, chunk):
        for c in range(0, size, chunk):
            h, w = min(chunk, size - r), min(chunk, size - c)
            block = np.zeros((h, w), np.float32)
            k = rng.binomial(h * w, density)
            pos = rng.choice(h * w, k, replace=False)
            block.flat[pos] = rng.uniform(0.5, 1.5, k).astype(np.float32)
            z[0, r: r + h, c: c + w] = block
            nnz += k
    return nnz


def check_dense(ours_path, dimg_path, size, windows=6, half=256, seed=1):
    import zarr

    a, b = zarr.open_array(ours_path, mode="r"), zarr.open_array(dimg_path, mode="r")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(windows):
        cy, cx = (int(v) for v in rng.integers(half, size - half, 2))
        sl = (0, slice(cy - half, cy + half), slice(cx - half, cx + half))
        worst = max(worst, float(np.abs(np.asarray(a[sl]) - np.asarray(b[sl])).max()))
    return worst


def mib(v):
    return v / 2**20


def main(argv=None):
    from distributed import Client, LocalCluster

    from dask_sparseconv.kernels import gaussian
    from dask_sparseconv.sample_data import sample_raster
    from dask_sparseconv.storage import write_csr_stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raster", action="store_true", help="run the raster workload (default: both)")
    ap.add_argument("--dense", action="store_true", help="run the dense workload (default: both)")
    ap.add_argument("--raster-size", type=int, default=100_000, help="raster side (default 100000)")
    ap.add_argument("--raster-nnz", type=int, default=10_000_000, help="raster nonzeros (default 10 million)")
    ap.add_argument("--dense-size", type=int, default=40_000, help="dense frame side (default 40000)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of ours and the floor (default 2)")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temporary directory, removed)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    both = not (args.raster or args.dense)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-tiles-")
    os.makedirs(workdir, exist_ok=True)
    p = lambda name: os.path.join(workdir, name)  # noqa: E731
    results: dict = {}

    def fresh_cluster():
        """Each workload on new workers: what one leaves in the workers' heaps is not the next one's."""
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                               dashboard_address=":0")
        client = Client(cluster)
        return cluster, client, list(client.run(os.getpid).values())

    try:
        if both or args.raster:
            cluster, client, pids = fresh_cluster()
            S, nnz = args.raster_size, args.raster_nnz
            k = gaussian(sigma=1.0)
            # warm-up (JIT, imports) on a small tiled job of the same kind (int64 indices too), not timed
            warm = sample_raster((50_000, 50_000), 100_000, seed=9)
            write_csr_stack(p("warm.zarr"), warm, (50_000, 50_000), overwrite=True)
            run_ours(p("warm.zarr"), k, p("warm_out.zarr"))
            t0 = time.perf_counter()
            frame = sample_raster((S, S), nnz, seed=1)
            write_csr_stack(p("raster.zarr"), frame, (S, S), overwrite=True)
            print(f"raster {S} x {S}, {frame.nnz} nonzeros: generated and written in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            row: dict = dict(ours=[], floor=[], rss=[], rss_start=[])
            for r in range(args.repeats):
                t, (_, summary), peak, start = _timed(client, pids, run_ours, p("raster.zarr"), k, p("raster_out.zarr"))
                row["ours"].append(t)
                row["rss"].append(peak)
                row["rss_start"].append(start)
                row["floor"].append(run_floor(p("raster_out.zarr"), p("raster_floor.zarr")))
                print(f"  run {r + 1}: ours {t:.2f} s ({summary.blocks} blocks), floor {row['floor'][-1]:.2f} s, "
                      f"peak worker RSS {mib(peak):.0f} MiB", flush=True)
            client.close()
            cluster.close()
            row.update(tiles=summary.blocks, nnz_out=summary.nnz_out)
            row["max_abs_vs_whole_frame"], row["max_abs_vs_scipy_windows"] = check_raster(
                p("raster_out.zarr"), frame, (S, S), k)
            print(f"  checked: max |ours - whole-frame engine| = {row['max_abs_vs_whole_frame']:.3g}, "
                  f"max |ours - scipy| on windows = {row['max_abs_vs_scipy_windows']:.3g}", flush=True)
            results["raster"] = row
            del frame
        if both or args.dense:
            cluster, client, pids = fresh_cluster()
            N = args.dense_size
            k = gaussian(sigma=2.0)
            write_dense_frame(p("warm_dense.zarr"), 9000, 4096, 0.001, seed=9)  # warm-up, not timed
            run_ours(p("warm_dense.zarr"), k, p("warm_dense_out.zarr"))
            t0 = time.perf_counter()
            nnz = write_dense_frame(p("dense.zarr"), N, 4096, 0.001)
            print(f"dense {N} x {N}, {nnz} nonzeros: written in {time.perf_counter() - t0:.1f} s", flush=True)
            row = dict(ours=[], dask_image=[], rss=[], rss_dimg=[], rss_start=[], rss_start_dimg=[])
            for r in range(args.repeats):
                t, (_, summary), peak, start = _timed(client, pids, run_ours, p("dense.zarr"), k, p("dense_out.zarr"))
                row["ours"].append(t)
                row["rss"].append(peak)
                row["rss_start"].append(start)
                print(f"  run {r + 1}: ours {t:.2f} s ({summary.blocks} tiles), peak worker RSS {mib(peak):.0f} MiB "
                      f"(from {mib(start):.0f})", flush=True)
            t, _, peak, start = _timed(client, pids, run_dask_image, p("dense.zarr"), k, p("dense_dimg.zarr"))
            row["dask_image"].append(t)
            row["rss_dimg"].append(peak)
            row["rss_start_dimg"].append(start)
            print(f"  dask-image {t:.2f} s, peak worker RSS {mib(peak):.0f} MiB (from {mib(start):.0f})", flush=True)
            client.close()
            cluster.close()
            row["tiles"] = summary.blocks
            row["max_abs_vs_dask_image"] = check_dense(p("dense_out.zarr"), p("dense_dimg.zarr"), N)
            print(f"  checked: max |ours - dask-image| on windows = {row['max_abs_vs_dask_image']:.3g}", flush=True)
            results["dense"] = row
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    if "raster" in results:
        r = results["raster"]
        o, f = statistics.median(r["ours"]), statistics.median(r["floor"])
        r.update(ours_median=o, floor_median=f, ours_over_floor=o / f, peak_rss_mib=mib(max(r["rss"])))
        print(f"raster {args.raster_size} x {args.raster_size}, {args.raster_nnz} nonzeros, CSR in/out, 7 x 7 Gaussian")
        print(f"{'tiles':>6s} {'ours s':>7s} {'floor s':>8s} {'ours/floor':>10s} {'start RSS MiB':>13s} "
              f"{'peak RSS MiB':>12s} {'limit MiB':>9s}")
        print(f"{r['tiles']:6d} {o:7.2f} {f:8.2f} {o / f:10.2f} {mib(max(r['rss_start'])):13.0f} "
              f"{r['peak_rss_mib']:12.0f} {1024:9d}")
        print("target: completes, exact, peak RSS under the limit, ours/floor <= 2\n")
    if "dense" in results:
        d = results["dense"]
        o, di = statistics.median(d["ours"]), statistics.median(d["dask_image"])
        d.update(ours_median=o, dask_image_median=di, speedup=di / o, peak_rss_mib=mib(max(d["rss"])),
                 peak_rss_dimg_mib=mib(max(d["rss_dimg"])))
        print(f"dense {args.dense_size} x {args.dense_size} float32, 0.1 % nonzero, chunks 4096 x 4096, Gaussian sigma 2")
        print(f"{'tiles':>6s} {'ours s':>7s} {'dask-image s':>12s} {'speedup':>8s} {'start RSS MiB':>13s} "
              f"{'ours RSS MiB':>12s} {'dask-image RSS MiB':>18s} {'RSS ratio':>9s}")
        print(f"{d['tiles']:6d} {o:7.2f} {di:12.2f} {di / o:8.2f} {mib(max(d['rss_start'])):13.0f} "
              f"{d['peak_rss_mib']:12.0f} {d['peak_rss_dimg_mib']:18.0f} "
              f"{d['peak_rss_mib'] / d['peak_rss_dimg_mib']:9.2f}")
        print("target: speedup >= 5, RSS ratio <= 0.5")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
