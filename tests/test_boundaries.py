"""Boundaries and correlation (:mod:`dask_sparseconv.boundaries`,
:mod:`dask_sparseconv.operation`) against ``scipy.signal.convolve2d`` /
``correlate2d`` and ``scipy.ndimage``: every mode x boundary x operation,
odd and even kernels, non-square frames, frames smaller than the kernel,
dense and CSR in and out, on every method and backend (torch on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy_oracle import PAD_MODES, operate_stack, padded_reference

from dask_sparseconv import Convolver
from dask_sparseconv.boundaries import ALIASES, FOLDS, Extension, fill_frame, pads
from dask_sparseconv.operation import Operation, check_operation
from dask_sparseconv.validation import module_available

ENGINES = [("direct", "numba"), ("precomputed", "numpy"), ("precomputed", "numba"), ("lazy", "numpy"),
           ("gather_scatter", "numpy"), ("gather_scatter", "numba"), ("separable", "numba")]
if module_available("torch"):
    ENGINES += [("precomputed", "torch"), ("lazy", "torch"), ("gather_scatter", "torch")]

#: (frame shape, kernel shape): odd and even kernels, non-square frames, a
#: kernel larger than the frame (its halo wraps or reflects more than once)
CASES = [((6, 7), (3, 3)), ((9, 4), (2, 4)), ((5, 8), (1, 1)), ((3, 2), (5, 4)), ((1, 6), (3, 2)), ((7, 5), (4, 1))]
OPERATIONS = [("fill", 0.0), ("fill", 2.5), ("wrap", 0.0), ("symm", 0.0), ("mirror", 0.0), ("nearest", 0.0)]


def _stack(rng, n, H, W, density=0.3):
    x = np.where(rng.random((n, H, W)) < density, rng.standard_normal((n, H, W)), 0.0)
    x[0] = 0  # an empty image: still gets the fill frame
    x[-1, 0, 0] = x[-1, H - 1, W - 1] = 1.0  # corners: the most ghosts
    return x


def _engine_kwargs(method, backend):
    return dict(method=method, backend=backend, **({"device": "cpu"} if backend == "torch" else {}))


@pytest.mark.parametrize("method, backend", ENGINES)
@pytest.mark.parametrize("correlate", [False, True])
def test_every_mode_boundary_and_operation_matches_scipy(method, backend, correlate):
    rng = np.random.default_rng(7)
    for frame_shape, kshape in CASES:
        x = _stack(rng, 4, *frame_shape)
        k = rng.standard_normal(kshape)
        csr_in = scipy.sparse.csr_matrix(x.reshape(4, -1))
        for mode in ("full", "same", "valid"):
            if mode == "valid" and (kshape[0] > frame_shape[0] or kshape[1] > frame_shape[1]):
                continue
            for boundary, fill in OPERATIONS:
                ref = operate_stack(x, k, mode, boundary, fill, correlate)
                conv = Convolver(frame_shape, k, mode, boundary=boundary, fillvalue=fill, correlate=correlate,
                                 **_engine_kwargs(method, backend))
                dense = conv(x)  # dense in, dense out
                sparse = conv(csr_in)  # CSR in, CSR out
                what = f"{frame_shape} {kshape} {mode} {boundary} fill={fill} correlate={correlate}"
                np.testing.assert_allclose(dense, ref, rtol=1e-10, atol=1e-10, err_msg=what)
                assert scipy.sparse.isspmatrix_csr(sparse) and sparse.has_canonical_format, what
                assert not np.any(sparse.data == 0), what
                np.testing.assert_allclose(sparse.toarray().reshape(ref.shape), ref, rtol=1e-10, atol=1e-10,
                                           err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_in_and_out(dtype):
    rng = np.random.default_rng(3)
    x = _stack(rng, 3, 12, 10).astype(dtype)
    k = rng.random((5, 4))
    for boundary, fill in OPERATIONS:
        conv = Convolver((12, 10), k, "same", boundary=boundary, fillvalue=fill, correlate=True)
        got = conv(x)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, operate_stack(x, k, "same", boundary, fill, True), rtol=tol, atol=tol)


def test_the_padded_reference_is_scipy_for_its_own_boundaries():
    """The oracle for 'mirror' and 'nearest' (numpy.pad, then scipy 'valid')
    gives scipy.signal's result for 'wrap' and 'symm': it pads as scipy does."""
    rng = np.random.default_rng(0)
    for frame_shape, kshape in CASES:
        f = rng.standard_normal(frame_shape)
        k = rng.standard_normal(kshape)
        for mode in ("full", "same"):
            for correlate in (False, True):
                func = scipy.signal.correlate2d if correlate else scipy.signal.convolve2d
                for boundary in ("wrap", "symm"):
                    np.testing.assert_allclose(padded_reference(f, k, mode, PAD_MODES[boundary], correlate),
                                               func(f, k, mode, boundary=boundary), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["reflect", "mirror", "nearest", "wrap", "grid-wrap", "constant"])
