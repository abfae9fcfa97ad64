"""DirectNumba (method='direct', backend='numba') against scipy.signal.convolve2d.

Every result is checked image by image against scipy, and every CSR result
for canonical form (sorted, no duplicates), no stored zeros and the index
dtype rule of the engine contract. Scratch-memory budgets are varied so that
all three per-image paths run: frame-sized buffer, bounding-box buffer and
coordinate list.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from engine_support import check_csr, random_csr, reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sparseconv import Convolver
from dask_sparseconv.engine import direct, engine_class
from dask_sparseconv.engine.direct import DirectNumba
from dask_sparseconv.geometry import geometry

MODES = ("full", "same", "valid")
TOL = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12)}
# frame-sized buffer / bbox buffer of 8 float64 slots / bbox buffer of 512 slots
BUDGETS = (256 * 1024**2, 64, 4096)


# -- helpers -----------------------------------------------------------------


def check_against_scipy(y, ref, dtype, *, pattern=True):
    """Values (and the nonzero pattern) equal scipy's up to rounding."""
    tol = TOL[np.dtype(dtype)]
    got = y.toarray().reshape(ref.shape) if scipy.sparse.issparse(y) else y
    np.testing.assert_allclose(got, ref, equal_nan=True, **tol)
    if pattern and scipy.sparse.issparse(y):
        # continuous random values: exact zeros only where nothing lands
        np.testing.assert_array_equal(got != 0, ref != 0)


# -- property test -------------------------------------------------------------


