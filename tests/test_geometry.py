"""Output geometry must match scipy.signal.convolve2d for every mode and shape."""

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from hypothesis import given, settings
from hypothesis import strategies as st

from dask_sparseconv.geometry import geometry, output_support


@settings(max_examples=200, deadline=None)
@given(
    H=st.integers(1, 12), W=st.integers(1, 12), kh=st.integers(1, 14), kw=st.integers(1, 14),
    mode=st.sampled_from(["full", "same", "valid"]),
)
def test_geometry_matches_scipy_window(H, W, kh, kw, mode):
    rng = np.random.default_rng(H * 1000 + W * 100 + kh * 10 + kw)
    x = rng.standard_normal((H, W))
    k = rng.standard_normal((kh, kw))
    if mode == "valid" and (H < kh or W < kw):
        with pytest.raises(ValueError, match="x must be larger than k"):
            geometry((H, W), (kh, kw), mode)
        return
    geo = geometry((H, W), (kh, kw), mode)
    ref = scipy.signal.convolve2d(x, k, mode=mode)
    assert geo.out_shape == ref.shape
    full = scipy.signal.convolve2d(x, k, mode="full")
    Ho, Wo = geo.out_shape
    np.testing.assert_allclose(full[geo.top : geo.top + Ho, geo.left : geo.left + Wo], ref, rtol=1e-12, atol=1e-12)
    assert geo.out_pixels == Ho * Wo and geo.in_pixels == H * W


def test_unknown_mode_names_value():
    with pytest.raises(ValueError, match="'sideways'"):
        geometry((4, 4), (3, 3), "sideways")


def test_kept_geometries_equal_computed_ones_for_any_shape_type():
    """Geometries are kept per process: a kept one must be what the
    arguments compute, whatever types they come in (numpy integers, lists),
    and a refused one is refused again."""
    for frame, kshape in [((6, 5), (3, 4)), ([6, 5], [3, 4]), (np.array([6, 5]), np.array([3, 4])),
                          ((np.int64(6), np.int32(5)), (np.int16(3), 4))]:
        for mode in ("full", "same", "valid"):
            geo = geometry(frame, kshape, mode)
            ref = scipy.signal.convolve2d(np.ones((6, 5)), np.ones((3, 4)), mode=mode)
            assert geo.out_shape == ref.shape and geo.frame_shape == (6, 5) and geo.kernel_shape == (3, 4)
            assert all(type(v) is int for v in (*geo.frame_shape, *geo.kernel_shape, *geo.out_shape, geo.top, geo.left))
            assert geometry(frame, kshape, mode) == geo
    for _ in range(2):
        with pytest.raises(ValueError, match="x must be larger than k"):
            geometry((2, 5), (3, 3), "valid")


@settings(max_examples=60, deadline=None)
@given(
    H=st.integers(1, 10), W=st.integers(1, 10), kh=st.integers(1, 6), kw=st.integers(1, 6),
    mode=st.sampled_from(["full", "same", "valid"]), density=st.floats(0.0, 0.6), seed=st.integers(0, 1000),
)
def test_output_support_counts_scipy_nonzeros(H, W, kh, kw, mode, density, seed):
    """Positive images and kernel (nothing cancels): the support is exactly
    the number of nonzeros scipy's convolution gives, summed over images."""
    if mode == "valid" and (H < kh or W < kw):
        return
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((4, H, W)) < density, rng.random((4, H, W)) + 0.5, 0.0)
    k = np.where(rng.random((kh, kw)) < 0.6, 1.0, 0.0)
    geo = geometry((H, W), (kh, kw), mode)
    ref = sum(np.count_nonzero(scipy.signal.convolve2d(f, k, mode=mode)) for f in x)
    assert output_support(scipy.sparse.csr_matrix(x.reshape(4, -1)), k, geo) == ref


@settings(max_examples=60, deadline=None)
@given(
    H=st.integers(1, 12), W=st.integers(1, 12), kh=st.integers(1, 7), kw=st.integers(1, 7),
    mode=st.sampled_from(["full", "same", "valid"]), density=st.floats(0.0, 0.9), seed=st.integers(0, 1000),
)
def test_support_counts_per_image_with_stored_zeros_and_holes(H, W, kh, kw, mode, density, seed):
    """Per image, against scipy, with kernels full of holes (several tap runs
    per kernel row), dense rows whose runs end at the frame edge, and stored
    zeros (which reach nothing)."""
    from dask_sparseconv.engine.support import support_counts

    if mode == "valid" and (H < kh or W < kw):
        return
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((5, H, W)) < density, rng.random((5, H, W)) + 0.5, 0.0)
    k = np.where(rng.random((kh, kw)) < 0.5, 1.0, 0.0)
    m = scipy.sparse.csr_matrix(x.reshape(5, -1))
    zeros = rng.random(m.nnz) < 0.2
    m.data[zeros] = 0.0  # stored, not eliminated
    ref = [np.count_nonzero(scipy.signal.convolve2d(np.where(f, 1.0, 0.0), k, mode=mode))
           for f in m.toarray().reshape(5, H, W)]
    got = support_counts(m, k, geometry((H, W), (kh, kw), mode))
    assert got.dtype == np.int64 and got.tolist() == ref


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_support_counts_in_pieces_of_images(monkeypatch, limit):
    """Inputs over the interval budget are counted a few images at a time
    (one image alone may exceed it): the same counts, against scipy."""
    import dask_sparseconv.engine.support as support

    monkeypatch.setattr(support, "_MAX_INTERVALS", limit)
    rng = np.random.default_rng(limit)
    x = np.where(rng.random((7, 9, 11)) < 0.3, rng.random((7, 9, 11)) + 0.5, 0.0)
    x[2] = 0.0  # an empty image between pieces
    k = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    for mode in ("full", "same", "valid"):
        got = support.support_counts(scipy.sparse.csr_matrix(x.reshape(7, -1)), k, geometry((9, 11), (2, 3), mode))
        ref = [np.count_nonzero(scipy.signal.convolve2d(f, k, mode=mode)) for f in x]
        assert got.tolist() == ref
