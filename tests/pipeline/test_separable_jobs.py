"""Separable kernels through the pipeline: ``method='separable'`` and
``method='auto'`` (which weighs the separable path per block on numba
workers) in ``convolve`` and ``convolve_zarr``, dense and CSR stores, the
threaded scheduler and a LocalCluster with worker processes, against scipy."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.sparse
import zarr
from pipeline_support import assert_matches, reference

from dask_sparseconv import convolve, convolve_zarr, kernels, open_stack
from dask_sparseconv.runtime import cache
from dask_sparseconv.sample_data import sample_rois
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 24, 48, 40
GAUSS = kernels.gaussian(1.8)  # 11 x 11, rank 1: 'auto' weighs the separable path
DOG = kernels.gaussian(1.2, size=9) - kernels.gaussian(2.4, size=9)  # rank 2


def _stack():
    x = sample_rois(N, (H, W), max_rois=2, radius=5.0, seed=11).toarray().reshape(N, H, W)
    x[3] = 0  # an empty frame
    return x


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    x = _stack()
    root = tmp_path_factory.mktemp("separable")
    dense, csr = str(root / "dense.zarr"), str(root / "csr.zarr")
    write_dense_stack(dense, x, chunks=4)
    write_csr_stack(csr, scipy.sparse.csr_matrix(x.reshape(N, -1)), (H, W), chunk_size=256)
    return x, {"dense": dense, "csr": csr}


@pytest.mark.parametrize("method", ["separable", "auto"])
@pytest.mark.parametrize("in_fmt, out_fmt, mode", [("dense", "dense", "same"), ("csr", "csr", "full"),
                                                   ("csr", "dense", "valid")])
def test_convolve_zarr_with_separable_kernels(stores, tmp_path, method, in_fmt, out_fmt, mode):
    x, paths = stores
    for name, kernel in (("gauss", GAUSS), ("dog", DOG)):
        target = str(tmp_path / f"{name}.zarr")
        with dask.config.set(scheduler="threads", num_workers=2):
            summary = convolve_zarr(paths[in_fmt], kernel, target, mode, output_format=out_fmt, method=method,
                                    block_memory=60_000)
        assert summary.blocks > 2
        assert_matches(open_stack(target).compute(), reference(x, kernel, mode))
        prov = zarr.open_group(target).attrs["dask_sparseconv"] if out_fmt == "csr" else \
            zarr.open_array(target).attrs["dask_sparseconv"]
        assert prov["method"] == method


def test_auto_takes_the_separable_path_in_block_tasks(stores, tmp_path):
    """The threaded scheduler shares this process's convolver cache, so the
    engine that ran the blocks can be asked which path it took."""
    x, paths = stores
    cache.clear_cache()
    target = str(tmp_path / "out.zarr")
    with dask.config.set(scheduler="threads", num_workers=2):
        convolve_zarr(paths["csr"], GAUSS, target, "same", block_memory=60_000)
    convs = [c for c in cache._entries.values() if c.kernel.shape == GAUSS.shape]
    assert convs and all(c.auto_separable for c in convs)
    calls = [c.engine(np.float32).calls for c in convs]
    assert sum(c["separable"] for c in calls) >= 3  # one per block with nonzeros
    assert_matches(open_stack(target).compute(), reference(x, GAUSS, "same"))


def test_lazy_convolve_with_separable_method():
    x = _stack()
    with dask.config.set(scheduler="threads", num_workers=2):
        y = convolve(x, DOG, "same", method="separable", block_memory=60_000)
        assert y.numblocks[0] > 1
        assert_matches(y.compute(), reference(x, DOG, "same"))


@pytest.mark.xdist_group("cluster")
def test_separable_jobs_on_a_local_cluster_with_worker_processes(local_cluster, stores, tmp_path):
    from distributed import Client

    x, paths = stores
    with Client(local_cluster):
        for method in ("auto", "separable"):
            target = str(tmp_path / f"{method}.zarr")
            summary = convolve_zarr(paths["csr"], GAUSS, target, "same", method=method, block_memory=60_000)
            assert summary.blocks > 2
            assert_matches(open_stack(target).compute(), reference(x, GAUSS, "same"))
