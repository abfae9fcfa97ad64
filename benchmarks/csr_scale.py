"""CSR outputs at scale (issue #16), run as ``bench_pipeline.py --scale``.

ROI footprints (0-3 soft disks of radius 8 per 512 x 512 frame, the
generator of the 2000-frame table), 7 x 7 Gaussian (sigma 1.5), anndata CSR
in and CSR out, on a local cluster of 2 worker processes x 1 thread with
``memory_limit='1GiB'``. For each stack size, ``--repeats`` times, back to
back:

* **ours**: ``convolve_zarr(source, kernel, target)`` with default settings;
* **floor**: a plain dask copy of OUR output (``da.from_zarr`` ->
  ``da.store``, same chunks and codecs): reading and writing the output
  bytes with no convolution at all.

Peak worker RSS is sampled (``psutil``, every 20 ms) over each of our runs,
for both worker processes; the table shows the highest. Before each of our
runs the workers return freed heap to the system (glibc ``malloc_trim``), so
that what the previous floor copy left in their heaps is not counted as ours;
the table also shows the RSS the workers start from. Each output is
checked (untimed) against ``scipy.signal.convolve2d`` on 8 frames spread
over the stack, and its nnz against the sum over those frames.

Targets (issue #16): ours/floor <= 1.25 at 40,000 and 200,000 frames; time
per frame at 200,000 within 10 % of time per frame at 10,000; peak worker
RSS flat in the number of frames and below half the memory limit.

Usage::

    python benchmarks/bench_pipeline.py --scale                      # 10k, 40k, 200k frames
    python benchmarks/bench_pipeline.py --scale --sizes 10000 40000  # fewer sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np
import scipy.signal


class PeakRSS:
    """Highest resident set size of a set of processes, sampled in a thread."""

    def __init__(self, pids, every: float = 0.02):
        import psutil

        self._procs = [psutil.Process(p) for p in pids]
        self._every = every
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self._procs:
                try:
                    self.peak = max(self.peak, p.memory_info().rss)
                except Exception:  # a worker restarting
                    pass
            self._stop.wait(self._every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def trim_worker_heaps(client):
    """Ask glibc in every worker to hand freed heap pages back to the system.

    Without it a worker's RSS after the floor copy (a few hundred MiB of freed
    but still mapped chunks) would be read as the next run's peak. Returns the
    highest worker RSS after trimming, in bytes (0 where glibc is absent).
    """

    def trim():
        import ctypes
        import gc

        import psutil

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: nothing to trim
            pass
        return psutil.Process().memory_info().rss

    return max(client.run(trim).values())


def check_output(out_path, csr, frame_shape, kernel, frames):
    """Untimed: a few frames of our output against scipy.signal.convolve2d."""
    from dask_sparseconv import open_stack

    ours = open_stack(out_path)
    H, W = frame_shape
    for i in frames:
        ref = scipy.signal.convolve2d(csr[i].toarray().reshape(H, W), kernel, mode="same")
        got = ours[i : i + 1].compute().toarray().reshape(H, W)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def main(argv=None):
    from bench_pipeline import gaussian_kernel, roi_csr, run_floor, run_ours

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 200_000], help="frames per stack")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per size (default 2)")
    ap.add_argument("--workdir", default=None, help="where stores go (default: a temporary directory, removed)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    from dask_sparseconv.storage import write_csr_stack

    H = W = 512
    kernel = gaussian_kernel(7, 1.5)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-csr-scale-")
    os.makedirs(workdir, exist_ok=True)
    p = lambda name: os.path.join(workdir, name)  # noqa: E731
    print(f"csr scale: sizes {args.sizes}, {args.repeats} repeats, workdir {workdir}", flush=True)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB", dashboard_address=":0")
    client = Client(cluster)
    pids = list(client.run(os.getpid).values())
    results = []
    try:
        # warm-up at a size that takes the same code paths (JIT, threaded engine), not timed
        warm = roi_csr(3000, H, W, seed=9)
        write_csr_stack(p("warm.zarr"), warm, (H, W), overwrite=True)
        run_ours(p("warm.zarr"), kernel, p("warm_out.zarr"))
        run_floor(p("warm_out.zarr"), p("warm_floor.zarr"))
        for n in args.sizes:
            t0 = time.perf_counter()
            csr = roi_csr(n, H, W, seed=1)
            write_csr_stack(p("in.zarr"), csr, (H, W), overwrite=True)
            print(f"{n} frames: {csr.nnz} nonzeros in, written in {time.perf_counter() - t0:.1f} s", flush=True)
            row = dict(frames=n, ours=[], floor=[], rss=[], rss_start=[])
            for r in range(args.repeats):
                row["rss_start"].append(trim_worker_heaps(client))
                with PeakRSS(pids) as peak:
                    t, summary = run_ours(p("in.zarr"), kernel, p("out.zarr"))
                row["ours"].append(t)
                row["rss"].append(peak.peak)
                row["floor"].append(run_floor(p("out.zarr"), p("floor.zarr")))
                if r == 0:
                    check_output(p("out.zarr"), csr, (H, W), kernel, np.linspace(0, n - 1, 8).astype(int))
                    row.update(blocks=summary.blocks, block_rows=summary.block_rows, nnz_out=summary.nnz_out,
                               held=summary.extra.get("blocks_held", 0))
                print(f"  run {r + 1}/{args.repeats}: ours {t:.2f} s, floor {row['floor'][-1]:.2f} s, "
                      f"worker RSS {row['rss_start'][-1] / 2**20:.0f} MiB at start, "
                      f"{peak.peak / 2**20:.0f} MiB at peak", flush=True)
            results.append(row)
            del csr
    finally:
        client.close()
        cluster.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    head = (f"{'frames':>8s} {'blocks':>6s} {'held':>5s} {'ours s':>7s} {'floor s':>8s} {'ours/floor':>10s} "
            f"{'paired':>7s} {'us/frame':>9s} {'vs first':>8s} {'start RSS MiB':>13s} {'peak RSS MiB':>12s}")
    print(head)
    print("-" * len(head))
    base = None
    for row in results:
        o, f = statistics.median(row["ours"]), statistics.median(row["floor"])
        paired = statistics.median(a / b for a, b in zip(row["ours"], row["floor"]))
        per = o / row["frames"] * 1e6
        base = base or per
        row.update(ours_median=o, floor_median=f, ours_over_floor=o / f, paired=paired, us_per_frame=per,
                   per_frame_vs_first=per / base, peak_rss_mib=max(row["rss"]) / 2**20,
                   start_rss_mib=max(row["rss_start"]) / 2**20)
        print(f"{row['frames']:8d} {row['blocks']:6d} {row['held']:5d} {o:7.2f} {f:8.2f} {o / f:10.2f} {paired:7.2f} "
              f"{per:9.1f} {per / base:8.2f} {row['start_rss_mib']:13.0f} {row['peak_rss_mib']:12.0f}")
    print("\ntargets: ours/floor <= 1.25 at 40k and 200k; us/frame at 200k within 10 % of 10k; "
          "peak RSS flat and < 512 MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0
