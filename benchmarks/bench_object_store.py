"""Object-store throughput (issue #14): the same job on the local file system and on ``s3://``.

The S3 side is moto's standalone server (``python -m moto.server``, started
here on 127.0.0.1 as in the tests), reached through s3fs by the worker
processes of a ``LocalCluster`` (2 workers x 1 thread). moto is a
single-process Python server that keeps objects in memory, so its numbers
say what the package's S3 path costs on top of a slow server, not what a
cloud bucket would give; the local column is the same job on this
machine's disk.

Workloads:

1. ROI footprints (0-3 soft disks per frame), 512 x 512, anndata CSR in and
   out, 7 x 7 Gaussian;
2. a dense stack 256 x 256 float32, 2 % nonzero, 9 x 9 Gaussian, dense in
   and out.

Each cell: median of ``--repeats`` runs of ``convolve_zarr`` (the output
deleted before each), throughput = (input stored bytes + output stored
bytes) / time. Every S3 result is compared with the local one.

Usage::

    python benchmarks/bench_object_store.py [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from bench_pipeline import gaussian_kernel, roi_csr  # noqa: E402  (shared data generators)
from s3_server import MotoServer  # noqa: E402  (the tests' server: one way to start it)


def stored_bytes_local(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def stored_bytes_s3(server: MotoServer, bucket: str, prefix: str) -> int:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name=server.REGION,
                      aws_access_key_id=server.key, aws_secret_access_key=server.secret)
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def same(a, b) -> bool:
    import scipy.sparse

    if scipy.sparse.issparse(a):
        return (a != b).nnz == 0
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (development)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    import dask_sparseconv as dsc
    from dask_sparseconv.storage import write_csr_stack, write_dense_stack

    n_roi, n_dense = (400, 200) if args.quick else (4000, 1000)
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((n_dense, 256, 256)) < 0.02, rng.random((n_dense, 256, 256)) + 0.5, 0)
    dense = dense.astype(np.float32)
    workloads = [
        ("csr", f"ROI {n_roi} x 512 x 512, CSR -> CSR, 7 x 7", gaussian_kernel(7, 1.5),
         lambda url, o: write_csr_stack(url, roi_csr(n_roi, 512, 512), (512, 512), storage_options=o)),
        ("dense", f"dense {n_dense} x 256 x 256, 2 %, dense -> dense, 9 x 9", gaussian_kernel(9, 2.0),
         lambda url, o: write_dense_stack(url, dense, chunks=16, storage_options=o)),
    ]
    tmp = tempfile.mkdtemp(prefix="bench-s3-")
    server = MotoServer(tmp)
    rows = []
    try:
        opts = server.storage_options()
        bucket = server.bucket()
        with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB", dashboard_address=None) as lc, \
                Client(lc):
            for fmt, label, kernel, write in workloads:
                local_in, local_out = os.path.join(tmp, f"{fmt}-in.zarr"), os.path.join(tmp, f"{fmt}-out.zarr")
                s3_in, s3_out = f"s3://{bucket}/{fmt}-in.zarr", f"s3://{bucket}/{fmt}-out.zarr"
                write(local_in, None)
                write(s3_in, opts)
                times: dict[str, list[float]] = {"local": [], "s3": []}
                for _ in range(args.repeats):
                    for where, src, dst, o in (("local", local_in, local_out, None), ("s3", s3_in, s3_out, opts)):
                        t0 = time.perf_counter()
                        dsc.convolve_zarr(src, kernel, dst, "same", output_format=fmt, overwrite=True,
                                          storage_options=o, target_storage_options=o)
                        times[where].append(time.perf_counter() - t0)
                nbytes = {
                    "local": stored_bytes_local(local_in) + stored_bytes_local(local_out),
                    "s3": stored_bytes_s3(server, bucket, f"{fmt}-in.zarr/") + stored_bytes_s3(server, bucket,
                                                                                           f"{fmt}-out.zarr/"),
                }
                ok = same(dsc.open_stack(local_out).compute(), dsc.open_stack(s3_out, storage_options=opts).compute())
                t_local, t_s3 = statistics.median(times["local"]), statistics.median(times["s3"])
                rows.append((label, nbytes["local"] / 1e6, t_local, nbytes["local"] / 1e6 / t_local, t_s3,
                             nbytes["s3"] / 1e6 / t_s3, t_s3 / t_local, ok))
                shutil.rmtree(local_out, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nLocalCluster 2 workers x 1 thread; medians of {args.repeats}; moto {_moto_version()} server on 127.0.0.1\n")
    print("| workload | stored in + out (MB) | local (s) | local (MB/s) | s3 via moto (s) | s3 (MB/s) | s3 / local | same |")
    print("|---|---|---|---|---|---|---|---|")
    for label, mb, tl, rl, ts, rs, ratio, ok in rows:
        print(f"| {label} | {mb:.1f} | {tl:.2f} | {rl:.0f} | {ts:.2f} | {rs:.0f} | {ratio:.1f}x | {'same' if ok else 'DIFFERENT'} |")
    return 0 if all(r[-1] for r in rows) else 1


def _moto_version() -> str:
    import moto

    return moto.__version__


if __name__ == "__main__":
    sys.exit(main())
