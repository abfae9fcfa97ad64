"""The pipeline on a real distributed.LocalCluster (2 worker processes x 1
thread): results against scipy, one convolver build per worker for 100
blocks, and an out-of-core run whose workers' RSS is measured."""

import os
import threading
import time

import numpy as np
import psutil
import pytest
import scipy.sparse
import zarr
from pipeline_support import EVEN_KERNEL, KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import cache_stats, convolve, convolve_zarr, open_stack
from dask_sparseconv.row_blocks import image_bytes
from dask_sparseconv.runtime.cache import clear_cache
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

pytestmark = pytest.mark.xdist_group("cluster")


@pytest.fixture(scope="module")
def client(local_cluster):
    from distributed import Client

    with Client(local_cluster) as c:
        yield c


@pytest.mark.parametrize("in_fmt, out_fmt, mode", [("dense", "csr", "same"), ("csr", "dense", "full"), ("csr", "csr", "valid")])
def test_cluster_results_match_scipy(client, tmp_path, in_fmt, out_fmt, mode):
    x = sparse_stack(45, 21, 17, density=0.04, seed=21)
    src = str(tmp_path / "in.zarr")
    if in_fmt == "dense":
        write_dense_stack(src, x, chunks=4)
    else:
        write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(45, -1)), (21, 17), chunk_size=64)
    target = str(tmp_path / "out.zarr")
    kernel = EVEN_KERNEL if mode == "same" else KERNEL
    summary = convolve_zarr(src, kernel, target, mode, output_format=out_fmt, block_memory=30_000)
    assert summary.blocks > 2
    assert len(summary.extra["worker_pids"]) >= 1
    assert os.getpid() not in summary.extra["worker_pids"]  # ran on the workers
    assert_matches(open_stack(target).compute(), reference(x, kernel, mode))


