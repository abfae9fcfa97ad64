"""The command's local workers' allocator (runtime/allocator.py) against distributed's setting.

``dask-sparseconv run`` on the resume benchmark's two workloads (bench_resume.py:
6000 x 256 x 256 dense, 9 x 9; 40,000 ROI frames of 512 x 512 CSR, 7 x 7; local
cluster of 2 workers x 1 thread), alternating:

* **distributed**: the workers start with distributed's ``MALLOC_TRIM_THRESHOLD_=65536``
  (set here in the command's environment, which the command then leaves alone);
* **ours**: the command's default, glibc's heap serving and keeping a block's memory.

Reported: medians of the command's wall time and of its compute time (the summary's
``time:`` line), their ratio, and the workers' peak resident memory (sampled every
20 ms). Each output is compared with the first run's.

Usage::

    python benchmarks/bench_allocator.py [--repeats 5] [--only dense|csr]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_pipeline import gaussian_kernel  # noqa: E402
from bench_resume import _cli, same_output, workflow, write_dense_uniform, write_roi_csr  # noqa: E402

TIME = re.compile(r"time:\s+([\d.]+) s")
SETTINGS = {"distributed": {"MALLOC_TRIM_THRESHOLD_": "65536"}, "ours": {}}


def run(folder: str, wf: str, extra_env: dict) -> tuple[float, float, int]:
    """``(wall s, compute s, peak RSS of the largest worker in bytes)`` of one command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env)
    shutil.rmtree(os.path.join(folder, "out.zarr"), ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cli() + ["run", wf], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    me, peak, parents = psutil.Process(proc.pid), {}, set()
    while proc.poll() is None:
        try:
            # the workers: the command's descendants never seen with children
            # of their own (not the fork server, which is their parent)
            for p in me.children(recursive=True):
                try:
                    if p.children():
                        parents.add(p.pid)
                    peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.02)
    peak = {pid: rss for pid, rss in peak.items() if pid not in parents}
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"the command failed ({proc.returncode}):\n{out}")
    m = TIME.search(out)
    return wall, float(m.group(1)) if m else float("nan"), max(peak.values(), default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=("dense", "csr"), default=None)
    args = ap.parse_args(argv)
    workloads = {
        "dense 6000 x 256 x 256, 9 x 9": ("dense", lambda p: write_dense_uniform(p, 6000, 256, 256, 0.02, chunk=16),
                                          gaussian_kernel(9, 2.0), "dense", "64MiB"),
        "csr ROI 40000 x 512 x 512, 7 x 7": ("csr", lambda p: write_roi_csr(p, 40000, 512, 512),
                                             gaussian_kernel(7, 1.5), "csr", "4MiB"),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_allocator_") as tmp:
        for label, (key, write, kernel, fmt, memory) in workloads.items():
            if args.only not in (None, key):
                continue
            folder = os.path.join(tmp, key)
            os.makedirs(folder)
            write(os.path.join(folder, "in.zarr"))
            np.save(os.path.join(folder, "k.npy"), kernel)
            wf = workflow(folder, "in.zarr", "k.npy", fmt, memory)
            res: dict[str, list] = {name: [] for name in SETTINGS}
            first = os.path.join(folder, "first.zarr")
            ok = True
            for _ in range(args.repeats):
                for name, extra in SETTINGS.items():
                    res[name].append(run(folder, wf, extra))
                    out = os.path.join(folder, "out.zarr")
                    if not os.path.exists(first):
                        shutil.copytree(out, first)
                    else:
                        ok = ok and same_output(out, first)
            med = {name: [statistics.median(r[i] for r in runs) for i in range(3)] for name, runs in res.items()}
            pairs = [o[0] / d[0] for o, d in zip(res["ours"], res["distributed"])]
            rows.append((label, med, statistics.median(pairs), ok))
    print()
    print("| workload | distributed: wall / compute (s) | ours: wall / compute (s) | ours/distributed wall "
          "(median of pairs) | worker peak RSS (MiB) distributed / ours | identical |")
    print("|---|---|---|---|---|---|")
    for label, med, pair, ok in rows:
        d, o = med["distributed"], med["ours"]
        print(f"| {label} | {d[0]:.2f} / {d[1]:.1f} | {o[0]:.2f} / {o[1]:.1f} | {o[0] / d[0]:.2f} ({pair:.2f}) | "
              f"{d[2] / 2**20:.0f} / {o[2] / 2**20:.0f} | {'yes' if ok else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
