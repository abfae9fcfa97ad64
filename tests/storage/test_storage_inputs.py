"""open_input / open_stack / describe_stack on real zarr stores (local, memory://, zarr objects)."""

from __future__ import annotations

import hashlib
import os
import pickle
import uuid

import numpy as np
import pytest
import scipy.sparse
import zarr

from dask_sparseconv.storage import (
    CSRInput,
    DenseInput,
    dense_to_csr,
    describe_stack,
    open_input,
    open_stack,
    write_csr_stack,
    write_dense_stack,
)

anndata = pytest.importorskip("anndata")


def _stack(n=9, H=6, W=5, dtype=np.float32, density=0.25, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, H, W)) < density
    if np.dtype(dtype) == np.bool_:
        return mask
    vals = rng.integers(1, 200, size=(n, H, W)) if np.issubdtype(dtype, np.integer) else rng.standard_normal((n, H, W))
    return np.where(mask, vals, 0).astype(dtype)


def _assert_canonical_equal(got, want_dense_2d, dtype):
    assert isinstance(got, scipy.sparse.csr_matrix)
    assert got.dtype == np.dtype(dtype)
    assert got.has_canonical_format
    assert got.indices.dtype == np.int32 and got.indptr.dtype == np.int32
    ref = scipy.sparse.csr_matrix(want_dense_2d)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)


def _tree_fingerprint(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = (hashlib.sha1(fh.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


# -- dense -------------------------------------------------------------------------------
@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "bool", "float32", "float64"])
def test_dense_round_trip(tmp_path, zarr_format, dtype):
    x = _stack(dtype=dtype)
    path = tmp_path / "in.zarr"
    write_dense_stack(path, x, chunks=4, zarr_format=zarr_format)
    src = open_input(str(path))
    assert isinstance(src, DenseInput)
    assert (src.format, src.n_images, src.frame_shape, src.dtype, src.chunk_rows, src.nnz) == (
        "dense", 9, (6, 5), np.dtype(dtype), 4, None)
    assert src.bytes_per_image_dense == 30 * np.dtype(dtype).itemsize
    assert str(path) in src.location
    for a, b in [(0, 9), (2, 7), (8, 9), (3, 3)]:
        _assert_canonical_equal(src.read_block(a, b), x[a:b].reshape(b - a, 30), dtype)
        dense = src.read_dense_block(a, b)
        assert dense.dtype == np.dtype(dtype) and dense.flags.c_contiguous
        np.testing.assert_array_equal(dense, x[a:b])
    np.testing.assert_array_equal(open_stack(path).compute(), x)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_dense_spatially_chunked(tmp_path, zarr_format):
    x = _stack(n=7, H=8, W=10, dtype=np.float64)
    write_dense_stack(tmp_path / "s.zarr", x, chunks=(1, 3, 4), zarr_format=zarr_format)
    src = open_input(tmp_path / "s.zarr")
    assert src.chunk_rows == 1 and src.chunks == (1, 3, 4)
    _assert_canonical_equal(src.read_block(2, 6), x[2:6].reshape(4, 80), np.float64)
    stack = open_stack(tmp_path / "s.zarr")
    assert stack.chunks[1] == (3, 3, 2)
    np.testing.assert_array_equal(stack.compute(), x)


def test_dense_to_csr_matches_scipy_with_nan_and_negative_zero():
    x = np.array([[0.0, -0.0, np.nan, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, -3.0]], dtype=np.float32)
    got = dense_to_csr(x)
    ref = scipy.sparse.csr_matrix(x)
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)  # NaN kept, -0.0 dropped, like scipy


@pytest.mark.parametrize("compiled", [True, False])  # False: the planner's numpy path on the client
@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint8", "bool", ">f4"])
@pytest.mark.parametrize("density", [0.0, 0.002, 0.4, 1.0])  # 0.4 and 1.0 overflow the one-pass room
def test_dense_to_csr_dtypes_and_densities(dtype, density, compiled):
    rng = np.random.default_rng(5)
    x = np.where(rng.random((9, 4000)) < density, rng.standard_normal((9, 4000)) * 10, 0).astype(dtype)
    got = dense_to_csr(x, compiled=compiled)
    ref = scipy.sparse.csr_matrix(x.astype(x.dtype.newbyteorder("=")))
    ref.eliminate_zeros()
    assert got.dtype == x.dtype and got.has_canonical_format and got.indices.dtype == np.int32
    np.testing.assert_array_equal(got.indptr, ref.indptr)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.data, ref.data)


