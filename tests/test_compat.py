"""dask_sparseconv.Toeplitz_convolution2d against sparse_convolution 0.4.2 itself.

The same calls go through the peer and through ours, and the results must
agree in kind (dense/sparse), shape, dtype and values; ours must in
addition be canonical CSR for sparse input. Deliberate differences (see
docs/compat.md) are tested as such: integer kernels with float images,
sparse output format, exception class.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import pickle
import re
import sys
import threading
import types

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
import sparse_convolution
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dask_sparseconv
from dask_sparseconv.compat import (
    ConvolutionArgumentError,
    ConvolutionArgumentTypeError,
    Toeplitz_convolution2d,
)
from dask_sparseconv.engine.base import INT32_MAX

Peer = sparse_convolution.Toeplitz_convolution2d

COMBOS = [
    ("direct", "numba"),
    ("precomputed", "numpy"),
    ("precomputed", "numba"),
    ("precomputed", "torch"),
    ("lazy", "numpy"),
    ("lazy", "torch"),
    ("gather_scatter", "numpy"),
    ("gather_scatter", "numba"),
    ("gather_scatter", "torch"),
]
MODES = ("same", "full", "valid")
H, W = 5, 6


@pytest.fixture(autouse=True)
def _quiet_peer_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the peer's torch paths warn about sparse CSR being beta
        yield


def batch(rng, n=3, dtype=np.float64, density=0.3):
    x = (rng.random((n, H * W)) < density) * rng.standard_normal((n, H * W)) * 3
    return x.astype(dtype)


def inputs(x):
    """(name, input, batching) for every input kind the peer documents (and COO)."""
    one = x[0].reshape(H, W)
    return [
        ("dense", x, True),
        ("csr", scipy.sparse.csr_matrix(x), True),
        ("csc", scipy.sparse.csc_matrix(x), True),
        ("coo", scipy.sparse.coo_matrix(x), True),
        ("dense1", one, False),
        ("csr1", scipy.sparse.csr_matrix(one), False),
        ("csc1", scipy.sparse.csc_matrix(one), False),
    ]


def tol(*dtypes):
    return dict(rtol=1e-5, atol=1e-5) if any(np.dtype(d) == np.float32 for d in dtypes) else dict(rtol=1e-10, atol=1e-12)


def check_canonical(y):
    assert type(y) is scipy.sparse.csr_matrix
    want = np.int32 if max(y.shape[0], y.shape[1], y.nnz) <= INT32_MAX else np.int64
    assert y.indices.dtype == want and y.indptr.dtype == want
    assert y.has_canonical_format
    for i in range(y.shape[0]):
        assert np.all(np.diff(y.indices[y.indptr[i] : y.indptr[i + 1]]) > 0)
    assert not np.any(y.data == 0)


def assert_same_result(ours, peer, sparse_in):
    """Kind, shape, dtype and values agree; ours is canonical CSR for sparse input."""
    if sparse_in:
        assert scipy.sparse.issparse(peer)
        check_canonical(ours)  # the peer returns CSR, CSC or COO depending on the method
        a, b = ours.toarray(), peer.toarray()
    else:
        assert type(ours) is np.ndarray and type(peer) is np.ndarray
        assert ours.flags.c_contiguous
        a, b = ours, peer
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a, b, **tol(a.dtype))


# -- outputs -------------------------------------------------------------------


@pytest.mark.parametrize("method,backend", COMBOS)
@pytest.mark.parametrize("dtype", (None, np.float32, np.float64))
@pytest.mark.parametrize("kdtype", (np.float64, np.float32))
def test_outputs_match_peer(method, backend, dtype, kdtype):
    rng = np.random.default_rng(abs(hash((method, backend, str(dtype), str(kdtype)))) % 2**32)
    k = rng.standard_normal((2, 3)).astype(kdtype)
    for mode in MODES:
        kw = dict(mode=mode, dtype=dtype, method=method, backend=backend)
        peer, ours = Peer((H, W), k, **kw), Toeplitz_convolution2d((H, W), k, **kw)
        x64, x32 = batch(rng), batch(rng, dtype=np.float32)
        cases = inputs(x64) + [c for c in inputs(x32) if c[0] in ("dense", "csr", "csr1")]
        for i, (_name, x, batching) in enumerate(cases):
            assert_same_result(ours(x, batching=batching), peer(x, batching=batching), scipy.sparse.issparse(x))
            if i % 3 == 0:  # the per-call mode override
                other = "full" if mode != "full" else "same"
                assert_same_result(
                    ours(x, batching=batching, mode=other), peer(x, batching=batching, mode=other), scipy.sparse.issparse(x)
                )


@pytest.mark.parametrize("method,backend", COMBOS)
def test_defaults_and_attributes_match_peer(method, backend):
    k = np.arange(6.0).reshape(2, 3)
    for kw in (dict(), dict(method=method), dict(method=method, backend=backend), dict(method=method, backend=backend, mode="full", dtype="float32", max_buffer_bytes=1000)):
        peer, ours = Peer((H, W), k, **kw), Toeplitz_convolution2d((H, W), k, **kw)
        for attr in ("method", "backend", "mode", "x_shape", "dtype", "device", "max_buffer_bytes"):
            assert getattr(ours, attr) == getattr(peer, attr), attr
            assert type(getattr(ours, attr)) is type(getattr(peer, attr)), attr
        np.testing.assert_array_equal(ours.k, peer.k)
        assert ours.k.dtype == peer.k.dtype and ours.k is not k


def test_device_attribute():
    k = np.ones((2, 2))
    assert Toeplitz_convolution2d((H, W), k, method="lazy", backend="torch").device == Peer((H, W), k, method="lazy", backend="torch").device
    # stored as given, ignored, for non-torch backends (as the peer)
    assert Toeplitz_convolution2d((H, W), k, device="cpu").device == "cpu"
    ours = Toeplitz_convolution2d((H, W), k, method="gather_scatter", backend="torch", device="cpu")
    assert ours.device == "cpu" and ours.convolver.device == "cpu"


def test_x_shape_floats_are_accepted_like_the_peer():
    ours = Toeplitz_convolution2d([5.0, np.int64(6)], np.ones((2, 2)))
    assert ours.x_shape == Peer([5.0, np.int64(6)], np.ones((2, 2))).x_shape == (5, 6)


def test_kernel_is_copied():
    k = np.ones((3, 3))
    ours = Toeplitz_convolution2d((H, W), k)
    k[:] = 5
    x = batch(np.random.default_rng(0))
    np.testing.assert_allclose(ours(x), Peer((H, W), np.ones((3, 3)))(x))


@pytest.mark.parametrize("method,backend", COMBOS)
def test_int_kernel_with_int_images_matches_peer(method, backend):
    """Integer kernel and integer images: exact integer results, the peer's dtype."""
    rng = np.random.default_rng(1)
    k = rng.integers(-3, 4, size=(3, 2))
    x = rng.integers(-5, 6, size=(3, H * W)) * (rng.random((3, H * W)) < 0.4)
    ours = Toeplitz_convolution2d((H, W), k, method=method, backend=backend)
    ref = np.stack([scipy.signal.convolve2d(xi.reshape(H, W), k, mode="same").reshape(-1) for xi in x])
    for xin in (x, scipy.sparse.csr_matrix(x)):
        got = ours(xin)
        dense = got.toarray() if scipy.sparse.issparse(got) else got
        np.testing.assert_array_equal(dense, ref)
        if (method, backend) == ("gather_scatter", "numpy"):
            assert dense.dtype == np.int64  # the peer fails here (numpy casting error)
            continue
        peer = Peer((H, W), k, method=method, backend=backend)(xin)
        assert_same_result(got, peer, scipy.sparse.issparse(xin))


