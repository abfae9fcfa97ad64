"""Named kernels and kernel files."""

import math
import pickle

import numpy as np
import pytest

from dask_sparseconv import kernels


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 3.0])
def test_gaussian_default_size_and_normalised(sigma):
    k = kernels.gaussian(sigma)
    side = 2 * math.ceil(3 * sigma) + 1
    assert k.shape == (side, side)
    assert k.dtype == np.float64
    assert math.isclose(k.sum(), 1.0, rel_tol=1e-12)
    # symmetric, peak in the centre
    np.testing.assert_allclose(k, k[::-1, ::-1])
    np.testing.assert_allclose(k, k.T)
    assert k.argmax() == k.size // 2


def test_gaussian_matches_separable_formula():
    k = kernels.gaussian(1.2, size=5)
    x = np.arange(5) - 2.0
    g = np.exp(-(x**2) / (2 * 1.2**2))
    expected = np.outer(g, g)
    np.testing.assert_allclose(k, expected / expected.sum())


def test_gaussian_anisotropic_and_pair_size():
    k = kernels.gaussian([1.0, 2.0])
    assert k.shape == (7, 13)
    k = kernels.gaussian(1.0, size=[3, 5])
    assert k.shape == (3, 5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sigma": 0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": 1.0, "size": 4}, "size"),
        ({"sigma": 1.0, "size": 0}, "size"),
        ({"sigma": [1.0, 2.0, 3.0]}, "sigma"),
        ({"sigma": 1e6}, "sigma"),
    ],
)
def test_gaussian_bad_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        kernels.gaussian(**kwargs)


@pytest.mark.parametrize("bad", ["1", None, True])
def test_gaussian_bad_types(bad):
    with pytest.raises(TypeError, match="sigma"):
        kernels.gaussian(bad)


def test_box():
    k = kernels.box(3)
    np.testing.assert_allclose(k, np.full((3, 3), 1 / 9))
    k = kernels.box((2, 4))
    assert k.shape == (2, 4)
    assert math.isclose(k.sum(), 1.0)
    with pytest.raises(ValueError, match="size"):
        kernels.box(0)
    with pytest.raises(TypeError, match="size"):
        kernels.box(2.5)
    with pytest.raises(ValueError, match="size"):
        kernels.box([1, 2, 3])


def test_disk():
    k = kernels.disk(1)
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], float) / 5
    np.testing.assert_allclose(k, expected)
    k = kernels.disk(2.5)
    assert k.shape == (5, 5)
    assert math.isclose(k.sum(), 1.0)
    assert k[0, 0] == 0 and k[2, 2] > 0
    with pytest.raises(ValueError, match="radius"):
        kernels.disk(-1)
    with pytest.raises(TypeError, match="radius"):
        kernels.disk("big")


def test_load_npy(tmp_path):
    k = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "k.npy", k)
    out = kernels.load_kernel_file(tmp_path / "k.npy")
    np.testing.assert_array_equal(out, k)


def test_load_npy_refuses_pickled_object_array(tmp_path):
    obj = np.empty((2, 2), dtype=object)
    obj[:] = [[1, 2], [3, {"evil": True}]]
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(ValueError, match="pickled object array"):
        kernels.load_kernel_file(tmp_path / "obj.npy")


def test_load_npy_refuses_plain_pickle(tmp_path):
    (tmp_path / "p.npy").write_bytes(pickle.dumps([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="p.npy"):
        kernels.load_kernel_file(tmp_path / "p.npy")


def test_load_npy_wrong_shape(tmp_path):
    np.save(tmp_path / "k.npy", np.ones(5))
    with pytest.raises(ValueError, match="2-D"):
        kernels.load_kernel_file(tmp_path / "k.npy")
    np.save(tmp_path / "n.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="finite"):
        kernels.load_kernel_file(tmp_path / "n.npy")


def test_load_text_formats(tmp_path):
    (tmp_path / "k.txt").write_text("# a comment\n0 1 0\n1 4 1\n0 1 0\n")
    (tmp_path / "k.csv").write_text("0,1,0\n1,4,1\n0,1,0\n")
    (tmp_path / "k.tsv").write_text("0\t1\t0\n1\t4\t1\n0\t1\t0\n")
    expected = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], float)
    for name in ("k.txt", "k.csv", "k.tsv"):
        np.testing.assert_array_equal(kernels.load_kernel_file(tmp_path / name), expected)
    (tmp_path / "one.txt").write_text("1 2 3\n")
    assert kernels.load_kernel_file(tmp_path / "one.txt").shape == (1, 3)


def test_load_text_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("1,2\n3\n")
    with pytest.raises(ValueError, match="bad.csv"):
        kernels.load_kernel_file(tmp_path / "bad.csv")
    (tmp_path / "word.txt").write_text("a b\n")
    with pytest.raises(ValueError, match="not a table of numbers"):
        kernels.load_kernel_file(tmp_path / "word.txt")


def test_load_missing_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kernels.load_kernel_file(tmp_path / "nope.npy")
    (tmp_path / "k.json").write_text("[[1]]")
    with pytest.raises(ValueError, match="unknown suffix"):
        kernels.load_kernel_file(tmp_path / "k.json")
