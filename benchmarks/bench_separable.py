"""Benchmark: separable kernels (issue #12, part 4).

Side by side, same process, same inputs, interleaved rounds (each side's
median): our 2-D direct path (``method='direct'``), the forced separable
path (``method='separable'``), ``method='auto'`` (which weighs the two per
call) and sparse_convolution 0.4.2's direct/numba (the peer). Every result
is checked against the 2-D path first.

Two tables:

* **kernel sweep**: the peer's kernel sweep (50 images 100 x 100, density
  0.01, i.i.d. pixels) with a Gaussian of side k (sigma k/6): isolated
  pixels, where separable passes save nothing, so ``auto`` must pick 2-D;
* **ROI stack**: 2000 ROI footprints of 512 x 512 (``sample_rois``, float32),
  Gaussians of side 7 to 31 and a 31 x 31 difference of Gaussians (rank 2).

Target: separable >= 3x faster than the 2-D direct path at k=31 on the ROI
stack; ``auto`` never slower than 2-D (within noise).

    python benchmarks/bench_separable.py
    python benchmarks/bench_separable.py --quick --markdown table.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np
import scipy.sparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_engine import Config, make_input  # noqa: E402

from dask_sparseconv import Convolver, kernels  # noqa: E402
from dask_sparseconv.sample_data import sample_rois  # noqa: E402


def gaussian_of_side(k: int) -> np.ndarray:
    return np.ones((1, 1)) if k == 1 else kernels.gaussian(k / 6.0, size=k)


def dog(k: int) -> np.ndarray:
    return kernels.gaussian(k / 10.0, size=k) - kernels.gaussian(k / 5.0, size=k)


def time_sides(funcs: dict, rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each side, sides interleaved round by round
    (the order rotates, so no side always follows the same one)."""
    acc: dict[str, list[float]] = {name: [] for name in funcs}
    names = list(funcs)
    r = 0
    while r < rounds or min(sum(v) for v in acc.values()) < min_seconds:
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            funcs[name]()
            acc[name].append(time.perf_counter() - t0)
        r += 1
        if r >= 20 * rounds:
            break
    return {name: statistics.median(v) for name, v in acc.items()}


def close(a, b, dtype) -> bool:
    rtol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    d = abs(scipy.sparse.csr_matrix(a) - scipy.sparse.csr_matrix(b))
    scale = max(1.0, float(abs(b).max()))
    return d.nnz == 0 or float(d.max()) <= 4 * rtol * scale


def run_case(label: str, frame_shape, kernel, x, rounds: int, min_seconds: float, peer: bool) -> dict:
    dtype = x.dtype
    k = kernel.astype(dtype)
    direct = Convolver(frame_shape, k, method="direct")
    sep = Convolver(frame_shape, k, method="separable")
    auto = Convolver(frame_shape, k, method="auto")
    funcs = {"direct": lambda: direct(x), "separable": lambda: sep(x), "auto": lambda: auto(x)}
    if peer:
        from sparse_convolution import Toeplitz_convolution2d

        p = Toeplitz_convolution2d(x_shape=frame_shape, k=k, mode="same", method="direct", backend="numba", dtype=dtype)
        funcs["peer"] = lambda: p(x, batching=True)
    ref = direct(x)  # also the warm-up of every side
    checks = {name: close(f(), ref, dtype) for name, f in funcs.items()}
    eng = auto.engine(dtype)
    calls_before = dict(getattr(eng, "calls", {}))
    gc.collect()
    t = time_sides(funcs, rounds, min_seconds)
    calls = getattr(eng, "calls", None)
    if calls is None:
        path = "direct (not weighed)"
    else:
        took = {p: calls[p] - calls_before.get(p, 0) for p in calls}
        path = "separable" if took["separable"] >= took["direct"] else "direct"
    rank = sep.engine(dtype).rank
    return dict(label=label, rank=rank, t=t, path=path, ok=all(checks.values()), checks=checks)


def table(rows: list[dict], title: str, peer: bool) -> str:
    head = ["config", "rank", "2-D direct (ms)", "separable (ms)", "auto (ms)", "auto took"]
    if peer:
        head.append("peer (ms)")
    head += ["2-D / separable", "2-D / auto", "results"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["t"]
        cells = [r["label"], str(r["rank"]), f"{t['direct'] * 1e3:.2f}", f"{t['separable'] * 1e3:.2f}",
                 f"{t['auto'] * 1e3:.2f}", r["path"]]
        if peer:
            cells.append(f"{t['peer'] * 1e3:.2f}")
        cells += [f"{t['direct'] / t['separable']:.2f}x", f"{t['direct'] / t['auto']:.2f}x",
                  "same" if r["ok"] else f"DIFFER {r['checks']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a 400-frame ROI stack")
    ap.add_argument("--frames", type=int, default=None, help="ROI frames (default 2000, --quick 400)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args(argv)
    rounds, min_s = (5, 0.2) if args.quick else (15, 1.0)
    frames = args.frames or (400 if args.quick else 2000)

    sweep = []
    for k in (1, 3, 5, 9, 15, 31):
        cfg = Config("kernel", 100, 100, k, 0.01, 50)
        x = make_input(cfg, np.float64)
        sweep.append(run_case(f"50x100x100 d=0.01 gaussian k={k}", (100, 100), gaussian_of_side(k), x, rounds,
                              min_s, peer=True))
        print(table(sweep[-1:], "", True).splitlines()[-1], flush=True)

    rois = sample_rois(frames, (512, 512), seed=0)  # float32
    roi_rows = []
    cases = [(f"gaussian k={k}", gaussian_of_side(k)) for k in (7, 15, 31)] + [("difference of Gaussians k=31", dog(31))]
    for name, kern in cases:
        roi_rows.append(run_case(f"{frames}x512x512 ROI {name}", (512, 512), kern, rois, rounds, min_s, peer=True))
        print(table(roi_rows[-1:], "", True).splitlines()[-1], flush=True)

    out = "\n\n".join([
        table(sweep, "Kernel sweep (the peer's: i.i.d. pixels, float64), default threads", True),
        table(roi_rows, f"ROI stack ({frames} frames 512 x 512, float32), default threads", True),
    ])
    print()
    print(out)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(out + "\n")


if __name__ == "__main__":
    main()