@pytest.mark.parametrize("method,backend", COMBOS)
def test_int_kernel_with_float_images_computes_in_float64(method, backend):
    """Deliberate difference: the peer truncates float images to the kernel's
    integer type (non-torch backends, and lazy/gather_scatter on torch); we do not."""
    rng = np.random.default_rng(2)
    k = np.array([[1, 2], [3, 4]])
    x = batch(rng) + 0.5 * (batch(rng) != 0)
    ours = Toeplitz_convolution2d((H, W), k, method=method, backend=backend)
    got = ours(scipy.sparse.csr_matrix(x))
    want_dtype = np.float32 if backend == "torch" else np.float64  # torch: the peer's float32
    assert got.dtype == want_dtype
    ref = np.stack([scipy.signal.convolve2d(xi.reshape(H, W), k, mode="same").reshape(-1) for xi in x])
    np.testing.assert_allclose(got.toarray(), ref, **tol(want_dtype))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    combo=st.sampled_from(COMBOS),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    n=st.integers(1, 4),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from([None, np.float32, np.float64]),
    sparse_in=st.booleans(),
)
def test_hypothesis_matches_peer(data, combo, h, w, kh, kw, n, density, dtype, sparse_in):
    modes = [m for m in MODES if m != "valid" or (h >= kh and w >= kw)]
    mode = data.draw(st.sampled_from(modes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    k = rng.standard_normal((kh, kw))
    x = (rng.random((n, h * w)) < density) * rng.standard_normal((n, h * w))
    if sparse_in:
        x = scipy.sparse.csr_matrix(x)
    method, backend = combo
    kwargs = dict(mode=mode, dtype=dtype, method=method, backend=backend)
    ours, peer = Toeplitz_convolution2d((h, w), k, **kwargs), Peer((h, w), k, **kwargs)
    assert_same_result(ours(x, batching=True), peer(x, batching=True), sparse_in)


def test_explicit_zeros_and_cancellation_are_not_stored():
    x = scipy.sparse.csr_matrix((np.array([1.0, 0.0, -1.0]), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 3))
    k = np.array([[1.0, 1.0]])
    for method, backend in COMBOS:
        ours = Toeplitz_convolution2d((1, 3), k, mode="full", method=method, backend=backend)
        peer = Peer((1, 3), k, mode="full", method=method, backend=backend)
        y = ours(x)
        assert_same_result(y, peer(x), True)
        x2 = scipy.sparse.csr_matrix(np.array([[1.0, -1.0]]))
        y2 = Toeplitz_convolution2d((1, 2), k, mode="full", method=method, backend=backend)(x2)
        assert y2.nnz == 2  # 1 - 1 == 0 in the middle is dropped


def test_sparse_array_input_and_empty_batch():
    rng = np.random.default_rng(3)
    x = batch(rng)
    ours = Toeplitz_convolution2d((H, W), np.ones((3, 3)))
    peer = Peer((H, W), np.ones((3, 3)))
    assert_same_result(ours(scipy.sparse.csr_array(x)), peer(scipy.sparse.csr_matrix(x)), True)
    empty = scipy.sparse.csr_matrix((2, H * W))
    assert_same_result(ours(empty), peer(empty), True)
    zero_k = Toeplitz_convolution2d((H, W), np.zeros((3, 3)))
    assert zero_k(scipy.sparse.csr_matrix(x)).nnz == 0 and not zero_k(x).any()


# -- errors --------------------------------------------------------------------

INIT_ERRORS = [
    (dict(x_shape=5), True),
    (dict(x_shape=("a", 3)), True),
    (dict(k=[[1.0, 2.0]]), True),
    (dict(k=np.ones(3)), False),
    (dict(mode=3), True),
    (dict(mode="circular"), False),
    (dict(method=1), True),
    (dict(method="fft"), False),
    (dict(mode="valid", k=np.ones((6, 2))), False),
    (dict(method="direct", backend="torch"), False),
    (dict(method="lazy", backend="numba"), False),
    (dict(method="precomputed", backend="cupy"), False),
    (dict(method="gather_scatter", backend="auto"), False),
]


@pytest.mark.parametrize("kwargs,is_type", INIT_ERRORS, ids=[str(sorted(kw)) + str(i) for i, (kw, _) in enumerate(INIT_ERRORS)])
def test_init_errors_same_text_and_catchable(kwargs, is_type):
    args = dict(x_shape=(H, W), k=np.ones((2, 2)))
    args.update(kwargs)
    with pytest.raises(AssertionError) as peer_err:
        Peer(**args)
    with pytest.raises(AssertionError) as ours_err:  # old code: except AssertionError
        Toeplitz_convolution2d(**args)
    assert str(ours_err.value) == str(peer_err.value)
    assert isinstance(ours_err.value, ValueError)  # new code: except ValueError
    assert isinstance(ours_err.value, ConvolutionArgumentError)
    assert isinstance(ours_err.value, TypeError) == is_type


def test_error_texts_users_match_on():
    def msg(**kw):
        args = dict(x_shape=(H, W), k=np.ones((2, 2)))
        args.update(kw)
        with pytest.raises(ValueError) as err:
            Toeplitz_convolution2d(**args)
        return str(err.value)

    assert "x must be larger than k" in msg(mode="valid", k=np.ones((6, 6)))
    assert "mode must be 'full', 'same', or 'valid'" in msg(mode="bogus")
    assert "backend='torch' is not valid for method='direct'" in msg(backend="torch")


def test_call_errors_same_text_and_catchable():
    rng = np.random.default_rng(4)
    big_k = np.ones((6, 2))
    peer, ours = Peer((H, W), big_k), Toeplitz_convolution2d((H, W), big_k)
    calls = [
        (batch(rng), dict(mode="bogus")),
        (batch(rng), dict(mode="valid")),  # the kernel is taller than the frame
        (np.zeros((2, H * W - 1)), dict()),
        (scipy.sparse.csr_matrix((2, H * W + 1)), dict(batching=True)),
        (np.zeros((H, W + 1)), dict(batching=False)),
        (scipy.sparse.csr_matrix((W, H)), dict(batching=False)),
        (np.zeros((1, H * W)), dict(batching=False)),
    ]
    for x, kw in calls:
        with pytest.raises(AssertionError) as peer_err:
            peer(x, **kw)
        with pytest.raises(AssertionError) as ours_err:
            ours(x, **kw)
        assert str(ours_err.value) == str(peer_err.value)
        assert isinstance(ours_err.value, ValueError)
    for text, x, kw in [
        ("When batching=True, x.shape[1] (29) must equal x_shape[0]*x_shape[1] (30)", np.zeros((2, 29)), {}),
        ("When batching=False, x.shape ((5, 7)) must equal x_shape ((5, 6))", np.zeros((5, 7)), dict(batching=False)),
    ]:
        with pytest.raises(ValueError, match=re.escape(text)):
            ours(x, **kw)


def test_errors_the_peer_did_not_raise_are_catchable_the_same_way():
    # deliberate: clear errors at construction or call instead of late failures / silent NaN
    for kw in (
        dict(k=np.array([[np.nan, 1.0]])),
        dict(k=np.zeros((0, 3))),
        dict(x_shape=(5, 6, 7)),
        dict(x_shape=(0, 6)),
        dict(x_shape=(5.5, 6)),
        dict(max_buffer_bytes=0),
        dict(dtype=np.complex128),
    ):
        args = dict(x_shape=(H, W), k=np.ones((2, 2)))
        args.update(kw)
        with pytest.raises(ConvolutionArgumentError) as err:
            Toeplitz_convolution2d(**args)
        assert isinstance(err.value, AssertionError) and isinstance(err.value, ValueError)
    ours = Toeplitz_convolution2d((H, W), np.ones((2, 2)))
    with pytest.raises(ConvolutionArgumentTypeError):
        ours(np.zeros((2, H * W), dtype=complex))
    with pytest.raises(ValueError, match="batching=True, x must be 2D"):
        ours(np.zeros((2, H, W)))


def test_exception_classes():
    assert issubclass(ConvolutionArgumentError, ValueError) and issubclass(ConvolutionArgumentError, AssertionError)
    assert issubclass(ConvolutionArgumentTypeError, TypeError) and issubclass(ConvolutionArgumentTypeError, ConvolutionArgumentError)


# -- verbose -------------------------------------------------------------------


def test_verbose_warning_text_matches_peer(capsys, monkeypatch):
    # x_shape*k.shape reaches 1e8, but a zero kernel keeps our Toeplitz matrix empty;
    # the peer's builder is stubbed so that it does not allocate 1e8 entries.
    import sparse_convolution.sparse_convolution as peer_mod

    monkeypatch.setattr(peer_mod, "build_toeplitz_scipy", lambda **kw: (None, None))
    k = np.zeros((100, 100))
    Peer((100, 100), k, method="precomputed", verbose=True)
    peer_text = capsys.readouterr().out
    Toeplitz_convolution2d((100, 100), k, method="precomputed", verbose=True)
    ours_text = capsys.readouterr().out
    assert ours_text == peer_text
    assert ours_text.startswith("Warning: Expected number of non-zero elements in the Toeplitz matrix is large.")
    assert "Consider using method='lazy' or 'gather_scatter'." in ours_text
    # nothing without verbose, below the threshold, or for other methods
    Toeplitz_convolution2d((100, 100), k, method="precomputed")
    Toeplitz_convolution2d((10, 10), np.ones((3, 3)), method="precomputed", verbose=2)
    Toeplitz_convolution2d((100, 100), k, method="gather_scatter", verbose=True)
    assert capsys.readouterr().out == ""


# -- documented examples run unchanged -----------------------------------------


def _readme_blocks():
    meta = importlib.metadata.metadata("sparse_convolution")
    text = meta.get_payload() or meta["Description"]
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3 and "Toeplitz_convolution2d" in blocks[0]
    return "\n".join(blocks)


def _run_with(module, code, seed=0):
    ns = {}
    np.random.seed(seed)
    saved = sys.modules.get("sparse_convolution")
    sys.modules["sparse_convolution"] = module
    try:
        exec(compile(code, "<sparse_convolution README>", "exec"), ns)
    finally:
        sys.modules["sparse_convolution"] = saved
    return ns


def test_peer_readme_runs_unchanged():
    code = _readme_blocks()
    shim = types.ModuleType("sparse_convolution")
    shim.Toeplitz_convolution2d = dask_sparseconv.Toeplitz_convolution2d
    ours = _run_with(shim, code)
    peer = _run_with(sparse_convolution, code)
    assert isinstance(ours["conv"], Toeplitz_convolution2d)
    assert_same_result(ours["out"], peer["out"], True)  # the batched result of block 2
    # block 1's single-image result, recomputed from the same inputs
    np.testing.assert_allclose(
        ours["conv"](ours["x"], batching=False).toarray(), peer["conv"](peer["x"], batching=False).toarray(), rtol=1e-10
    )
    assert (ours["conv"].method, ours["conv"].backend) == (peer["conv"].method, peer["conv"].backend) == ("direct", "numba")


def test_peer_docstring_example():
    np.random.seed(1)
    k = np.random.rand(10, 10)
    x = scipy.sparse.csr_matrix(np.random.rand(5, 3000))
    ours = Toeplitz_convolution2d(x_shape=(100, 30), k=k, mode="same", method="direct")(x=x, batching=True)
    peer = Peer(x_shape=(100, 30), k=k, mode="same", method="direct")(x=x, batching=True)
    assert_same_result(ours, peer, True)


def test_exported_from_package():
    assert dask_sparseconv.Toeplitz_convolution2d is Toeplitz_convolution2d


# -- pickling and threads ------------------------------------------------------


def test_pickle_round_trip():
    rng = np.random.default_rng(5)
    ours = Toeplitz_convolution2d((H, W), rng.standard_normal((3, 3)), mode="full", method="precomputed", backend="numpy", dtype=np.float32)
    again = pickle.loads(pickle.dumps(ours))
    x = scipy.sparse.csr_matrix(batch(rng))
    for attr in ("method", "backend", "mode", "x_shape", "dtype", "device", "max_buffer_bytes"):
        assert getattr(again, attr) == getattr(ours, attr)
    assert_same_result(again(x), ours(x).tocsc(), True)


def test_concurrent_calls():
    rng = np.random.default_rng(6)
    k = rng.standard_normal((3, 3))
    xs = [scipy.sparse.csr_matrix(batch(rng, n=4)) for _ in range(6)]
    for method, backend in (("direct", "numba"), ("precomputed", "numpy"), ("gather_scatter", "torch")):
        ours = Toeplitz_convolution2d((H, W), k, method=method, backend=backend)
        expected = [Peer((H, W), k, method=method, backend=backend)(x).toarray() for x in xs]
        results = [None] * len(xs)

        def work(i, results=results, ours=ours):
            results[i] = ours(xs[i]).toarray()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got, want in zip(results, expected):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_every_combo_listed():
    assert set(COMBOS) == {(m, b) for m, bs in sparse_convolution.sparse_convolution.VALID_BACKENDS.items() for b in bs}
    assert list(itertools.chain(*dask_sparseconv.compat.VALID_BACKENDS.values())) == list(
        itertools.chain(*sparse_convolution.sparse_convolution.VALID_BACKENDS.values())
    )


def test_nan_in_images_follows_scipy():
    # documented difference: the peer's direct method returned an all-zero image here
    k = np.array([[1.0, 0.0, 1.0]])
    x = np.zeros((1, 5))
    x[0, 2] = np.nan
    x[0, 0] = 1.0
    ref = scipy.signal.convolve2d(x, k, mode="same")  # NaN wherever a tap reaches the NaN pixel...
    ref[0, 2] = 0.0  # ...except through the zero tap, which sparse methods (ours and the peer's) skip
    for method, backend in COMBOS:
        ours = Toeplitz_convolution2d((1, 5), k, method=method, backend=backend)
        np.testing.assert_array_equal(ours(x), ref)
        np.testing.assert_array_equal(ours(scipy.sparse.csr_matrix(x)).toarray(), ref)


def test_more_inputs_accepted_and_float16():
    import torch

    k = np.arange(1.0, 7.0).reshape(2, 3)
    x = batch(np.random.default_rng(7))
    want = Peer((H, W), k)(x)
    np.testing.assert_allclose(Toeplitz_convolution2d((H, W), torch.as_tensor(k))(x), want)  # torch kernel
    np.testing.assert_allclose(Toeplitz_convolution2d((H, W), k)(x.tolist()), want)  # array-like images
    y = Toeplitz_convolution2d((H, W), k.astype(np.float16))(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-3)


def test_unavailable_cuda_device_is_an_argument_error():
    import torch

    if torch.cuda.is_available():  # this check is about CPU-only machines (CI, this repo's dev boxes)
        assert Toeplitz_convolution2d((H, W), np.ones((2, 2)), method="lazy", backend="torch", device="cuda").device == "cuda"
        return
    with pytest.raises(ConvolutionArgumentError, match="CUDA is not available"):
        Toeplitz_convolution2d((H, W), np.ones((2, 2)), method="lazy", backend="torch", device="cuda")
