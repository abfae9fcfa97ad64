"""convolve_zarr through a cluster started from the command line:
`dask scheduler` plus two `dask worker` processes, reached with
Client(address). Every wait is bounded and the processes are always killed."""

import os

import numpy as np
import pytest
import scipy.sparse
from dask_processes import START_TIMEOUT, DaskProcesses
from pipeline_support import KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import cache_stats, convolve_zarr, open_stack
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

pytestmark = pytest.mark.xdist_group("cluster")

@pytest.fixture
def cli_cluster(tmp_path):
    """Yield the address of a scheduler with two single-threaded workers."""
    procs = DaskProcesses(tmp_path)
    try:
        address = procs.scheduler()
        assert address.startswith("tcp://127.0.0.1:")
        procs.workers(2)
        yield address
    finally:
        procs.stop()


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
