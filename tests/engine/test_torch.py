"""Torch engines (precomputed, lazy, gather_scatter) on device='cpu'.

Every result is checked image by image against scipy.signal.convolve2d, and
every CSR result for the engine contract: canonical (sorted, no duplicates),
no stored zeros, data of the engine dtype, int32 indices when they fit.
Scratch budgets are varied so the chunked paths (several accumulator groups,
several expansion groups, several dense copy-back groups) run too.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
import torch  # CI installs the CPU build: these tests are never skipped
from engine_support import check_csr, random_csr, reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sparseconv import Convolver
from dask_sparseconv.engine import engine_class
from dask_sparseconv.engine.torch_engines import (
    GatherScatterTorch,
    LazyTorch,
    PrecomputedTorch,
    estimate_toeplitz_bytes,
)
from dask_sparseconv.geometry import geometry

ENGINES = (PrecomputedTorch, LazyTorch, GatherScatterTorch)
MODES = ("full", "same", "valid")
DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}
# default / a few images per group / one image per group (and tiny expansion groups)
BUDGETS = (256 * 1024**2, 2048, 1)


def run_both(cls, x, frame_shape, kernel, mode, dtype, budget=256 * 1024**2, accel_paths=False):
    """Run to_csr and to_dense and check both against scipy.

    ``accel_paths=True`` runs the code paths meant for accelerators (device
    memory separate from the host: tiled dense accumulators copied back,
    sorting on the device) on the CPU device.
    """
    dtype = np.dtype(dtype)
    eng = cls(frame_shape, kernel.astype(dtype), dtype, device="cpu", max_buffer_bytes=budget)
    if accel_paths:
        eng._shares_host_memory = False
    geo = geometry(frame_shape, kernel.shape, mode)
    ref = reference(x, frame_shape, kernel.astype(dtype), mode)
    n = x.shape[0]
    y = eng.to_csr(x, mode)
    check_csr(y, n, geo.out_pixels, dtype)
    np.testing.assert_allclose(y.toarray().reshape(ref.shape), ref, **TOL[dtype])
    d = eng.to_dense(x, mode)
    assert d.shape == (n,) + geo.out_shape and d.dtype == dtype and d.flags.c_contiguous
    np.testing.assert_allclose(d, ref, **TOL[dtype])
    return eng, y, d


# -- registry and devices ----------------------------------------------------


@pytest.mark.parametrize("method,cls", [("precomputed", PrecomputedTorch), ("lazy", LazyTorch), ("gather_scatter", GatherScatterTorch)])
def test_registry(method, cls):
    assert engine_class(method, "torch") is cls
    assert cls.method == method and cls.backend == "torch"


def test_device_is_resolved_string():
    eng = GatherScatterTorch((4, 4), np.ones((2, 2)), np.float32, device="cpu")
    assert eng.device == "cpu"
    eng = LazyTorch((4, 4), np.ones((2, 2)), np.float32, device=None)  # resolved like the Convolver does
    assert eng.device in ("cpu", "cuda")


# -- correctness against scipy -----------------------------------------------


@pytest.mark.parametrize("cls", ENGINES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("accel_paths", (False, True), ids=("host", "accel"))
def test_matches_scipy(cls, mode, dtype, budget, accel_paths):
    rng = np.random.default_rng(hash((cls.__name__, mode, budget)) % 2**32)
    H, W = 9, 7
    kernel = rng.standard_normal((3, 4))
    x = random_csr(rng, 6, H, W, 0.3, dtype)
    x.data[x.indptr[2] : x.indptr[3]] = 0  # an empty image in the middle
    x.eliminate_zeros()
    assert x.has_canonical_format and x.getrow(2).nnz == 0
    run_both(cls, x, (H, W), kernel, mode, dtype, budget, accel_paths)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    H=st.integers(1, 8),
    W=st.integers(1, 8),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    n=st.integers(0, 4),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    cls=st.sampled_from(ENGINES),
    budget=st.sampled_from(BUDGETS),
)
def test_hypothesis_matches_scipy(data, H, W, kh, kw, n, density, dtype, cls, budget):
    modes = [m for m in MODES if m != "valid" or (H >= kh and W >= kw)]
    mode = data.draw(st.sampled_from(modes))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((kh, kw))
    kernel[rng.random((kh, kw)) < 0.3] = 0  # zero taps
    x = random_csr(rng, n, H, W, density, dtype, explicit_zeros=data.draw(st.booleans()), idx64=data.draw(st.booleans()))
    run_both(cls, x, (H, W), kernel, mode, dtype, budget, accel_paths=data.draw(st.booleans()))


# -- edge cases ----------------------------------------------------------------


@pytest.mark.parametrize("cls", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(cls, dtype):
    eng = cls((5, 6), np.ones((3, 3)), dtype, device="cpu")
    for x in (scipy.sparse.csr_matrix((0, 30), dtype=dtype), scipy.sparse.csr_matrix((4, 30), dtype=dtype)):
        for mode in MODES:
            geo = geometry((5, 6), (3, 3), mode)
            y = eng.to_csr(x, mode)
            check_csr(y, x.shape[0], geo.out_pixels, dtype)
            assert y.nnz == 0
            d = eng.to_dense(x, mode)
            assert d.shape == (x.shape[0],) + geo.out_shape and d.dtype == dtype and not d.any()


@pytest.mark.parametrize("cls", ENGINES)
def test_all_zero_kernel(cls):
    rng = np.random.default_rng(1)
    x = random_csr(rng, 3, 6, 6, 0.5, np.float64)
    eng = cls((6, 6), np.zeros((3, 3)), np.float64, device="cpu")
    y = eng.to_csr(x, "same")
    check_csr(y, 3, 36, np.float64)
    assert y.nnz == 0
    assert not eng.to_dense(x, "full").any()


@pytest.mark.parametrize("cls", ENGINES)
def test_explicit_zeros_and_cancellation(cls):
    # explicit stored zeros in the input, and two pixels whose contributions cancel exactly
    x = scipy.sparse.csr_matrix((np.array([1.0, 0.0, -1.0]), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 3))
    kernel = np.array([[1.0, 1.0]])
    _, y, d = run_both(cls, x, (1, 3), kernel, "full", np.float64)
    # full: [1, 1+0, 0-1, -1] -> [1, 1, -1, -1]; same: [1, 1, -1]; check a cancelling one too
    x2 = scipy.sparse.csr_matrix(np.array([[1.0, -1.0]]))
    _, y2, _ = run_both(cls, x2, (1, 2), np.array([[1.0, 1.0]]), "full", np.float64)
    assert y2.nnz == 2  # the middle output 1 - 1 == 0 is not stored


@pytest.mark.parametrize("cls", ENGINES)
@pytest.mark.parametrize("mode", ("full", "same"))
def test_kernel_larger_than_image(cls, mode):
    rng = np.random.default_rng(2)
    x = random_csr(rng, 3, 2, 3, 0.8, np.float32)
    run_both(cls, x, (2, 3), rng.standard_normal((5, 6)), mode, np.float32)


@pytest.mark.parametrize("cls", ENGINES)
def test_one_by_one(cls):
    rng = np.random.default_rng(3)
    x = random_csr(rng, 4, 1, 1, 0.7, np.float64)
    for mode in MODES:
        run_both(cls, x, (1, 1), np.array([[2.5]]), mode, np.float64)
    x = random_csr(rng, 2, 4, 5, 0.5, np.float64)
    for mode in MODES:
        run_both(cls, x, (4, 5), np.array([[-3.0]]), mode, np.float64)


@pytest.mark.parametrize("cls", ENGINES)
def test_dense_out_buffer_is_used_and_reset(cls):
    rng = np.random.default_rng(4)
    x = random_csr(rng, 3, 5, 5, 0.4, np.float64)
    eng = cls((5, 5), np.ones((3, 3)), np.float64, device="cpu")
    buf = np.full((3, 5, 5), 7.0)
    res = eng.to_dense(x, "same", out=buf)
    assert res is buf
    np.testing.assert_allclose(buf, reference(x, (5, 5), np.ones((3, 3)), "same"))
    with pytest.raises(ValueError, match="out must be"):
        eng.to_dense(x, "same", out=np.zeros((3, 5, 5), dtype=np.float32))


@pytest.mark.parametrize("cls", ENGINES)
def test_input_not_modified_and_read_only_ok(cls):
    rng = np.random.default_rng(5)
    x = random_csr(rng, 3, 6, 5, 0.4, np.float32)
    before = (x.data.copy(), x.indices.copy(), x.indptr.copy())
    for arr in (x.data, x.indices, x.indptr):
        arr.flags.writeable = False
    run_both(cls, x, (6, 5), rng.standard_normal((2, 3)), "same", np.float32)
    for a, b in zip(before, (x.data, x.indices, x.indptr)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accel_paths", (False, True), ids=("host", "accel"))
def test_gather_scatter_row_bands_on_sparse_tall_frame(accel_paths):
    """One image's output exceeds the budget: row bands, only where data is."""
    H, W = 400, 9
    x = scipy.sparse.csr_matrix((2, H * W))
    pix = np.array([0, 5, 3 * W + 4, 200 * W, 200 * W + 8, (H - 1) * W + 3, H * W - 1])
    x = scipy.sparse.csr_matrix((np.arange(1.0, 8.0), pix, np.array([0, 7, 7])), shape=(2, H * W))
    kernel = np.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]])
    eng, _, _ = run_both(GatherScatterTorch, x, (H, W), kernel, "same", np.float64, budget=8 * 9 * 5, accel_paths=accel_paths)
    geo = geometry((H, W), kernel.shape, "same")
    tiles = list(eng._tiles(x, geo))
    assert all(b - a == 1 and 0 < (hi - lo) <= 5 for a, b, lo, hi, s, e in tiles)
    assert len(tiles) <= 5  # three clusters of rows, not 80 bands


