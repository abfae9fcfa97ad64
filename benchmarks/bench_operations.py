"""Benchmark: what a boundary, a fill value or correlation costs, against
zero-fill convolution of the same stack and against scipy.signal.

ROI footprints (``sample_rois``: 512 x 512 frames, about 0.1 % nonzero),
7 x 7 Gaussian, CSR in and CSR out, mode 'same', in one process on one
thread (``n_threads=1``: the cost of the operation, not of the thread pool).
For each operation: our convolver (built once, then the median of
``--repeats`` calls, interleaved with the other operations'), its time over
zero fill, and
``scipy.signal.convolve2d``/``correlate2d`` with the same boundary on the
same frames as dense arrays (the tool users compare with; median of 3 runs
over the first ``--scipy-frames`` frames, scaled to the whole stack), and
the ratio. Every result is checked against scipy first.

    python benchmarks/bench_operations.py                 # 2000 frames
    python benchmarks/bench_operations.py --frames 400 --repeats 3
    python benchmarks/bench_operations.py --markdown table.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.signal

from dask_sparseconv import Convolver, kernels
from dask_sparseconv.sample_data import sample_rois

OPERATIONS = [
    ("convolution, zero fill", {}),
    ("correlation, zero fill", {"correlate": True}),
    ("fill, fillvalue 0.5", {"fillvalue": 0.5}),
    ("boundary wrap", {"boundary": "wrap"}),
    ("boundary symm", {"boundary": "symm"}),
    ("boundary mirror", {"boundary": "mirror"}),
    ("boundary nearest", {"boundary": "nearest"}),
]
SCIPY_BOUNDARY = {"fill": "fill", "wrap": "wrap", "symm": "symm"}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scipy_stack(frames, kernel, boundary, fillvalue, correlate):
    func = scipy.signal.correlate2d if correlate else scipy.signal.convolve2d
    return np.stack([func(f, kernel, "same", boundary=boundary, fillvalue=fillvalue) for f in frames])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scipy-frames", type=int, default=100)
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)

    x = sample_rois(args.frames, (512, 512), seed=0).astype(np.float64)
    kernel = kernels.gaussian(1.0)  # 7 x 7
    dense_head = x[: args.scipy_frames].toarray().reshape(-1, 512, 512)
    convs, results = [], []
    for _label, kw in OPERATIONS:  # build, compile and check everything first
        conv = Convolver((512, 512), kernel, "same", n_threads=1, **kw)
        convs.append(conv)
        results.append(conv(x))
    # interleaved: each repeat times every operation once, so that load from
    # other processes hits all of them alike
    times: list[list[float]] = [[] for _ in OPERATIONS]
    for _ in range(args.repeats):
        for i, conv in enumerate(convs):
            t0 = time.perf_counter()
            conv(x)
            times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    rows = []
    for (label, _), conv, y, ts in zip(OPERATIONS, convs, results, times):
        op = conv.operation
        t_ours = statistics.median(ts)
        if op.boundary in SCIPY_BOUNDARY:
            ref = scipy_stack(dense_head, kernel, op.boundary, op.fillvalue, op.correlate)
            np.testing.assert_allclose(y[: args.scipy_frames].toarray().reshape(ref.shape), ref, atol=1e-12)
            t_scipy = median_time(lambda op=op: scipy_stack(dense_head, kernel, op.boundary, op.fillvalue,
                                                            op.correlate), 3)
            t_scipy *= args.frames / args.scipy_frames
        else:  # scipy.signal has no such boundary: the test suite checks it against scipy.ndimage
            t_scipy = None
        rows.append((label, t_ours, t_ours / base, y.nnz / args.frames, t_scipy))

    head = ["operation", "ours s", "vs zero fill", "output nnz/frame", "scipy.signal s", "scipy / ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t, rel, nnz, ts in rows:
        lines.append(f"| {label} | {t:.3f} | {rel:.2f} | {nnz:,.0f} | "
                     + (f"{ts:.1f} | {ts / t:,.0f}x |" if ts is not None else "- | - |"))
    text = (f"{args.frames} ROI frames 512 x 512 ({x.nnz / args.frames:,.0f} nonzeros/frame), 7 x 7 Gaussian, "
            f"CSR in and out, mode same, 1 thread; medians of {args.repeats} (scipy: 3 runs on "
            f"{args.scipy_frames} frames, scaled)\n\n" + "\n".join(lines))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
