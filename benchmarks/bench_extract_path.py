"""Where the direct engine should switch from the bit map to a plain scan.

The direct engine extracts an image's output either through a bit map of
the slots it touched (cost ~ touched slots) or by scanning its bounding box
(cost ~ box area, branch-free). ``DENSE_OPS`` (``dask_sparseconv.engine.
direct``) sets the switch: an image with ``nnz * K * DENSE_OPS >= rows *
W_out`` is scanned. This script times the drop-in class's call for several
values of it on configurations around the crossover (one process, warm,
medians of ``--repeats`` calls) and checks that every value gives the same
result, so that the constant is chosen from a measurement on this machine.

    python benchmarks/bench_extract_path.py
    python benchmarks/bench_extract_path.py --values 1 2 3 4 --repeats 200
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.sparse

from dask_sparseconv import Toeplitz_convolution2d
from dask_sparseconv.engine.direct import DENSE_OPS, DirectNumba

#: (images, frame side, kernel side, density): expected ops/area from 0.03 to 1.2
CONFIGS = [
    (100, 200, 5, 0.001),
    (50, 100, 3, 0.01),
    (50, 100, 5, 0.01),
    (50, 256, 5, 0.01),
    (50, 512, 5, 0.01),
    (50, 100, 7, 0.01),
    (100, 100, 5, 0.02),
    (50, 100, 9, 0.01),
    (50, 256, 9, 0.01),
    (100, 100, 5, 0.04),
    (50, 100, 11, 0.01),
]


def median_call(conv, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        conv(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 6], help="DENSE_OPS values to try")
    ap.add_argument("--repeats", type=int, default=100, help="calls per cell (median)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"# call time (ms) by DENSE_OPS; mode 'same', float64, CSR in/out; current default {DENSE_OPS:g}")
    head = ["config", "ops/area"] + [f"{v:g}" for v in args.values] + ["best"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    try:
        for n, side, ks, d in CONFIGS:
            x = scipy.sparse.random(n, side * side, density=d, format="csr", random_state=0)
            k = rng.random((ks, ks))
            ref = None
            row = []
            for v in args.values:
                DirectNumba.dense_ops = v
                conv = Toeplitz_convolution2d((side, side), k, mode="same")
                y = conv(x)
                if ref is None:
                    ref = y
                elif (y != ref).nnz or not np.array_equal(y.indices, ref.indices):
                    print(f"DIFFERENT RESULT at DENSE_OPS={v} for {n}x{side}x{side} k={ks} d={d}", file=sys.stderr)
                    return 1
                row.append(median_call(conv, x, args.repeats) * 1e3)
            best = args.values[int(np.argmin(row))]
            cells = [f"{n}x{side}x{side} k={ks} d={d}", f"{d * ks * ks:.2f}"] + [f"{t:.3f}" for t in row] + [f"{best:g}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    finally:
        DirectNumba.dense_ops = DENSE_OPS
    return 0


if __name__ == "__main__":
    sys.exit(main())