def test_csr_chain_writes_on_both_workers(client, tmp_path):
    """A CSR output on two worker processes: each worker writes the blocks it
    computed (the carries travel between them), and the result is exact."""
    x = sparse_stack(200, 40, 36, density=0.03, seed=24)
    src = str(tmp_path / "in.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(200, -1)), (40, 36), chunk_size=500)
    target = str(tmp_path / "out.zarr")
    summary = convolve_zarr(src, KERNEL, target, "full", block_memory=40_000)
    assert summary.blocks >= 8
    assert len(summary.extra["worker_pids"]) == 2  # both workers computed and wrote blocks
    result = open_stack(target).compute()
    assert summary.nnz_out == result.nnz
    assert_matches(result, reference(x, KERNEL, "full"))


def test_lazy_array_on_cluster(client):
    x = sparse_stack(30, 12, 12, seed=22)
    y = convolve(x, KERNEL, "full", block_memory=15_000)
    assert y.numblocks[0] > 2
    assert_matches(client.compute(y).result(), reference(x, KERNEL, "full"))


def test_compute_false_with_client_compute(client, tmp_path):
    x = sparse_stack(20, 10, 10, seed=23)
    src = str(tmp_path / "in.zarr")
    write_dense_stack(src, x, chunks=3)
    graph = convolve_zarr(src, KERNEL, str(tmp_path / "out.zarr"), compute=False)
    summary = client.compute(graph).result()
    assert summary.n_images == 20
    assert_matches(open_stack(str(tmp_path / "out.zarr")).compute(), reference(x, KERNEL, "same"))


def test_100_blocks_on_2_workers_build_at_most_2_convolvers(client, tmp_path):
    n, H, W = 100, 16, 16
    x = sparse_stack(n, H, W, density=0.05, seed=24)
    csr = scipy.sparse.csr_matrix(x.reshape(n, -1))
    src = str(tmp_path / "in.zarr")
    write_csr_stack(src, csr, (H, W))
    per_image = image_bytes((H, W), (H, W), 4, 4, in_format="csr", out_format="csr", nnz_per_image=csr.nnz / n,
                            kernel_size=np.count_nonzero(KERNEL))
    client.run(clear_cache)
    summary = convolve_zarr(src, KERNEL, str(tmp_path / "out.zarr"), block_memory=per_image)
    assert summary.blocks == 100
    stats = client.run(cache_stats)
    assert len(stats) == 2
    builds = sum(s["builds"] for s in stats.values())
    lookups = sum(s["hits"] + s["misses"] for s in stats.values())
    assert lookups == 100  # one cache lookup per block task
    assert 1 <= builds <= 2
    assert all(s["size"] <= 1 for s in stats.values())
    assert_matches(open_stack(str(tmp_path / "out.zarr")).compute(), reference(x, KERNEL, "same"))


def _write_big_sparse_dense_store(path, n, H, W, chunk, seed=0):
    """A dense float32 stack of n frames with ~8 nonzeros each, written chunk by chunk."""
    from zarr.codecs import BloscCodec

    rng = np.random.default_rng(seed)
    z = zarr.create_array(path, shape=(n, H, W), chunks=(chunk, H, W), dtype="float32", fill_value=0,
                          compressors=[BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")])
    buf = np.zeros((chunk, H, W), np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        buf[:] = 0
        k = (b - a) * 8
        buf[rng.integers(0, b - a, k), rng.integers(0, H, k), rng.integers(0, W, k)] = rng.random(k, dtype=np.float32) + 0.5
        z[a:b] = buf[: b - a]
    return z


class _RSSSampler:
    """Sample the RSS of some processes every ``interval`` seconds in a thread."""

    def __init__(self, pids, interval=0.05):
        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak = {p: 0 for p in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_out_of_core_dense_stack_keeps_worker_rss_bounded(client, tmp_path):
    n, H, W = 6000, 256, 256  # 1.57 GB dense float32: ~4x each worker's memory_limit
    src = str(tmp_path / "big.zarr")
    _write_big_sparse_dense_store(src, n, H, W, chunk=32)
    dense_bytes = n * H * W * 4
    limit = min(w["memory_limit"] for w in client.scheduler_info()["workers"].values())
    assert dense_bytes >= 3 * limit
    pids = list(client.run(os.getpid).values())
    target = str(tmp_path / "big_out.zarr")
    with _RSSSampler(pids) as sampler:
        summary = convolve_zarr(src, KERNEL, target, compressor="lz4")
    peak = max(sampler.peak.values())
    print(f"\nout-of-core: {dense_bytes / 1e9:.2f} GB dense stack, memory_limit {limit / 1e6:.0f} MB, "
          f"{summary.blocks} blocks of {summary.block_rows}, elapsed {summary.elapsed:.1f} s, "
          f"peak worker RSS {peak / 1e6:.0f} MB ({', '.join(f'{v / 1e6:.0f}' for v in sampler.peak.values())})")
    assert summary.n_images == n and summary.blocks >= 2
    assert summary.nnz_in > 0
    assert peak < limit  # far below the 1.57 GB the stack would take in memory
    # spot-check frames from the start, middle and end against scipy
    out = zarr.open_array(target, mode="r")
    inp = zarr.open_array(src, mode="r")
    for i in (0, n // 2 + 7, n - 1):
        assert_matches(out[i : i + 1], reference(inp[i : i + 1], KERNEL, "same"))


def test_thread_policy_counts_every_worker_process_on_the_host(client):
    """2 worker processes x 1 thread on one host: each process's engines get
    cores // 2 threads (the scheduler tells a worker its peers on the host),
    not the whole machine each, and the convolvers built there carry it."""
    from dask_sparseconv.runtime.cache import concurrent_tasks, engine_threads, get_convolver

    def policy():
        conv = get_convolver((8, 8), KERNEL)
        return concurrent_tasks(), engine_threads(cores=8), engine_threads(), conv.n_threads, len(os.sched_getaffinity(0))

    futures = [client.submit(policy, workers=[w], allow_other_workers=False, pure=False) for w in client.nthreads()]
    for tasks, of_eight, threads, built, cores in client.gather(futures):
        assert tasks == 2 and of_eight == 4
        assert threads == built == max(1, cores // 2)


def test_job_carries_per_host_threads_so_workers_do_not_ask_the_scheduler(client, tmp_path):
    """convolve_zarr puts the cluster's per-host thread counts in the job: each
    worker sizes its engines from them (cores // 2 here), with no scheduler
    round trip of its own (its host-thread cache stays empty)."""
    from dask_sparseconv.runtime import cache

    def reset():
        cache.clear_cache()
        cache._host_threads.clear()

    def seen():
        return len(cache._host_threads), sorted({c.n_threads for c in cache._entries.values()}), len(os.sched_getaffinity(0))

    client.run(reset)
    n, H, W = 40, 16, 16
    x = sparse_stack(n, H, W, density=0.05, seed=31)
    src = str(tmp_path / "in.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(n, -1)), (H, W))
    summary = convolve_zarr(src, KERNEL, str(tmp_path / "out.zarr"), block_memory=4000)
    assert summary.blocks > 2
    for asked, threads, cores in client.run(seen).values():
        assert asked == 0
        assert threads in ([], [max(1, cores // 2)])
    assert_matches(open_stack(str(tmp_path / "out.zarr")).compute(), reference(x, KERNEL, "same"))
