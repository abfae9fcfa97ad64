"""One job on a mixed cluster: a `dask scheduler`, a "GPU" `dask worker`
(started with --resources GPU=1 and DASK_SPARSECONV_GPU_DEVICE=cpu, so its
accelerator is torch's CPU device — the simulation aid of
dask_sparseconv.runtime.devices) and a plain CPU `dask worker`.

Each worker resolves backend='auto' itself; routing is proven by the worker
pids recorded in every block's stats. Every wait is bounded and the
processes are always stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from dask_processes import DaskProcesses
from scipy_oracle import convolve_stack

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.runtime.devices import ENV_BUDGET, ENV_GPU_DEVICE, ENV_SHARE
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

pytestmark = pytest.mark.xdist_group("cluster")

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90  # seconds: scheduler file, workers registering, one CLI run
KERNEL = np.array([[0.5, 1.0, 0.0], [-1.0, 2.0, 0.25], [0.0, 1.5, 0.5]])
GPU_ENGINE = "precomputed/torch/cpu"
CPU_ENGINE = "direct/numba"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (ENV_GPU_DEVICE, ENV_BUDGET, ENV_SHARE)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def mixed_cluster(tmp_path_factory):
    """Yield {'address', 'gpu': worker address, 'cpu': worker address, 'gpu_log': path}."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("mixed_cluster")
    procs = DaskProcesses(tmp, env=_env())
    try:
        address = procs.scheduler()
        procs.worker("gpu-worker", ["--resources", "GPU=1"], memory_limit="2GB",
                     env=_env(**{ENV_GPU_DEVICE: "cpu", ENV_BUDGET: "4GiB", "OMP_NUM_THREADS": "1"}))
        procs.worker("cpu-worker", memory_limit="2GB")
        with Client(address, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
            info = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {w["name"]: a for a, w in info.items()}
        yield {"address": address, "gpu": by_name["gpu-worker"], "cpu": by_name["cpu-worker"],
               "gpu_log": tmp / "gpu-worker.log"}
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed_inputs")
    rng = np.random.default_rng(5)
    x = np.where(rng.random((48, 30, 26)) < 0.05, rng.standard_normal((48, 30, 26)), 0).astype(np.float32)
    x[[3, 17]] = 0
    dense, csr = str(tmp / "dense.zarr"), str(tmp / "csr.zarr")
    write_dense_stack(dense, x, chunks=4)
    write_csr_stack(csr, scipy.sparse.csr_matrix(x.reshape(48, -1)), (30, 26), chunk_size=64)
    return {"x": x, "dense": dense, "csr": csr}


def _reference(x, mode):
    k = KERNEL.astype(np.float32).astype(np.float64)  # the engines compute with the float32 kernel
    return convolve_stack(x, k, mode)


def _check(target, x, mode):
    """Values equal scipy within the documented float32 tolerance (docs/gpu.md)."""
    out = open_stack(target).compute()
    ref = _reference(x, mode)
    out = out.toarray().reshape(ref.shape) if scipy.sparse.issparse(out) else np.asarray(out)
    atol = 1e-6 * float(np.abs(x).max()) * float(np.abs(KERNEL).sum())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=atol)


def _workers(summary):
    return summary.extra["workers"]


def test_one_job_uses_gpu_and_cpu_workers(mixed_cluster, stack, tmp_path):
    from distributed import Client

    with Client(mixed_cluster["address"], timeout=START_TIMEOUT) as client:
        pids = client.run(os.getpid)
        s = convolve_zarr(stack["csr"], KERNEL, str(tmp_path / "any.zarr"), "same", block_memory=8_000)
    gpu, cpu = mixed_cluster["gpu"], mixed_cluster["cpu"]
    w = _workers(s)
    assert s.blocks >= 8 and set(w) == {gpu, cpu}, w
    assert w[gpu]["pid"] == pids[gpu] and w[cpu]["pid"] == pids[cpu]
    assert w[gpu]["engines"] == {GPU_ENGINE: w[gpu]["blocks"]}
    assert w[cpu]["engines"] == {CPU_ENGINE: w[cpu]["blocks"]}
    assert s.extra["engines"] == {GPU_ENGINE: w[gpu]["blocks"], CPU_ENGINE: w[cpu]["blocks"]}
    assert s.extra["fallbacks"] == []
    _check(str(tmp_path / "any.zarr"), stack["x"], "same")


@pytest.mark.parametrize("route", ["gpu", "cpu"])
def test_route_restricts_blocks_to_gpu_or_cpu_workers(mixed_cluster, stack, tmp_path, route):
    from distributed import Client

    target = str(tmp_path / f"{route}.zarr")
    with Client(mixed_cluster["address"], timeout=START_TIMEOUT) as client:
        pids = client.run(os.getpid)
        s = convolve_zarr(stack["dense"], KERNEL, target, "full", output_format="dense", route=route,
                          block_memory=30_000)
    addr = mixed_cluster[route]
    assert s.blocks >= 4
    assert set(_workers(s)) == {addr} and s.extra["worker_pids"] == [pids[addr]]
    assert s.extra["engines"] == {GPU_ENGINE if route == "gpu" else CPU_ENGINE: s.blocks}
    _check(target, stack["x"], "full")