@pytest.mark.parametrize("correlate", [False, True])
def test_ndimage_names_match_scipy_ndimage(name, correlate):
    """scipy.ndimage.convolve/correlate (odd kernels: ndimage centres even
    ones on another pixel) with the ndimage names, 'same' mode."""
    rng = np.random.default_rng(11)
    func = scipy.ndimage.correlate if correlate else scipy.ndimage.convolve
    for frame_shape, kshape in [((9, 7), (3, 5)), ((4, 6), (5, 3)), ((2, 3), (7, 7)), ((6, 6), (1, 3))]:
        x = _stack(rng, 3, *frame_shape)
        k = rng.standard_normal(kshape)
        ref = np.stack([func(f, k, mode=name, cval=0.0) for f in x])
        got = Convolver(frame_shape, k, "same", boundary=name, correlate=correlate)(x)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10, err_msg=f"{frame_shape} {kshape}")


def test_aliases_resolve_to_the_signal_names():
    assert {name: check_operation(name).boundary for name in ALIASES} == ALIASES
    assert Convolver((5, 5), np.ones((3, 3)), boundary="reflect").operation.boundary == "symm"


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_fillvalue_on_an_all_zero_stack_gives_exactly_the_fill_frame(mode):
    rng = np.random.default_rng(5)
    k = rng.random((4, 3))
    conv = Convolver((9, 8), k, mode, fillvalue=-1.75)
    frame = conv.fill_frame(np.float64)
    Ho, Wo = conv.out_shape
    dense = conv(np.zeros((3, 9, 8)))
    assert np.array_equal(dense, np.broadcast_to(frame.toarray().reshape(Ho, Wo), dense.shape))
    sparse = conv(scipy.sparse.csr_matrix((3, 72)))
    assert sparse.nnz == 3 * frame.nnz
    assert np.array_equal(sparse.toarray(), np.repeat(frame.toarray(), 3, axis=0))
    # and the fill frame is scipy's result on a zero frame
    np.testing.assert_allclose(frame.toarray().reshape(Ho, Wo),
                               scipy.signal.convolve2d(np.zeros((9, 8)), k, mode, fillvalue=-1.75), rtol=1e-12, atol=1e-14)
    if mode == "valid":
        assert frame.nnz == 0  # valid never reads the padding


def test_fill_frame_is_zero_in_the_interior_and_where_taps_are_zero():
    k = np.zeros((5, 5))
    k[2, 2] = 1.0  # the identity: no tap ever reaches the padding
    assert fill_frame(k, Convolver((10, 10), k).geometry(), 3.0, np.float64).nnz == 0
    k = np.ones((3, 3))
    frame = fill_frame(k, Convolver((10, 12), k).geometry(), 1.0, np.float64).toarray().reshape(10, 12)
    assert np.all(frame[1:-1, 1:-1] == 0)
    assert frame[0, 0] == 5.0 and frame[0, 5] == 3.0  # a corner misses 5 taps, an edge pixel 3
    # nonzero only within k - 1 pixels of the edges: the CSR output cost per image
    assert np.count_nonzero(frame) == 10 * 12 - 8 * 10


def test_wrap_and_symm_keep_the_output_sparse():
    """Ghost copies reach only pixels within the halo: an image with nonzeros
    away from the edges gives exactly the zero-fill result."""
    k = np.arange(9.0).reshape(3, 3) + 1
    x = np.zeros((1, 20, 20))
    x[0, 8:12, 8:12] = 1.0
    base = Convolver((20, 20), k, "same")(scipy.sparse.csr_matrix(x.reshape(1, -1)))
    for boundary in ("wrap", "symm", "mirror", "nearest"):
        got = Convolver((20, 20), k, "same", boundary=boundary)(scipy.sparse.csr_matrix(x.reshape(1, -1)))
        assert got.nnz == base.nnz and (got != base).nnz == 0


