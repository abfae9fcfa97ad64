"""Benchmark: our direct engine against sparse_convolution 0.4.2's direct/numba.

Both sides are built once per configuration (our ``Convolver(method='direct')``
and the peer's ``Toeplitz_convolution2d(method='direct', backend='numba')``),
warmed up (JIT), checked to give the same CSR result (same sparsity pattern,
allclose values), then timed in alternating blocks of calls, so that load
from other processes hits both equally (see ``time_blocks``). The reported
time is the median call.

Sweeps are the peer's published ones (CSR in, CSR out, mode 'same').

Each configuration runs in a fresh Python process (``--in-process`` to
share one): numba's dispatcher reuses the first specialisation a function
was compiled for when later arguments convert to it, so the peer's speed on
a batch of 10 images depended on what it had seen before (0.37 ms after a
10-image first call, 1.25 ms after a 1-image one, measured 2026-11-25).

    python benchmarks/bench_engine.py                 # everything (< 5 min)
    python benchmarks/bench_engine.py --quick         # fewer repeats
    python benchmarks/bench_engine.py --sweep density --sweep kernel
    python benchmarks/bench_engine.py --markdown results.md
    python benchmarks/bench_engine.py --threads 1       # both single-threaded
    python benchmarks/bench_engine.py --init            # construction + call, one process (the seed's total time)
    python benchmarks/bench_engine.py --init --no-settle  # ... each call right after the other side's
    python benchmarks/bench_engine.py --init --gap-ms 20  # ... each call after the same idle time
    python benchmarks/bench_engine.py --init --by-library  # ... each library's sweep in turn (the seed's grid)
    python benchmarks/bench_engine.py --bandwidth       # large frames: output GB/s against a numpy copy
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dask_sparseconv import Convolver  # noqa: E402


@dataclass(frozen=True)
class Config:
    sweep: str
    H: int
    W: int
    k: int
    density: float
    batch: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.H}x{self.W} k={self.k} d={self.density:g}"


def _sweeps() -> dict[str, list[Config]]:
    batches = (1, 10, 100, 1000, 10000)
    return {
        "batch": [Config("batch", 100, 100, 5, 0.01, b) for b in batches],
        "density": [Config("density", 100, 100, 5, d, 100) for d in (0.0001, 0.001, 0.01, 0.1, 0.5)],
        "size": [Config("size", s, s, 5, 0.01, 50) for s in (32, 64, 128, 256, 512, 1024)],
        "kernel": [Config("kernel", 100, 100, k, 0.01, 50) for k in (1, 3, 5, 9, 15, 31)],
        "batch_d0.1": [Config("batch_d0.1", 100, 100, 5, 0.1, b) for b in batches],
        "very_sparse": [Config("very_sparse", 200, 200, 5, 0.001, b) for b in batches],
    }


SWEEPS = _sweeps()


def make_input(cfg: Config, dtype, seed: int = 0) -> scipy.sparse.csr_matrix:
    """(batch, H*W) CSR with i.i.d. Bernoulli(density) support and uniform values."""
    rng = np.random.default_rng(seed)
    n_pix = cfg.H * cfg.W
    parts = []
    step = max(1, 20_000_000 // n_pix)  # bounded temporary memory
    for a in range(0, cfg.batch, step):
        m = min(step, cfg.batch - a)
        mask = rng.random((m, n_pix)) < cfg.density
        rows, cols = np.nonzero(mask)
        vals = rng.uniform(0.1, 1.0, rows.size).astype(dtype)
        parts.append(scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(m, n_pix)))
    x = scipy.sparse.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    x.sum_duplicates()
    return x


def same_result(a: scipy.sparse.csr_matrix, b: scipy.sparse.csr_matrix, dtype) -> str:
    """'' when a and b have the same shape, sparsity pattern and close values."""
    a, b = scipy.sparse.csr_matrix(a), scipy.sparse.csr_matrix(b)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    a.sort_indices()
    b.sort_indices()
    if a.nnz != b.nnz or not (np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)):
        return f"sparsity differs (nnz {a.nnz} vs {b.nnz})"
    rtol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    if not np.allclose(a.data, b.data, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b.data).max(initial=0)))):
        return "values differ"
    return ""


#: Seconds of uncounted calls at the start of each block.
SETTLE_S = 0.005


def _once(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def time_blocks(f_ours, f_peer, min_total: float, min_rounds: int, max_rounds: int) -> tuple[float, float]:
    """Median seconds per call of each side.

    The two sides run in alternating blocks of calls (ours first in even
    rounds, the peer first in odd ones), so both see the same machine load.
    Not call by call: the peer's OpenMP threads keep spinning for a while
    after a call and slow down whatever runs right after it, and a
    pool thread woken right after the other library's call is slower to
    start. So each block starts with ``SETTLE_S`` of calls that are not
    counted (for calls shorter than that).
    """
    sides = {"ours": (f_ours, []), "peer": (f_peer, [])}
    per_call = {name: _once(f) for name, (f, _) in sides.items()}
    calls = {name: max(1, min(50, math.ceil(0.02 / max(t, 1e-6)))) for name, t in per_call.items()}
    rounds = 0
    while True:
        order = ("ours", "peer") if rounds % 2 == 0 else ("peer", "ours")
        for name in order:
            f, acc = sides[name]
            if per_call[name] < SETTLE_S:  # settling calls after the switch, not counted
                t_end = time.perf_counter() + SETTLE_S
                while time.perf_counter() < t_end:
                    f()
            for _ in range(calls[name]):
                acc.append(_once(f))
        rounds += 1
        totals = [sum(acc) for _, acc in sides.values()]
        if rounds >= max_rounds or (rounds >= min_rounds and min(totals) >= min_total):
            break
    return statistics.median(sides["ours"][1]), statistics.median(sides["peer"][1])


def run_config(cfg: Config, dtype, quick: bool, threads: int | None = None) -> dict:
    from sparse_convolution import Toeplitz_convolution2d

    rng = np.random.default_rng(1)
    kernel = rng.uniform(-1.0, 1.0, (cfg.k, cfg.k)).astype(dtype)
    x = make_input(cfg, dtype)
    ours = Convolver((cfg.H, cfg.W), kernel, mode="same", method="direct", dtype=dtype, n_threads=threads)
    peer = Toeplitz_convolution2d(x_shape=(cfg.H, cfg.W), k=kernel, mode="same", method="direct", backend="numba", dtype=dtype)

    def f_ours():
        return ours(x)

    def f_peer():
        return peer(x, batching=True)

    problem = same_result(f_ours(), f_peer(), dtype)  # also the JIT warm-up
    gc.collect()
    if quick:
        t_o, t_p = time_blocks(f_ours, f_peer, min_total=0.1, min_rounds=2, max_rounds=6)
    else:
        t_o, t_p = time_blocks(f_ours, f_peer, min_total=0.3, min_rounds=4, max_rounds=40)
    return dict(cfg=cfg, ours=t_o * 1e3, peer=t_p * 1e3, speedup=t_p / t_o, nnz=x.nnz, problem=problem)


def _other_threads_ns() -> int | None:
    """CPU time (ns) that this process's threads other than the calling one
    have run (Linux); None where that cannot be read.

    Read from each thread's CPU clock, which is exact: /proc's schedstat of
    a thread running on another core is only brought up to date at scheduler
    ticks (4 ms here), so a spinning thread looked asleep between them.
    """
    me = threading.get_native_id()
    total = 0
    try:
        for tid in map(int, os.listdir("/proc/self/task")):
            if tid != me:
                try:
                    # the thread's CPU clock: Linux's MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
                    total += time.clock_gettime_ns(((~tid) << 3) | 6)
                except OSError:  # the thread has just exited
                    pass
    except (OSError, AttributeError, ValueError):
        return None
    return total


def quiesce(window_s: float = 0.001, limit_s: float = 0.1) -> float:
    """Wait until no other thread of this process has run for ``window_s``
    (at most ``limit_s``); returns the seconds waited.

    After each parallel region the peer's libgomp worker spins on a core for
    ~7-9 ms (measured: 8-9 ms of that thread's CPU time during whatever runs
    next, on 2 cores; ~1.1 ms of it in every 1 ms for the first 7 ms). A
    call started in that time has one core where it would have two. A
    notebook's calls start with every library's threads asleep, so each
    timed call starts so too.
    """
    t0 = time.perf_counter()
    last = _other_threads_ns()
    if last is None:
        time.sleep(0.02)  # no /proc: longer than the spin measured
        return time.perf_counter() - t0
    while time.perf_counter() - t0 < limit_s:
        time.sleep(window_s)
        now = _other_threads_ns() or 0
        if now - last < window_s * 1e9 * 0.05:  # under 5 % of a core: asleep
            break
        last = now
    return time.perf_counter() - t0


#: run_init's waits for quiet threads, by the side whose call came before (seconds)
SETTLE_WAITS: dict[str, list[float]] = {}
#: run_init's idle time before each timed call, from the end of the one before, by the side about to run (seconds)
GAPS: dict[str, list[float]] = {}


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where getrusage has none).

    Reported beside the init + call times: which side's fresh output faults
    its pages in depends on the heap the previous calls left (glibc gives
    memory freed at the top of its heap back to the system), and on this
    VM ~500 faults cost a 1-2 ms call 1.2-1.9 ms (docs/benchmarks.md)."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_init(configs: list[Config], dtype, runs: int, settle: bool = True, gap_s: float = 0.0,
             by_library: bool = False) -> list[dict]:
    """Init + call, the way the seed's grid search and a notebook see it: build
    the drop-in ``Toeplitz_convolution2d(x_shape, k, mode='same')`` and call it
    once on the batch, every configuration in this one process. ``runs``
    interleaved rounds (ours then the peer, then the other way round), after a
    warm-up round that compiles both; the median of each is reported.

    With ``settle`` each timed call starts once the other library's threads
    have gone back to sleep (:func:`quiesce`); without it, right after the
    previous call, so that whichever side follows the peer shares a core
    with its spinning OpenMP thread.

    ``gap_s``: besides, start each timed call at least this long after the
    previous one ended. In the rotation every call of ours follows one of
    the peer's, whose thread spins for ~7-9 ms before it sleeps, and every
    call of the peer's follows one of ours (~1 ms of quiet wait): so ours
    started after ~9 ms of idling and the peer's after ~1 ms, and a 10 ms
    pause alone makes either side's next call up to ~2x slower on this VM
    (docs/benchmarks.md). A gap longer than the spin gives both sides the
    same idle time before their calls, as a notebook's pauses do.

    ``by_library``: each round runs every configuration with one library,
    then every configuration with the other (which one first alternates),
    as the seed's grid search runs one method's sweep after another: each
    call then follows the same library's previous call, in the state that
    library leaves itself in (its threads spinning or not), and the quiet
    wait only comes where the library changes.
    """
    from sparse_convolution import Toeplitz_convolution2d as Peer

    from dask_sparseconv import Toeplitz_convolution2d as Ours

    rng = np.random.default_rng(1)
    cases = []
    for cfg in configs:
        kernel = rng.uniform(-1.0, 1.0, (cfg.k, cfg.k)).astype(dtype)
        cases.append((cfg, kernel, make_input(cfg, dtype)))

    split: dict[tuple, list[float]] = {}  # (side, cfg, 'init' | 'call') -> seconds
    faults: dict[tuple, list[int]] = {}  # (side, cfg) -> minor page faults of each timed step

    def ours(kernel, x, cfg):
        t0 = time.perf_counter()
        conv = Ours((cfg.H, cfg.W), kernel, mode="same")
        split.setdefault(("ours", cfg, "init"), []).append(time.perf_counter() - t0)
        return conv(x, batching=True)

    def peer(kernel, x, cfg):
        t0 = time.perf_counter()
        conv = Peer(x_shape=(cfg.H, cfg.W), k=kernel, mode="same", method="direct", backend="numba")
        split.setdefault(("peer", cfg, "init"), []).append(time.perf_counter() - t0)
        return conv(x, batching=True)

    problems = {cfg: same_result(ours(k, x, cfg), peer(k, x, cfg), dtype) for cfg, k, x in cases}  # warm-up + check
    times: dict[Config, dict[str, list[float]]] = {cfg: {"ours": [], "peer": []} for cfg, _, _ in cases}
    SETTLE_WAITS.clear()
    GAPS.clear()
    previous = "peer"  # the check above ended with a peer call
    last_end = time.perf_counter()
    for r in range(runs):
        gc.collect()
        gc.disable()  # a collection inside a sub-millisecond call would be timed as the call
        try:
            sides = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
            if by_library:  # a whole sweep of one library, then of the other
                steps = [(cfg, k, x, name, f) for name, f in sides for cfg, k, x in cases]
            else:  # the two libraries call by call
                steps = [(cfg, k, x, name, f) for cfg, k, x in cases for name, f in sides]
            for cfg, k, x, name, f in steps:
                if settle and not (by_library and name == previous):
                    SETTLE_WAITS.setdefault(previous, []).append(quiesce())
                idle = time.perf_counter() - last_end
                if idle < gap_s:
                    time.sleep(gap_s - idle)
                f0 = _minor_faults()
                t0 = time.perf_counter()
                GAPS.setdefault(name, []).append(t0 - last_end)
                f(k, x, cfg)
                last_end = time.perf_counter()
                times[cfg][name].append(last_end - t0)
                faults.setdefault((name, cfg), []).append(_minor_faults() - f0)
                previous = name
        finally:
            gc.enable()
    rows = []
    for cfg, _, x in cases:
        t_o, t_p = statistics.median(times[cfg]["ours"]), statistics.median(times[cfg]["peer"])
        # construction alone (the first entry of each list is the warm-up round's)
        i_o = statistics.median(split[("ours", cfg, "init")][1:]) * 1e3
        i_p = statistics.median(split[("peer", cfg, "init")][1:]) * 1e3
        rows.append(dict(cfg=cfg, ours=t_o * 1e3, peer=t_p * 1e3, speedup=t_p / t_o, nnz=x.nnz, problem=problems[cfg],
                         ours_init=i_o, peer_init=i_p,
                         ours_faults=statistics.median(faults[("ours", cfg)]),
                         peer_faults=statistics.median(faults[("peer", cfg)])))
    return rows


def run_bandwidth(cfg: Config, dtype, threads, runs: int) -> dict:
    """Achieved output bandwidth of a memory-bound call against a plain numpy
    copy of the same output (issue #15's large-frame measure).

    The copy floor writes the result's ``data``/``indices``/``indptr`` into
    newly allocated arrays (``np.empty`` + ``np.copyto``), as a call must:
    its output is new memory each time. ``runs`` rounds, the three contenders
    interleaved (ours, the peer, the copy; order rotated), medians.
    """
    from sparse_convolution import Toeplitz_convolution2d

    rng = np.random.default_rng(1)
    kernel = rng.uniform(-1.0, 1.0, (cfg.k, cfg.k)).astype(dtype)
    x = make_input(cfg, dtype)
    ours = Convolver((cfg.H, cfg.W), kernel, mode="same", method="direct", dtype=dtype, n_threads=threads)
    peer = Toeplitz_convolution2d(x_shape=(cfg.H, cfg.W), k=kernel, mode="same", method="direct", backend="numba", dtype=dtype)
    ref = ours(x)
    problem = same_result(ref, peer(x, batching=True), dtype)
    parts = (ref.data, ref.indices, ref.indptr)
    out_bytes = sum(a.nbytes for a in parts)
    in_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes

    def copy():
        for a in parts:
            np.copyto(np.empty_like(a), a)

    sides = {"ours": (lambda: ours(x)), "peer": (lambda: peer(x, batching=True)), "copy": copy}
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(runs):
        for name in names[r % 3:] + names[: r % 3]:
            gc.collect()
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    t = {name: statistics.median(v) for name, v in times.items()}
    return dict(cfg=cfg, out_bytes=out_bytes, in_bytes=in_bytes, nnz_out=ref.nnz, problem=problem, **t)


def format_bandwidth(rows: list[dict]) -> str:
    head = ("config", "output MB", "ours (ms)", "peer (ms)", "copy (ms)", "ours GB/s", "copy GB/s", "ours/copy", "check")
    body = [
        (r["cfg"].label, f"{r['out_bytes'] / 1e6:.1f}", f"{r['ours'] * 1e3:.2f}", f"{r['peer'] * 1e3:.2f}",
         f"{r['copy'] * 1e3:.2f}", f"{r['out_bytes'] / r['ours'] / 1e9:.2f}", f"{r['out_bytes'] / r['copy'] / 1e9:.2f}",
         f"{r['ours'] / r['copy']:.2f}x", r["problem"] or "ok")
        for r in rows
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])


def format_table(rows: list[dict], markdown: bool) -> str:
    split = bool(rows) and "ours_init" in rows[0]
    head = ("sweep", "config", "ours (ms)", "peer (ms)", "speedup", "check") + (
        ("ours init (ms)", "peer init (ms)", "faults ours/peer") if split else ())
    body = [
        (r["cfg"].sweep, r["cfg"].label, f"{r['ours']:.3f}", f"{r['peer']:.3f}", f"{r['speedup']:.2f}x", r["problem"] or "ok")
        + ((f"{r['ours_init']:.3f}", f"{r['peer_init']:.3f}", f"{r['ours_faults']:g}/{r['peer_faults']:g}")
           if split else ())
        for r in rows
    ]
    geo = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows)) if rows else float("nan")
    worst = min((r["speedup"] for r in rows), default=float("nan"))
    foot = f"geometric mean speedup (peer/ours): {geo:.2f}x over {len(rows)} configs; lowest {worst:.2f}x"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines) + f"\n\n{foot}\n"
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
    return "\n".join(lines) + "\n" + foot


def _run_child(name: str, index: int, args) -> dict:
    """One configuration in a fresh interpreter (see the module docstring)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{name}:{index}", "--dtype", args.dtype]
    if args.quick:
        cmd.append("--quick")
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (noisier, ~4x faster)")
    ap.add_argument("--sweep", action="append", choices=sorted(SWEEPS), help="run only this sweep (repeatable)")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--markdown", metavar="PATH", help="also write the table as markdown to PATH")
    ap.add_argument(
        "--threads", type=int, metavar="N",
        help="threads for both libraries (ours: n_threads; peer: numba.set_num_threads); default: each one's default, all CPUs",
    )
    ap.add_argument("--in-process", action="store_true",
                    help="run every configuration in this process (faster; see the module docstring for why not)")
    ap.add_argument("--init", action="store_true",
                    help="time construction plus one call of the drop-in class, every configuration in one process "
                         "(the seed's total time), medians of --runs interleaved rounds")
    ap.add_argument("--runs", type=int, default=7, help="rounds for --init (default 7)")
    ap.add_argument("--no-settle", dest="settle", action="store_false",
                    help="--init: start each call right after the previous one, without waiting for the other "
                         "library's threads to stop spinning (see quiesce)")
    ap.add_argument("--gap-ms", type=float, default=0.0, metavar="MS",
                    help="--init: start each timed call at least MS milliseconds after the previous one ended, so "
                         "that both sides start from the same idle time (see run_init); default 0")
    ap.add_argument("--by-library", action="store_true",
                    help="--init: in each round, every configuration with one library, then with the other (as the "
                         "seed's grid search runs one method after another), instead of alternating call by call")
    ap.add_argument("--bandwidth", action="store_true",
                    help="output bandwidth of the largest frames (50x512x512, 50x1024x1024) against a numpy copy of "
                         "the same output, --runs interleaved rounds")
    ap.add_argument("--one", metavar="SWEEP:INDEX", help=argparse.SUPPRESS)  # a child process: one config, JSON out
    args = ap.parse_args(argv)
    if args.threads is not None:
        import numba

        numba.set_num_threads(args.threads)

    dtype = np.dtype(args.dtype)
    names = args.sweep or list(SWEEPS)
    rows = []
    t_start = time.perf_counter()
    if args.one:
        name, index = args.one.split(":")
        r = run_config(SWEEPS[name][int(index)], dtype, args.quick, args.threads)
        print(json.dumps({k: v for k, v in r.items() if k != "cfg"}))
        return 0
    if args.bandwidth:
        big = [cfg for cfg in SWEEPS["size"] if cfg.H >= 512]
        rows = [run_bandwidth(cfg, dtype, args.threads, max(args.runs, 9)) for cfg in big]
        print(f"# output bandwidth, medians of {max(args.runs, 9)} interleaved rounds; dtype={dtype}, mode='same', "
              f"CSR in/out, {os.cpu_count()} CPUs, threads={args.threads or 'default'}")
        print(format_bandwidth(rows))
        return 1 if any(r["problem"] for r in rows) else 0
    if args.init:
        if args.gap_ms < 0:
            ap.error(f"--gap-ms must be >= 0; got {args.gap_ms}")
        rows = run_init([cfg for name in names for cfg in SWEEPS[name]], dtype, args.runs, args.settle,
                        args.gap_ms / 1e3, args.by_library)
        for r in rows:
            print(f"  {r['cfg'].sweep:12s} {r['cfg'].label:32s} ours {r['ours']:9.3f} ms  peer {r['peer']:9.3f} ms  "
                  f"{r['speedup']:5.2f}x  {r['problem'] or 'ok'}", file=sys.stderr, flush=True)
    for name in names if not args.init else ():
        for index, cfg in enumerate(SWEEPS[name]):
            if args.in_process:
                r = run_config(cfg, dtype, args.quick, args.threads)
            else:
                r = dict(cfg=cfg, **_run_child(name, index, args))
            rows.append(r)
            print(
                f"  {cfg.sweep:12s} {cfg.label:32s} ours {r['ours']:9.3f} ms  peer {r['peer']:9.3f} ms  "
                f"{r['speedup']:5.2f}x  {r['problem'] or 'ok'}",
                file=sys.stderr,
                flush=True,
            )
    threads = args.threads or "default"
    what = (f"init + call, one process, medians of {args.runs} interleaved runs, "
            f"{'each call started on quiet threads' if args.settle else 'calls back to back'}"
            f"{f', at least {args.gap_ms:g} ms after the previous call' if args.gap_ms else ''}"
            f"{', one library after the other' if args.by_library else ''}") if args.init else "call only"
    print(f"# {what}; dtype={dtype}, mode='same', CSR in/out, {os.cpu_count()} CPUs, threads={threads}, "
          f"{time.perf_counter() - t_start:.0f} s")
    print(format_table(rows, markdown=False))
    if args.init and SETTLE_WAITS:
        print("# waits for quiet threads before a call, median (max): "
              + ", ".join(f"after {side}'s call {statistics.median(w) * 1e3:.1f} ms ({max(w) * 1e3:.1f})"
                          for side, w in sorted(SETTLE_WAITS.items())))
    if args.init and GAPS:
        print("# idle time before a timed call, median (max): "
              + ", ".join(f"before {side}'s {statistics.median(w) * 1e3:.1f} ms ({max(w) * 1e3:.1f})"
                          for side, w in sorted(GAPS.items())))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"dtype={dtype}, mode='same', CSR in -> CSR out, {os.cpu_count()} CPUs, threads={threads}\n\n")
            fh.write(format_table(rows, markdown=True))
    return 1 if any(r["problem"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
