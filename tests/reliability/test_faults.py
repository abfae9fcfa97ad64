"""Faults during a run, with real processes: a dask worker SIGKILLed while
blocks are in flight (the run completes, output identical to a clean run's),
and the client process itself killed (the output is left incomplete, never
looks complete, and the next run resumes it). The input is hashed before
and after: it is never modified."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from reliability_support import (
    assert_identical,
    cli,
    done_count,
    env,
    kill_group,
    provenance,
    stack,
    tree_digest,
    wait_for_blocks,
    write_inputs,
)

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.storage import describe_stack

pytestmark = pytest.mark.xdist_group("cluster")

KERNEL = np.ones((5, 5), dtype=np.float32) / 25
MEMORY = {"dense": "16KiB", "csr": "64KiB"}  # budgets giving 2-image blocks: hundreds of tasks


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_worker_killed_mid_run_output_identical(tmp_path, dask_processes, fmt):
    from distributed import Client

    x = stack(600, 32, 32, density=0.04, seed=3)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    before = tree_digest(src)
    clean, target = str(tmp_path / "clean.zarr"), tmp_path / "out.zarr"
    convolve_zarr(src, KERNEL, clean, "same", output_format=fmt)  # threaded scheduler, for reference

    address = dask_processes.scheduler()
    dask_processes.workers(2)
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=90)
        pids = client.run(os.getpid)  # worker address -> pid of the worker process
        assert len(pids) == 2
        graph = convolve_zarr(src, KERNEL, str(target), "same", output_format=fmt, block_memory=MEMORY[fmt],
                              compute=False)
        n_blocks = sum(1 for k in graph.__dask_graph__() if str(k).startswith("sparseconv-block-"))
        assert n_blocks >= 150
        future = client.compute(graph)
        wait_for_blocks(target, 20, timeout=120)
        # kill a worker that has tasks assigned right now: with a CSR output the
        # carry chain can leave one worker idle for a moment, so a fixed choice
        # sometimes killed a worker with nothing to lose
        for _ in range(100):
            in_flight = client.processing()
            victim_addr = max(sorted(pids), key=lambda a: len(in_flight.get(a, ())))
            if in_flight.get(victim_addr):
                break
            time.sleep(0.01)
        victim = pids[victim_addr]
        os.kill(victim, signal.SIGKILL)
        killed_at = done_count(target)
        summary = future.result(timeout=180)
        survivors = client.run(os.getpid)
    assert killed_at < n_blocks and in_flight.get(victim_addr), "the worker was killed while it had blocks"
    assert victim not in survivors.values()  # it really died (its nanny may have started a new one)
    assert summary.blocks == n_blocks and summary.blocks_computed == n_blocks
    assert provenance(target)["complete"] is True
    assert_identical(target, clean)
    assert tree_digest(src) == before


_CRASHING_CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from dask_sparseconv import convolve_zarr
    convolve_zarr(sys.argv[1], np.ones((5, 5), np.float32) / 25, sys.argv[2], "same",
                  output_format=sys.argv[3], block_memory=sys.argv[4])
""")


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_client_killed_output_incomplete_then_resumed(tmp_path, fmt):
    """SIGKILL of the process running convolve_zarr (a crash: no handler runs)."""
    x = stack(480, 32, 32, density=0.04, seed=5)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    before = tree_digest(src)
    target = tmp_path / "out.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHING_CLIENT, src, str(target), fmt, MEMORY[fmt]], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_blocks(target, 10, proc, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        kill_group(proc)
    written = done_count(target)
    n_blocks = provenance(target)["n_blocks"]
    assert provenance(target)["complete"] is False and 10 <= written < n_blocks
    # every reader can tell: open_stack refuses, describe_stack/info report the progress
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(str(target))
    d = describe_stack(str(target))
    assert d["complete"] is False and d["done_blocks"] == written
    info = cli("info", target)
    assert info.returncode == 0 and "INCOMPLETE" in info.stdout and "again to resume" in info.stdout
    # a second run resumes (markers whose data verifies are skipped; a block cut
    # off mid-write has no marker, or fails verification, and is redone)
    summary = convolve_zarr(src, KERNEL, str(target), "same", output_format=fmt, block_memory=MEMORY[fmt])
    assert summary.resumed and summary.blocks_skipped >= written - 2 and summary.blocks_computed > 0
    assert summary.blocks_skipped + summary.blocks_computed == n_blocks
    clean = str(tmp_path / "clean.zarr")
    convolve_zarr(src, KERNEL, clean, "same", output_format=fmt)
    assert_identical(target, clean)
    assert tree_digest(src) == before
