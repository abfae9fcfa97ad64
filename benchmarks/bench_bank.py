"""Benchmark: a kernel bank against separate jobs (issue #12, part 3).

One LocalCluster (2 workers x 1 thread, processes), the ROI stack of the
pipeline benchmark (``sample_rois``: 512 x 512 float32 frames, 0-3 disks of
radius 8, ~0.14 % nonzero) as an anndata CSR store and as a dense zarr
array (chunks of 16 frames, zstd), mode 'same', CSR out (and dense out with
``--dense``). Side by side, in the same run, in
alternating order, medians of ``--repeats``:

* **bank**: one ``convolve_zarr(source, bank, target)`` with the K kernels
  (Gaussians of sigma 1, 1.5, 2 and 3 by default, zero-padded, centred, to
  the largest; the engines skip zero taps);
* **separate**: K ``convolve_zarr(source, kernel_k, target_k)`` jobs one
  after the other, what a user does without banks (each reads the input,
  plans, fingerprints and writes its own output).

Every bank output is checked against the separate job of its kernel (same
values). Target: bank >= 2.5x faster than the separate jobs for K=4.

    python benchmarks/bench_bank.py                  # 2000 frames
    python benchmarks/bench_bank.py --frames 400 --repeats 2
    python benchmarks/bench_bank.py --markdown table.md
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dask_sparseconv as dsc  # noqa: E402
from dask_sparseconv import kernels  # noqa: E402
from dask_sparseconv.sample_data import sample_rois  # noqa: E402
from dask_sparseconv.storage import write_csr_stack  # noqa: E402

SIGMAS = (1.0, 1.5, 2.0, 3.0)


def bank_of(sigmas) -> tuple[np.ndarray, list[np.ndarray]]:
    singles = [kernels.gaussian(s) for s in sigmas]
    side = max(k.shape[0] for k in singles)
    padded = [np.pad(k, (side - k.shape[0]) // 2) for k in singles]
    return np.stack(padded), singles


def _dense_blocks(x, rows: int = 200):
    """The CSR stack as a dense (n, 512, 512) numpy array, built in pieces."""
    out = np.zeros((x.shape[0], 512, 512), dtype=x.dtype)
    for a in range(0, x.shape[0], rows):
        out[a:a + rows] = x[a:a + rows].toarray().reshape(-1, 512, 512)
    return out


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_bank(src, bank, target, fmt, names):
    _rm(target)
    t0 = time.perf_counter()
    s = dsc.convolve_zarr(src, bank, target, output_format=fmt, kernel_names=names)
    return time.perf_counter() - t0, s


def run_separate(src, singles, targets, fmt):
    for t in targets:
        _rm(t)
    t0 = time.perf_counter()
    for k, t in zip(singles, targets):
        dsc.convolve_zarr(src, k, t, output_format=fmt)
    return time.perf_counter() - t0


def same(bank_target, names, targets, fmt) -> bool:
    got = dsc.open_bank(bank_target)
    for name, t in zip(names, targets):
        a, b = got[name].compute(), dsc.open_stack(t).compute()
        if fmt == "csr":
            d = abs(a - b)
            if d.nnz and float(d.max()) > 1e-5 * float(abs(b).max()):
                return False
        elif not np.allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max())):
            return False
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense", action="store_true", help="also dense output")
    ap.add_argument("--input", choices=("csr", "dense", "both"), default="both",
                    help="the ROI stack as an anndata CSR store, a dense zarr array, or both (default)")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    tmp = tempfile.mkdtemp(prefix="bench_bank_")
    bank, singles = bank_of(SIGMAS)
    names = [f"sigma{s:g}" for s in SIGMAS]
    x = sample_rois(args.frames, (512, 512), seed=0)
    sources = {}
    if args.input in ("csr", "both"):
        sources["csr"] = os.path.join(tmp, "rois_csr.zarr")
        write_csr_stack(sources["csr"], x, (512, 512))
    if args.input in ("dense", "both"):
        sources["dense"] = os.path.join(tmp, "rois_dense.zarr")
        dsc.write_dense_stack(sources["dense"], _dense_blocks(x), chunks=16)
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster):
        # warm-up: compile the engines on the workers
        small = os.path.join(tmp, "small.zarr")
        write_csr_stack(small, x[:20], (512, 512))
        run_bank(small, bank, os.path.join(tmp, "w.zarr"), "csr", names)
        run_separate(small, singles, [os.path.join(tmp, f"w{k}.zarr") for k in range(len(singles))], "csr")
        for (in_fmt, src), fmt in [(s, f) for s in sources.items() for f in (("csr", "dense") if args.dense else ("csr",))]:
            target = os.path.join(tmp, f"bank_{fmt}.zarr")
            targets = [os.path.join(tmp, f"single{k}_{fmt}.zarr") for k in range(len(singles))]
            tb, ts = [], []
            summary = None
            for r in range(args.repeats):
                if r % 2 == 0:
                    t, summary = run_bank(src, bank, target, fmt, names)
                    tb.append(t)
                    ts.append(run_separate(src, singles, targets, fmt))
                else:
                    ts.append(run_separate(src, singles, targets, fmt))
                    t, summary = run_bank(src, bank, target, fmt, names)
                    tb.append(t)
                print(f"  {in_fmt} -> {fmt} repeat {r}: bank {tb[-1]:.2f} s, separate {ts[-1]:.2f} s", flush=True)
            ok = same(target, names, targets, fmt)
            b, s = statistics.median(tb), statistics.median(ts)
            rows.append((f"{in_fmt} -> {fmt}", b, s, s / b, summary.nnz_out if summary else 0, ok))
    _rm(tmp)
    head = (f"{args.frames} ROI frames 512 x 512 float32, K={len(SIGMAS)} Gaussians sigma {', '.join(map(str, SIGMAS))} "
            f"(bank padded to {bank.shape[1]} x {bank.shape[2]}), mode same, LocalCluster 2 workers x 1 thread; "
            f"medians of {args.repeats}, alternating order")
    lines = [head, "", "| store in -> out | bank (s) | 4 separate jobs (s) | separate / bank | nnz out (all kernels) | results |",
             "|---|---|---|---|---|---|"]
    for fmt, b, s, ratio, nnz, ok in rows:
        lines.append(f"| {fmt} | {b:.2f} | {s:.2f} | {ratio:.2f}x | {nnz:,} | {'same' if ok else 'DIFFER'} |")
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