def test_small_device_budget_falls_back_and_says_so_once(mixed_cluster, stack, tmp_path):
    """The GPU worker's budget is lowered (its environment, as if started with
    DASK_SPARSECONV_DEVICE_BUDGET): Toeplitz + working memory no longer fit,
    working memory alone does -> torch gather_scatter; reported in the
    summary, by the CLI as a warning, and once in the worker's log."""
    from distributed import Client

    from dask_sparseconv.runtime.devices import DEFAULT_WORKING_BYTES

    def set_budget(value):
        from dask_sparseconv.runtime import devices

        os.environ[devices.ENV_BUDGET] = value
        devices.clear_resolutions()

    gpu = mixed_cluster["gpu"]
    with Client(mixed_cluster["address"], timeout=START_TIMEOUT) as client:
        client.run(set_budget, str(DEFAULT_WORKING_BYTES + 1000), workers=[gpu])
        try:
            a = convolve_zarr(stack["csr"], KERNEL, str(tmp_path / "a.zarr"), "valid", route="gpu", block_memory=8_000)
            wf = tmp_path / "wf.yaml"
            wf.write_text(
                f"input: {{path: {stack['csr']}}}\nkernel: {{values: {KERNEL.tolist()}}}\nmode: valid\n"
                f"output: {{path: {tmp_path / 'b.zarr'}}}\nblock: {{memory: 8000}}\n"
                f"cluster: {{address: '{mixed_cluster['address']}', route: gpu, timeout: {START_TIMEOUT}s}}\n"
            )
            res = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "run", str(wf)], capture_output=True,
                                 text=True, timeout=4 * START_TIMEOUT, env=_env())
        finally:
            client.run(set_budget, "4GiB", workers=[gpu])  # as started
    assert res.returncode == 0, (res.stdout, res.stderr)
    fallback_engine = "gather_scatter/torch/cpu"
    assert a.extra["engines"] == {fallback_engine: a.blocks} and set(_workers(a)) == {gpu}
    (reason,) = a.extra["fallbacks"]
    assert reason.startswith("fallback: precomputed on cpu") and fallback_engine in reason
    assert f"engines:    {fallback_engine}" in res.stdout
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: device fallback")]
    assert warnings == [f"warning: device fallback on a worker: {reason}"], res.stderr
    _check(str(tmp_path / "a.zarr"), stack["x"], "valid")
    _check(str(tmp_path / "b.zarr"), stack["x"], "valid")
    # two jobs with the same frame/kernel/mode: one log line in the worker process
    log = mixed_cluster["gpu_log"].read_text(errors="replace")
    assert log.count(reason) == 1, log[-3000:]


def test_route_gpu_without_gpu_workers_is_refused_before_writing(stack, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster):
        with pytest.raises(ValueError, match=r"route='gpu': none of the 1 workers advertises a GPU"):
            convolve_zarr(stack["csr"], KERNEL, str(tmp_path / "no.zarr"), route="gpu")
    assert not (tmp_path / "no.zarr").exists()


def test_frames_in_tiles_run_on_gpu_and_cpu_workers(mixed_cluster, tmp_path):
    """Frames larger than a block are cut into tiles (dask_sparseconv/tiles.py);
    each tile is a block task, routed like any other: the GPU worker convolves
    its tiles' windows with its device engine, the CPU worker with numba, and
    the frames equal scipy's."""
    from distributed import Client

    rng = np.random.default_rng(8)
    x = np.where(rng.random((2, 400, 360)) < 0.01, rng.standard_normal((2, 400, 360)), 0).astype(np.float32)
    src = str(tmp_path / "big.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(2, -1)), (400, 360), chunk_size=500)
    target = str(tmp_path / "tiles.zarr")
    with Client(mixed_cluster["address"], timeout=START_TIMEOUT):
        s = convolve_zarr(src, KERNEL, target, "same", block_memory=40_000)
    w = _workers(s)
    gpu, cpu = mixed_cluster["gpu"], mixed_cluster["cpu"]
    import zarr

    tiles = dict(zarr.open_group(target, mode="r").attrs)["dask_sparseconv"]["tiles"]
    assert tiles and s.blocks >= 8 and set(w) == {gpu, cpu}, (tiles, w)
    assert w[gpu]["engines"] == {GPU_ENGINE: w[gpu]["blocks"]}, w
    assert w[cpu]["engines"] == {CPU_ENGINE: w[cpu]["blocks"]}, w
    _check(target, x, "same")
