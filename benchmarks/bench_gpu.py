"""GPU benchmark (issue #6): torch ``precomputed`` on one GPU vs numba ``direct`` on the CPU cores.

Workload: N frames of 256 x 256 float32 at density 0.01 (default N = 10000),
convolved in row blocks (``--block-rows``, default 500 images) with a 5 x 5
and a 15 x 15 kernel (every tap nonzero), CSR in -> CSR out, ``mode='same'``
— what a pipeline block task does after reading its block.

For each kernel, on the same machine:

* **torch precomputed** on ``--device`` (default ``cuda``): the Toeplitz
  matrix is built once on the device (timed separately as ``build``), then
  every block is one host->device transfer of its CSR arrays, one sparse
  product and one transfer of the CSR result back;
* **numba direct** on all the CPU cores this process may use
  (``n_threads = cores``), after a JIT warm-up.

Both are warmed up on one block, then timed over all blocks; the first
block's results are compared (float32 tolerance of docs/gpu.md). The table
gives blocks/s, images/s and the GPU/CPU ratio, with the devices named.

Usage::

    python benchmarks/bench_gpu.py                          # on a GPU machine: full size
    python benchmarks/bench_gpu.py --device cpu --n 400     # smoke test without a GPU
    python benchmarks/bench_gpu.py --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import scipy.sparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dask_sparseconv import Convolver  # noqa: E402
from dask_sparseconv.engine.threads import default_threads  # noqa: E402

FRAME = (256, 256)
DENSITY = 0.01


def make_stack(n: int, seed: int = 0) -> scipy.sparse.csr_matrix:
    """``(n, H*W)`` float32 CSR, each frame ``DENSITY`` nonzero at uniform positions."""
    rng = np.random.default_rng(seed)
    pixels = FRAME[0] * FRAME[1]
    per = int(round(DENSITY * pixels))
    cols = np.sort(np.argsort(rng.random((n, pixels)), axis=1)[:, :per], axis=1) if n <= 2000 else None
    if cols is None:  # large n: build in parts to bound memory
        parts = [make_stack(min(2000, n - a), seed + 1 + a) for a in range(0, n, 2000)]
        return scipy.sparse.vstack(parts, format="csr")
    data = rng.standard_normal(n * per).astype(np.float32)
    indptr = np.arange(0, n * per + 1, per, dtype=np.int64)
    out = scipy.sparse.csr_matrix((data, cols.ravel().astype(np.int32), indptr), shape=(n, pixels))
    out.has_canonical_format = True
    return out


def kernel(size: int) -> np.ndarray:
    ax = np.arange(size) - size // 2
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (size / 4) ** 2))
    return (g / g.sum()).astype(np.float32)


def blocks(x: scipy.sparse.csr_matrix, rows: int):
    return [x[a : a + rows] for a in range(0, x.shape[0], rows)]


def time_engine(conv: Convolver, parts, sync) -> tuple[float, scipy.sparse.csr_matrix]:
    first = conv(parts[0], out="csr", batched=True)  # warm-up (JIT, cuSPARSE handles)
    sync()
    t0 = time.perf_counter()
    for p in parts:
        conv(p, out="csr", batched=True)
    sync()
    return time.perf_counter() - t0, first


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"torch CPU device ({cpu_name()}, {torch.get_num_threads()} torch threads)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="frames (default 10000)")
    ap.add_argument("--block-rows", type=int, default=500, help="images per block (default 500)")
    ap.add_argument("--device", default="cuda", help="torch device for the precomputed engine (default cuda; "
                                                     "'cpu' = smoke test without a GPU)")
    ap.add_argument("--kernels", default="5,15", help="kernel sizes, comma-separated (default 5,15)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here; use --device cpu for a smoke test", file=sys.stderr)
        return 2

    def sync():
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    cores = default_threads()
    t0 = time.perf_counter()
    x = make_stack(args.n)
    parts = blocks(x, args.block_rows)
    print(f"stack: {args.n} x {FRAME[0]}x{FRAME[1]} float32, density {DENSITY}, nnz {x.nnz:,}; "
          f"{len(parts)} blocks of {args.block_rows} (made in {time.perf_counter() - t0:.1f} s)")
    gpu_label = device_name(args.device)
    cpu_label = f"{cpu_name()}, {cores} cores"
    print(f"torch precomputed on: {args.device} = {gpu_label}")
    print(f"numba direct on:      {cpu_label}")

    rows = []
    for size in [int(s) for s in args.kernels.split(",")]:
        k = kernel(size)
        b0 = time.perf_counter()
        gpu = Convolver(FRAME, k, "same", method="precomputed", backend="torch", dtype="float32", device=args.device)
        sync()
        build = time.perf_counter() - b0
        cpu = Convolver(FRAME, k, "same", method="direct", backend="numba", dtype="float32", n_threads=cores)
        t_gpu, y_gpu = time_engine(gpu, parts, sync)
        t_cpu, y_cpu = time_engine(cpu, parts, lambda: None)
        diff = abs(y_gpu - y_cpu)
        max_err = float(diff.max()) if diff.nnz else 0.0
        scale = float(abs(parts[0]).max()) * float(np.abs(k).sum())
        ok = max_err <= 1e-5 * scale + 1e-6 * scale
        rows.append({
            "kernel": f"{size}x{size}", "device": args.device, "device_name": gpu_label, "cpu": cpu_label,
            "n": args.n, "blocks": len(parts), "block_rows": args.block_rows, "toeplitz_build_s": build,
            "toeplitz_bytes": gpu.nbytes, "gpu_s": t_gpu, "cpu_s": t_cpu,
            "gpu_blocks_per_s": len(parts) / t_gpu, "cpu_blocks_per_s": len(parts) / t_cpu,
            "gpu_images_per_s": args.n / t_gpu, "cpu_images_per_s": args.n / t_cpu,
            "speedup": t_cpu / t_gpu, "max_abs_diff": max_err, "agree": bool(ok),
        })
        del gpu, cpu

    head = (f"{'kernel':>7} | {'torch precomputed':>24} | {'numba direct':>24} | {'ratio':>6} | {'build':>7} | agree")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        g = f"{r['gpu_blocks_per_s']:8.2f} bl/s {r['gpu_images_per_s']:8.0f} im/s"
        c = f"{r['cpu_blocks_per_s']:8.2f} bl/s {r['cpu_images_per_s']:8.0f} im/s"
        print(f"{r['kernel']:>7} | {g:>24} | {c:>24} | {r['speedup']:5.2f}x | {r['toeplitz_build_s']:6.2f}s | "
              f"{'yes' if r['agree'] else 'NO'} (max |diff| {r['max_abs_diff']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
