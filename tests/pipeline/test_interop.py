"""convolve() on the containers users hold (pipeline/interop.py): xarray
DataArrays, pydata/sparse COO (alone and as dask chunks), scipy.sparse
arrays. Values against scipy; the result's container follows the input's."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.sparse
from scipy_oracle import convolve_stack

from dask_sparseconv import convolve

xr = pytest.importorskip("xarray")
sparse = pytest.importorskip("sparse")

KERNEL = np.array([[0.0, 1.0, 0.5, 0.0], [1.0, -2.0, 1.0, 0.25], [0.5, 1.0, 0.0, 0.0]], dtype=np.float32)


@pytest.fixture
def stack():
    rng = np.random.default_rng(7)
    x = np.where(rng.random((6, 20, 16)) < 0.1, rng.standard_normal((6, 20, 16)), 0).astype(np.float32)
    x[2] = 0
    return x


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["same", "full", "valid"])
@pytest.mark.parametrize("lazy", [False, True])
def test_dataarray_keeps_dims_coords_and_attrs(stack, mode, lazy):
    data = stack.reshape(2, 3, 20, 16)
    xa = xr.DataArray(da.from_array(data, chunks=(1, 3, 20, 16)) if lazy else data, dims=("t", "c", "y", "x"),
                      coords={"t": [0.0, 1.5], "c": ["a", "b", "c"], "y": np.arange(20) * 0.5,
                              "x": 3 + np.arange(16) * 0.25, "time_s": ("t", [10.0, 11.5])},
                      attrs={"units": "photons"}, name="cells")
    before = xa.copy(deep=True)
    out = convolve(xa, KERNEL, mode)
    ref = convolve_stack(stack, KERNEL, mode)
    Ho, Wo = ref.shape[1:]
    assert isinstance(out, xr.DataArray) and out.dims == ("t", "c", "y", "x") and out.shape == (2, 3, Ho, Wo)
    assert isinstance(out.data, da.Array)  # lazy, like every convolve() result
    _close(out.values.reshape(ref.shape), ref)
    assert out.name == "cells" and out.attrs == {"units": "photons"}
    assert list(out.t.values) == [0.0, 1.5] and list(out.c.values) == ["a", "b", "c"]
    assert list(out.time_s.values) == [10.0, 11.5]
    # output pixel o sits on input pixel o + (window start - same's start)
    shift_y = {"same": 0, "full": -1, "valid": 1}[mode]  # kH = 3
    shift_x = {"same": 0, "full": -1, "valid": 2}[mode]  # kW = 4
    _close(out.y.values, (np.arange(Ho) + shift_y) * 0.5)
    _close(out.x.values, 3 + (np.arange(Wo) + shift_x) * 0.25)
    xr.testing.assert_identical(xa, before)  # the input is left as it was


def test_dataarray_uneven_coords_are_sliced_or_dropped(stack):
    y = np.cumsum(np.arange(1, 21)).astype(float)  # uneven spacing
    xa = xr.DataArray(stack, dims=("frame", "y", "x"), coords={"y": y})
    valid = convolve(xa, KERNEL, "valid")
    _close(valid.y.values, y[1:19])
    full = convolve(xa, KERNEL, "full")
    assert "y" not in full.coords  # cannot be extended without a spacing
    _close(full.values, convolve_stack(stack, KERNEL, "full"))


def test_dataarray_of_sparse_coo_and_kernel_bank(stack):
    xa = xr.DataArray(sparse.COO.from_numpy(stack), dims=("frame", "y", "x"))
    out = convolve(xa, KERNEL, "same")
    assert isinstance(out.data._meta, sparse.COO)
    _close(out.data.compute().todense(), convolve_stack(stack, KERNEL, "same"))
    bank = np.stack([KERNEL, KERNEL[::-1, ::-1]])
    dense = xr.DataArray(stack, dims=("frame", "y", "x"))
    out = convolve(dense, bank, "full")
    assert out.dims == ("frame", "kernel", "y", "x")
    _close(out.values[:, 1], convolve_stack(stack, bank[1], "full"))
    with pytest.raises(ValueError, match="output_format='csr' is not available for an xarray.DataArray"):
        convolve(dense, KERNEL, output_format="csr")


@pytest.mark.parametrize("mode", ["same", "full"])
def test_sparse_coo_in_coo_out(stack, mode):
    coo = sparse.COO.from_numpy(stack)
    out = convolve(coo, KERNEL, mode)
    assert isinstance(out, da.Array) and isinstance(out._meta, sparse.COO)
    got = out.compute()
    assert isinstance(got, sparse.COO) and got.ndim == 3
    _close(got.todense(), convolve_stack(stack, KERNEL, mode))
    flat = sparse.COO.from_numpy(stack.reshape(6, -1))  # (n, H*W) with frame_shape
    got = convolve(flat, KERNEL, mode, frame_shape=(20, 16)).compute()
    assert got.ndim == 2
    _close(got.todense().reshape(6, *convolve_stack(stack, KERNEL, mode).shape[1:]),
           convolve_stack(stack, KERNEL, mode))
    dense = convolve(coo, KERNEL, mode, output_format="dense").compute()
    assert isinstance(dense, np.ndarray)
    _close(dense, convolve_stack(stack, KERNEL, mode))


def test_dask_array_of_coo_chunks(stack):
    x = da.from_array(sparse.COO.from_numpy(stack), chunks=(2, 10, 16), asarray=False)  # frames split too
    got = convolve(x, KERNEL, "valid").compute()
    assert isinstance(got, sparse.COO)
    _close(got.todense(), convolve_stack(stack, KERNEL, "valid"))


def test_scipy_sparse_arrays_in_and_out(stack):
    rows = scipy.sparse.csr_array(stack.reshape(6, -1))
    got = convolve(rows, KERNEL, "same", frame_shape=(20, 16)).compute()
    assert isinstance(got, scipy.sparse.csr_array)
    _close(got.toarray().reshape(6, 20, 16), convolve_stack(stack, KERNEL, "same"))
    chunks = da.from_array(rows, chunks=(4, 320), asarray=False)
    got = convolve(chunks, KERNEL, "full", frame_shape=(20, 16)).compute()
    assert isinstance(got, scipy.sparse.csr_array)
    _close(got.toarray().reshape(6, 22, 19), convolve_stack(stack, KERNEL, "full"))
    coo = scipy.sparse.coo_array(stack.reshape(6, -1))
    got = convolve(coo, KERNEL, "same", frame_shape=(20, 16), output_format="dense").compute()
    _close(got, convolve_stack(stack, KERNEL, "same"))
