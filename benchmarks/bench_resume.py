"""Resume benchmark (issue #11): what a resumed run costs next to a clean one.

Two views, each on its own table:

* **cli**: ``dask-sparseconv run wf.yaml`` is started, interrupted with
  Ctrl-C (SIGINT) once a given share of its row blocks is reported done, and
  the same command is run again. The resumed command's wall time (all of it:
  Python start and imports, the plan, the lock, starting the local cluster,
  the input fingerprint, verifying the written blocks, the blocks left,
  finalize) is compared with a clean command's.
* **api**: a notebook or cluster user with a running ``LocalCluster``:
  ``convolve_zarr`` is built with ``compute=False`` and only the first share
  of its block tasks is computed (what an interrupted run leaves behind),
  then ``convolve_zarr`` is called again; its wall time is compared with a
  clean ``convolve_zarr`` on the same cluster.

Target (issue #11): ``resumed / clean <= fraction left + 0.15``. Runs go in
rounds (a clean run, then each share's interrupted and resumed run), and a
point counts as met only when both the ratio of the medians and the median
of each round's own ratio (resumed over that round's clean run) are within
it.

Workloads (both on a local cluster of 2 worker processes x 1 thread):

1. dense: 6000 frames 256 x 256 float32, 2 % nonzero (uniform), 9 x 9
   Gaussian, dense zarr in and out;
2. csr: ROI footprints (0-3 soft disks of radius 8 per 512 x 512 frame),
   anndata CSR in and out, 7 x 7 Gaussian, with a 4 MiB block budget: many
   blocks, each writing the final chunks that end in it (the carry chain of
   docs/storage.md), so a resumed run has written blocks to keep and the
   values of the first unfinished chunk to recompute.

The interrupt point is read from the CLI's own progress lines (``progress:
K/N blocks``), so "25 %" means at least a quarter of the blocks were reported
done when SIGINT was sent; the table shows the blocks the resumed run
actually skipped. Each resumed run's output is checked against the clean
run's, array by array.

Usage::

    python benchmarks/bench_resume.py                # full sizes
    python benchmarks/bench_resume.py --quick        # small sizes, for development
    python benchmarks/bench_resume.py --repeats 3 --json resume.json
    python benchmarks/bench_resume.py --only csr --view cli --csr-frames 80000   # a larger CSR job
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_pipeline import gaussian_kernel, roi_csr  # noqa: E402  (shared data generators)

PROGRESS = re.compile(r"progress: (\d+)/(\d+) blocks")
RESUMED = re.compile(r"resumed:\s+([\d,]+) blocks computed, ([\d,]+) skipped")


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def write_dense_uniform(path: str, n: int, H: int, W: int, density: float, chunk: int, seed: int = 0) -> None:
    import zarr

    arr = zarr.create_array(path, shape=(n, H, W), chunks=(chunk, H, W), dtype="float32", overwrite=True)
    rng = np.random.default_rng(seed)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        vals = rng.random((b - a, H, W), dtype=np.float32)
        mask = rng.random((b - a, H, W)) < density
        arr[a:b] = np.where(mask, vals + np.float32(0.5), np.float32(0))


def write_roi_csr(path: str, n: int, H: int, W: int) -> None:
    from dask_sparseconv.storage import write_csr_stack

    write_csr_stack(path, roi_csr(n, H, W), (H, W), overwrite=True)


def workflow(folder: str, src: str, kernel_file: str, fmt: str, memory: str) -> str:
    wf = os.path.join(folder, "wf.yaml")
    with open(wf, "w") as f:
        f.write(textwrap.dedent(f"""
            input: {{path: {src}}}
            kernel: {{file: {kernel_file}}}
            mode: same
            output: {{path: out.zarr, format: {fmt}}}
            cluster: {{n_workers: 2, threads_per_worker: 1, memory_limit: 2GiB, dashboard_address: null}}
            block: {{memory: {memory}}}
        """))
    return wf


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------
def _cli() -> list[str]:
    # the command installed beside this Python: on PATH there may be a
    # wrapper instead (pyenv's shim adds ~0.08 s to every command here)
    exe = os.path.join(os.path.dirname(sys.executable), "dask-sparseconv")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("dask-sparseconv")
    return [exe] if exe else [sys.executable, "-m", "dask_sparseconv.cli"]


def settle() -> None:
    """Write the page cache's dirty pages out before a timed run: a dense
    run leaves ~1 GB of output behind, and the kernel's write-back of it
    (from 30 s on) otherwise lands in whichever run comes next."""
    if hasattr(os, "sync"):
        os.sync()


def run_cli(folder: str, *args: str) -> tuple[float, str, str]:
    settle()
    t0 = time.perf_counter()
    p = subprocess.run(_cli() + list(args), cwd=folder, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"dask-sparseconv {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return dt, p.stdout, p.stderr


def interrupt_at(folder: str, wf: str, share: float) -> int:
    """Run ``wf`` and send SIGINT once ``share`` of its blocks are reported done; return the exit code."""
    # a benchmark started in the background of a shell inherits an ignored
    # SIGINT, and so would the command: give it Ctrl-C back
    proc = subprocess.Popen(_cli() + ["run", wf], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:
            m = PROGRESS.search(line)
            if m and int(m.group(2)) and int(m.group(1)) >= share * int(m.group(2)):
                proc.send_signal(signal.SIGINT)
                break
        proc.stderr.read()
        return proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def same_output(a: str, b: str) -> bool:
    import zarr

    ga, gb = zarr.open(a, mode="r"), zarr.open(b, mode="r")
    if isinstance(ga, zarr.Array):
        return bool(np.array_equal(ga[:], gb[:]))
    return all(np.array_equal(ga[k][:], gb[k][:]) for k in ("data", "indices", "indptr"))


def _row(name: str, view: str, share: float, cleans: list[float], times: list[float], computed: list[int],
         skipped: list[int], ok: bool) -> dict:
    left = statistics.median(c / (c + s) for c, s in zip(computed, skipped))
    clean, resumed = statistics.median(cleans), statistics.median(times)
    # each resumed run over its own round's clean run: the two ran minutes
    # apart at most, in the same spell of the host
    paired = statistics.median(t / c for t, c in zip(times, cleans))
    target = left + 0.15
    return {"workload": name, "view": view, "interrupt_at": share, "clean_s": clean, "resumed_s": resumed,
            "fraction_left": left, "ratio": resumed / clean, "paired_ratio": paired, "target": target,
            "met": max(resumed / clean, paired) <= target, "identical": ok, "blocks": computed[0] + skipped[0],
            "clean_runs": cleans, "resumed_runs": times}


def bench(name: str, folder: str, wf: str, shares: list[float], repeats: int) -> list[dict]:
    """The cli view. Each repeat is a round: a clean run, then one interrupted
    and resumed run per share, so that the host's slower and faster spells
    (+-15 % over minutes on the 2-vCPU VM) reach clean and resumed runs alike
    rather than whichever block of runs they fall on."""
    out = os.path.join(folder, "out.zarr")
    clean_copy = os.path.join(folder, "clean.zarr")
    cleans: list[float] = []
    runs: dict[float, dict[str, list]] = {s: {"times": [], "computed": [], "skipped": [], "ok": []} for s in shares}
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        dt, _, _ = run_cli(folder, "run", wf)
        cleans.append(dt)
        if not os.path.exists(clean_copy):
            shutil.copytree(out, clean_copy)
        for share in shares:
            for _attempt in range(3):  # SIGINT can land after the last block: that run finished, try again
                shutil.rmtree(out, ignore_errors=True)
                rc = interrupt_at(folder, wf, share)
                if rc == 130:
                    break
            else:
                raise RuntimeError(f"{name}: the interrupted run exited {rc}, not 130, three times")
            dt, stdout, _ = run_cli(folder, "run", wf)
            m = RESUMED.search(stdout)
            if not m:
                raise RuntimeError(f"{name}: the second run did not resume:\n{stdout}")
            c, s = (int(g.replace(",", "")) for g in m.groups())
            r = runs[share]
            r["times"].append(dt)
            r["computed"].append(c)
            r["skipped"].append(s)
            r["ok"].append(same_output(out, clean_copy))
    shutil.rmtree(clean_copy, ignore_errors=True)
    return [_row(name, "cli", share, cleans, r["times"], r["computed"], r["skipped"], all(r["ok"]))
            for share, r in runs.items()]


def bench_api(name: str, folder: str, src: str, kernel: np.ndarray, fmt: str, memory: str, shares: list[float],
              repeats: int) -> list[dict]:
    """The api view (see the module docs) on one LocalCluster of 2 workers x 1
    thread, in rounds as :func:`bench`: a clean call, then each share's."""
    from dask.delayed import Delayed
    from distributed import Client, LocalCluster

    import dask_sparseconv as dsc

    out = os.path.join(folder, "out_api.zarr")
    clean_copy = os.path.join(folder, "clean_api.zarr")
    kw = dict(output_format=fmt, block_memory=memory)
    cleans: list[float] = []
    runs: dict[float, dict[str, list]] = {s: {"times": [], "computed": [], "skipped": [], "ok": []} for s in shares}
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="2GiB", dashboard_address=None) as lc, \
            Client(lc) as client:
        shutil.rmtree(out, ignore_errors=True)
        dsc.convolve_zarr(src, kernel, out, **kw)  # warm-up: compile on the workers
        shutil.rmtree(clean_copy, ignore_errors=True)
        shutil.copytree(out, clean_copy)
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            settle()
            t0 = time.perf_counter()
            dsc.convolve_zarr(src, kernel, out, **kw)
            cleans.append(time.perf_counter() - t0)
            for share in shares:
                shutil.rmtree(out, ignore_errors=True)
                graph = dsc.convolve_zarr(src, kernel, out, compute=False, **kw)
                hlg = graph.__dask_graph__()
                keys = sorted(k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-"))
                client.compute([Delayed(k, hlg) for k in keys[: int(share * len(keys))]], sync=True)
                del graph, hlg
                lock = out.rstrip("/") + ".lock"
                if os.path.exists(lock):  # the interrupted "run" is this process: nobody releases it
                    os.unlink(lock)
                settle()
                t0 = time.perf_counter()
                s = dsc.convolve_zarr(src, kernel, out, **kw)
                r = runs[share]
                r["times"].append(time.perf_counter() - t0)
                r["computed"].append(s.blocks_computed)
                r["skipped"].append(s.blocks - s.blocks_computed)
                r["ok"].append(same_output(out, clean_copy))
    shutil.rmtree(clean_copy, ignore_errors=True)
    return [_row(name, "api", share, cleans, r["times"], r["computed"], r["skipped"], all(r["ok"]))
            for share, r in runs.items()]


def print_table(rows: list[dict]) -> None:
    print()
    print("| view | workload | interrupted at | blocks left | clean (s) | resumed (s) | resumed/clean | "
          "per round | target (left + 0.15) | met (both) | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['view']} | {r['workload']} | {r['interrupt_at']:.0%} | {r['fraction_left']:.0%} of {r['blocks']} | "
              f"{r['clean_s']:.2f} | {r['resumed_s']:.2f} | {r['ratio']:.2f} | {r['paired_ratio']:.2f} | "
              f"{r['target']:.2f} | {'yes' if r['met'] else 'NO'} | {'yes' if r['identical'] else 'NO'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (development)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; medians are reported")
    ap.add_argument("--only", choices=("dense", "csr"), default=None)
    ap.add_argument("--view", choices=("cli", "api"), default=None, help="one view only (default: both)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--csr-frames", type=int, default=None, metavar="N",
                    help="frames of the CSR workload (default 40000, 4000 with --quick): the command's fixed start "
                         "is a smaller share of a larger job")
    args = ap.parse_args(argv)
    if args.csr_frames is not None and args.csr_frames < 1:
        ap.error(f"--csr-frames must be a positive number of frames; got {args.csr_frames}")
    shares = [0.25, 0.5, 0.75]
    rows = []
    # name: (frames full/quick, writer, kernel, output format, block budget)
    workloads = {
        "dense": ((6000, 600), lambda p, n: write_dense_uniform(p, n, 256, 256, 0.02, chunk=16),
                  gaussian_kernel(9, 2.0), "dense", "64MiB", "dense {n} x 256 x 256, 2 %, 9 x 9"),
        "csr": ((40000, 4000), lambda p, n: write_roi_csr(p, n, 512, 512),
                gaussian_kernel(7, 1.5), "csr", "4MiB", "csr ROI {n} x 512 x 512, 7 x 7"),
    }
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        for key, ((full, quick), write, kernel, fmt, memory, label) in workloads.items():
            if args.only not in (None, key):
                continue
            folder = os.path.join(tmp, key)
            os.makedirs(folder)
            n = quick if args.quick else full
            if key == "csr" and args.csr_frames is not None:
                n = args.csr_frames
            src = os.path.join(folder, "in.zarr")
            write(src, n)
            np.save(os.path.join(folder, "k.npy"), kernel)
            wf = workflow(folder, "in.zarr", "k.npy", fmt, memory)
            name = label.format(n=n)
            if args.view in (None, "cli"):
                rows += bench(name, folder, wf, shares, args.repeats)
            if args.view in (None, "api"):
                rows += bench_api(name, folder, src, kernel, fmt, memory, shares, args.repeats)
            print_table(rows)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
