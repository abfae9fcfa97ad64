"""Public behaviour of :class:`dask_sparseconv.Convolver`.

Input kinds (CSR, CSC, COO, sparse arrays, dense batch, single image, dense
stack), output layouts, the dtype policy, argument errors (the message names
the argument and the bad value), inputs never modified, and thread safety of
one convolver shared by 8 threads, for every CPU-capable registry cell.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from scipy_oracle import convolve_stack

from dask_sparseconv import Convolver
from dask_sparseconv.engine import REGISTRY

MODES = ("full", "same", "valid")
CELLS = sorted(REGISTRY)
CELL_IDS = [f"{m}-{b}" for m, b in CELLS]
FRAME = (7, 9)
KERNEL = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])


def cell_kwargs(cell):
    method, backend = cell
    return dict(method=method, backend=backend, **({"device": "cpu"} if backend == "torch" else {}))


def imgs(n=4, seed=0, frame=FRAME, density=0.3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n,) + frame)
    a[rng.random(a.shape) > density] = 0
    return a.astype(dtype)


def ref(stack, mode="same", kernel=KERNEL):
    """(n, H_out, W_out) float64 reference."""
    return convolve_stack(stack, kernel, mode)


def close(a, b, dtype=np.float64):
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), b, rtol=tol, atol=tol)


# -- input kinds and output layouts ------------------------------------------------


@pytest.mark.parametrize(
    "fmt", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array", "coo_array", "csc_array", "lil_matrix"]
)
def test_sparse_batch_in_csr_out(fmt):
    stack = imgs()
    x = getattr(scipy.sparse, fmt)(stack.reshape(4, -1))
    conv = Convolver(FRAME, KERNEL, mode="full")
    y = conv(x)
    assert scipy.sparse.issparse(y) and y.format == "csr" and y.shape == (4, 8 * 11)
    assert y.has_canonical_format and not np.any(y.data == 0)
    close(y.toarray(), ref(stack, "full").reshape(4, -1))
    d = conv(x, out="dense")
    assert isinstance(d, np.ndarray) and d.shape == (4, 88)
    close(d, ref(stack, "full").reshape(4, -1))


def test_dense_batch_single_image_and_stack():
    stack = imgs()
    conv = Convolver(FRAME, KERNEL, mode="valid")
    r = ref(stack, "valid")  # (4, 6, 7)
    # dense batch (n, H*W) -> dense (n, Ho*Wo); out='csr' gives CSR
    d = conv(stack.reshape(4, -1))
    assert isinstance(d, np.ndarray) and d.shape == (4, 42)
    close(d, r.reshape(4, -1))
    y = conv(stack.reshape(4, -1), out="csr")
    assert y.format == "csr" and y.shape == (4, 42)
    close(y.toarray(), r.reshape(4, -1))
    # one dense image -> one dense image; one sparse image -> one CSR image
    d1 = conv(stack[1])
    assert d1.shape == (6, 7)
    close(d1, r[1])
    y1 = conv(scipy.sparse.csr_matrix(stack[1]))
    assert y1.format == "csr" and y1.shape == (6, 7) and y1.has_canonical_format
    close(y1.toarray(), r[1])
    # dense stack -> dense stack; a list works too
    ds = conv(stack)
    assert ds.shape == (4, 6, 7)
    close(ds, r)
    close(conv(stack.tolist()), r)
    # a stack cannot come back as CSR
    with pytest.raises(ValueError, match="out='csr'"):
        conv(stack, out="csr")


def test_batched_resolves_one_row_frames():
    frame = (1, 5)
    k = np.array([[1.0, 2.0, 3.0]])
    conv = Convolver(frame, k, mode="full")
    x = np.array([[1.0, 0.0, 0.0, 2.0, 0.0]])
    expected = scipy.signal.convolve2d(x, k, "full")  # (1, 7)
    as_batch = conv(x)  # (1, 5) reads as a batch of one by default
    assert as_batch.shape == (1, 7)
    close(as_batch, expected)
    as_image = conv(x, batched=False)
    assert as_image.shape == (1, 7)
    close(as_image, expected)
    with pytest.raises(ValueError, match="batched=True"):
        conv(np.zeros((1, 6)), batched=True)


def test_mode_override_per_call():
    stack = imgs()
    conv = Convolver(FRAME, KERNEL, mode="same")
    assert conv.out_shape == FRAME
    for mode in MODES:
        close(conv(stack, mode=mode), ref(stack, mode))
    assert conv.mode == "same"
    assert conv.geometry("full").out_shape == (8, 11)


def test_non_canonical_input_gives_summed_result():
    stack = imgs(n=2)
    x = scipy.sparse.csr_matrix(stack.reshape(2, -1))
    # duplicate every entry and reverse each row's order: same matrix, not canonical
    rows = np.repeat(np.arange(2), np.diff(x.indptr))
    idx = np.concatenate([x.indices[::-1], x.indices])
    data = np.concatenate([x.data[::-1] * 0.25, x.data * 0.75])
    r = np.concatenate([rows[::-1], rows])
    order = np.argsort(r, kind="stable")
    counts = np.bincount(r, minlength=2)
    nc = scipy.sparse.csr_matrix((data[order], idx[order], np.r_[0, np.cumsum(counts)]), shape=x.shape)
    assert not nc.has_canonical_format
    conv = Convolver(FRAME, KERNEL, method="gather_scatter", backend="numba")
    close(conv(nc).toarray(), ref(stack).reshape(2, -1))


def test_duplicates_are_summed_in_the_compute_dtype():
    # int8 duplicates 100 + 100 must give 200, not wrap to -56
    coo = scipy.sparse.coo_matrix((np.array([100, 100], np.int8), ([0, 0], [3, 3])), shape=(1, 63))
    y = Convolver(FRAME, [[1.0]])(coo)
    assert y.dtype == np.float64 and list(y.data) == [200.0]
    # float32 duplicates with dtype='float64' are summed in float64
    a, b = np.float32(1.0), np.float32(2.0**-30)
    csr = scipy.sparse.csr_matrix((np.array([a, b], np.float32), np.array([5, 5]), np.array([0, 2])), shape=(1, 63))
    y = Convolver(FRAME, [[1.0]], dtype="float64")(csr)
    assert list(y.data) == [1.0 + 2.0**-30]


# -- dtype policy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "in_dtype, requested, expected",
    [
        (np.float32, None, np.float32),
        (np.float64, None, np.float64),
        (np.float16, None, np.float32),
        (np.int32, None, np.float64),
        (np.int64, None, np.float64),
        (np.bool_, None, np.float64),
        (np.float64, "float32", np.float32),
        (np.float32, "float64", np.float64),
        (np.int16, np.float32, np.float32),
    ],
)
@pytest.mark.parametrize("cell", [("direct", "numba"), ("precomputed", "numpy"), ("lazy", "numpy")], ids=lambda c: "-".join(c))
def test_dtype_policy(cell, in_dtype, requested, expected):
    stack = (imgs(n=2) * 4).round()
    x = stack.astype(in_dtype)
    conv = Convolver(FRAME, KERNEL.astype(np.float32), dtype=requested, **cell_kwargs(cell))
    d = conv(x)
    assert d.dtype == expected
    close(d, ref(x.astype(np.float64)), expected)
    if in_dtype != np.float16:  # scipy.sparse cannot hold float16
        y = conv(scipy.sparse.csr_matrix(x.reshape(2, -1)))
        assert y.dtype == expected
        close(y.toarray(), ref(x.astype(np.float64)).reshape(2, -1), expected)


# -- argument errors ----------------------------------------------------------------


def _raises(exc, *needles, **kwargs):
    """Convolver(**kwargs) raises ``exc`` whose message contains every needle."""
    args = dict(frame_shape=FRAME, kernel=KERNEL)
    args.update(kwargs)
    with pytest.raises(exc) as err:
        Convolver(**args)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"


@pytest.mark.parametrize(
    "kwargs, exc, needles",
    [
        (dict(mode="sideways"), ValueError, ("mode", "'sideways'")),
        (dict(mode=3), TypeError, ("mode", "3")),
        (dict(method="fast"), ValueError, ("method", "'fast'")),
        (dict(backend="cuda"), ValueError, ("backend", "'cuda'")),
        (dict(method="direct", backend="numpy"), ValueError, ("backend", "'numpy'", "'direct'")),
        (dict(method="lazy", backend="numba"), ValueError, ("backend", "'numba'", "'lazy'")),
        (dict(method="precomputed", backend="torch", device="gpu-seven"), ValueError, ("device", "'gpu-seven'")),
        (dict(method="precomputed", backend="numpy", device="cpu"), ValueError, ("device", "'cpu'", "torch")),
        (dict(kernel=np.ones(3)), ValueError, ("kernel", "1-D")),
        (dict(kernel=np.ones((3, 3, 1, 1))), ValueError, ("kernel", "4-D")),  # 3-D is a kernel bank
        (dict(kernel=np.ones((0, 3))), ValueError, ("kernel", "empty", "(0, 3)")),
        (dict(kernel=[[1.0, np.nan]]), ValueError, ("kernel", "NaN")),
        (dict(kernel=[[1.0, np.inf]]), ValueError, ("kernel", "inf")),
        (dict(kernel="gaussian"), TypeError, ("kernel", "'gaussian'")),
        (dict(kernel=[[1j, 0]]), TypeError, ("kernel", "complex")),
        (dict(kernel=None), TypeError, ("kernel", "None")),
        (dict(frame_shape=(0, 5)), ValueError, ("frame_shape", "(0, 5)")),
        (dict(frame_shape=(-3, 5)), ValueError, ("frame_shape", "(-3, 5)")),
        (dict(frame_shape=(5,)), ValueError, ("frame_shape", "(5,)")),
        (dict(frame_shape=(5, 6, 7)), ValueError, ("frame_shape", "(5, 6, 7)")),
        (dict(frame_shape=(2.5, 6)), ValueError, ("frame_shape", "2.5")),
        (dict(frame_shape="64x64"), TypeError, ("frame_shape", "'64x64'")),
        (dict(frame_shape=None), TypeError, ("frame_shape", "None")),
        (dict(dtype=int), ValueError, ("dtype", "int64")),
        (dict(dtype="int32"), ValueError, ("dtype", "int32")),
        (dict(dtype="float16"), ValueError, ("dtype", "float16")),
        (dict(dtype="not-a-dtype"), TypeError, ("dtype", "'not-a-dtype'")),
        (dict(n_threads=0), ValueError, ("n_threads", "0")),
        (dict(max_buffer_bytes=-1), ValueError, ("max_buffer_bytes", "-1")),
        (dict(frame_shape=(2, 2), kernel=np.ones((3, 3)), mode="valid"), ValueError, ("valid", "(2, 2)", "(3, 3)")),
    ],
)
def test_constructor_argument_errors(kwargs, exc, needles):
    _raises(exc, *needles, **kwargs)


def test_call_argument_errors():
    conv = Convolver(FRAME, KERNEL)
    n_pix = FRAME[0] * FRAME[1]
    cases = [
        (scipy.sparse.csr_matrix((3, n_pix + 1)), ValueError, ("x", "(3, 64)", str(n_pix))),
        (np.zeros((3, 10)), ValueError, ("x", "(3, 10)")),
        (np.zeros((2, 7, 8)), ValueError, ("x", "(2, 7, 8)", "(n_images, 7, 9)")),
        (np.zeros((1, 2, 7, 9)), ValueError, ("x", "(1, 2, 7, 9)")),
        (np.zeros(63), ValueError, ("x", "(63,)")),
        (np.zeros(FRAME, dtype=complex), TypeError, ("x", "complex")),
        (np.full(FRAME, "a"), TypeError, ("x", "<U1")),
        ("not an array", TypeError, ("x", "str")),
    ]
    for x, exc, needles in cases:
        with pytest.raises(exc) as err:
            conv(x)
        for needle in needles:
            assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"
    with pytest.raises(ValueError, match=r"out.*'coo'"):
        conv(np.zeros(FRAME), out="coo")
    with pytest.raises(ValueError, match=r"mode.*'bogus'"):
        conv(np.zeros(FRAME), mode="bogus")


# -- inputs are never modified ---------------------------------------------------------


def _snapshot(x):
    if scipy.sparse.issparse(x):
        parts = {k: getattr(x, k).copy() for k in ("data", "indices", "indptr", "row", "col") if hasattr(x, k)}
        return x.format, x.shape, parts
    return "dense", x.shape, {"a": x.copy()}


def _same(x, snap):
    fmt, shape, parts = _snapshot(x)
    assert (fmt, shape) == snap[:2]
    for k, v in snap[2].items():
        assert parts[k].dtype == v.dtype, k
        np.testing.assert_array_equal(parts[k], v, err_msg=k)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_inputs_are_never_modified(cell):
    stack = imgs(n=3, seed=5)
    base = scipy.sparse.csr_matrix(stack.reshape(3, -1))
    # non-canonical CSR: duplicates and unsorted rows, float32 data, int64 indices
    dup_idx = np.concatenate([base.indices, base.indices[::-1]]).astype(np.int64)
    rows = np.concatenate([np.repeat(np.arange(3), np.diff(base.indptr))] * 2)
    order = np.argsort(rows, kind="stable")
    nc = scipy.sparse.csr_matrix((3, base.shape[1]), dtype=np.float32)
    nc.data = np.concatenate([base.data, base.data[::-1]]).astype(np.float32)[order]
    nc.indices = dup_idx[order]
    nc.indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=3))].astype(np.int64)
    coo = scipy.sparse.coo_matrix(
        (np.r_[base.tocoo().data, 1.0], (np.r_[base.tocoo().row, 0], np.r_[base.tocoo().col, 0])), shape=base.shape
    )  # a duplicate at (0, 0) when stack[0, 0, 0] != 0
    inputs = [nc, coo, base.tocsc(), base.astype(np.float32), stack, stack.astype(np.int32), stack[0]]
    kernel = KERNEL.copy()
    conv = Convolver(FRAME, kernel, dtype="float64", **cell_kwargs(cell))
    kernel[:] = 99  # the convolver keeps its own copy
    for x in inputs:
        snap = _snapshot(x)
        was_canonical = getattr(x, "has_canonical_format", None) if x is nc else None
        res_default = conv(x)
        res_dense = conv(x, out="dense", mode="full")
        _same(x, snap)
        if x is nc:
            assert was_canonical is False
            dense_nc = np.zeros((3, base.shape[1]))
            np.add.at(dense_nc, (np.repeat(np.arange(3), np.diff(nc.indptr)), nc.indices), nc.data.astype(np.float64))
            close(res_dense.reshape(3, -1), ref(dense_nc.reshape(3, *FRAME), "full").reshape(3, -1))
        del res_default
    close(conv(stack), ref(stack))


# -- thread safety ------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_eight_threads_share_one_convolver(cell):
    """8 threads start together on a fresh convolver (racing any lazy per-mode
    build) and mix modes, dtypes and output kinds; every result must be right."""
    frame = (12, 10)
    kernel = np.random.default_rng(3).standard_normal((3, 4))
    conv = Convolver(frame, kernel, mode="same", n_threads=2, **cell_kwargs(cell))
    batches = [imgs(n=5, seed=s, frame=frame, density=0.25) for s in range(8)]
    barrier = threading.Barrier(8)
    errors = []

    def worker(t):
        try:
            barrier.wait()
            for rep in range(4):
                s = (t + rep) % 8
                mode = MODES[(t + rep) % 3]
                dtype = np.float32 if (t + rep) % 2 else np.float64
                x = scipy.sparse.csr_matrix(batches[s].reshape(5, -1).astype(dtype))
                if rep % 2:
                    got = conv(x, out="dense", mode=mode)
                else:
                    y = conv(x, mode=mode)
                    assert y.has_canonical_format and not np.any(y.data == 0)
                    got = y.toarray()
                assert got.dtype == dtype
                tol = 1e-4 if dtype == np.float32 else 1e-10
                ex = np.array(
                    [scipy.signal.convolve2d(i, kernel.astype(dtype).astype(np.float64), mode) for i in batches[s].astype(dtype)]
                ).reshape(5, -1)
                np.testing.assert_allclose(got, ex, rtol=tol, atol=tol)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((t, repr(exc)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors
    assert {dt for dt, _shape in conv._engines} <= {np.dtype(np.float32), np.dtype(np.float64)}
    assert len(conv._engines) <= 2  # one engine per dtype, however many threads asked at once
