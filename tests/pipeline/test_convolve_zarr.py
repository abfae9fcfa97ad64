"""convolve_zarr() and convolve() over zarr stores on the threaded scheduler:
every input/output format and mode against scipy, misaligned and spatial
chunkings, compute=False, fsspec memory://, and up-front argument checks that
leave nothing written."""

import os
import uuid

import dask
import numpy as np
import pytest
import scipy.sparse
import zarr
from dask.delayed import Delayed
from pipeline_support import EVEN_KERNEL, KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import convolve, convolve_zarr, open_stack
from dask_sparseconv.pipeline import ConvolveSummary
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 37, 18, 15


@pytest.fixture(autouse=True)
def threaded():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.fixture(scope="module")
def stack():
    return sparse_stack(N, H, W, density=0.05, seed=11)


@pytest.fixture(scope="module")
def stores(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    dense = str(root / "dense.zarr")
    write_dense_stack(dense, stack, chunks=5)  # 5-image chunks: do not divide the blocks below
    csr = str(root / "csr.zarr")
    write_csr_stack(csr, scipy.sparse.csr_matrix(stack.reshape(N, -1)), (H, W), chunk_size=97)
    return {"dense": dense, "csr": csr}


def _read(path):
    out = open_stack(path).compute()
    return out


@pytest.mark.parametrize("mode", ["same", "full", "valid"])
@pytest.mark.parametrize("in_fmt", ["dense", "csr"])
@pytest.mark.parametrize("out_fmt", ["dense", "csr"])
def test_store_to_store_matches_scipy(stack, stores, tmp_path, mode, in_fmt, out_fmt):
    kernel = EVEN_KERNEL if mode == "same" else KERNEL
    target = str(tmp_path / "out.zarr")
    summary = convolve_zarr(stores[in_fmt], kernel, target, mode, output_format=out_fmt, block_memory=25_000)
    assert isinstance(summary, ConvolveSummary)
    ref = reference(stack, kernel, mode)
    assert summary.n_images == N and summary.format == out_fmt and summary.blocks > 1
    assert summary.nnz_in == np.count_nonzero(stack)
    assert summary.out_shape == ref.shape[1:]
    result = _read(target)
    assert scipy.sparse.issparse(result) == (out_fmt == "csr")
    assert_matches(result, ref)
    if out_fmt == "csr":
        assert summary.nnz_out == result.nnz
    else:
        assert summary.nnz_out == np.count_nonzero(result)
        # dense outputs are chunked by block
        assert zarr.open_array(target, mode="r").chunks[0] == summary.block_rows
    prov = zarr.open(target, mode="r").attrs["dask_sparseconv"]
    assert prov["complete"] is True and prov["mode"] == mode


@pytest.mark.parametrize("block_memory", ["64MiB", 25_000, 4_000])
def test_csr_output_written_once_through_the_carry_chain(stack, stores, tmp_path, block_memory):
    """A CSR output from one block to many blocks smaller than a data chunk:
    values go straight to their final chunks; no block record is left."""
    target = tmp_path / "out.zarr"
    summary = convolve_zarr(stores["csr"], KERNEL, str(target), "full", block_memory=block_memory)
    result = _read(str(target))
    assert summary.nnz_out == result.nnz
    assert_matches(result, reference(stack, KERNEL, "full"))
    g = zarr.open_group(str(target), mode="r")
    assert not (target / "_blocks").exists() and g.attrs["dask_sparseconv"]["complete"] is True
    assert g.attrs["dask_sparseconv"]["nnz"] == result.nnz == g["data"].shape[0]


def test_csr_graph_bounds_the_results_waiting_for_their_offsets(stores, tmp_path):
    """Block i's compute waits for the write lag(threads) blocks back, so at
    most that many results wait in memory for their carries; the carries
    form the only chain, and every write depends on its own compute."""
    from dask.core import get_dependencies

    graph = convolve_zarr(stores["csr"], KERNEL, str(tmp_path / "out.zarr"), "full", block_memory=4_000, compute=False)
    hlg = dict(graph.__dask_graph__())
    deps = {k: get_dependencies(hlg, k) for k in hlg}
    name = lambda kind, i: next(k for k in hlg if isinstance(k, str) and k.startswith(f"sparseconv-{kind}-")  # noqa: E731
                                and k.endswith(f"-{i:06d}"))
    n = sum(1 for k in hlg if isinstance(k, str) and k.startswith("sparseconv-compute-"))
    gated = [i for i in range(n) if any("-block-" in str(d) for d in deps[name("compute", i)])]
    L = gated[0]  # lag(threads of the scheduler the graph was built for)
    assert L >= 2 and gated == list(range(L, n))
    for i in range(n):
        gate = {name("block", i - L)} if i >= L else set()
        assert {d for d in deps[name("compute", i)] if "-block-" in str(d)} == gate
        wanted = {name("compute", i)} | ({name("carry", i - 1)} if i else set())
        assert wanted <= deps[name("block", i)]


def test_default_output_format_follows_input(stores, tmp_path):
    a = convolve_zarr(stores["csr"], KERNEL, str(tmp_path / "a.zarr"))
    b = convolve_zarr(stores["dense"], KERNEL, str(tmp_path / "b.zarr"))
    assert (a.format, b.format) == ("csr", "dense")


def test_spatially_chunked_dense_store(stack, tmp_path):
    src = str(tmp_path / "tiles.zarr")
    write_dense_stack(src, stack, chunks=(4, 9, 8))  # frames split into tiles
    target = str(tmp_path / "out.zarr")
    summary = convolve_zarr(src, KERNEL, target, "full", block_memory=30_000)
    assert_matches(_read(target), reference(stack, KERNEL, "full"))
    lazy = convolve(src, KERNEL, "full", block_memory=30_000)
    assert lazy.chunks[0] == tuple(b - a for a, b in [(s, min(s + summary.block_rows, N)) for s in range(0, N, summary.block_rows)])
    assert_matches(lazy.compute(), reference(stack, KERNEL, "full"))


def test_lazy_convolve_over_stores(stack, stores):
    ref = reference(stack, KERNEL, "same")
    dense = convolve(stores["dense"], KERNEL)
    assert dense.ndim == 3 and dense.numblocks[0] >= 1
    assert_matches(dense.compute(), ref)
    sparse = convolve(stores["csr"], KERNEL, block_memory=20_000)
    assert sparse.shape == (N, H * W)
    out = sparse.compute()
    assert scipy.sparse.issparse(out)
    assert_matches(out, ref)
    assert_matches(convolve(stores["csr"], KERNEL, output_format="dense").compute(), ref)


def test_compute_false_returns_delayed(stack, stores, tmp_path):
    target = str(tmp_path / "out.zarr")
    graph = convolve_zarr(stores["csr"], KERNEL, target, compute=False, block_memory=20_000)
    assert isinstance(graph, Delayed)
    # created but not complete until computed
    assert zarr.open(target, mode="r").attrs["dask_sparseconv"]["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target)
    summary = graph.compute()
    assert isinstance(summary, ConvolveSummary) and summary.elapsed >= 0
    assert_matches(_read(target), reference(stack, KERNEL, "same"))
    keys = [k for k in dict(graph.__dask_graph__()) if "sparseconv-kernel" in str(k)]
    assert len(keys) == 1  # the kernel is one key every block depends on


def test_overwrite(stores, tmp_path):
    target = str(tmp_path / "out.zarr")
    convolve_zarr(stores["dense"], KERNEL, target)
    with pytest.raises(FileExistsError, match="overwrite"):
        convolve_zarr(stores["dense"], KERNEL, target)
    summary = convolve_zarr(stores["dense"], KERNEL * 2, target, overwrite=True)
    assert summary.n_images == N


def test_memory_fsspec_roundtrip(stack):
    base = f"memory://sparseconv-{uuid.uuid4().hex}"
    write_csr_stack(f"{base}/in.zarr", scipy.sparse.csr_matrix(stack.reshape(N, -1)), (H, W))
    summary = convolve_zarr(f"{base}/in.zarr", KERNEL, f"{base}/out.zarr", "full", block_memory=20_000)
    assert summary.blocks > 1
    assert_matches(open_stack(f"{base}/out.zarr").compute(), reference(stack, KERNEL, "full"))
    convolve_zarr(f"{base}/out.zarr", KERNEL, f"{base}/dense.zarr", "valid", output_format="dense")
    again = open_stack(f"{base}/dense.zarr").compute()
    assert_matches(again, reference(reference(stack, KERNEL, "full"), KERNEL, "valid"), rtol=1e-4, atol=1e-4)


def _assert_nothing_written(target):
    assert not os.path.exists(target)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(mode="wide"), ValueError, "mode"),
        (dict(method="fft"), ValueError, "method"),
        (dict(method="direct", backend="torchy"), ValueError, "backend"),
        (dict(dtype="int16"), ValueError, "dtype"),
        (dict(output_format="coo"), ValueError, "output_format"),
        (dict(block_memory="10B"), ValueError, "block_memory"),
        (dict(block_memory="plenty"), ValueError, "block_memory"),
        (dict(kernel=np.ones((2, 2, 2, 2))), ValueError, "kernel"),  # (a 3-D kernel is a bank: test_kernel_bank_jobs.py)
        (dict(kernel=np.stack([np.ones((2, 2)), np.full((2, 2), np.nan)])), ValueError, r"kernel\[1\]"),
        (dict(kernel=[[1.0, np.inf]]), ValueError, "kernel"),
        (dict(kernel="gauss"), TypeError, "kernel"),
        (dict(kernel=np.ones((H + 1, 3)), mode="valid"), ValueError, "valid"),
        (dict(overwrite="yes"), TypeError, "overwrite"),
        (dict(compute=1), TypeError, "compute"),
        (dict(compressor="snappy"), ValueError, "compressor"),
        (dict(storage_options={"anon": True}), TypeError, "storage_options"),
    ],
)
def test_bad_arguments_write_nothing(stores, tmp_path, kwargs, exc, match):
    kernel = kwargs.pop("kernel", KERNEL)
    mode = kwargs.pop("mode", "same")
    target = str(tmp_path / "never.zarr")
    with pytest.raises(exc, match=match):
        convolve_zarr(stores["dense"], kernel, target, mode, **kwargs)
    _assert_nothing_written(target)


def test_missing_source_writes_nothing(tmp_path):
    target = str(tmp_path / "never.zarr")
    with pytest.raises(FileNotFoundError):
        convolve_zarr(str(tmp_path / "missing.zarr"), KERNEL, target)
    _assert_nothing_written(target)


def test_target_inside_or_equal_to_source_is_refused(stack, stores):
    src = stores["csr"]
    for target in (src, os.path.join(src, "result"), os.path.dirname(src)):
        with pytest.raises(ValueError, match="overlap"):
            convolve_zarr(src, KERNEL, target, overwrite=True)
    assert not os.path.exists(os.path.join(src, "result"))
    assert_matches(open_stack(src).compute(), stack, rtol=0, atol=0)


def test_source_untouched_after_refusals(stack, stores):
    with pytest.raises(ValueError):
        convolve_zarr(stores["dense"], KERNEL, stores["dense"], overwrite=True)
    np.testing.assert_array_equal(open_stack(stores["dense"]).compute(), stack)
