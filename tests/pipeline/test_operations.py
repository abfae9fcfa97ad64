"""Boundaries, fill values and correlation through the pipeline:
``convolve`` (lazy) and ``convolve_zarr`` with dense and CSR stores in and
out, on the threaded scheduler and on a LocalCluster with worker processes,
against scipy; provenance and resume compare the operation."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.sparse
import zarr
from pipeline_support import EVEN_KERNEL, assert_matches, sparse_stack
from scipy_oracle import operate_stack

from dask_sparseconv import convolve, convolve_zarr, open_stack
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 30, 14, 11
OPERATIONS = [
    dict(boundary="wrap"),
    dict(boundary="symm", correlate=True),
    dict(fillvalue=1.5),
    dict(fillvalue=-0.5, correlate=True),
    dict(boundary="nearest"),
]


def _stack():
    x = sparse_stack(N, H, W, density=0.06, seed=31)
    x[1, 0, :] = 1.0  # a row along the top edge: ghosts on the other side
    x[2, :, W - 1] = -2.0
    return x


def _ref(x, mode, op):
    return operate_stack(x, EVEN_KERNEL, mode, op.get("boundary", "fill"), op.get("fillvalue", 0.0),
                         op.get("correlate", False))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    x = _stack()
    root = tmp_path_factory.mktemp("ops")
    dense, csr = str(root / "dense.zarr"), str(root / "csr.zarr")
    write_dense_stack(dense, x, chunks=4)
    write_csr_stack(csr, scipy.sparse.csr_matrix(x.reshape(N, -1)), (H, W), chunk_size=64)
    return x, {"dense": dense, "csr": csr}


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: "-".join(f"{k}={v}" for k, v in op.items()))
@pytest.mark.parametrize("in_fmt, out_fmt, mode", [("dense", "dense", "same"), ("dense", "csr", "full"),
                                                   ("csr", "csr", "same"), ("csr", "dense", "full")])
def test_convolve_zarr_operations_match_scipy(stores, tmp_path, op, in_fmt, out_fmt, mode):
    x, paths = stores
    target = str(tmp_path / "out.zarr")
    with dask.config.set(scheduler="threads", num_workers=2):
        summary = convolve_zarr(paths[in_fmt], EVEN_KERNEL, target, mode, output_format=out_fmt,
                                block_memory=20_000, **op)
    assert summary.blocks > 2
    result = open_stack(target).compute()
    ref = _ref(x, mode, op)
    assert_matches(result, ref)
    if out_fmt == "csr":
        assert summary.nnz_out == result.nnz == np.count_nonzero(result.toarray())
    prov = zarr.open_group(target).attrs["dask_sparseconv"] if out_fmt == "csr" else \
        zarr.open_array(target).attrs["dask_sparseconv"]
    assert prov["boundary"] == op.get("boundary", "fill")
    assert prov["fillvalue"] == op.get("fillvalue", 0.0) and prov["correlate"] == op.get("correlate", False)


@pytest.mark.parametrize("op", OPERATIONS[:3], ids=["wrap", "symm-correlate", "fill"])
def test_lazy_convolve_of_arrays_and_matrices(op):
    x = _stack()
    ref = _ref(x, "same", op)
    with dask.config.set(scheduler="threads", num_workers=2):
        assert_matches(convolve(x, EVEN_KERNEL, "same", block_memory=20_000, **op).compute(), ref)
        csr = scipy.sparse.csr_matrix(x.reshape(N, -1))
        lazy = convolve(csr, EVEN_KERNEL, "same", frame_shape=(H, W), block_memory=20_000, **op)
        assert lazy.numblocks[0] > 1
        assert_matches(lazy.compute(), ref)


def test_operations_give_distinct_graphs():
    """Two lazy calls that differ only in the operation do not share keys."""
    x = _stack()
    a = convolve(x, EVEN_KERNEL, "same")
    b = convolve(x, EVEN_KERNEL, "same", boundary="wrap")
    c = convolve(x, EVEN_KERNEL, "same", correlate=True)
    assert len({a.name, b.name, c.name}) == 3
    with dask.config.set(scheduler="threads"):
        ra, rb = dask.compute(a, b)
    assert not np.allclose(ra, rb)
    assert_matches(rb, _ref(x, "same", dict(boundary="wrap")))


def test_a_nonzero_fillvalue_sizes_csr_blocks_for_the_fill_frame(stores, tmp_path):
    """Every image, empty ones too, carries the fill frame: the planner counts it."""
    from dask_sparseconv.pipeline import plan_job

    x = sparse_stack(20, 64, 64, density=0.003, seed=3)
    src = str(tmp_path / "in.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(20, -1)), (64, 64), chunk_size=64)
    plain = plan_job(src, EVEN_KERNEL, "same", block_memory=200_000, threads=2)
    filled = plan_job(src, EVEN_KERNEL, "same", block_memory=200_000, threads=2, fillvalue=1.0)
    # the fill frame of a 3 x 4 kernel on 64 x 64: 2 of 3 rows, 3 of 4 columns missed at the edges
    assert filled.blocks.bytes_per_image >= plain.blocks.bytes_per_image + 8 * (64 * 64 - 62 * 61)


def test_resume_refuses_another_operation(stores, tmp_path):
    """An incomplete output of a wrap job is not continued by a symm job."""
    _, paths = stores
    target = str(tmp_path / "out.zarr")
    with dask.config.set(scheduler="threads"):
        graph = convolve_zarr(paths["dense"], EVEN_KERNEL, target, "same", boundary="wrap", compute=False,
                              block_memory=20_000)
        del graph  # the target exists, incomplete, nothing computed
        with pytest.raises(ValueError, match=r"boundary: stored 'wrap' vs now 'symm'"):
            convolve_zarr(paths["dense"], EVEN_KERNEL, target, "same", boundary="symm", block_memory=20_000,
                          lock=False)
        # the same job resumes and finishes exactly
        convolve_zarr(paths["dense"], EVEN_KERNEL, target, "same", boundary="wrap", block_memory=20_000, lock=False)
    assert_matches(open_stack(target).compute(), _ref(_stack(), "same", dict(boundary="wrap")))


@pytest.mark.parametrize("kwargs, words", [
    (dict(boundary="circular"), ["boundary", "'circular'"]),
    (dict(boundary="symm", fillvalue=1.0), ["fillvalue=1.0", "boundary='fill'"]),
    (dict(correlate=1), ["correlate", "True or False"]),
])
def test_bad_operations_are_refused_before_anything_is_written(stores, tmp_path, kwargs, words):
    _, paths = stores
    target = tmp_path / "out.zarr"
    with pytest.raises((ValueError, TypeError)) as info:
        convolve_zarr(paths["dense"], EVEN_KERNEL, str(target), **kwargs)
    assert all(w in str(info.value) for w in words)
    assert not target.exists()
    with pytest.raises((ValueError, TypeError)):
        convolve(_stack(), EVEN_KERNEL, **kwargs)


@pytest.mark.xdist_group("cluster")
def test_operations_on_a_local_cluster_with_worker_processes(local_cluster, stores, tmp_path):
    from distributed import Client

    x, paths = stores
    with Client(local_cluster):
        for i, op in enumerate([dict(boundary="wrap", correlate=True), dict(fillvalue=2.0)]):
            target = str(tmp_path / f"out{i}.zarr")
            summary = convolve_zarr(paths["csr"], EVEN_KERNEL, target, "full", block_memory=20_000, **op)
            assert summary.blocks > 2
            assert_matches(open_stack(target).compute(), _ref(x, "full", op))