# -- precomputed specifics -----------------------------------------------------


def test_toeplitz_built_once_per_mode_and_lives_on_device():
    eng = PrecomputedTorch((6, 7), np.arange(1.0, 7.0).reshape(2, 3), np.float64, device="cpu")
    base = eng.nbytes()
    m1 = eng.prepare("same")
    assert eng.prepare("same") is m1
    assert m1.layout == torch.sparse_csr and m1.device.type == "cpu" and m1.dtype == torch.float64
    assert m1.shape == (42, 42)
    assert eng.nbytes() == base + eng.estimated_bytes("same")
    eng.prepare("full")
    assert set(eng._matrices) == {"same", "full"}


def test_toeplitz_too_large_is_refused_before_building():
    eng = PrecomputedTorch((64, 64), np.ones((5, 5)), np.float64, device="cpu")
    eng.max_toeplitz_bytes = 1000
    with pytest.raises(ValueError, match="Toeplitz matrix"):
        eng.prepare("same")
    assert not eng._matrices


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_estimate_toeplitz_bytes(mode, dtype):
    rng = np.random.default_rng(6)
    kernel = rng.standard_normal((3, 4))
    kernel[0, 1] = 0
    eng = PrecomputedTorch((9, 8), kernel.astype(dtype), dtype, device="cpu")
    mat = eng.prepare(mode)
    actual = sum(t.numel() * t.element_size() for t in (mat.crow_indices(), mat.col_indices(), mat.values()))
    assert estimate_toeplitz_bytes((9, 8), kernel, dtype, mode) == actual
    # mode-free estimate: H*W*nnz(kernel) entries, an upper bound, exact for 'full'
    upper = estimate_toeplitz_bytes((9, 8), kernel, dtype)
    nnz = 9 * 8 * 11
    assert upper == nnz * (np.dtype(dtype).itemsize + 4) + (9 * 8 + 1) * 4
    assert upper >= actual
    if mode == "full":
        assert upper == actual