@st.composite
def problems(draw):
    H = draw(st.integers(1, 40))
    W = draw(st.integers(1, 40))
    kh = draw(st.integers(1, 9))
    kw = draw(st.integers(1, 9))
    modes = [m for m in MODES if m != "valid" or (H >= kh and W >= kw)]
    return dict(
        H=H, W=W, kh=kh, kw=kw,
        n=draw(st.integers(0, 6)),
        density=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.6, 1.0])),
        kernel_density=draw(st.sampled_from([1.0, 0.5])),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        mode=draw(st.sampled_from(modes)),
        budget=draw(st.sampled_from(BUDGETS)),
        n_threads=draw(st.sampled_from([1, 2, 3, 4])),
        idx64=draw(st.booleans()),
        path=draw(st.sampled_from(["auto", "scan", "bits", "coo", "bands"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def force_path(eng, path):
    """Make every image take one extraction path: box scan, bit map,
    coordinate list, or (frame-sized scratch) bands of a few rows as large frames do."""
    if path == "bands":
        eng.band_frame_bytes, eng.band_ops = 0, 10**9
        eng.band_bytes = 3 * eng.dtype.itemsize * 8  # 24 values: bands of one to a few rows, or single rows
    elif path == "scan":
        eng.dense_ops = 1e18
    elif path == "bits":
        eng.dense_ops, eng.bbox_ratio, eng.bbox_slack = 0.0, 10**9, 10**9
    elif path == "coo":
        eng.dense_ops, eng.bbox_ratio, eng.bbox_slack = 0.0, 0, 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_engine_matches_scipy(p):
    rng = np.random.default_rng(p["seed"])
    H, W, dtype, mode = p["H"], p["W"], np.dtype(p["dtype"]), p["mode"]
    kernel = rng.standard_normal((p["kh"], p["kw"]))
    kernel[rng.random(kernel.shape) > p["kernel_density"]] = 0
    kernel = kernel.astype(dtype)
    x = random_csr(rng, p["n"], H, W, p["density"], dtype, explicit_zeros=True, idx64=p["idx64"])
    eng = DirectNumba((H, W), kernel, dtype, n_threads=p["n_threads"], max_buffer_bytes=p["budget"])
    eng.serial_work = 0  # let every multi-image call use the thread pool
    force_path(eng, p["path"])
    ref = reference(x, (H, W), kernel, mode)
    y = eng.to_csr(x, mode)
    check_csr(y, p["n"], ref[0].size if p["n"] else geometry((H, W), kernel.shape, mode).out_pixels, dtype)
    check_against_scipy(y, ref, dtype)
    d = eng.to_dense(x, mode)
    assert d.shape == ref.shape and d.dtype == dtype and d.flags.c_contiguous
    check_against_scipy(d, ref, dtype)


# -- explicit cases ------------------------------------------------------------


def run_engine_all_modes(frame_shape, kernel, x, dtype=np.float64, **kw):
    for mode in MODES:
        if mode == "valid" and (frame_shape[0] < kernel.shape[0] or frame_shape[1] < kernel.shape[1]):
            continue
        ref = reference(x, frame_shape, kernel, mode)
        for budget in BUDGETS:
            for path in ("auto", "scan", "bits", "coo", "bands"):
                eng = DirectNumba(frame_shape, kernel.astype(dtype), dtype, max_buffer_bytes=budget, **kw)
                force_path(eng, path)
                y = eng.to_csr(x, mode)
                check_csr(y, x.shape[0], ref[0].size, dtype)
                check_against_scipy(y, ref, dtype)
            check_against_scipy(eng.to_dense(x, mode), ref, dtype)


@pytest.mark.parametrize(
    "frame_shape,kshape",
    [
        ((1, 1), (1, 1)),
        ((1, 30), (3, 3)),  # one row
        ((30, 1), (3, 3)),  # one column
        ((1, 30), (1, 4)),
        ((7, 5), (9, 9)),  # kernel larger than the image (full/same only)
        ((3, 3), (8, 2)),
        ((12, 10), (1, 1)),
        ((12, 10), (4, 2)),  # even kernel: scipy's 'same' offset
        ((16, 16), (6, 6)),
    ],
)
def test_shapes(frame_shape, kshape):
    rng = np.random.default_rng(sum(frame_shape) * 31 + sum(kshape))
    kernel = rng.standard_normal(kshape)
    x = random_csr(rng, 5, *frame_shape, 0.3, np.float64)
    run_engine_all_modes(frame_shape, kernel, x)


def test_dense_images_and_kernel_with_holes():
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((5, 5))
    kernel[2, :] = 0
    kernel[:, 0] = 0
    x = random_csr(rng, 4, 20, 17, 1.0, np.float32)
    run_engine_all_modes((20, 17), kernel, x, dtype=np.float32)


def test_all_zero_kernel_gives_empty_result():
    x = random_csr(np.random.default_rng(1), 3, 10, 10, 0.5, np.float64)
    eng = DirectNumba((10, 10), np.zeros((3, 3)), np.float64)
    for mode in MODES:
        y = eng.to_csr(x, mode)
        check_csr(y, 3, geometry((10, 10), (3, 3), mode).out_pixels, np.float64)
        assert y.nnz == 0
        assert not eng.to_dense(x, mode).any()


def test_empty_images_and_empty_batch():
    eng = DirectNumba((8, 9), np.ones((3, 3)), np.float64)
    for n in (0, 1, 4):
        x = scipy.sparse.csr_matrix((n, 72))
        for mode in MODES:
            geo = geometry((8, 9), (3, 3), mode)
            y = eng.to_csr(x, mode)
            check_csr(y, n, geo.out_pixels, np.float64)
            assert y.nnz == 0
            d = eng.to_dense(x, mode)
            assert d.shape == (n,) + geo.out_shape and not d.any()
    # empty rows between full ones
    rng = np.random.default_rng(0)
    x = random_csr(rng, 6, 8, 9, 0.5, np.float64)
    x = scipy.sparse.vstack([x[:2], scipy.sparse.csr_matrix((3, 72)), x[2:], scipy.sparse.csr_matrix((1, 72))]).tocsr()
    run_engine_all_modes((8, 9), np.ones((3, 3)), x)


def test_cancellation_and_stored_zeros_are_dropped():
    # [1, 1] * [1, -1]: full output is [1, 0, -1]; the middle cancels exactly
    kernel = np.array([[1.0, -1.0]])
    x = scipy.sparse.csr_matrix(np.array([[1.0, 1.0, 0.0, 0.0]]))
    for budget, path in [(b, p) for b in BUDGETS for p in ("auto", "scan", "bits", "coo")]:
        eng = DirectNumba((1, 4), kernel, np.float64, max_buffer_bytes=budget)
        force_path(eng, path)
        y = eng.to_csr(x, "full")
        check_csr(y, 1, 5, np.float64)
        assert y.indices.tolist() == [0, 2] and y.data.tolist() == [1.0, -1.0]
    # stored zeros in the input contribute nothing
    xz = scipy.sparse.csr_matrix((np.array([0.0, 2.0, 0.0]), np.array([0, 5, 9]), np.array([0, 3])), shape=(1, 16))
    assert xz.has_canonical_format
    eng = DirectNumba((4, 4), np.ones((3, 3)), np.float64)
    y = eng.to_csr(xz, "same")
    check_csr(y, 1, 16, np.float64)
    check_against_scipy(y, reference(xz, (4, 4), np.ones((3, 3)), "same"), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_propagate_like_scipy(dtype):
    # with every tap nonzero the result is exactly scipy's, NaN/inf included
    rng = np.random.default_rng(5)
    kernel = rng.uniform(0.5, 1.5, (3, 4))
    img = np.zeros((10, 12))
    img[2, 3], img[7, 8], img[5, 5], img[5, 6], img[0, 0] = np.nan, np.inf, np.inf, -np.inf, 1.0
    x = scipy.sparse.csr_matrix(img.reshape(1, -1).astype(dtype))
    for mode in MODES:
        for budget, path in [(b, p) for b in BUDGETS for p in ("auto", "scan", "bits", "coo")]:
            eng = DirectNumba((10, 12), kernel.astype(dtype), dtype, max_buffer_bytes=budget)
            force_path(eng, path)
            ref = reference(x, (10, 12), kernel, mode)
            assert np.isnan(ref).any() and np.isinf(ref).any()
            y = eng.to_csr(x, mode)
            check_csr(y, 1, ref[0].size, dtype)
            check_against_scipy(y, ref, dtype)  # stored NaNs count as nonzero
            check_against_scipy(eng.to_dense(x, mode), ref, dtype)


def test_inf_next_to_zero_tap_is_not_nan():
    # documented sparse semantics: only nonzero taps are scattered, so
    # inf * (zero tap) is never formed, where dense scipy gives NaN
    kernel = np.array([[1.0, 0.0]])
    x = scipy.sparse.csr_matrix(np.array([[np.inf, 0.0, 0.0]]))
    y = DirectNumba((1, 3), kernel, np.float64).to_csr(x, "full")
    assert y.indices.tolist() == [0] and np.isposinf(y.data).all()
    assert np.isnan(scipy.signal.convolve2d(x.toarray(), kernel, mode="full")[0, 1])


def test_int64_indices_are_used_as_given():
    rng = np.random.default_rng(11)
    kernel = rng.standard_normal((5, 3))
    for dtype in (np.float32, np.float64):
        x = random_csr(rng, 7, 25, 31, 0.1, dtype, idx64=True)
        assert x.indices.dtype == np.int64 and x.indptr.dtype == np.int64
        run_engine_all_modes((25, 31), kernel, x, dtype=dtype)


def test_sparse_blobs_in_a_large_frame_take_the_coordinate_path():
    # two pixels in opposite corners: the bounding box is the whole frame,
    # far larger than nnz * K, so the image is done by coordinate list
    H = W = 3000
    kernel = np.arange(1.0, 10.0).reshape(3, 3)
    img = scipy.sparse.csr_matrix(([2.0, -1.0, 0.5], ([0, 0, 0], [1, W + 5, H * W - 1])), shape=(1, H * W))
    for mode in MODES:
        eng = DirectNumba((H, W), kernel, np.float64)
        y = eng.to_csr(img, mode)
        geo = geometry((H, W), kernel.shape, mode)
        check_csr(y, 1, geo.out_pixels, np.float64)
        expect = blob_reference(img, (H, W), kernel, mode)
        assert dict(zip(y.indices.tolist(), y.data.tolist())) == pytest.approx(expect, rel=1e-12)


def blob_reference(x, frame_shape, kernel, mode):
    """{out index: value} of a single huge image, by direct summation in Python."""
    H, W = frame_shape
    geo = geometry(frame_shape, kernel.shape, mode)
    Ho, Wo = geo.out_shape
    acc: dict[int, float] = {}
    for p, v in zip(x.indices.tolist(), x.data.tolist()):
        r, c = divmod(p, W)
        for (i, j), kv in np.ndenumerate(kernel):
            if kv == 0:
                continue
            R, C = r + i - geo.top, c + j - geo.left
            if 0 <= R < Ho and 0 <= C < Wo:
                acc[R * Wo + C] = acc.get(R * Wo + C, 0.0) + v * kv
    return {k: v for k, v in acc.items() if v != 0}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_frame_with_int64_indices(dtype):
    # 50000 x 50000 = 2.5e9 pixels > 2**31: int64 indices in and out; a few
    # small blobs far apart (opposite corners, centre) must not cost a
    # frame-sized (20 GB) buffer
    H = W = 50_000
    rng = np.random.default_rng(2)
    kernel = rng.uniform(0.5, 1.5, (5, 5)).astype(dtype)
    pos, val = [], []
    for r0, c0 in [(0, 0), (H - 12, W - 12), (0, W - 12), (H - 12, 0), (25_000, 25_000), (25_005, 25_020)]:
        blob = rng.standard_normal((12, 12))
        blob[rng.random(blob.shape) < 0.5] = 0
        rr, cc = np.nonzero(blob)
        pos.append((rr + r0).astype(np.int64) * W + cc + c0)
        val.append(blob[rr, cc])
    pos, val = np.concatenate(pos), np.concatenate(val)
    order = np.argsort(pos)
    x = scipy.sparse.csr_matrix((val[order].astype(dtype), pos[order], np.array([0, pos.size])), shape=(1, H * W))
    x2 = scipy.sparse.vstack([x, scipy.sparse.csr_matrix((1, H * W), dtype=dtype), x]).tocsr()
    assert x2.indices.dtype == np.int64
    tol = TOL[np.dtype(dtype)]
    for mode in MODES:
        eng = DirectNumba((H, W), kernel, dtype)
        y = eng.to_csr(x2, mode)
        geo = geometry((H, W), kernel.shape, mode)
        check_csr(y, 3, geo.out_pixels, dtype)
        assert y.indices.dtype == np.int64
        expect = blob_reference(x, (H, W), kernel.astype(np.float64), mode)
        for row in (0, 2):
            got = dict(zip(y[row].indices.tolist(), y[row].data.tolist()))
            assert set(got) == set(expect)
            np.testing.assert_allclose([got[k] for k in expect], list(expect.values()), **tol)
        assert y.indptr[2] == y.indptr[1]


def test_huge_frame_through_convolver_with_mode_override():
    H = W = 50_000
    x = scipy.sparse.csr_matrix(
        (np.array([1.0, 2.0]), np.array([0, H * W - 1], dtype=np.int64), np.array([0, 2])), shape=(1, H * W)
    )
    conv = Convolver((H, W), np.ones((3, 3)), mode="same", method="direct")
    for mode, n_out in (("same", 8), ("full", 18), ("valid", 2)):
        y = conv(x, mode=mode)
        assert y.nnz == n_out and y.indices.dtype == np.int64


def test_huge_frame_needs_no_frame_sized_memory():
    # in a child process limited to 6 GiB of address space (a float64 frame
    # buffer would be 20 GB): every mode still works
    import os
    import subprocess
    import sys

    code = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import numpy as np, scipy.sparse
from dask_sparseconv import Convolver
H = W = 50_000
pos = np.array([0, 5, W + 3, H * W - 1], dtype=np.int64)
x = scipy.sparse.csr_matrix((np.ones(4), pos, np.array([0, 4])), shape=(1, H * W))
conv = Convolver((H, W), np.ones((5, 5)), method="direct", n_threads=2)
print([conv(x, mode=m).nnz for m in ("same", "full", "valid")])
try:
    np.zeros(H * W)
except MemoryError:
    print("frame refused")
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[38, 80, 11]", "frame refused"], out.stdout


def test_window_buffer_path_on_a_huge_frame():
    # one compact blob: the bounding-box buffer (not the coordinate list) is used
    H = W = 50_000
    rng = np.random.default_rng(8)
    blob = rng.standard_normal((40, 40))
    rr, cc = np.nonzero(blob)
    pos = (rr + 30_000).astype(np.int64) * W + cc + 100
    x = scipy.sparse.csr_matrix((blob[rr, cc], pos, np.array([0, pos.size])), shape=(1, H * W))
    kernel = rng.standard_normal((7, 7))
    eng = DirectNumba((H, W), kernel, np.float64)
    y = eng.to_csr(x, "same")
    expect = blob_reference(x, (H, W), kernel, "same")
    got = dict(zip(y.indices.tolist(), y.data.tolist()))
    assert set(got) == set(expect)
    np.testing.assert_allclose([got[k] for k in expect], list(expect.values()), rtol=1e-10)


def test_dense_image_over_the_scratch_budget_is_done_in_bands():
    # 300 x 200 frame, budget of 2500 float64 slots: no frame buffer; the
    # bounding box is cut into bands of 12 output rows
    rng = np.random.default_rng(17)
    kernel = rng.standard_normal((5, 4))
    x = random_csr(rng, 3, 300, 200, 0.3, np.float64)
    for mode in MODES:
        eng = DirectNumba((300, 200), kernel, np.float64, max_buffer_bytes=20_000, n_threads=1)
        ref = reference(x, (300, 200), kernel, mode)
        y = eng.to_csr(x, mode)
        check_csr(y, 3, ref[0].size, np.float64)
        check_against_scipy(y, ref, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_large_frames_are_done_in_bands_that_stay_in_cache(dtype):
    """Frames over BAND_FRAME_BYTES whose images touch every cache line are
    scattered and scanned in bands of rows (docs/engine.md), with the
    default thresholds: 1100 x 1030 frames (8.6 / 4.3 MiB of output), a
    dense-ish image, a sparse one (bit map path) and an empty one, serial
    and on two threads."""
    from dask_sparseconv.engine import direct

    rng = np.random.default_rng(41)
    H, W = 1100, 1030
    assert H * W * np.dtype(dtype).itemsize > direct.BAND_FRAME_BYTES
    kernel = rng.standard_normal((5, 6)).astype(dtype)
    dense = random_csr(rng, 2, H, W, 0.02, dtype)
    sparse = random_csr(rng, 1, H, W, 0.0005, dtype)
    x = scipy.sparse.vstack([dense[0], sparse, scipy.sparse.csr_matrix((1, H * W), dtype=dtype), dense[1]],
                            format="csr")
    ops = np.diff(x.indptr) * kernel.size
    assert ops[0] * direct.BAND_OPS >= H * W > ops[1] * direct.BAND_OPS  # one image each way
    for mode in MODES:
        ref = reference(x, (H, W), kernel, mode)
        for n_threads in (1, 2):
            eng = DirectNumba((H, W), kernel, dtype, n_threads=n_threads)
            eng.serial_work = 0
            y = eng.to_csr(x, mode)
            check_csr(y, 4, ref[0].size, dtype)
            check_against_scipy(y, ref, dtype)
            for buf, bits in direct.scratch_buffers():
                assert not buf.any() and not bits.any()


# -- through the public API ----------------------------------------------------


def test_convolver_default_is_direct_and_matches_scipy():
    rng = np.random.default_rng(21)
    kernel = rng.standard_normal((5, 5))
    conv = Convolver((33, 29), kernel, mode="same")
    assert (conv.method, conv.backend) == ("direct", "numba")
    assert engine_class("direct", "numba") is DirectNumba
    for dtype in (np.float32, np.float64):
        x = random_csr(rng, 9, 33, 29, 0.05, dtype)
        for mode in MODES:
            ref = reference(x, (33, 29), kernel.astype(dtype), mode)
            y = conv(x, mode=mode)
            check_csr(y, 9, ref[0].size, dtype)
            check_against_scipy(y, ref, dtype)
            d = conv(x, out="dense", mode=mode)
            check_against_scipy(d.reshape(ref.shape), ref, dtype)
            # one image, dense stack
            one = conv(x[3].toarray().reshape(33, 29), mode=mode)
            check_against_scipy(one[None], ref[3:4], dtype)
            stack = conv(x.toarray().reshape(9, 33, 29), mode=mode)
            check_against_scipy(stack, ref, dtype)
    # int64 index arrays are passed through untouched and give the same result
    x = random_csr(rng, 6, 33, 29, 0.1, np.float64, idx64=True)
    ref = reference(x, (33, 29), kernel, "same")
    y = conv(x)
    assert x.indices.dtype == np.int64  # the caller's matrix is not modified
    check_csr(y, 6, ref[0].size, np.float64)
    check_against_scipy(y, ref, np.float64)
    # dense output into an engine-supplied buffer
    eng = conv.engine(np.float64)
    x = random_csr(rng, 3, 33, 29, 0.05, np.float64)
    buf = np.full((3, 33 + 4, 29 + 4), 7.0)
    res = eng.to_dense(x, "full", out=buf)
    assert res is buf
    check_against_scipy(buf, reference(x, (33, 29), kernel, "full"), np.float64)


def test_concurrent_calls_from_many_threads():
    # dask workers call one cached convolver from several threads at once
    rng = np.random.default_rng(99)
    kernel = rng.standard_normal((5, 5))
    conv = Convolver((48, 40), kernel, mode="same", method="direct", n_threads=2)
    for dt in (np.float32, np.float64):
        conv.engine(dt).serial_work = 0  # ranges go through the shared pool too
    batches = []
    for t in range(8):
        dtype = (np.float32, np.float64)[t % 2]
        mode = MODES[t % 3]
        x = random_csr(rng, 20 + 7 * t, 48, 40, (0.01, 0.05, 0.2)[t % 3], dtype)
        batches.append((x, mode, dtype, reference(x, (48, 40), kernel.astype(dtype), mode)))
    errors = []
    barrier = threading.Barrier(8)

    def hammer(t):
        try:
            x, mode, dtype, ref = batches[t]
            barrier.wait()
            for _ in range(15):
                y = conv(x, mode=mode)
                check_csr(y, x.shape[0], ref[0].size, dtype)
                check_against_scipy(y, ref, dtype)
                d = conv(x, out="dense", mode=mode)
                check_against_scipy(d.reshape(ref.shape), ref, dtype)
        except Exception as exc:  # collected, re-raised in the main thread
            errors.append((t, exc))

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_large_batch_uses_threads_and_matches_serial():
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((5, 5))
    x = random_csr(rng, 400, 40, 40, 0.05, np.float64)
    serial = DirectNumba((40, 40), kernel, np.float64, n_threads=1)
    for n_threads in (2, 3, 4, 5):  # ranges pair up back to back; odd ones and later pairs move
        threaded = DirectNumba((40, 40), kernel, np.float64, n_threads=n_threads)
        threaded.serial_work = 0
        for mode in MODES:
            a, b = serial.to_csr(x, mode), threaded.to_csr(x, mode)
            check_csr(b, 400, a.shape[1], np.float64)
            np.testing.assert_array_equal(a.indptr, b.indptr)
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.data, b.data)  # same summation order
            np.testing.assert_array_equal(serial.to_dense(x, mode), threaded.to_dense(x, mode))
    check_against_scipy(a, reference(x, (40, 40), kernel, "valid"), np.float64)


def test_tight_bounds_for_blobs_in_large_frames(monkeypatch):
    # small blobs in 300x300 frames: the bounds are tightened to the boxes
    from dask_sparseconv.engine import direct

    monkeypatch.setattr(direct, "TIGHTEN_BOUNDS", 0)
    rng = np.random.default_rng(23)
    kernel = rng.standard_normal((5, 5))
    rows = []
    for _ in range(30):
        img = np.zeros((300, 300))
        r0, c0 = rng.integers(0, 290, 2)
        img[r0 : r0 + 10, c0 : c0 + 10] = rng.standard_normal((10, 10))
        rows.append(scipy.sparse.csr_matrix(img.reshape(1, -1)))
    x = scipy.sparse.vstack(rows + [scipy.sparse.csr_matrix((1, 90000))]).tocsr()
    for n_threads in (1, 2, 3):
        eng = DirectNumba((300, 300), kernel, np.float64, n_threads=n_threads)
        eng.serial_work = 0
        for mode in MODES:
            ref = reference(x, (300, 300), kernel, mode)
            y = eng.to_csr(x, mode)
            check_csr(y, 31, ref[0].size, np.float64)
            check_against_scipy(y, ref, np.float64)


def test_dense_out_buffer_is_validated():
    eng = DirectNumba((6, 6), np.ones((3, 3)), np.float64)
    x = scipy.sparse.csr_matrix(np.eye(1, 36))
    with pytest.raises(ValueError, match="out must be"):
        eng.to_dense(x, "same", out=np.zeros((1, 6, 6), dtype=np.float32))


def test_canonical_csr_matches_scipys_constructor():
    """The engines' fast CSR wrapper gives the object scipy's constructor
    gives (same attributes, values and behaviour), flagged canonical."""
    from dask_sparseconv.engine import base

    assert base._CSR_MAXPRINT is not None  # this scipy takes the fast path
    ref = scipy.sparse.random(7, 30, density=0.3, format="csr", random_state=3, dtype=np.float64)
    ref.sum_duplicates()
    fast = base.canonical_csr(ref.data.copy(), ref.indices.copy(), ref.indptr.copy(), ref.shape)
    slow = scipy.sparse.csr_matrix((ref.data, ref.indices, ref.indptr), shape=ref.shape)
    assert type(fast) is type(slow) and set(vars(fast)) >= set(vars(slow)) - {"_has_sorted_indices", "_has_canonical_format"}
    assert fast.shape == slow.shape and fast.maxprint == slow.maxprint and fast.has_canonical_format
    np.testing.assert_array_equal(fast.toarray(), ref.toarray())
    np.testing.assert_array_equal((fast @ fast.T).toarray(), (slow @ slow.T).toarray())
    np.testing.assert_array_equal(fast[2:5].toarray(), ref[2:5].toarray())
    assert (fast + slow).nnz == ref.nnz and repr(fast).startswith("<Compressed Sparse Row")


def _segments_reference(nz, W_out):
    """The kernel-row pieces as plain Python: each piece starts at a row's next
    nonzero tap and spans up to 64 columns."""
    off, masks, widths = [], [], []
    for i in range(nz.shape[0]):
        cols = [int(c) for c in np.flatnonzero(nz[i])]
        while cols:
            j0 = cols[0]
            piece = [c for c in cols if c < j0 + 64]
            off.append(i * W_out + j0)
            masks.append(sum(1 << (c - j0) for c in piece))
            widths.append(piece[-1] - j0 + 1)
            cols = cols[len(piece):]
    return off, masks, widths


def test_kernel_row_segments_match_a_python_reference():
    """The compiled segment builder (every new convolver runs it) against the
    Python loop it replaced, on random tap patterns up to 200 columns wide."""
    from dask_sparseconv.engine.direct import _segments

    rng = np.random.default_rng(17)
    for _ in range(400):
        kH, kW = (int(v) for v in rng.integers(1, 200, 2))
        nz = rng.random((kH, kW)) < rng.random() ** 3
        off, mask, width = _segments(np.ascontiguousarray(nz), np.int64(97))
        want = _segments_reference(nz, 97)
        assert off.dtype == np.int64 and mask.dtype == np.uint64 and width.dtype == np.uint64
        assert off.tolist() == want[0] and [int(m) for m in mask] == want[1] and width.tolist() == want[2]


def test_kept_scratch_stays_zero_across_calls_paths_and_modes():
    # One engine's frame buffer and bit map outlive a call (docs/engine.md):
    # every path must leave them zeroed, or the next call adds stale values.
    rng = np.random.default_rng(12)
    kernel = rng.standard_normal((5, 4))
    eng = DirectNumba((30, 34), kernel, np.float64, n_threads=2)
    for step in range(30):
        path = ("auto", "scan", "bits", "coo", "bands")[step % 5]
        mode = MODES[step % 3]
        eng.serial_work = 0 if step % 2 else None  # threaded ranges keep their own scratch
        eng.dense_ops, eng.bbox_ratio, eng.bbox_slack = DirectNumba.dense_ops, DirectNumba.bbox_ratio, DirectNumba.bbox_slack
        eng.band_frame_bytes, eng.band_bytes, eng.band_ops = (DirectNumba.band_frame_bytes, DirectNumba.band_bytes,
                                                              DirectNumba.band_ops)
        force_path(eng, path)
        x = random_csr(rng, 1 + step % 5, 30, 34, (0.02, 0.3, 1.0)[step % 3], np.float64)
        if step % 5 == 0:
            x.data[0] = np.nan  # NaN slots must be cleared too
        ref = reference(x, (30, 34), kernel, mode)
        check_against_scipy(eng.to_csr(x, mode), ref, np.float64)
        assert direct.scratch_buffers(), "the frame scratch is kept between calls"
        for buf, bits in direct.scratch_buffers():
            assert not buf.any() and not bits.any()
    assert direct.scratch_nbytes() == sum(b.nbytes + m.nbytes for b, m in direct.scratch_buffers())


@pytest.mark.parametrize("kshape", [(31, 31), (15, 21), (3, 40), (12, 9)])
def test_tap_runs_give_the_same_sums_as_tap_by_tap(monkeypatch, kshape):
    # Interior pixels add long kernel rows run by run (RUN_MIN); the sums
    # must be those of the tap-by-tap loop, bit for bit, on every path.
    import dask_sparseconv.engine.direct as direct

    rng = np.random.default_rng(sum(kshape))
    kernel = rng.standard_normal(kshape)
    yy, xx = np.mgrid[: kshape[0], : kshape[1]]
    disk = (yy - kshape[0] // 2) ** 2 + (xx - kshape[1] // 2) ** 2 <= (min(kshape) // 2) ** 2
    x = random_csr(rng, 6, 70, 64, 0.03, np.float64)
    for k in (kernel, np.where(disk, kernel, 0.0)):  # dense rows, and rows of varying length
        results = {}
        for run_min in (1, 10**9):  # always runs / never runs
            monkeypatch.setattr(direct, "RUN_MIN", run_min)
            eng = DirectNumba((70, 64), k, np.float64, n_threads=1)
            assert (eng._plan("same").run0.size > 0) == (run_min == 1)
            for mode in MODES:
                for path in ("scan", "bits", "coo"):
                    force_path(eng, path)
                    results[run_min, mode, path] = (eng.to_csr(x, mode), eng.to_dense(x, mode))
        for mode in MODES:
            ref = reference(x, (70, 64), k, mode)
            for path in ("scan", "bits", "coo"):
                (a, da), (b, db) = results[1, mode, path], results[10**9, mode, path]
                check_against_scipy(a, ref, np.float64)
                np.testing.assert_array_equal(a.indices, b.indices)
                np.testing.assert_array_equal(a.data, b.data)
                np.testing.assert_array_equal(da, db)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_frame_scratch_too_large_to_keep_is_made_per_call(monkeypatch, n_threads):
    # Past KEEP_SCRATCH_BYTES the frame scratch lives for one call only (and
    # the batch goes straight to the ranged path, which makes it once).
    import dask_sparseconv.engine.direct as direct

    monkeypatch.setattr(direct, "KEEP_SCRATCH_BYTES", 1024)
    rng = np.random.default_rng(21)
    kernel = rng.standard_normal((5, 5))
    eng = DirectNumba((40, 44), kernel, np.float64, n_threads=n_threads)
    eng.serial_work = 0
    for mode in MODES:
        x = random_csr(rng, 7, 40, 44, 0.05, np.float64)
        check_against_scipy(eng.to_csr(x, mode), reference(x, (40, 44), kernel, mode), np.float64)
    frames = {eng.geometry(mode).out_pixels for mode in MODES}
    assert not [buf for buf, _ in direct.scratch_buffers() if buf.size in frames]


def test_engines_of_one_thread_share_its_frame_scratch(monkeypatch):
    # A thread keeps one zeroed frame scratch per frame size and dtype for
    # every engine it calls (a notebook builds many convolvers): each new
    # engine reuses it, and each engine's results stay its own.
    import dask_sparseconv.engine.direct as direct

    rng = np.random.default_rng(31)
    x = random_csr(rng, 5, 37, 41, 0.1, np.float64)
    seen = set()
    for step in range(6):
        kernel = rng.standard_normal((3 + step % 3, 4))
        eng = DirectNumba((37, 41), kernel, np.float64, n_threads=1)
        force_path(eng, ("scan", "bits")[step % 2])
        check_against_scipy(eng.to_csr(x, "same"), reference(x, (37, 41), kernel, "same"), np.float64)
        mine = [buf for buf, _ in direct._thread_scratch().frames.values() if buf.size == 37 * 41]
        assert len(mine) == 1 and not mine[0].any()
        seen.add(id(mine[0]))
    assert len(seen) == 1, "every engine used the thread's one scratch of this frame size"
    # at most KEEP_SCRATCH_FRAMES sizes (and KEEP_SCRATCH_TOTAL bytes) per thread, least recent dropped
    monkeypatch.setattr(direct, "KEEP_SCRATCH_FRAMES", 2)
    for H in (20, 21, 22, 23):
        eng = DirectNumba((H, 30), np.ones((3, 3)), np.float64, n_threads=1)
        y = random_csr(rng, 2, H, 30, 0.1, np.float64)
        check_against_scipy(eng.to_csr(y, "same"), reference(y, (H, 30), np.ones((3, 3)), "same"), np.float64)
    store = direct._thread_scratch()
    assert sorted(key[1] for key in store.frames) == [22 * 30, 23 * 30]
    assert store.nbytes() == sum(b.nbytes + m.nbytes for b, m in store.frames.values())