@pytest.mark.parametrize("boundary", sorted(FOLDS))
def test_extension_places_each_nonzero_and_its_ghosts(boundary):
    """The padded frame the engines convolve equals numpy.pad of the image."""
    rng = np.random.default_rng(2)
    for frame_shape, kshape in CASES:
        x = _stack(rng, 3, *frame_shape)
        for mode in ("full", "same"):
            for correlate in (False, True):
                geo = Operation(correlate=correlate).window(frame_shape, kshape, mode)
                ext = Extension(geo, boundary)
                got = ext(scipy.sparse.csr_matrix(x.reshape(3, -1)))
                assert got.has_canonical_format and got.shape == (3, ext.frame_shape[0] * ext.frame_shape[1])
                (pt, pb), (pl, pr) = (pads(geo)[:2], pads(geo)[2:])
                pad_mode = PAD_MODES.get(boundary, "constant")
                want = np.stack([np.pad(f, ((pt, pb), (pl, pr)), mode=pad_mode) for f in x])
                assert np.array_equal(got.toarray().reshape(want.shape), want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    H=st.integers(1, 9), W=st.integers(1, 9), kh=st.integers(1, 6), kw=st.integers(1, 6),
    mode=st.sampled_from(["full", "same", "valid"]), boundary=st.sampled_from(sorted(FOLDS)),
    fill=st.sampled_from([0.0, 0.5, -3.0]), correlate=st.booleans(), density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16), method=st.sampled_from(["direct", "gather_scatter", "precomputed", "separable"]),
)
def test_hypothesis_cases_match_scipy(H, W, kh, kw, mode, boundary, fill, correlate, density, seed, method):
    if mode == "valid" and (kh > H or kw > W):
        return
    if boundary != "fill":
        fill = 0.0
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((3, H, W)) < density, rng.standard_normal((3, H, W)), 0.0)
    k = rng.standard_normal((kh, kw))
    conv = Convolver((H, W), k, mode, method=method, boundary=boundary, fillvalue=fill, correlate=correlate)
    ref = operate_stack(x, k, mode, boundary, fill, correlate)
    np.testing.assert_allclose(conv(x), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(conv(scipy.sparse.csr_matrix(x.reshape(3, -1))).toarray().reshape(ref.shape), ref,
                               rtol=1e-9, atol=1e-9)


def test_a_single_image_and_a_per_call_mode():
    rng = np.random.default_rng(4)
    img = _stack(rng, 2, 8, 9)[1]
    k = rng.random((2, 2))
    conv = Convolver((8, 9), k, "same", boundary="wrap", correlate=True)
    np.testing.assert_allclose(conv(img), scipy.signal.correlate2d(img, k, "same", boundary="wrap"), atol=1e-12)
    np.testing.assert_allclose(conv(img, mode="full"), scipy.signal.correlate2d(img, k, "full", boundary="wrap"),
                               atol=1e-12)
    assert conv(scipy.sparse.csr_matrix(img)).shape == (8, 9)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(boundary="periodic"), ValueError, ["boundary", "'periodic'", "wrap", "symm"]),
    (dict(boundary=1), TypeError, ["boundary", "1"]),
    (dict(fillvalue="1"), TypeError, ["fillvalue", "'1'"]),
    (dict(fillvalue=np.nan), ValueError, ["fillvalue", "finite"]),
    (dict(fillvalue=True), TypeError, ["fillvalue"]),
    (dict(boundary="wrap", fillvalue=2.0), ValueError, ["fillvalue=2.0", "boundary='fill'", "'wrap'"]),
    (dict(correlate="yes"), TypeError, ["correlate", "'yes'", "True or False"]),
])
def test_bad_operation_arguments_name_the_argument(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Convolver((5, 5), np.ones((3, 3)), **kwargs)
    for w in words:
        assert w in str(info.value)


def test_the_kernel_given_is_kept_and_not_modified():
    k = np.arange(6.0).reshape(2, 3)
    before = k.copy()
    conv = Convolver((5, 5), k, correlate=True)
    assert np.array_equal(k, before) and np.array_equal(conv.kernel, before)
    assert "correlate=True" in repr(conv)
