"""Edge cases for every (method, backend) cell of the engine registry.

Shapes at the limits (kernel larger than the frame, 1x1 and even kernels,
one-row / one-column frames), degenerate data (all-zero kernel, empty
images, empty batch, stored zeros, exact cancellation), non-finite image
values, int64 index input, frames above 2**31 pixels, and the ``out=``
buffer of ``Engine.to_dense``. Torch cells run on ``device='cpu'``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from scipy_oracle import convolve_stack

from dask_sparseconv import Convolver
from dask_sparseconv.engine import REGISTRY
from dask_sparseconv.engine.base import INT32_MAX
from dask_sparseconv.geometry import geometry

MODES = ("full", "same", "valid")
CELLS = sorted(REGISTRY)
CELL_IDS = [f"{m}-{b}" for m, b in CELLS]
cells = pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)


def cell_kwargs(cell):
    method, backend = cell
    return dict(method=method, backend=backend, **({"device": "cpu"} if backend == "torch" else {}))


def make(cell, frame_shape, kernel, mode="same", **kw):
    return Convolver(frame_shape, kernel, mode=mode, **cell_kwargs(cell), **kw)


def reference(dense_imgs, kernel, mode):
    """scipy.signal.convolve2d per image in float64, flattened: (n, out_pixels)."""
    return convolve_stack(dense_imgs, kernel, mode).reshape(len(dense_imgs), -1)


def nonzero_tap_reference(img, kernel, mode):
    """The documented semantics for non-finite values: only nonzero taps contribute."""
    H, W = img.shape
    kh, kw = kernel.shape
    geo = geometry((H, W), (kh, kw), mode)
    full = np.zeros((H + kh - 1, W + kw - 1))
    for i, j in zip(*np.nonzero(kernel)):
        full[i : i + H, j : j + W] += kernel[i, j] * img
    Ho, Wo = geo.out_shape
    return full[geo.top : geo.top + Ho, geo.left : geo.left + Wo]


def check_csr(y, n, n_cols, dtype=np.float64):
    assert y.format == "csr" and y.shape == (n, n_cols)
    assert y.data.dtype == np.dtype(dtype)
    want = np.int32 if max(n, n_cols, y.nnz) <= INT32_MAX else np.int64
    assert y.indices.dtype == want and y.indptr.dtype == want, (y.indices.dtype, y.indptr.dtype)
    for i in range(n):
        assert np.all(np.diff(y.indices[y.indptr[i] : y.indptr[i + 1]]) > 0)
    assert not np.any(y.data == 0)


def check_all(cell, frame_shape, kernel, imgs, modes=MODES, dtype=np.float64, **kw):
    """CSR and dense results of ``imgs`` (n, H, W) against scipy for each mode."""
    imgs = np.asarray(imgs, dtype=dtype)
    n = imgs.shape[0]
    x = scipy.sparse.csr_matrix(imgs.reshape(n, -1))
    H, W = frame_shape
    conv = make(cell, frame_shape, kernel, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for mode in modes:
        ref = reference(imgs, kernel, mode)
        geo = geometry(frame_shape, np.shape(kernel), mode)
        y = conv(x, mode=mode)
        check_csr(y, n, geo.out_pixels, dtype)
        np.testing.assert_allclose(y.toarray(), ref, **tol, err_msg=f"{cell} {mode} csr")
        d = conv(x, mode=mode, out="dense")
        assert d.shape == (n, geo.out_pixels) and d.dtype == np.dtype(dtype)
        np.testing.assert_allclose(d, ref, **tol, err_msg=f"{cell} {mode} dense")


def rand_imgs(seed, n, H, W, density=0.3):
    rng = np.random.default_rng(seed)
    imgs = rng.standard_normal((n, H, W))
    imgs[rng.random(imgs.shape) > density] = 0
    return imgs


# -- shapes -------------------------------------------------------------------


@cells
@pytest.mark.parametrize("kshape", [(5, 7), (4, 2), (7, 1)])
def test_kernel_larger_than_frame(cell, kshape):
    kernel = np.random.default_rng(1).standard_normal(kshape)
    check_all(cell, (3, 2), kernel, rand_imgs(2, 3, 3, 2, density=0.8), modes=("full", "same"))
    with pytest.raises(ValueError, match="valid"):
        make(cell, (3, 2), kernel, mode="valid")
    conv = make(cell, (3, 2), kernel, mode="same")
    with pytest.raises(ValueError, match="valid"):
        conv(scipy.sparse.csr_matrix((1, 6)), mode="valid")


@cells
def test_one_by_one_kernel_is_scaling(cell):
    imgs = rand_imgs(3, 4, 9, 11)
    check_all(cell, (9, 11), np.array([[-2.5]]), imgs)
    y = make(cell, (9, 11), [[3.0]])(scipy.sparse.csr_matrix(imgs.reshape(4, -1)), mode="valid")
    np.testing.assert_array_equal(y.toarray(), 3.0 * imgs.reshape(4, -1))


@cells
@pytest.mark.parametrize("kshape", [(2, 2), (4, 6), (2, 5), (6, 3)])
def test_even_kernels(cell, kshape):
    kernel = np.random.default_rng(4).standard_normal(kshape)
    check_all(cell, (10, 13), kernel, rand_imgs(5, 3, 10, 13))


@cells
@pytest.mark.parametrize("frame_shape", [(1, 25), (25, 1), (1, 1)])
@pytest.mark.parametrize("kshape", [(1, 3), (3, 1), (3, 3), (1, 1)])
def test_one_row_and_one_column_frames(cell, frame_shape, kshape):
    kernel = np.arange(1.0, 1.0 + kshape[0] * kshape[1]).reshape(kshape)
    H, W = frame_shape
    modes = [m for m in MODES if m != "valid" or (H >= kshape[0] and W >= kshape[1])]
    check_all(cell, frame_shape, kernel, rand_imgs(6, 3, H, W, density=0.6), modes=modes)


# -- degenerate data ------------------------------------------------------------


@cells
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_zero_kernel(cell, dtype):
    conv = make(cell, (6, 7), np.zeros((3, 3)), dtype=dtype)
    x = scipy.sparse.csr_matrix(rand_imgs(7, 5, 6, 7).reshape(5, -1).astype(dtype))
    for mode in MODES:
        geo = geometry((6, 7), (3, 3), mode)
        y = conv(x, mode=mode)
        check_csr(y, 5, geo.out_pixels, dtype)
        assert y.nnz == 0
        d = conv(x, mode=mode, out="dense")
        assert d.shape == (5, geo.out_pixels) and d.dtype == dtype and not d.any()


@cells
def test_empty_images_and_empty_batches(cell):
    imgs = rand_imgs(8, 7, 8, 9)
    imgs[[0, 3, 6]] = 0  # empty first, middle and last images
    check_all(cell, (8, 9), np.random.default_rng(9).standard_normal((3, 2)), imgs)
    conv = make(cell, (8, 9), np.ones((3, 3)))
    for mode in MODES:
        geo = geometry((8, 9), (3, 3), mode)
        for n in (0, 4):  # no images / only empty images
            x = scipy.sparse.csr_matrix((n, 72))
            y = conv(x, mode=mode)
            check_csr(y, n, geo.out_pixels)
            assert y.nnz == 0
            d = conv(x, mode=mode, out="dense")
            assert d.shape == (n, geo.out_pixels) and not d.any()
    # dense stack with no images
    d = conv(np.zeros((0, 8, 9)))
    assert d.shape == (0, 8, 9)


@cells
def test_explicit_stored_zeros_are_ignored(cell):
    imgs = rand_imgs(10, 3, 7, 8)
    x = scipy.sparse.csr_matrix(imgs.reshape(3, -1))
    # store zeros at some empty pixels and zero out some stored values, keeping canonical form
    dense = x.toarray()
    mask = (dense != 0) | (np.random.default_rng(11).random(dense.shape) < 0.3)
    rows, cols = np.nonzero(mask)
    vals = dense[rows, cols]
    vals[::4] = 0.0
    xz = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=x.shape)
    assert xz.nnz > np.count_nonzero(xz.data) and xz.has_canonical_format
    conv = make(cell, (7, 8), np.random.default_rng(12).standard_normal((3, 3)))
    clean = xz.copy()
    clean.eliminate_zeros()
    for mode in MODES:
        y = conv(xz, mode=mode)
        check_csr(y, 3, geometry((7, 8), (3, 3), mode).out_pixels)
        ref = reference(clean.toarray().reshape(3, 7, 8), conv.kernel, mode)
        np.testing.assert_allclose(y.toarray(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(conv(xz, mode=mode, out="dense"), ref, rtol=1e-10, atol=1e-12)


@cells
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_cancellation_is_dropped(cell, dtype):
    conv = make(cell, (1, 2), np.array([[1.0, -1.0]]), mode="full", dtype=dtype)
    y = conv(scipy.sparse.csr_matrix(np.array([[3.0, 3.0]], dtype=dtype)))
    check_csr(y, 1, 3, dtype)
    assert y.nnz == 2 and list(y.indices) == [0, 2] and list(y.data) == [3.0, -3.0]
    # small integers: every sum is exact, so stored entries == nonzeros of scipy's result
    rng = np.random.default_rng(13)
    imgs = rng.integers(-2, 3, (5, 12, 10)).astype(dtype)
    kernel = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 2.0]])
    conv = make(cell, (12, 10), kernel, dtype=dtype)
    x = scipy.sparse.csr_matrix(imgs.reshape(5, -1))
    for mode in MODES:
        ref = reference(imgs, kernel, mode)
        y = conv(x, mode=mode)
        check_csr(y, 5, ref.shape[1], dtype)
        assert y.nnz == np.count_nonzero(ref)
        np.testing.assert_array_equal(y.toarray(), ref)
        np.testing.assert_array_equal(conv(x, mode=mode, out="dense"), ref)


@cells
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_through_nonzero_taps_only(cell, dtype):
    H, W = 9, 8
    img = np.zeros((H, W))
    img[1, 1] = np.nan
    img[4, 5] = np.inf
    img[5, 5] = 2.0
    img[7, 2] = -np.inf
    img[7, 3] = np.inf  # neighbours of opposite sign: inf + -inf = nan where both reach
    kernel = np.array([[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]])
    conv = make(cell, (H, W), kernel, dtype=dtype)
    x = scipy.sparse.csr_matrix(img.reshape(1, -1).astype(dtype))
    for mode in MODES:
        ref = nonzero_tap_reference(img, kernel, mode).reshape(1, -1)
        assert np.isnan(ref).any() and np.isposinf(ref).any() and np.isneginf(ref).any()
        y = conv(x, mode=mode)
        check_csr(y, 1, ref.shape[1], dtype)
        np.testing.assert_array_equal(y.toarray(), ref.astype(dtype))  # NaN == NaN here
        assert y.nnz == np.count_nonzero(ref)  # NaN counts as stored
        np.testing.assert_array_equal(conv(x, mode=mode, out="dense"), ref.astype(dtype))


# -- indices and sizes --------------------------------------------------------------


@cells
def test_int64_index_input_small_frame(cell):
    imgs = rand_imgs(14, 4, 10, 9)
    x = scipy.sparse.csr_matrix(imgs.reshape(4, -1))
    x64 = scipy.sparse.csr_matrix((4, 90))
    x64.data, x64.indices, x64.indptr = x.data, x.indices.astype(np.int64), x.indptr.astype(np.int64)
    assert x64.indices.dtype == np.int64
    conv = make(cell, (10, 9), np.random.default_rng(15).standard_normal((3, 4)))
    for mode in MODES:
        y = conv(x64, mode=mode)
        check_csr(y, 4, geometry((10, 9), (3, 4), mode).out_pixels)  # int32 out: sizes fit
        ref = reference(imgs, conv.kernel, mode)
        np.testing.assert_allclose(y.toarray(), ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(conv(x64, mode=mode, out="dense"), ref, rtol=1e-10, atol=1e-12)


HUGE = 50_000  # a 50000 x 50000 frame: 2.5e9 pixels, beyond int32


def huge_input(seed=16):
    rng = np.random.default_rng(seed)
    pix = np.unique(np.concatenate([[0, HUGE - 1, HUGE * (HUGE - 1), HUGE * HUGE - 1], rng.integers(0, HUGE * HUGE, 60)]))
    pix = pix.astype(np.int64)
    vals = rng.standard_normal((2, len(pix)))
    indices = np.concatenate([pix, pix[::3]])
    data = np.concatenate([vals[0], vals[1][::3]])
    indptr = np.array([0, len(pix), len(pix), len(indices)], dtype=np.int64)  # image 1 empty
    x = scipy.sparse.csr_matrix((3, HUGE * HUGE))
    x.data, x.indices, x.indptr = data, indices, indptr
    return x


def huge_expected(x, kernel, mode):
    """Brute-force dict of {(image, output pixel): value} for a few nonzeros."""
    geo = geometry((HUGE, HUGE), kernel.shape, mode)
    Ho, Wo = geo.out_shape
    out = {}
    for img in range(x.shape[0]):
        for p in range(x.indptr[img], x.indptr[img + 1]):
            r, c = divmod(int(x.indices[p]), HUGE)
            for i, j in zip(*np.nonzero(kernel)):
                orow, ocol = r + i - geo.top, c + j - geo.left
                if 0 <= orow < Ho and 0 <= ocol < Wo:
                    key = (img, orow * Wo + ocol)
                    out[key] = out.get(key, 0.0) + x.data[p] * kernel[i, j]
    return {k: v for k, v in out.items() if v != 0}, geo


HUGE_KERNEL = np.array([[1.0, 0.0, -0.5, 2.0], [0.25, 1.5, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])


def check_huge(y, x, mode, exact_zeros=True):
    """``exact_zeros=False`` (the separable engine: the kernel as pairs of 1-D
    passes sums in another order): a sum that cancels to zero in 2-D may
    leave a rounding residue, so keys are compared up to values below 1e-12."""
    expected, geo = huge_expected(x, HUGE_KERNEL, mode)
    check_csr(y, 3, geo.out_pixels)
    assert y.indices.dtype == np.int64  # out_pixels > int32
    got = {}
    for img in range(3):
        for p in range(y.indptr[img], y.indptr[img + 1]):
            got[(img, int(y.indices[p]))] = float(y.data[p])
    if exact_zeros:
        assert got.keys() == expected.keys()
    else:
        assert all(abs(got[k]) < 1e-12 for k in got.keys() - expected.keys())
    for key, v in expected.items():
        assert got.get(key, 0.0) == pytest.approx(v, rel=1e-12, abs=1e-12)


# gather_scatter on torch allocates its accumulator per image, so it runs in a
# memory-capped child process (below) rather than here.
HUGE_OK = [c for c in CELLS if c[0] != "precomputed" and c != ("gather_scatter", "torch")]


@pytest.mark.parametrize("cell", HUGE_OK, ids=[f"{m}-{b}" for m, b in HUGE_OK])
@pytest.mark.parametrize("mode", MODES)
def test_frame_beyond_int32_pixels(cell, mode):
    x = huge_input()
    conv = make(cell, (HUGE, HUGE), HUGE_KERNEL, mode=mode)
    check_huge(conv(x), x, mode, exact_zeros=cell[0] != "separable")


def test_frame_beyond_int32_pixels_gather_scatter_torch_bounded_memory():
    """gather_scatter/torch must stay within max_buffer_bytes on a huge sparse frame.

    Run in a child process with a 6 GiB address-space cap so that an engine
    that allocates a full (2.5e9-pixel) accumulator fails instead of
    swamping the machine.
    """
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 * 1024**3, 6 * 1024**3))
        sys.path[:0] = [%r, %r]  # this folder and tests/ (the scipy oracle)
        import test_edge_cases as t
        from dask_sparseconv import Convolver
        x = t.huge_input()
        for mode in t.MODES:
            conv = Convolver((t.HUGE, t.HUGE), t.HUGE_KERNEL, mode=mode, method="gather_scatter", backend="torch", device="cpu")
            t.check_huge(conv(x), x, mode)
        print("OK")
        """
        % (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("cell", [c for c in CELLS if c[0] == "precomputed"], ids=lambda c: f"{c[0]}-{c[1]}")
def test_precomputed_refuses_a_huge_toeplitz_matrix(cell):
    x = huge_input()
    # refused when the convolver is built (it prepares its own mode) ...
    with pytest.raises(ValueError, match="Toeplitz") as err:
        make(cell, (HUGE, HUGE), HUGE_KERNEL, mode="same")
    assert "GiB" in str(err.value) and "gather_scatter" in str(err.value)
    # ... or, for another mode, by the call that would need it
    conv = make(cell, (40, 30), HUGE_KERNEL, mode="valid")
    eng = conv.engine(np.dtype(np.float64))
    eng.max_toeplitz_bytes = 1000  # 'valid' is already built; 'full' would exceed this
    small = scipy.sparse.csr_matrix(rand_imgs(21, 2, 40, 30).reshape(2, -1))
    np.testing.assert_allclose(conv(small).toarray(), reference(small.toarray().reshape(2, 40, 30), HUGE_KERNEL, "valid"))
    with pytest.raises(ValueError, match="Toeplitz"):
        conv(small, mode="full")
    if cell[1] != "torch":  # the CPU engines need no matrix at all for an all-zero kernel
        y = make(cell, (HUGE, HUGE), np.zeros((3, 3)))(x)
        assert y.nnz == 0 and y.shape == (3, HUGE * HUGE)


# -- engine-level details ----------------------------------------------------------


@cells
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_dense_writes_into_out(cell, dtype):
    imgs = rand_imgs(17, 3, 6, 5).astype(dtype)
    x = scipy.sparse.csr_matrix(imgs.reshape(3, -1))
    conv = make(cell, (6, 5), np.random.default_rng(18).standard_normal((2, 3)), dtype=dtype)
    eng = conv.engine(np.dtype(dtype))
    for mode in MODES:
        geo = geometry((6, 5), (2, 3), mode)
        buf = np.full((3,) + geo.out_shape, 7.0, dtype=dtype)  # stale content must be overwritten
        res = eng.to_dense(x, mode, out=buf)
        assert res is buf
        tol = 1e-5 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(buf.reshape(3, -1), reference(imgs, conv.kernel, mode), rtol=tol, atol=tol)
        with pytest.raises(ValueError, match="out"):
            eng.to_dense(x, mode, out=np.zeros((3, geo.out_shape[0] + 1, geo.out_shape[1]), dtype=dtype))
        fresh = eng.to_dense(x, mode)
        assert fresh.shape == (3,) + geo.out_shape and fresh.flags.c_contiguous and fresh.dtype == dtype


@cells
def test_modes_alternate_on_one_engine(cell):
    """Per-call modes in any order reuse the engine (and any per-mode state) correctly."""
    imgs = rand_imgs(19, 2, 11, 7)
    x = scipy.sparse.csr_matrix(imgs.reshape(2, -1))
    kernel = np.random.default_rng(20).standard_normal((4, 3))
    conv = make(cell, (11, 7), kernel, mode="valid")
    for mode in ("same", "full", "valid", "same", "full"):
        ref = reference(imgs, kernel, mode)
        np.testing.assert_allclose(conv(x, mode=mode).toarray(), ref, rtol=1e-10, atol=1e-12)
    assert conv.nbytes >= kernel.nbytes


@pytest.mark.parametrize("method,backend", [c for c in CELLS if c[1] != "torch"],
                         ids=[i for c, i in zip(CELLS, CELL_IDS) if c[1] != "torch"])
def test_engine_takes_a_kernel_that_is_not_an_array(method, backend):
    """An engine built straight from the registry with a nested list (or a
    read-only, non-contiguous or other-dtype array) as its kernel converts
    it; only a C-contiguous array of its dtype is kept as it is."""
    from dask_sparseconv.engine import engine_class

    rng = np.random.default_rng(4)
    frames = (rng.random((3, 9, 8)) < 0.2) * rng.random((3, 9, 8))
    x = scipy.sparse.csr_matrix(frames.reshape(3, -1))
    kernel = [[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]]
    want = convolve_stack(frames, np.array(kernel), "same")
    for k in (kernel, np.array(kernel, dtype=np.float32), np.asfortranarray(np.array(kernel))):
        eng = engine_class(method, backend)((9, 8), k, np.float64)
        assert type(eng.kernel) is np.ndarray and eng.kernel.dtype == np.float64 and eng.kernel.flags.c_contiguous
        got = eng.to_csr(x, "same").toarray().reshape(3, 9, 8)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
