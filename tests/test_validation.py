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


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (2, 3), (4, 4)])
def test_check_kernel_finds_every_non_finite_value(compiled, dtype, bad, where):
    """The compiled check finds what numpy's finds, wherever the value is, in
    every float dtype (float16 takes numpy's path); finite kernels pass."""
    k = np.random.default_rng(0).uniform(-1e4, 1e4, (5, 5)).astype(dtype)
    assert v.check_kernel(k, compiled=compiled).dtype == dtype
    k[where] = bad
    with pytest.raises(ValueError, match="finite"):
        v.check_kernel(k, compiled=compiled)


@pytest.mark.parametrize("order", [">", "<"])
def test_kernels_of_either_byte_order_on_numba(order):
    """A kernel in the other byte order (a FITS file's) takes numpy's check
    (numba refuses it) and convolves as scipy does; NaN is refused."""
    import scipy.signal
    import scipy.sparse

    from dask_sparseconv import Convolver, Toeplitz_convolution2d

    k = np.arange(9.0).reshape(3, 3).astype(order + "f8")
    x = scipy.sparse.random(3, 64, density=0.2, format="csr", random_state=1)
    want = np.stack([scipy.signal.convolve2d(f, k.astype(float), mode="same") for f in x.toarray().reshape(3, 8, 8)])
    for conv in (Convolver((8, 8), k, backend="numba"), Toeplitz_convolution2d((8, 8), k)):
        np.testing.assert_allclose(conv(x).toarray().reshape(3, 8, 8), want, rtol=1e-12, atol=1e-12)
    k[1, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        v.check_kernel(k, compiled=True)


def test_only_the_numba_convolver_loads_the_compiled_check():
    """A convolver on numba's engines checks its kernel with the compiled loop;
    other checks (a job's planning on the client) never load compiled code,
    which costs a process ~0.3 s of numba's start-up. Both refuse NaN."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from dask_sparseconv import Convolver, Toeplitz_convolution2d, validation as v\n"
        "from dask_sparseconv.finite import all_finite\n"
        "v.check_kernels(np.ones((3, 3)))\n"
        "Convolver((8, 8), np.ones((3, 3)), method='gather_scatter', backend='numpy')\n"
        "print(len(all_finite.overloads))\n"
        "Convolver((8, 8), np.ones((3, 3)), backend='numba')\n"
        "print(len(all_finite.overloads))\n"
        "for build in (lambda k: Convolver((8, 8), k), lambda k: Toeplitz_convolution2d((8, 8), k)):\n"
        "    try:\n"
        "        build(np.array([[1.0, np.nan]]))\n"
        "    except ValueError as exc:\n"
        "        print('finite' in str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "1", "True", "True"]


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
