"""create_output: dense and CSR writers, markers, staging + consolidation, completion, resume, overlap."""

from __future__ import annotations

import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse
import zarr

from dask_sparseconv.storage import (
    create_output,
    describe_stack,
    open_input,
    open_stack,
    same_or_inside,
    stores_overlap,
    write_dense_stack,
)
from dask_sparseconv.storage.location import resolve_location

PROV = {"source": "/data/in.zarr", "kernel": [[0.0, 1.0], [1.0, 0.5]], "mode": "same", "method": "direct", "backend": "numba"}


def _result(n, Ho, Wo, density=0.2, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, Ho, Wo)) < density, rng.standard_normal((n, Ho, Wo)), 0).astype(dtype)
    x[3] = 0  # an empty image
    return x


def _bounds(n, rows):
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


# -- dense -------------------------------------------------------------------------------------
def test_dense_output_threads_and_completion(tmp_path):
    n, Ho, Wo = 23, 7, 6
    x = _result(n, Ho, Wo)
    bounds = _bounds(n, 5)
    target = tmp_path / "out.zarr"
    out = create_output(target, "dense", n, (Ho, Wo), "float32", bounds, attrs=PROV)
    arr = zarr.open_array(target, mode="r")
    assert arr.shape == (n, Ho, Wo) and arr.chunks == (5, Ho, Wo) and arr.metadata.zarr_format == 3
    assert "Zstd" in repr(arr.compressors) and arr.compressors[0].level == 1
    prov = arr.attrs["dask_sparseconv"]
    assert prov["complete"] is False and prov["kernel"] == PROV["kernel"] and prov["backend"] == "numba"
    assert "version" in prov and prov["n_blocks"] == 5 and prov["block_rows"] == 5

    def work(i):
        a, b = bounds[i]
        res = scipy.sparse.csr_matrix(x[a:b].reshape(b - a, -1)) if i % 2 else x[a:b].astype(np.float64)
        return out.write_block(i, a, b, res)

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(work, [0, 2, 4]))
    assert out.done_blocks() == {0, 2, 4}
    with pytest.raises(ValueError, match=r"cannot finalize .* 2 block\(s\) are not written yet \(first: \[1, 3\]\)"):
        out.finalize()
    with pytest.raises(ValueError, match=r"out.zarr.*is incomplete.*resume.*allow_incomplete=True"):
        open_stack(target)
    with pytest.raises(ValueError, match="is incomplete"):
        open_input(target)
    assert open_stack(target, allow_incomplete=True).shape == (n, Ho, Wo)
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(work, [1, 3]))
    out.finalize()
    assert out.complete
    prov = zarr.open_array(target, mode="r").attrs["dask_sparseconv"]
    assert prov["complete"] is True and prov["mode"] == "same"
    np.testing.assert_array_equal(open_stack(target).compute(), x)
    info = describe_stack(target)
    assert info["complete"] is True and info["provenance"]["method"] == "direct"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_block_from_a_sparse_result_is_digested_from_its_nonzeros(tmp_path, dtype):
    """A CSR result (what the pipeline hands over for sparse dense-output
    blocks) is digested from its nonzeros; the dense block read back
    verifies against it, and any change to it does not."""
    n, Ho, Wo = 12, 5, 9
    x = _result(n, Ho, Wo, dtype=dtype)
    x[1, 0, :3] = [np.nan, -0.0, np.inf]
    c = scipy.sparse.csr_matrix(x.reshape(n, -1))
    target = tmp_path / "out.zarr"
    out = create_output(target, "dense", n, (Ho, Wo), dtype, _bounds(n, 6), attrs=PROV)
    assert out.write_block(0, 0, 6, c[:6]) == c[:6].nnz
    explicit = c[6:].copy()
    explicit.data[::3] = 0  # explicit zeros and a -0.0 are not nonzero pixels
    explicit.data[1] = -0.0
    out.write_block(1, 6, 12, explicit)
    rec0, rec1 = (out.verify_block(i) for i in (0, 1))
    assert rec0["digest"].startswith("nzfletcher64:") and rec0["nnz"] == np.count_nonzero(x[:6])
    assert rec1["nnz"] == np.count_nonzero(explicit.toarray())
    np.testing.assert_array_equal(zarr.open_array(target)[6:].reshape(6, -1), explicit.toarray())
    # the same block written dense has the dense digest, and verifies too
    out.write_block(0, 0, 6, x[:6])
    assert out.verify_block(0)["digest"].startswith("fletcher64:")
    arr = zarr.open_array(target, mode="r+")
    arr[7, 2, 3] = arr[7, 2, 3] + 1  # damage block 1 after the fact
    assert out.verify_block(1) is None


