"""The separable engine and ``method='auto'``'s choice of it.

Values are checked against ``scipy.signal.convolve2d``; the generic matrix of
every registered cell (tests/engine/test_methods.py, test_edge_cases.py)
runs this engine too.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from scipy_oracle import convolve_rows

from dask_sparseconv import Convolver, kernels
from dask_sparseconv.engine.separable import AutoSeparable, SeparableNumba, low_rank, rank_rtol, worth_trying
from dask_sparseconv.sample_data import sample_rois

MODES = ("full", "same", "valid")


def dog(size=15):
    return kernels.gaussian(1.5, size=size) - kernels.gaussian(3.0, size=size)


# -- factorisation -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gaussians_and_boxes_are_rank_one(dtype):
    for k in (kernels.gaussian(2.0), kernels.gaussian((1.0, 3.0)), kernels.box((5, 9)), np.ones((1, 7))):
        f = low_rank(k.astype(dtype))
        assert f.rank == 1
        np.testing.assert_allclose(f.u.T @ f.w, k.astype(dtype), rtol=0, atol=4 * np.finfo(dtype).eps * np.abs(k).max())


def test_float32_kernel_cast_up_is_still_rank_one():
    """A kernel made in float32 and cast to float64 has a second singular
    value ~1e-8: the tolerance follows the precision its values carry."""
    k32 = kernels.gaussian(4.0, size=31).astype(np.float32)
    k64 = k32.astype(np.float64)
    s = np.linalg.svd(k64, compute_uv=False)
    assert s[1] / s[0] > 1e-12  # not rank one in float64 terms
    assert rank_rtol(k64) == rank_rtol(k32)
    assert low_rank(k64).rank == 1
    # a float64 Gaussian gets the float64 tolerance
    assert rank_rtol(kernels.gaussian(4.0, size=31)) < 1e-12


def test_ranks_of_other_kernels():
    rng = np.random.default_rng(0)
    assert low_rank(dog()).rank == 2
    assert low_rank(rng.standard_normal((6, 5))).rank == 5
    assert low_rank(np.zeros((3, 3))).rank == 0
    assert low_rank(kernels.disk(5.0)).rank > 2


def test_rank_one_factors_keep_zero_taps_zero():
    k = np.outer([0.0, 1.0, 2.5, 0.0], [1.0, 0.0, -3.0])
    f = low_rank(k)
    assert f.rank == 1
    np.testing.assert_array_equal((f.u.T @ f.w) != 0, k != 0)
    assert f.residual == 0


def test_small_integer_kernel_factors_exactly():
    k = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 2.0]])
    f = low_rank(k)
    assert f.rank == 2 and f.residual == 0
    np.testing.assert_array_equal(f.u.T @ f.w, k)


# -- values --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel_name", ["gaussian", "dog", "even_box", "random"])
def test_matches_scipy_on_blobs(mode, dtype, kernel_name):
    rng = np.random.default_rng(1)
    k = {"gaussian": kernels.gaussian(2.0), "dog": dog(9), "even_box": kernels.box((4, 6)),
         "random": rng.standard_normal((5, 4))}[kernel_name].astype(dtype)
    frame = (96, 80)
    x = sample_rois(12, frame, max_rois=3, radius=6.0, seed=3, dtype=dtype)
    conv = Convolver(frame, k, mode=mode, method="separable")
    n = x.shape[0]
    ref = convolve_rows(x, frame, k.astype(np.float64), mode).reshape(n, -1)
    bound = convolve_rows(abs(x), frame, np.abs(k.astype(np.float64)) + 1e-3 * np.abs(k).max(), mode).reshape(n, -1)
    tol = (1e-5 if dtype == np.float32 else 1e-11) * (np.abs(ref) + bound)
    y = conv(x)
    assert y.dtype == dtype and y.has_canonical_format and not np.any(y.data == 0)
    assert np.all(np.abs(y.toarray() - ref) <= tol)
    d = conv(x, out="dense")
    assert np.all(np.abs(d.reshape(n, -1) - ref) <= tol)


def test_threads_and_bands_give_the_serial_result():
    frame = (70, 90)
    x = sample_rois(40, frame, max_rois=3, radius=7.0, seed=5, dtype=np.float64)
    k = kernels.gaussian(2.5)
    serial = Convolver(frame, k, method="separable", n_threads=1)(x)
    conv = Convolver(frame, k, method="separable", n_threads=3, max_buffer_bytes=2048)  # bands of a few rows
    eng = conv.engine(np.float64)
    eng.serial_work = 0  # threaded whatever the size
    got = conv(x)
    assert (got != serial).nnz == 0  # same sums in the same order
    np.testing.assert_array_equal(conv(x, out="dense"), serial.toarray())


def test_nan_and_inf_reach_what_they_reach_in_2d():
    k = np.outer([0.0, 1.0, 2.0], [1.0, 0.0, 3.0, 1.0])
    img = np.zeros((9, 11))
    img[4, 5] = np.nan
    img[1, 1] = np.inf
    img[6, 2] = 2.0
    x = scipy.sparse.csr_matrix(img.reshape(1, -1))
    for mode in MODES:
        ref = scipy.signal.convolve2d(np.nan_to_num(img, nan=0, posinf=0), k, mode)  # finite part
        want_nan = Convolver((9, 11), k, mode=mode, method="direct")(x, out="dense").reshape(ref.shape)
        got = Convolver((9, 11), k, mode=mode, method="separable")(x, out="dense").reshape(ref.shape)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want_nan))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want_nan))
        finite = np.isfinite(want_nan)
        np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-12)


def test_empty_images_and_all_zero_kernel():
    x = scipy.sparse.csr_matrix((3, 100))
    assert Convolver((10, 10), kernels.gaussian(1.0), method="separable")(x).nnz == 0
    x = scipy.sparse.random(3, 100, density=0.2, format="csr", random_state=0)
    y = Convolver((10, 10), np.zeros((3, 3)), method="separable")(x)
    assert y.shape == (3, 100) and y.nnz == 0


# -- method='auto' ---------------------------------------------------------------


def test_auto_weighs_separable_only_for_large_low_rank_kernels():
    assert worth_trying(kernels.gaussian(3.0))  # 19 x 19, rank 1
    assert worth_trying(dog(15))  # rank 2
    assert not worth_trying(kernels.box(3))  # too few taps
    assert not worth_trying(np.random.default_rng(0).standard_normal((15, 15)))  # full rank
    assert Convolver((64, 64), kernels.gaussian(3.0)).auto_separable
    assert not Convolver((64, 64), kernels.gaussian(3.0), method="direct").auto_separable
    assert not Convolver((64, 64), kernels.disk(6.0)).auto_separable


def test_auto_takes_separable_on_blobs_and_direct_on_isolated_pixels():
    frame = (128, 128)
    k = kernels.gaussian(3.0)  # 19 x 19
    conv = Convolver(frame, k, n_threads=1)
    eng = conv.engine(np.float64)
    assert isinstance(eng, AutoSeparable) and conv.method == "direct"
    blobs = sample_rois(10, frame, max_rois=2, radius=8.0, seed=2, dtype=np.float64)
    y = conv(blobs)
    assert eng.calls == {"direct": 0, "separable": 1}
    np.testing.assert_allclose(y.toarray(), convolve_rows(blobs, frame, k, "same").reshape(10, -1), rtol=1e-10,
                               atol=1e-14)
    # isolated pixels: the row buffer is as wide as the kernel for each, no saving
    points = scipy.sparse.random(10, 128 * 128, density=0.0005, format="csr", random_state=4)
    y = conv(points)
    assert eng.calls == {"direct": 1, "separable": 1}
    np.testing.assert_allclose(y.toarray(), convolve_rows(points, frame, k, "same").reshape(10, -1), rtol=1e-10,
                               atol=1e-14)


def test_auto_leaves_nan_input_of_rank_two_kernels_to_2d():
    k = dog(9)
    img = np.zeros((40, 40))
    img[10:20, 10:20] = 1.0
    img[15, 15] = np.nan
    x = scipy.sparse.csr_matrix(img.reshape(1, -1))
    conv = Convolver((40, 40), k)
    assert conv.auto_separable
    got = conv(x, out="dense")
    want = Convolver((40, 40), k, method="direct")(x, out="dense")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert conv.engine(np.float64).calls["direct"] == 1


def test_separable_is_a_registered_cell_with_a_clear_error_for_torch():
    assert Convolver((8, 8), np.ones((3, 3)), method="separable").engine(np.float64).__class__ is SeparableNumba
    with pytest.raises(ValueError, match=r"backend='torch' is not valid for method='separable'"):
        Convolver((8, 8), np.ones((3, 3)), method="separable", backend="torch")