def test_array_inside_store_and_zarr_objects():
    store = zarr.storage.MemoryStore()
    g = zarr.open_group(store, mode="w")
    x = _stack(dtype=np.uint16)
    write_dense_stack(g, x, array_path="images/raw", chunks=3)
    for src in (open_input(g, array="images/raw"), open_input(g["images/raw"]), open_input(store, array="images/raw")):
        assert src.n_images == 9
        np.testing.assert_array_equal(src.read_dense_block(1, 5), x[1:5])
    with pytest.raises(ValueError, match="neither a csr_matrix.*array="):
        open_input(g)
    with pytest.raises(FileNotFoundError, match="array='images/nope'"):
        open_input(g, array="images/nope")


def test_memory_url_round_trip():
    url = f"memory://inputs-{uuid.uuid4().hex}/stack.zarr"
    x = _stack(dtype=np.float32)
    write_dense_stack(url, x, chunks=2, storage_options={})
    src = open_input(url)
    np.testing.assert_array_equal(src.read_dense_block(0, 9), x)
    src2 = pickle.loads(pickle.dumps(src))
    _assert_canonical_equal(src2.read_block(3, 8), x[3:8].reshape(5, 30), np.float32)
    c = scipy.sparse.csr_matrix(x.reshape(9, 30))
    curl = f"memory://inputs-{uuid.uuid4().hex}/csr.zarr"
    write_csr_stack(curl, c, (6, 5), chunk_size=5)
    cs = open_input(curl)
    assert cs.format == "csr" and cs.nnz == c.nnz
    assert (cs.read_block(0, 9) != c).nnz == 0


def test_inputs_pickle_light(tmp_path):
    x = _stack(n=64, H=32, W=32)
    write_dense_stack(tmp_path / "d.zarr", x, chunks=8)
    write_csr_stack(tmp_path / "c.zarr", scipy.sparse.csr_matrix(x.reshape(64, -1)), (32, 32), chunk_size=100)
    for p in ("d.zarr", "c.zarr"):
        src = open_input(tmp_path / p)
        blob = pickle.dumps(src)
        assert len(blob) < 16_000  # metadata only, not the 256 KiB of data
        again = pickle.loads(blob)
        assert (again.read_block(5, 20) != src.read_block(5, 20)).nnz == 0


# -- CSR (anndata encoding) ----------------------------------------------------------------
def _anndata_store(tmp_path, c, frame_shape, **settings):
    path = tmp_path / f"ad-{uuid.uuid4().hex[:6]}.zarr"
    g = zarr.open_group(path, mode="w")
    with anndata.settings.override(**settings):
        anndata.io.write_elem(g, "x", c)
    g["x"].attrs["frame_shape"] = list(frame_shape)
    return path


@pytest.mark.parametrize("settings", [{}, {"write_csr_csc_indices_with_min_possible_dtype": True},
                                      {"zarr_write_format": 3}])
def test_csr_written_by_anndata(tmp_path, settings):
    x = _stack(n=11, H=7, W=9, dtype=np.float64, density=0.2)
    c = scipy.sparse.csr_matrix(x.reshape(11, 63))
    path = _anndata_store(tmp_path, c, (7, 9), **settings)
    src = open_input(path, array="x")
    assert isinstance(src, CSRInput)
    assert (src.format, src.n_images, src.frame_shape, src.dtype, src.nnz) == ("csr", 11, (7, 9), np.dtype(np.float64), c.nnz)
    assert src.bytes_per_image_dense == 63 * 8
    assert 1 <= src.chunk_rows <= 11
    for a, b in [(0, 11), (3, 8), (10, 11), (4, 4)]:
        _assert_canonical_equal(src.read_block(a, b), x[a:b].reshape(b - a, 63), np.float64)
        np.testing.assert_array_equal(src.read_dense_block(a, b), x[a:b])
    stack = open_stack(path, array="x", rows_per_chunk=4)
    assert stack.chunks[0] == (4, 4, 3)
    got = stack.compute()
    assert isinstance(got, scipy.sparse.csr_matrix) and (got != c).nnz == 0
    blk = stack.blocks[1].compute()
    assert isinstance(blk, scipy.sparse.csr_matrix) and (blk != c[4:8]).nnz == 0
    assert (open_stack(path, array="x").compute() != c).nnz == 0
    info = describe_stack(path, array="x")
    assert info["format"] == "csr" and info["nnz"] == c.nnz and info["nnz_exact"]
    assert info["density"] == pytest.approx(c.nnz / (11 * 63))
    assert info["complete"] is None and info["provenance"] is None