def test_dense_output_chunk_rows(tmp_path):
    bounds = _bounds(20, 6)
    out = create_output(tmp_path / "a.zarr", "dense", 20, (4, 4), "float64", bounds, chunk_rows=3, compressor=None)
    arr = zarr.open_array(tmp_path / "a.zarr")
    assert arr.chunks == (3, 4, 4) and arr.compressors == ()
    x = _result(20, 4, 4, dtype=np.float64)
    for i, (a, b) in enumerate(bounds):
        out.write_block(i, a, b, x[a:b])
    out.finalize()
    np.testing.assert_array_equal(open_input(tmp_path / "a.zarr").read_dense_block(0, 20), x)
    with pytest.raises(ValueError, match="chunk_rows=4 must divide the block size"):
        create_output(tmp_path / "b.zarr", "dense", 20, (4, 4), "float64", bounds, chunk_rows=4)


def test_write_block_checks(tmp_path):
    out = create_output(tmp_path / "o.zarr", "dense", 10, (3, 3), "float32", _bounds(10, 4))
    with pytest.raises(ValueError, match=r"block 1 covers rows \(4, 8\); got start=4, stop=9"):
        out.write_block(1, 4, 9, np.zeros((5, 3, 3)))
    with pytest.raises(ValueError, match=r"block index 7 is out of range"):
        out.write_block(7, 0, 4, np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match=r"block 0: result must have shape \(4, 3, 3\)"):
        out.write_block(0, 0, 4, np.zeros((4, 9)))


def test_create_output_argument_errors(tmp_path):
    t = tmp_path / "o.zarr"
    with pytest.raises(ValueError, match="fmt must be one of"):
        create_output(t, "coo", 10, (3, 3), "f4", _bounds(10, 5))
    with pytest.raises(ValueError, match="must be contiguous.*block 1 is \\(6, 10\\)"):
        create_output(t, "dense", 10, (3, 3), "f4", [(0, 5), (6, 10)])
    with pytest.raises(ValueError, match="must all hold 3 rows except the last"):
        create_output(t, "dense", 10, (3, 3), "f4", [(0, 3), (3, 5), (5, 10)])
    with pytest.raises(ValueError, match="must end at n_images=10"):
        create_output(t, "dense", 10, (3, 3), "f4", [(0, 5)])
    with pytest.raises(TypeError, match="complex"):
        create_output(t, "dense", 10, (3, 3), "c8", _bounds(10, 5))
    with pytest.raises(ValueError, match="compressor must be"):
        create_output(t, "dense", 10, (3, 3), "f4", _bounds(10, 5), compressor="brotli")
    assert not t.exists()


def test_existing_target_and_overwrite(tmp_path):
    t = tmp_path / "o.zarr"
    out = create_output(t, "dense", 8, (2, 2), "f4", _bounds(8, 4))
    out.write_block(0, 0, 4, np.ones((4, 2, 2)))
    with pytest.raises(ValueError, match=r"target .*o.zarr' already exists; pass overwrite=True \(CLI: --overwrite\)"):
        create_output(t, "dense", 8, (2, 2), "f4", _bounds(8, 4))
    out2 = create_output(t, "csr", 8, (2, 2), "f4", _bounds(8, 4), overwrite=True)
    assert out2.done_blocks() == set()
    assert isinstance(zarr.open(t, mode="r"), zarr.Group)


