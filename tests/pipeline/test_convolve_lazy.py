"""convolve(): lazy dask arrays from in-memory and dask inputs, checked against
per-frame scipy.signal.convolve2d, on the threaded scheduler."""

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse
from pipeline_support import EVEN_KERNEL, KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import convolve
from dask_sparseconv.pipeline import ConvolveSummary  # noqa: F401  (public name exists)

MODES = ["same", "full", "valid"]


@pytest.fixture(autouse=True)
def threaded():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", [KERNEL, EVEN_KERNEL], ids=["3x3", "3x4"])
def test_numpy_stack_dense_out(mode, kernel):
    x = sparse_stack(23, 17, 13, seed=1)
    y = convolve(x, kernel, mode, block_memory=40_000)  # small budget: several blocks
    assert isinstance(y, da.Array) and y.numblocks[0] > 1
    assert y.chunks[1:] == ((y.shape[1],), (y.shape[2],))
    assert y.dtype == np.float32
    assert_matches(y.compute(), reference(x, kernel, mode))


@pytest.mark.parametrize("mode", MODES)
def test_sparse_matrix_csr_out(mode):
    x = sparse_stack(30, 16, 12, seed=2, dtype=np.float64)
    csr = scipy.sparse.csr_matrix(x.reshape(30, -1))
    y = convolve(csr, KERNEL, mode, frame_shape=(16, 12), block_memory=20_000)
    assert y.numblocks[0] > 1
    assert isinstance(y._meta, scipy.sparse.csr_matrix) or scipy.sparse.issparse(y._meta)
    out = y.compute()
    assert scipy.sparse.issparse(out) and out.dtype == np.float64
    assert_matches(out, reference(x, KERNEL, mode), rtol=1e-12, atol=1e-12)
    # one block's chunk is CSR too
    first = y.blocks[0].compute()
    assert scipy.sparse.issparse(first)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_matrix_dense_out(mode):
    x = sparse_stack(12, 9, 14, seed=3, dtype=np.float64)
    y = convolve(scipy.sparse.csr_matrix(x.reshape(12, -1)), EVEN_KERNEL, mode, frame_shape=(9, 14),
                 output_format="dense")
    assert y.ndim == 3
    assert_matches(y.compute(), reference(x, EVEN_KERNEL, mode), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_dask_input_misaligned_and_spatially_chunked(mode):
    x = sparse_stack(41, 20, 18, seed=4)
    # 7-image chunks (do not divide the blocks) split spatially into 4 tiles each
    dx = da.from_array(x, chunks=(7, 10, 9))
    y = convolve(dx, KERNEL, mode, block_memory=60_000)
    assert y.numblocks[1:] == (1, 1)
    assert_matches(y.compute(), reference(x, KERNEL, mode))


def test_dask_input_csr_out_and_float64_request():
    x = sparse_stack(10, 8, 8, seed=5)
    y = convolve(da.from_array(x, chunks=(3, 8, 8)), KERNEL, "same", output_format="csr", dtype="float64")
    out = y.compute()
    assert scipy.sparse.issparse(out) and out.dtype == np.float64 and out.shape == (10, 64)
    assert_matches(out, reference(x, KERNEL, "same"))


def test_flat_dask_input_with_frame_shape():
    x = sparse_stack(9, 6, 7, seed=6)
    y = convolve(da.from_array(x.reshape(9, 42), chunks=(4, 42)), KERNEL, "full", frame_shape=(6, 7))
    assert y.shape == (9, 8, 9)
    assert_matches(y.compute(), reference(x, KERNEL, "full"))


def test_other_methods_match():
    x = sparse_stack(8, 12, 12, seed=7, dtype=np.float64)
    ref = reference(x, KERNEL, "same")
    for method, backend in [("gather_scatter", "numpy"), ("lazy", "numpy"), ("precomputed", "numpy")]:
        y = convolve(x, KERNEL, "same", method=method, backend=backend)
        assert_matches(y.compute(), ref, rtol=1e-10, atol=1e-10)


def test_kernel_is_one_graph_key():
    x = sparse_stack(40, 8, 8, seed=8)
    y = convolve(x, np.ones((3, 3)), block_memory=8_000)
    graph = dict(y.__dask_graph__())
    kernel_keys = [k for k in graph if "sparseconv-kernel" in str(k)]
    assert y.numblocks[0] > 3 and len(kernel_keys) == 1


def test_empty_stack():
    y = convolve(np.zeros((0, 5, 5), np.float32), KERNEL, "full")
    assert y.shape == (0, 7, 7)
    assert y.compute().shape == (0, 7, 7)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(mode="wide"), ValueError, "mode"),
        (dict(method="fft"), ValueError, "method"),
        (dict(method="direct", backend="numpy"), ValueError, "backend"),
        (dict(dtype="int8"), ValueError, "dtype"),
        (dict(output_format="coo"), ValueError, "output_format"),
        (dict(block_memory="1KiB"), ValueError, "block_memory"),
        (dict(kernel=np.ones(3)), ValueError, "kernel"),
        (dict(kernel=np.array([[np.nan]])), ValueError, "kernel"),
        (dict(kernel=np.ones((9, 9)), mode="valid"), ValueError, "valid"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    kernel = kwargs.pop("kernel", KERNEL)
    with pytest.raises(exc, match=match):
        convolve(np.zeros((4, 8, 8), np.float32), kernel, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="frame_shape"):
        convolve(scipy.sparse.csr_matrix((3, 64)), KERNEL)
    with pytest.raises(ValueError, match="columns"):
        convolve(scipy.sparse.csr_matrix((3, 64)), KERNEL, frame_shape=(7, 7))
    with pytest.raises(ValueError, match="shape"):
        convolve(np.zeros((4, 4)), KERNEL)
    with pytest.raises(TypeError, match="real"):
        convolve(np.zeros((2, 4, 4), complex), KERNEL)
    with pytest.raises(TypeError, match="x must be"):
        convolve(object(), KERNEL)
    with pytest.raises(ValueError, match="array="):
        convolve(np.zeros((2, 4, 4)), KERNEL, array="raw")