def test_csr_non_canonical_rows_are_canonicalised(tmp_path):
    data = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    indices = np.array([3, 1, 1, 0], np.int32)  # unsorted, with a duplicate in row 0
    indptr = np.array([0, 3, 4], np.int64)
    g = zarr.open_group(tmp_path / "nc.zarr", mode="w")
    g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [2, 4], "frame_shape": [2, 2]})
    for k, v in (("data", data), ("indices", indices), ("indptr", indptr)):
        g.create_array(k, data=v)
    got = open_input(tmp_path / "nc.zarr").read_block(0, 2)
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.toarray(), [[0, 5, 0, 1], [4, 0, 0, 0]])


# -- validation ------------------------------------------------------------------------------
def _raw_csr(tmp_path, name="bad.zarr", data=None, indices=None, indptr=None, attrs=None, drop=()):
    g = zarr.open_group(tmp_path / name, mode="w")
    base = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": [3, 6], "frame_shape": [2, 3]}
    base.update(attrs or {})
    for k in drop:
        base.pop(k)
    g.attrs.update(base)
    arrays = {
        "data": np.array([1.0, 2.0, 3.0, 4.0]) if data is None else data,
        "indices": np.array([0, 5, 2, 3], np.int32) if indices is None else indices,
        "indptr": np.array([0, 2, 2, 4], np.int64) if indptr is None else indptr,
    }
    for k, v in arrays.items():
        if v is not False:
            g.create_array(k, data=v, chunks=(2,))
    return tmp_path / name


def test_valid_raw_csr_reads(tmp_path):
    src = open_input(_raw_csr(tmp_path))
    np.testing.assert_array_equal(src.read_block(0, 3).toarray(), [[1, 0, 0, 0, 0, 2], [0] * 6, [0, 0, 3, 4, 0, 0]])
    # the sparsity pattern alone (what the planner samples): same places, no values
    pattern = src.read_pattern(1, 3)
    assert pattern.dtype == bool and pattern.shape == (2, 6)
    np.testing.assert_array_equal(pattern.toarray(), [[0] * 6, [0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"indptr": np.array([0, 2, 4], np.int64)}, ValueError, r"indptr has length 3 but shape\[0\] = 3 needs "
            r"n_images \+ 1 = 4"),
        ({"indptr": np.array([0, 3, 2, 4], np.int64)}, ValueError, r"indptr is not monotonic.*indptr\[2\] = 2 < indptr\[1\] = 3"),
        ({"indptr": np.array([0, 2, 2, 3], np.int64)}, ValueError, r"indptr\[-1\] = 3 but data and indices have length 4"),
        ({"indptr": np.array([1, 2, 2, 4], np.int64)}, ValueError, r"indptr\[0\] is 1; it must be 0"),
        ({"indices": np.array([0, 5, 2], np.int32)}, ValueError, r"indices has length 3 but data has length 4"),
        ({"drop": ("frame_shape",)}, ValueError, r"has no 'frame_shape' attribute"),
        ({"attrs": {"frame_shape": [2, 2]}}, ValueError, r"frame_shape \[2, 2\] but H\*W = 4 != shape\[1\] = 6"),
        ({"attrs": {"shape": [3]}}, ValueError, r"needs a 'shape' attribute"),
        ({"attrs": {"encoding-version": "0.2.0"}}, ValueError, r"encoding-version '0.2.0'"),
        ({"data": False}, ValueError, r"has no 'data' array"),
        ({"indices": np.array([0.0, 5.0, 2.0, 3.0])}, TypeError, r"indices has dtype float64"),
    ],
)
def test_csr_validation_errors(tmp_path, kwargs, exc, pattern):
    path = _raw_csr(tmp_path, **kwargs)
    with pytest.raises(exc, match=pattern) as info:
        open_input(path)
    assert "bad.zarr" in str(info.value)


def test_csr_out_of_range_indices_named_by_block(tmp_path):
    path = _raw_csr(tmp_path, indices=np.array([0, 5, 2, 6], np.int32))
    src = open_input(path)  # indices are checked per block on read
    np.testing.assert_array_equal(src.read_block(0, 2).toarray()[0], [1, 0, 0, 0, 0, 2])
    with pytest.raises(ValueError, match=r"column index 6 out of range \[0, 6\) \(H\*W\) in block rows \[1, 3\), at row 2"):
        src.read_block(1, 3)
    path = _raw_csr(tmp_path, name="neg.zarr", indices=np.array([-1, 5, 2, 3], np.int32))
    with pytest.raises(ValueError, match=r"column index -1 .* block rows \[0, 1\), at row 0"):
        open_input(path).read_block(0, 1)