def test_resume_reopens_matching_output(tmp_path):
    t = tmp_path / "o.zarr"
    bounds = _bounds(12, 5)
    x = _result(12, 3, 4)
    out = create_output(t, "csr", 12, (3, 4), "float32", bounds, attrs=PROV, chunk_nnz=4)
    nnz0 = out.write_block(0, 0, 5, scipy.sparse.csr_matrix(x[:5].reshape(5, -1)))
    again = create_output(t, "csr", 12, (3, 4), "float32", bounds, attrs=PROV, resume=True)
    assert again.done_blocks() == {0} and again.chunk_nnz == 4
    nnz = [nnz0] + [again.write_block(i, a, b, x[a:b]) for i, (a, b) in list(enumerate(bounds))[1:]]
    again.finalize(nnz)
    assert (open_input(t).read_block(0, 12) != scipy.sparse.csr_matrix(x.reshape(12, -1))).nnz == 0
    with pytest.raises(ValueError, match=r"cannot resume .*kernel: stored .* vs now"):
        create_output(t, "csr", 12, (3, 4), "float32", bounds, attrs={**PROV, "kernel": [[2.0]]}, resume=True)
    with pytest.raises(ValueError, match=r"block_rows: stored 5 vs now 4"):
        create_output(t, "csr", 12, (3, 4), "float32", _bounds(12, 4), attrs=PROV, resume=True)
    write_dense_stack(tmp_path / "foreign.zarr", x)
    with pytest.raises(ValueError, match="was not written by dask_sparseconv"):
        create_output(tmp_path / "foreign.zarr", "dense", 12, (3, 4), "float32", bounds, resume=True)


def test_unwritable_targets(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"target .*file.txt/out.zarr.* cannot be created: .*file.txt' is a file"):
        create_output(f / "out.zarr", "dense", 4, (2, 2), "f4", _bounds(4, 2))
    ro = zarr.storage.MemoryStore(read_only=True)
    with pytest.raises(PermissionError, match="read-only zarr store"):
        create_output(ro, "dense", 4, (2, 2), "f4", _bounds(4, 2))


# -- CSR ----------------------------------------------------------------------------------------
def _check_anndata_layout(group, c):
    assert group.attrs["encoding-type"] == "csr_matrix" and group.attrs["encoding-version"] == "0.1.0"
    assert list(group.attrs["shape"]) == list(c.shape)
    assert group["indptr"].dtype == np.int64 and group["indices"].dtype == np.int32
    np.testing.assert_array_equal(group["indptr"][:], c.indptr)
    np.testing.assert_array_equal(group["indices"][:], c.indices)
    np.testing.assert_array_equal(group["data"][:], c.data)
    assert "_staging" not in group and "_consolidated" not in group
    anndata = pytest.importorskip("anndata")
    back = anndata.io.read_elem(group)
    assert (back != c).nnz == 0


def _misaligned_csr_output(tmp_path, n, Ho, Wo, chunk_nnz, chunk_rows, block_rows, **kw):
    """A sparse stack with whole empty blocks, and a CSR output for it whose
    chunks need not line up with its blocks."""
    x = _result(n, Ho, Wo, density=0.15)
    x[8:14] = 0  # whole empty blocks
    bounds = _bounds(n, block_rows)
    t = tmp_path / "c.zarr"
    out = create_output(t, "csr", n, (Ho, Wo), "float32", bounds, chunk_rows=chunk_rows, chunk_nnz=chunk_nnz, **kw)
    return x, scipy.sparse.csr_matrix(x.reshape(n, -1)), bounds, t, out


@pytest.mark.parametrize("chunk_nnz, chunk_rows, block_rows", [(7, 5, 4), (3, 2, 6), (1000, 1000, 5)])
def test_csr_staging_consolidation_misaligned_threads(tmp_path, chunk_nnz, chunk_rows, block_rows):
    n, Ho, Wo = 29, 6, 7
    x, c, bounds, t, out = _misaligned_csr_output(tmp_path, n, Ho, Wo, chunk_nnz, chunk_rows, block_rows, attrs=PROV)

    def work(i):
        a, b = bounds[i]
        res = c[a:b] if i % 2 else x[a:b]
        return out.write_block(i, a, b, res)

    order = list(range(len(bounds)))[::-1]
    with ThreadPoolExecutor(4) as ex:
        nnz_rev = list(ex.map(work, order))
    block_nnz = [nnz_rev[order.index(i)] for i in range(len(bounds))]
    assert block_nnz == [c[a:b].nnz for a, b in bounds]
    assert out.done_blocks() == set(range(len(bounds)))
    g = zarr.open_group(t, mode="r")
    assert out.staged_nnz() == block_nnz  # staging holds every block (one raw key each)
    out.finalize(block_nnz)
    g = zarr.open_group(t, mode="r")
    _check_anndata_layout(g, c)
    # data/indices are created at their capacity (every pixel) before nnz is known, then shrunk
    assert g["data"].chunks == (min(chunk_nnz, n * Ho * Wo),) and g["indptr"].chunks == (min(chunk_rows, n + 1),)
    assert g.attrs["frame_shape"] == [Ho, Wo] and g.attrs["dask_sparseconv"]["complete"] is True
    assert g.attrs["dask_sparseconv"]["nnz"] == c.nnz
    assert (open_stack(t, rows_per_chunk=5).compute() != c).nnz == 0


