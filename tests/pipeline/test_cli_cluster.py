"""convolve_zarr through a cluster started from the command line:
`dask scheduler` plus two `dask worker` processes, reached with
Client(address). Every wait is bounded and the processes are always killed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse

from dask_sparseconv import cache_stats, convolve_zarr, open_stack
from dask_sparseconv.storage import write_csr_stack, write_dense_stack
from pipeline_support import KERNEL, assert_matches, reference, sparse_stack

pytestmark = pytest.mark.xdist_group("cluster")

START_TIMEOUT = 90  # seconds, for the scheduler file and for the workers to register


def _stop(proc, timeout=10):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _tail(path, n=2000):
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def cli_cluster(tmp_path):
    """Yield the address of a scheduler with two single-threaded workers."""
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    sched_file = tmp_path / "scheduler.json"
    procs, logs = [], []

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                                      cwd=tmp_path, env=env))
        return procs[-1]

    try:
        sched = start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                       "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.monotonic() + START_TIMEOUT
        address = None
        while time.monotonic() < deadline:
            if sched.poll() is not None:
                pytest.fail(f"dask scheduler exited with {sched.returncode}:\n{_tail(tmp_path / 'scheduler.log')}")
            if sched_file.exists():
                try:
                    address = json.loads(sched_file.read_text())["address"]
                    break
                except (ValueError, KeyError):
                    pass  # partially written
            time.sleep(0.1)
        if address is None:
            pytest.fail(f"no scheduler file after {START_TIMEOUT} s:\n{_tail(tmp_path / 'scheduler.log')}")
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            start(["worker", address, "--nthreads", "1", "--nworkers", "1", "--memory-limit", "1GB",
                   "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(tmp_path / f"w{i}"),
                   "--name", f"cli-worker-{i}"], f"worker{i}")
        yield address
    finally:
        for p in reversed(procs):
            _stop(p)
        for log in logs:
            log.close()


def test_convolve_zarr_through_cli_started_cluster(cli_cluster, tmp_path):
    from distributed import Client

    x = sparse_stack(60, 24, 20, density=0.03, seed=31)
    dense_src, csr_src = str(tmp_path / "in_dense.zarr"), str(tmp_path / "in_csr.zarr")
    write_dense_stack(dense_src, x, chunks=6)
    write_csr_stack(csr_src, scipy.sparse.csr_matrix(x.reshape(60, -1)), (24, 20), chunk_size=128)
    with Client(cli_cluster, timeout=START_TIMEOUT) as client:
        client.wait_for_workers(2, timeout=START_TIMEOUT)
        assert sum(client.nthreads().values()) == 2
        a = convolve_zarr(dense_src, KERNEL, str(tmp_path / "a.zarr"), "full", output_format="csr", block_memory=40_000)
        b = convolve_zarr(csr_src, KERNEL, str(tmp_path / "b.zarr"), "valid", output_format="dense", block_memory=40_000)
        stats = client.run(cache_stats)
        pids = set(client.run(os.getpid).values())
    assert a.blocks > 2 and b.blocks > 2
    assert set(a.extra["worker_pids"]) <= pids and os.getpid() not in pids
    assert_matches(open_stack(str(tmp_path / "a.zarr")).compute(), reference(x, KERNEL, "full"))
    assert_matches(open_stack(str(tmp_path / "b.zarr")).compute(), reference(x, KERNEL, "valid"))
    # two keys (full, valid) at most once per worker each
    assert sum(s["builds"] for s in stats.values()) <= 4
    assert np.isfinite(a.elapsed) and a.elapsed > 0
