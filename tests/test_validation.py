"""Argument checks: the message names the argument, the value and what is allowed."""

import numpy as np
import pytest

from dask_sparseconv import validation as v


@pytest.mark.parametrize(
    "kernel, exc, fragment",
    [
        (np.ones(3), ValueError, "2-D"),
        (np.ones((0, 3)), ValueError, "empty"),
        (np.array([[1.0, np.nan]]), ValueError, "finite"),
        (np.array([[1.0, np.inf]]), ValueError, "finite"),
        ("gaussian", TypeError, "'gaussian'"),
        (None, TypeError, "None"),
        (np.array([["a"]]), TypeError, "dtype"),
        (np.ones((2, 2), dtype=complex), TypeError, "complex"),
        ([[1, 2], [3]], TypeError, "kernel"),
    ],
)
def test_check_kernel_rejects(kernel, exc, fragment):
    with pytest.raises(exc, match="kernel") as info:
        v.check_kernel(kernel)
    assert fragment in str(info.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (2, 3), (4, 4)])
def test_check_kernel_finds_every_non_finite_value(dtype, bad, where):
    """The compiled check (used once numba is loaded) finds what numpy finds,
    wherever the value is, in every float dtype; finite kernels pass."""
    from dask_sparseconv.finite import all_finite

    k = np.random.default_rng(0).uniform(-1e4, 1e4, (5, 5)).astype(dtype)
    assert v.check_kernel(k).dtype == dtype
    k[where] = bad
    if dtype != np.float16:  # numba has no float16: the numpy path takes those
        assert not all_finite(k)
    with pytest.raises(ValueError, match="finite"):
        v.check_kernel(k)


def test_check_kernel_without_numba_loaded():
    """Validating a kernel does not import numba (a command that only checks
    its workflow does not pay for it), and still refuses non-finite values."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from dask_sparseconv import validation as v\n"
        "ok = v.check_kernel(np.ones((3, 3)))\n"
        "try:\n"
        "    v.check_kernel(np.array([[1.0, np.inf]]))\n"
        "except ValueError as exc:\n"
        "    print('refused', 'finite' in str(exc), ok.sum(), 'numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["refused", "True", "9.0", "False"]


def test_check_kernel_copies():
    k = np.ones((3, 3))
    out = v.check_kernel(k)
    out[0, 0] = 5
    assert k[0, 0] == 1


@pytest.mark.parametrize("shape", [(0, 3), (3,), (3, 3, 3), "33", (2.5, 3), (True, 3), (-1, 4)])
def test_check_frame_shape_rejects(shape):
    with pytest.raises((ValueError, TypeError), match="frame_shape"):
        v.check_frame_shape(shape)


def test_check_frame_shape_accepts_numpy_ints():
    assert v.check_frame_shape((np.int64(3), 4.0)) == (3, 4)


@pytest.mark.parametrize(
    "method, backend, fragment",
    [
        ("fast", "auto", "method must be one of"),
        ("direct", "numpy", "not valid for method='direct'"),
        ("lazy", "numba", "not valid for method='lazy'"),
        ("auto", "cuda", "backend must be one of"),
        (3, "auto", "method must be a string"),
    ],
)
def test_resolve_method_backend_rejects(method, backend, fragment):
    with pytest.raises((ValueError, TypeError)) as info:
        v.resolve_method_backend(method, backend)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "method, backend, expected",
    [
        ("auto", "auto", ("direct", "numba")),
        (None, None, ("direct", "numba")),
        ("gather_scatter", None, ("gather_scatter", "numba")),
        ("precomputed", "auto", ("precomputed", "numpy")),
        ("lazy", None, ("lazy", "numpy")),
        ("precomputed", "torch", ("precomputed", "torch")),
    ],
)
def test_resolve_method_backend_defaults(method, backend, expected):
    assert v.resolve_method_backend(method, backend) == expected


@pytest.mark.parametrize("dtype", ["int32", np.float16, "complex64"])
def test_check_dtype_rejects(dtype):
    with pytest.raises(ValueError, match="dtype"):
        v.check_dtype(dtype)


def test_check_dtype_accepts():
    assert v.check_dtype("float32") == np.float32
    assert v.check_dtype(None) is None