def test_csr_parallel_consolidation_tasks_and_resume(tmp_path):
    n = 17
    x = _result(n, 5, 5, density=0.3)
    c = scipy.sparse.csr_matrix(x.reshape(n, -1))
    bounds = _bounds(n, 4)
    t = tmp_path / "c.zarr"
    out = create_output(t, "csr", n, (5, 5), "float32", bounds, chunk_rows=3, chunk_nnz=5)
    nnz = [out.write_block(i, a, b, c[a:b]) for i, (a, b) in enumerate(bounds)]
    with pytest.raises(ValueError, match="holds .* values in staging but block_nnz says"):
        bad = list(nnz)
        bad[0] += 1
        for task in out.consolidation_tasks(bad):
            task()
    tasks = out.consolidation_tasks(nnz)
    assert len(tasks) == 2 * -(-c.nnz // 5) + -(-(n + 1) // 3)  # data and indices chunks, indptr chunks
    assert {tk.kind for tk in tasks} == {"data", "indices", "indptr"}
    # ship tasks like dask would (pickled), run half of them in threads: a crash mid-consolidation
    shipped = [pickle.loads(pickle.dumps(tk)) for tk in tasks]
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda tk: tk(), shipped[::2]))
    assert out.consolidated_tasks(nnz) == {tk.index for tk in tasks[::2]}
    assert out.consolidated_tasks([0] * (len(nnz) - 1) + [sum(nnz)]) == set()  # another plan: its marks do not count
    info = describe_stack(t)
    assert info["complete"] is False and info["n_blocks"] == 5 and info["done_blocks"] == 5
    assert info["format"] == "csr" and info["shape"] == [17, 25]
    # a new process resumes: reopen, finalize runs only what is missing
    again = create_output(t, "csr", n, (5, 5), "float32", bounds, resume=True)
    again.finalize(None)  # nnz read back from staging
    _check_anndata_layout(zarr.open_group(t, mode="r"), c)
    again.finalize(nnz)  # already complete: no-op


@pytest.mark.parametrize("chunk_nnz, chunk_rows, block_rows", [(7, 5, 4), (1000, 1000, 5)])
def test_csr_held_and_staged_blocks_mix(tmp_path, chunk_nnz, chunk_rows, block_rows):
    """Blocks held in memory (hold_block) and staged ones feed the same
    consolidation; chunks straddle block boundaries, tasks travel pickled."""
    n, Ho, Wo = 29, 6, 7
    x, c, bounds, t, out = _misaligned_csr_output(tmp_path, n, Ho, Wo, chunk_nnz, chunk_rows, block_rows)
    held, nnz = {}, []
    for i, (a, b) in enumerate(bounds):
        if i % 3 == 1:
            nnz.append(out.write_block(i, a, b, c[a:b]))
        else:
            k, held[i] = out.hold_block(i, a, b, x[a:b] if i % 2 else c[a:b])
            nnz.append(k)
            assert held[i].nnz == k == c[a:b].nnz and held[i].data.dtype == np.float32
    assert out.done_blocks() == {i for i in range(len(bounds)) if i % 3 == 1}  # a held block has no marker
    shipped = pickle.loads(pickle.dumps(held))
    for task in out.consolidation_tasks(nnz, require_written=False):
        pickle.loads(pickle.dumps(task))(shipped, mark=False)
    assert out.consolidated_tasks(nnz) == set()  # mark=False: nothing recorded
    out.finalize(nnz, consolidated=True)
    g = zarr.open_group(t, mode="r")
    _check_anndata_layout(g, c)
    assert "_staging" not in g and g.attrs["dask_sparseconv"]["complete"] is True
    assert (open_stack(t).compute() != c).nnz == 0