def test_missing_and_not_zarr(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match="nope.zarr.*does not exist"):
        open_input(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_input(f"memory://missing-{uuid.uuid4().hex}/x.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="empty.*is not a zarr store"):
        open_input(empty)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pytest.raises(ValueError, match="plain.txt"):
        open_input(plain)


def test_wrong_kinds_of_nodes(tmp_path):
    zarr.create_array(tmp_path / "flat.zarr", shape=(4, 5), dtype="f4")
    with pytest.raises(ValueError, match=r"flat.zarr.*2-D zarr array of shape \(4, 5\).*must be 3-D"):
        open_input(tmp_path / "flat.zarr")
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("a", shape=(2, 3, 3), dtype="f4")
    with pytest.raises(ValueError, match=r"g.zarr.*neither a csr_matrix encoding.*array=.*\['a'\]"):
        open_input(tmp_path / "g.zarr")
    assert open_input(tmp_path / "g.zarr", array="a").n_images == 2
    zarr.create_array(tmp_path / "cplx.zarr", shape=(2, 3, 3), dtype="c8")
    with pytest.raises(TypeError, match="cplx.zarr.*complex64"):
        open_input(tmp_path / "cplx.zarr")


def test_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"source must be a local path.*got 123"):
        open_input(123)
    with pytest.raises(TypeError, match="storage_options are only used with a URL"):
        open_input(tmp_path / "x.zarr", storage_options={"anon": True})
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        open_input("memory://x", storage_options="anon")
    with pytest.raises(ValueError, match="without '..'"):
        open_input(tmp_path, array="../etc")
    write_dense_stack(tmp_path / "d.zarr", _stack(), chunks=3)
    src = open_input(tmp_path / "d.zarr")
    with pytest.raises(ValueError, match=r"rows \[5, 12\) are out of range .* 9 images"):
        src.read_block(5, 12)


def test_corrupt_chunk_names_array_and_chunk(tmp_path):
    x = _stack(n=12, dtype=np.float32, density=0.9)
    path = tmp_path / "corrupt.zarr"
    write_dense_stack(path, x, chunks=4)
    chunk = path / "c" / "1" / "0" / "0"
    assert chunk.exists()
    chunk.write_bytes(b"garbage, not zstd")
    src = open_input(path)
    np.testing.assert_array_equal(src.read_dense_block(0, 4), x[:4])
    with pytest.raises(ValueError, match=r"dense array at .*corrupt.zarr.*chunk 1 along axis 0 \(elements 4-7\).*\[2, 10\)"):
        src.read_block(2, 10)
    c = scipy.sparse.csr_matrix(x.reshape(12, 30))
    cpath = tmp_path / "corrupt_csr.zarr"
    write_csr_stack(cpath, c, (6, 5), chunk_size=50)
    (cpath / "data" / "c" / "2").write_bytes(b"\x00\x01junk")
    src = open_input(cpath)
    assert (src.read_block(0, 2) != c[0:2]).nnz == 0
    with pytest.raises(ValueError, match=r"could not read data at .*corrupt_csr.zarr.*chunk 2 along axis 0 \(elements 100-149\)"):
        src.read_block(0, 12)


def test_input_store_not_modified(tmp_path):
    x = _stack(n=10)
    write_dense_stack(tmp_path / "d.zarr", x, chunks=3)
    c = scipy.sparse.csr_matrix(x.reshape(10, 30))
    path = _anndata_store(tmp_path, c, (6, 5))
    for root, kw in ((tmp_path / "d.zarr", {}), (path, {"array": "x"})):
        before = _tree_fingerprint(root)
        src = open_input(root, **kw)
        src.read_block(0, 10)
        src.read_dense_block(2, 5)
        pickle.loads(pickle.dumps(src)).read_block(1, 4)
        open_stack(root, **kw).compute()
        describe_stack(root, **kw)
        assert _tree_fingerprint(root) == before
    # a zarr object opened for writing is still only read
    g = zarr.open_group(path, mode="a")
    before = _tree_fingerprint(path)
    open_input(g, array="x").read_block(0, 10)
    assert _tree_fingerprint(path) == before


def test_describe_dense_estimates_density(tmp_path):
    x = _stack(n=40, density=0.3)
    write_dense_stack(tmp_path / "d.zarr", x, chunks=2)
    info = describe_stack(tmp_path / "d.zarr", sample_chunks=4)
    assert info["format"] == "dense" and info["shape"] == [40, 6, 5] and info["chunks"] == [2, 6, 5]
    assert "Zstd" in info["codec"] and info["zarr_format"] == 3
    assert info["nnz_exact"] is False and info["sampled_images"] == 8
    assert 0.15 < info["density"] < 0.45
    full = describe_stack(tmp_path / "d.zarr", sample_chunks=100)
    assert full["nnz_exact"] and full["nnz"] == np.count_nonzero(x)
