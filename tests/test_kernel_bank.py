"""Kernel banks in memory: a 3-D kernel ``(K, kH, kW)`` to ``Convolver``
gives K results, each the one of a single-kernel convolver, for every
layout, operation and a few method/backend cells."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_sparseconv import Convolver, kernels

BANK = np.stack([kernels.gaussian(1.0, size=5), kernels.box(5), np.arange(25.0).reshape(5, 5) / 25 - 0.4])
EVEN_BANK = np.stack([np.arange(12.0).reshape(3, 4), -np.ones((3, 4)), np.eye(3, 4)])


def _stack(n=5, H=17, W=13, seed=0):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, H, W)) < 0.15, rng.standard_normal((n, H, W)), 0.0)
    return x


@pytest.mark.parametrize("bank", [BANK, EVEN_BANK], ids=["odd", "even"])
@pytest.mark.parametrize("op", [{}, {"boundary": "wrap"}, {"boundary": "symm", "correlate": True}, {"fillvalue": 0.5}],
                         ids=["plain", "wrap", "symm-correlate", "fill"])
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_each_result_is_scipys_and_the_single_kernel_convolvers(bank, op, mode):
    x = _stack()
    n, H, W = x.shape
    conv = Convolver((H, W), bank, mode=mode, **op)
    assert conv.bank_size == len(bank) and len(conv.members) == len(bank)
    func = scipy.signal.correlate2d if op.get("correlate") else scipy.signal.convolve2d
    batch = scipy.sparse.csr_matrix(x.reshape(n, -1))
    csr, dense, stack = conv(batch), conv(batch, out="dense"), conv(x)
    assert isinstance(csr, list) and len(csr) == len(bank)
    for k, kern in enumerate(bank):
        ref = np.stack([func(f, kern, mode, boundary=op.get("boundary", "fill"),
                             fillvalue=op.get("fillvalue", 0)) for f in x])
        alone = Convolver((H, W), kern, mode=mode, **op)
        np.testing.assert_allclose(csr[k].toarray().reshape(ref.shape), ref, rtol=1e-10, atol=1e-12)
        assert (csr[k] != alone(batch)).nnz == 0  # the same engine on the same input: the same values
        np.testing.assert_array_equal(dense[k], alone(batch, out="dense"))
        np.testing.assert_array_equal(stack[k], alone(x))
        one = conv(x[0])  # a single image
        np.testing.assert_array_equal(one[k], alone(x[0]))


@pytest.mark.parametrize("cell", [("precomputed", "numpy"), ("gather_scatter", "numba"), ("lazy", "torch"),
                                  ("separable", "numba")])
def test_banks_on_other_engines(cell):
    if cell[1] == "torch":
        pytest.importorskip("torch")
    method, backend = cell
    x = _stack(seed=3)
    n, H, W = x.shape
    kw = {"device": "cpu"} if backend == "torch" else {}
    res = Convolver((H, W), BANK, method=method, backend=backend, **kw)(scipy.sparse.csr_matrix(x.reshape(n, -1)))
    for k, kern in enumerate(BANK):
        ref = np.stack([scipy.signal.convolve2d(f, kern, "same") for f in x]).reshape(n, -1)
        np.testing.assert_allclose(res[k].toarray(), ref, rtol=1e-9, atol=1e-12)


def test_a_list_of_kernels_is_a_bank_and_its_members_weigh_separable_paths():
    big = [kernels.gaussian(3.0), kernels.gaussian(2.0, size=19), kernels.disk(9.0)]
    conv = Convolver((64, 64), big)
    assert conv.bank_size == 3
    assert [m.auto_separable for m in conv.members] == [True, True, False]
    assert "bank of 3 kernels" in repr(conv)
    assert conv.out_shape == (64, 64)
    with pytest.raises(TypeError, match=r"members\[k\]\.engine"):
        conv.engine(np.float64)


def test_the_callers_bank_is_not_modified_or_kept():
    bank = BANK.copy()
    conv = Convolver((10, 10), bank)
    bank[:] = 0
    assert conv.kernel.any() and all(m.kernel.any() for m in conv.members)


@pytest.mark.parametrize("kernel, words", [
    ([np.ones((3, 3)), np.ones((5, 5))], ["share one shape", "(3, 3)", "(5, 5)"]),
    (np.ones((0, 3, 3)), ["at least one kernel"]),
    (np.stack([np.ones((3, 3)), np.full((3, 3), np.nan)]), ["kernel[1]", "finite"]),
    (np.ones((2, 2, 2, 2)), ["2-D", "4-D"]),
])
def test_bad_banks_are_refused_with_the_argument_named(kernel, words):
    with pytest.raises((ValueError, TypeError)) as info:
        Convolver((8, 8), kernel)
    assert all(w in str(info.value) for w in words), str(info.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(1, 4), H=st.integers(1, 12), W=st.integers(1, 12), kh=st.integers(1, 5), kw=st.integers(1, 5),
       mode=st.sampled_from(["full", "same", "valid"]), boundary=st.sampled_from(["fill", "wrap", "symm", "nearest"]),
       correlate=st.booleans(), density=st.floats(0.0, 0.6), seed=st.integers(0, 2**16),
       method=st.sampled_from(["direct", "separable", "gather_scatter"]))
def test_hypothesis_bank_results_are_the_single_kernel_results(K, H, W, kh, kw, mode, boundary, correlate, density,
                                                               seed, method):
    if mode == "valid" and (kh > H or kw > W):
        return
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((3, H, W)) < density, rng.standard_normal((3, H, W)), 0.0)
    bank = rng.standard_normal((K, kh, kw))
    conv = Convolver((H, W), bank, mode, method=method, boundary=boundary, correlate=correlate)
    func = scipy.signal.correlate2d if correlate else scipy.signal.convolve2d
    got = conv(scipy.sparse.csr_matrix(x.reshape(3, -1)))
    for k in range(K):
        alone = Convolver((H, W), bank[k], mode, method=method, boundary=boundary, correlate=correlate)
        assert (got[k] != alone(scipy.sparse.csr_matrix(x.reshape(3, -1)))).nnz == 0
        if boundary in ("fill", "wrap", "symm"):
            ref = np.stack([func(f, bank[k], mode, boundary=boundary) for f in x])
            np.testing.assert_allclose(got[k].toarray().reshape(ref.shape), ref, rtol=1e-9, atol=1e-9)