def test_csr_all_held_and_count_checks(tmp_path):
    n = 10
    x = _result(n, 4, 4, density=0.4)
    c = scipy.sparse.csr_matrix(x.reshape(n, -1))
    bounds = _bounds(n, 4)
    t = tmp_path / "c.zarr"
    out = create_output(t, "csr", n, (4, 4), "float64", bounds, chunk_nnz=6)
    pairs = [out.hold_block(i, a, b, c[a:b]) for i, (a, b) in enumerate(bounds)]
    nnz, held = [k for k, _ in pairs], dict(enumerate(h for _, h in pairs))
    with pytest.raises(ValueError, match="block 1 covers rows"):
        out.hold_block(1, 0, 4, c[0:4])
    bad = list(nnz)
    bad[0] += 1
    with pytest.raises(ValueError, match="holds .* values in memory but block_nnz says"):
        for task in out.consolidation_tasks(bad, require_written=False):
            task(held)
    for task in out.consolidation_tasks(nnz, require_written=False):
        task(held, mark=False)
    out.finalize(nnz, consolidated=True, staged=False)  # nothing was staged: one attribute write
    g = zarr.open_group(t, mode="r")
    _check_anndata_layout(g, c)
    assert g["data"].dtype == np.float64 and g.attrs["dask_sparseconv"]["nnz"] == c.nnz
    assert open_input(t).read_block(0, n).toarray().tolist() == c.toarray().tolist()


def test_csr_all_empty_and_pickled_writer(tmp_path):
    bounds = _bounds(6, 4)
    url = f"memory://out-{uuid.uuid4().hex}/empty.zarr"
    out = create_output(url, "csr", 6, (3, 3), "float64", bounds)
    shipped = pickle.loads(pickle.dumps(out))
    nnz = [shipped.write_block(i, a, b, scipy.sparse.csr_matrix((b - a, 9))) for i, (a, b) in enumerate(bounds)]
    assert nnz == [0, 0] and out.done_blocks() == {0, 1}
    out.finalize(nnz)
    src = open_input(url)
    assert src.nnz == 0 and src.read_block(0, 6).nnz == 0 and src.dtype == np.float64


def test_memory_url_dense_output_and_describe():
    url = f"memory://out-{uuid.uuid4().hex}/dense.zarr"
    x = _result(9, 4, 4)
    bounds = _bounds(9, 4)
    out = create_output(url, "dense", 9, (4, 4), "float32", bounds, attrs=PROV, storage_options={})
    for i, (a, b) in enumerate(bounds):
        pickle.loads(pickle.dumps(out)).write_block(i, a, b, x[a:b])
    out.finalize(block_nnz=[int(np.count_nonzero(x[a:b])) for a, b in bounds])
    np.testing.assert_array_equal(open_stack(url).compute(), x)
    info = describe_stack(url)
    assert info["complete"] is True and info["provenance"]["nnz"] == np.count_nonzero(x)


def test_csr_output_in_group_of_zarr_object():
    store = zarr.storage.MemoryStore()
    root = zarr.open_group(store, mode="w")
    x = _result(8, 3, 3)
    out = create_output(root, "csr", 8, (3, 3), "float32", _bounds(8, 8), array="results/conv")
    out.finalize([out.write_block(0, 0, 8, x)])
    assert (open_input(root, array="results/conv").read_block(0, 8) != scipy.sparse.csr_matrix(x.reshape(8, 9))).nnz == 0


# -- locations ------------------------------------------------------------------------------------
def test_same_or_inside(tmp_path):
    src = tmp_path / "in.zarr"
    assert same_or_inside(src, src)
    assert same_or_inside(src / "out", src)
    assert same_or_inside(str(src) + "/", f"file://{src}")
    assert not same_or_inside(tmp_path / "in.zarr2", src)
    assert not same_or_inside(tmp_path, src)
    assert stores_overlap(tmp_path, src)
    assert same_or_inside(resolve_location(src, array="sub/out"), src)
    assert same_or_inside("memory://b/in.zarr/x", "memory://b/in.zarr")
    assert not same_or_inside("memory://b/in.zarr/x", str(src))
    assert same_or_inside("s3://bucket/in.zarr/out.zarr", "s3://bucket/in.zarr")  # works without s3fs installed
    assert not same_or_inside("s3://bucket/in.zarr2", "s3://bucket/in.zarr")
    store = zarr.storage.MemoryStore()
    g = zarr.open_group(store, mode="w")
    assert same_or_inside(resolve_location(g, array="a/b"), g)
    assert not same_or_inside(zarr.storage.MemoryStore(), g)
    local = zarr.open_group(src, mode="w")
    assert same_or_inside(resolve_location(local, array="res"), str(src))
