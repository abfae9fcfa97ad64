"""Every (method, backend) cell of the engine registry against scipy.signal.convolve2d.

The matrix is read from :data:`dask_sparseconv.engine.REGISTRY`, so a new cell
is tested as soon as it is registered. Torch cells run on ``device='cpu'``.
Each hypothesis example builds a :class:`~dask_sparseconv.Convolver` and
checks, image by image against scipy (computed in float64):

* values, with ``rtol`` 1e-5 (float32) / 1e-10 (float64) of the error bound
  ``convolve2d(|image|, |kernel|)`` (so cancellation is judged fairly);
* the CSR contract: canonical rows (strictly increasing columns, checked by
  hand, not from scipy's cached flag), no stored zeros, the output dtype and
  the int32/int64 index rule;
* the dense path (``out='dense'``) against the CSR path;
* a per-call ``mode`` that differs from the convolver's.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy_oracle import convolve_rows

from dask_sparseconv import Convolver
from dask_sparseconv.engine import REGISTRY
from dask_sparseconv.engine.base import INT32_MAX
from dask_sparseconv.geometry import geometry

MODES = ("full", "same", "valid")
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}
CELLS = sorted(REGISTRY)
CELL_IDS = [f"{m}-{b}" for m, b in CELLS]


def cell_kwargs(cell):
    method, backend = cell
    return dict(method=method, backend=backend, **({"device": "cpu"} if backend == "torch" else {}))


# -- helpers (kept local so the file stands alone) ---------------------------


def reference(x, frame_shape, kernel, mode, cell=None):
    """(convolve2d(image, kernel), convolve2d(|image|, |kernel|)) per image, float64, flattened.

    For the separable cell the bound's kernel is the kernel's largest
    magnitude on every tap: a kernel of rank > 1 is a sum of pairs whose
    terms cancel only up to rounding of the kernel's scale, also where the
    kernel's tap is zero (docs/engine.md, "Accuracy").
    """
    n, out_pixels = x.shape[0], geometry(frame_shape, kernel.shape, mode).out_pixels
    ref = convolve_rows(x, frame_shape, kernel, mode).reshape(n, out_pixels)
    magnitude = np.abs(kernel)
    if cell is not None and cell[0] == "separable":
        magnitude = np.full(kernel.shape, np.abs(kernel).max() * max(1, min(kernel.shape)))
    bound = convolve_rows(abs(x), frame_shape, magnitude, mode).reshape(n, out_pixels)
    return ref, bound


def check_csr_contract(y, n, n_cols, dtype):
    assert isinstance(y, scipy.sparse.csr_matrix) or (scipy.sparse.issparse(y) and y.format == "csr")
    assert y.shape == (n, n_cols)
    assert y.data.dtype == dtype, f"output dtype {y.data.dtype}, expected {dtype}"
    want = np.int32 if max(n, n_cols, y.nnz) <= INT32_MAX else np.int64
    assert y.indices.dtype == want and y.indptr.dtype == want, (y.indices.dtype, y.indptr.dtype, want)
    indptr = np.asarray(y.indptr)
    assert indptr[0] == 0 and indptr[-1] == y.nnz == len(y.indices) == len(y.data)
    assert np.all(np.diff(indptr) >= 0)
    for i in range(n):
        cols = y.indices[indptr[i] : indptr[i + 1]]
        assert np.all(np.diff(cols) > 0), f"row {i} not strictly increasing: {cols}"
        assert cols.size == 0 or (cols[0] >= 0 and cols[-1] < n_cols)
    assert not np.any(y.data == 0), "explicit zeros stored in the result"


def assert_close(got, ref, bound, dtype, what=""):
    rtol = RTOL[np.dtype(dtype)]
    err = np.abs(np.asarray(got, dtype=np.float64) - ref)
    lim = rtol * (np.abs(ref) + bound) + 1e-300
    bad = err > lim
    assert not bad.any(), f"{what}: {bad.sum()} values off, worst {err[bad].max()} (limit {lim[bad].min()})"


# -- strategy ------------------------------------------------------------------


@st.composite
def problems(draw):
    H = draw(st.integers(1, 32))
    W = draw(st.integers(1, 32))
    kh = draw(st.integers(1, 7))
    kw = draw(st.integers(1, 7))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    modes = [m for m in MODES if m != "valid" or (H >= kh and W >= kw)]
    mode = draw(st.sampled_from(modes))
    call_mode = draw(st.sampled_from(modes))
    n = draw(st.integers(0, 4))
    density = draw(st.floats(0.0, 0.5))
    kernel_zeros = draw(st.floats(0.0, 0.7))
    values = draw(st.sampled_from(["normal", "small_ints"]))  # small ints make exact cancellation likely
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if values == "normal":
        img = rng.standard_normal((n, H * W))
        kernel = rng.standard_normal((kh, kw))
    else:
        img = rng.integers(-2, 3, (n, H * W)).astype(np.float64)
        kernel = rng.integers(-2, 3, (kh, kw)).astype(np.float64)
    img[rng.random(img.shape) >= density] = 0
    kernel[rng.random(kernel.shape) < kernel_zeros] = 0
    x = scipy.sparse.csr_matrix(img.astype(dtype))
    return (H, W), kernel.astype(dtype), dtype, mode, call_mode, x


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@SETTINGS
@given(problem=problems())
def test_matches_scipy(cell, problem):
    frame_shape, kernel, dtype, mode, call_mode, x = problem
    n = x.shape[0]
    conv = Convolver(frame_shape, kernel, mode=mode, **cell_kwargs(cell))
    for m in dict.fromkeys([mode, call_mode]):
        geo = geometry(frame_shape, kernel.shape, m)
        ref, bound = reference(x, frame_shape, kernel, m, cell)
        y = conv(x, mode=None if m == mode else m)
        check_csr_contract(y, n, geo.out_pixels, dtype)
        assert_close(y.toarray(), ref, bound, dtype, f"{cell} csr mode={m}")
        d = conv(x, out="dense", mode=m)
        assert isinstance(d, np.ndarray) and d.dtype == dtype and d.shape == (n, geo.out_pixels)
        assert_close(d, ref, bound, dtype, f"{cell} dense mode={m}")
        assert_close(d, y.toarray().astype(np.float64), bound, dtype, f"{cell} dense vs csr mode={m}")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("budget", [64, 4096])
def test_small_scratch_budget(cell, budget):
    """Tiny max_buffer_bytes forces banded / chunked accumulators; results stay exact."""
    rng = np.random.default_rng(budget)
    frame_shape, kernel = (23, 17), rng.standard_normal((5, 4))
    img = rng.standard_normal((6, 23 * 17))
    img[rng.random(img.shape) > 0.2] = 0
    img[2] = 0  # an empty image in the middle
    x = scipy.sparse.csr_matrix(img)
    conv = Convolver(frame_shape, kernel, max_buffer_bytes=budget, n_threads=3, **cell_kwargs(cell))
    for mode in MODES:
        ref, bound = reference(x, frame_shape, kernel, mode, cell)
        y = conv(x, mode=mode)
        check_csr_contract(y, 6, ref.shape[1], np.dtype(np.float64))
        assert_close(y.toarray(), ref, bound, np.float64, f"{cell} csr {mode}")
        assert_close(conv(x, out="dense", mode=mode), ref, bound, np.float64, f"{cell} dense {mode}")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_many_images_many_threads(cell):
    """A batch large enough to be split across threads, with uneven work per image."""
    rng = np.random.default_rng(7)
    frame_shape, kernel = (16, 20), rng.standard_normal((3, 3)).astype(np.float32)
    img = rng.standard_normal((61, 320)).astype(np.float32)
    density = rng.random((61, 1)) ** 3  # most images nearly empty, a few dense
    img[rng.random(img.shape) > density] = 0
    x = scipy.sparse.csr_matrix(img)
    conv = Convolver(frame_shape, kernel, mode="same", n_threads=4, **cell_kwargs(cell))
    ref, bound = reference(x, frame_shape, kernel, "same", cell)
    y = conv(x)
    check_csr_contract(y, 61, 320, np.dtype(np.float32))
    assert_close(y.toarray(), ref, bound, np.float32, f"{cell} csr")
    assert_close(conv(x, out="dense"), ref, bound, np.float32, f"{cell} dense")