def test_estimate_toeplitz_bytes_large_frames_use_int64():
    # 50_000 x 50_000 frame, 3x3 kernel: 2.25e10 entries, int64 indices; nothing is allocated
    est = estimate_toeplitz_bytes((50_000, 50_000), np.ones((3, 3)), np.float32)
    entries = 50_000 * 50_000 * 9
    assert est == entries * (4 + 8) + (50_000 * 50_000 + 1) * 8
    assert estimate_toeplitz_bytes((10, 10), np.zeros((3, 3)), np.float64) == 101 * 4


# -- thread safety -------------------------------------------------------------


@pytest.mark.parametrize("cls", ENGINES)
def test_thread_safety(cls):
    rng = np.random.default_rng(7)
    H, W = 12, 10
    kernel = rng.standard_normal((3, 3))
    eng = cls((H, W), kernel, np.float64, device="cpu", max_buffer_bytes=4096)
    batches = [random_csr(rng, 5, H, W, 0.2, np.float64) for _ in range(8)]
    jobs = [(x, mode) for x in batches for mode in MODES]
    expected = [reference(x, (H, W), kernel, mode) for x, mode in jobs]
    errors = []
    barrier = threading.Barrier(4)

    def worker(t):
        try:
            barrier.wait()  # first calls (Toeplitz builds) race on purpose
            for i in range(t, len(jobs), 4):
                x, mode = jobs[i]
                y = eng.to_csr(x, mode) if i % 2 else eng.to_dense(x, mode)
                y = y.toarray() if scipy.sparse.issparse(y) else y
                np.testing.assert_allclose(y.reshape(expected[i].shape), expected[i], rtol=1e-10, atol=1e-12)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    if cls is PrecomputedTorch:
        assert set(eng._matrices) == set(MODES)


# -- through the Convolver -----------------------------------------------------


@pytest.mark.parametrize("method", ("precomputed", "lazy", "gather_scatter"))
def test_convolver_torch_backend(method):
    rng = np.random.default_rng(8)
    x = random_csr(rng, 4, 8, 9, 0.3, np.float32)
    kernel = rng.standard_normal((3, 3))
    conv = Convolver((8, 9), kernel, mode="same", method=method, backend="torch", device="cpu")
    assert conv.device == "cpu"
    y = conv(x)
    ref = reference(x, (8, 9), kernel.astype(np.float32), "same")
    check_csr(y, 4, 72, np.float32)
    np.testing.assert_allclose(y.toarray().reshape(ref.shape), ref, **TOL[np.dtype(np.float32)])
    d = conv(x.toarray().reshape(4, 8, 9).astype(np.float64))
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, reference(x, (8, 9), kernel, "same"), rtol=1e-5, atol=1e-5)


def test_import_does_not_import_torch():
    code = (
        "import sys, numpy as np, scipy.sparse\n"
        "import dask_sparseconv\n"
        "from dask_sparseconv import Convolver, engine\n"
        "c = Convolver((4, 4), np.ones((2, 2)), method='gather_scatter', backend='numpy')\n"
        "c(scipy.sparse.random(2, 16, density=0.5, format='csr'))\n"
        "import dask_sparseconv.compat\n"
        "dask_sparseconv.Toeplitz_convolution2d((4, 4), np.ones((2, 2)), method='precomputed')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
