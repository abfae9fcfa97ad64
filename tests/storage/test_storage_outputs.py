"""create_output: dense and CSR writers, markers, the CSR carry chain, completion, resume, overlap."""

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


def test_dense_block_record_digests_chunks_and_reads_older_crc32_records(tmp_path):
    """A block record lists its chunks' stored size and XXH3 digest; a record
    from an earlier build (bare CRC-32 hex) still verifies, and a changed
    chunk fails either way."""
    import json
    import zlib

    import xxhash

    n, Ho, Wo = 10, 6, 5
    x = _result(n, Ho, Wo)
    target = tmp_path / "out.zarr"
    out = create_output(target, "dense", n, (Ho, Wo), "float32", _bounds(n, 5), attrs=PROV)
    out.write_block(0, 0, 5, x[:5])
    out.write_block(1, 5, 10, x[5:])
    rec = out.verify_block(1)
    raw = (target / "c" / "1" / "0" / "0").read_bytes()
    assert rec["chunks"] == {"c/1/0/0": [len(raw), f"xxh3:{xxhash.xxh3_64_hexdigest(raw)}"]}
    # rewrite block 1's record the way earlier builds did
    old = {**rec, "chunks": {"c/1/0/0": [len(raw), f"{zlib.crc32(raw):08x}"]}}
    (target / "_progress" / "1").write_text(json.dumps(old))
    assert out.verify_block(1)["chunks"] == old["chunks"]
    arr = zarr.open_array(target, mode="r+")
    arr[6, 1, 1] = arr[6, 1, 1] + 1
    arr[1, 1, 1] = arr[1, 1, 1] + 1
    assert out.verify_block(1) is None and out.verify_block(0) is None
    np.testing.assert_array_equal(arr[:][[0, 2, 3, 4]], x[[0, 2, 3, 4]])


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
    c = scipy.sparse.csr_matrix(x.reshape(12, -1))
    out = create_output(t, "csr", 12, (3, 4), "float32", bounds, attrs=PROV, chunk_nnz=4)
    out.write_block(0, 0, 5, c[:5])
    again = create_output(t, "csr", 12, (3, 4), "float32", bounds, attrs=PROV, resume=True)
    assert again.done_blocks() == {0} and again.chunk_nnz == 4
    counts, _ = again.block_record(0)
    carry = again.carry(0, None, None, counts)  # block 0 skipped: its carry holds no values
    assert not carry.in_memory or carry.nnz == 0
    for i in (1, 2):
        a, b = bounds[i]
        again.write_chunks(i, carry, c[a:b], produce=lambda f0, f1: c[f0:f1])
        carry = again.carry(i, carry, c[a:b], np.diff(c[a:b].indptr))
    again.finalize()  # counts read back from the block records
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
    assert not any(k.startswith("_blocks") for k in group.store_path.store._store_dict) \
        if isinstance(group.store_path.store, zarr.storage.MemoryStore) else True
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


@pytest.mark.parametrize("chunk_nnz, chunk_rows, block_rows", [(7, 5, 4), (3, 2, 6), (1000, 1000, 5), (40, 5, 1)])
def test_csr_carry_chain_writes_each_chunk_once(tmp_path, chunk_nnz, chunk_rows, block_rows):
    """Blocks (dense or CSR results, some empty, some smaller than a chunk)
    written through the carry chain as the pipeline runs it: carries and
    writers pickled, writes in parallel threads in reverse order once the
    carries are known; every chunk is written by exactly one block."""
    n, Ho, Wo = 29, 6, 7
    x, c, bounds, t, out = _misaligned_csr_output(tmp_path, n, Ho, Wo, chunk_nnz, chunk_rows, block_rows, attrs=PROV)
    results = [c[a:b] if i % 2 else scipy.sparse.csr_matrix(x[a:b].reshape(b - a, -1)) for i, (a, b) in enumerate(bounds)]
    carries = [None]
    for i, res in enumerate(results):
        carry = out.carry(i, carries[-1], res, np.diff(res.indptr))
        carries.append(pickle.loads(pickle.dumps(carry)))
        assert carry.stop == c.indptr[bounds[i][1]] and carry.start % chunk_nnz == 0 and carry.nnz < chunk_nnz
    shipped = pickle.loads(pickle.dumps(out))
    writes = []
    real = zarr.storage.LocalStore.set

    async def counting_set(self, key, value, *args, **kw):  # the real store; it only notes the keys written
        writes.append(key)
        return await real(self, key, value, *args, **kw)

    zarr.storage.LocalStore.set = counting_set
    try:
        with ThreadPoolExecutor(4) as ex:
            nnz = list(ex.map(lambda i: shipped.write_chunks(i, carries[i], results[i]), reversed(range(len(bounds)))))
    finally:
        zarr.storage.LocalStore.set = real
    assert nnz[::-1] == [c[a:b].nnz for a, b in bounds]
    chunk_keys = [k for k in writes if k.startswith(("data/c/", "indices/c/"))]
    assert len(chunk_keys) == len(set(chunk_keys)) == 2 * -(-c.nnz // chunk_nnz)  # each chunk once
    assert out.done_blocks() == set(range(len(bounds)))
    out.finish([type("S", (), {"index": i, "counts": np.diff(r.indptr)})() for i, r in enumerate(results)], False)
    g = zarr.open_group(t, mode="r")
    _check_anndata_layout(g, c)
    # data/indices are created at their capacity (every pixel) before nnz is known, then shrunk
    assert g["data"].chunks == (min(chunk_nnz, n * Ho * Wo),) and g["indptr"].chunks == (min(chunk_rows, n + 1),)
    assert g.attrs["frame_shape"] == [Ho, Wo] and g.attrs["dask_sparseconv"]["complete"] is True
    assert g.attrs["dask_sparseconv"]["nnz"] == c.nnz
    assert (open_stack(t, rows_per_chunk=5).compute() != c).nnz == 0


def _three_of_five_blocks_written(tmp_path):
    """A CSR output of 17 images in blocks of 4 (chunks of 5 values), blocks 0-2 written: ``(c, bounds, path, writer)``."""
    x = _result(17, 5, 5, density=0.3)
    c = scipy.sparse.csr_matrix(x.reshape(17, -1))
    bounds = _bounds(17, 4)
    t = tmp_path / "c.zarr"
    out = create_output(t, "csr", 17, (5, 5), "float32", bounds, chunk_rows=3, chunk_nnz=5)
    for i in range(3):
        out.write_block(i, *bounds[i], c[slice(*bounds[i])])
    return c, bounds, t, out


def test_csr_block_markers_read_raw_agree_with_the_marker_array(tmp_path):
    """A kept block's check reads its marker as the raw key the writer sets
    (no array metadata, no selection): it says what the ``_progress`` array
    says, for written blocks, unwritten ones and a cleared marker."""
    from dask_sparseconv.storage import progress

    _, _, t, out = _three_of_five_blocks_written(tmp_path)
    g = zarr.open_group(t, mode="r+")
    assert [progress.block_marked(g, i) for i in range(5)] == [bool(v) for v in g["_progress"][:]] \
        == [True, True, True, False, False]
    g["_progress"][1] = 0  # a marker cleared (what a restart does before rewriting)
    assert [progress.block_marked(g, i) for i in range(5)] == [True, False, True, False, False]
    again = create_output(t, "csr", 17, (5, 5), "float32", _bounds(17, 4), resume=True)
    assert [again.block_record(i) is not None for i in range(5)] == [True, False, True, False, False]


def test_csr_resume_checks_written_chunks_and_recomputes_carries(tmp_path):
    """A reopened writer trusts a block only if its record and the values it
    wrote read back unchanged; a block left to do gets the values that
    skipped blocks carried by recomputing exactly their images."""
    n, (c, bounds, t, out) = 17, _three_of_five_blocks_written(tmp_path)
    info = describe_stack(t)
    assert info["complete"] is False and info["n_blocks"] == 5 and info["done_blocks"] == 3
    assert info["format"] == "csr" and info["shape"] == [17, 25]
    with pytest.raises(ValueError, match="block 3 comes next, got block 4"):
        out.write_block(4, *bounds[4], c[16:17])
    again = create_output(t, "csr", n, (5, 5), "float32", bounds, resume=True)
    records = [again.block_record(i) for i in range(5)]
    assert [r is not None for r in records] == [True, True, True, False, False]
    # damage a chunk block 1 wrote: block 1 is no longer trusted, the others still are
    lo = _record_json(t, 1)["written"]["values"][0]
    victim = t / "data" / "c" / str(lo // 5)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert again.block_record(1) is None and again.block_record(0) is not None
    (t / "_blocks" / "block_2").write_bytes((t / "_blocks" / "block_2").read_bytes()[:-3])  # a cut record
    assert again.block_record(2) is None
    calls = []

    def produce(f0, f1):
        calls.append((f0, f1))
        return c[f0:f1]

    carry = again.carry(0, None, None, records[0][0])  # block 0 skipped
    for i in range(1, 5):
        a, b = bounds[i]
        again.write_chunks(i, carry, c[a:b], produce=produce)
        carry = again.carry(i, carry, c[a:b], np.diff(c[a:b].indptr))
    assert calls and all(0 <= f0 < f1 <= 4 for f0, f1 in calls)  # only block 0's images
    again.finalize()
    _check_anndata_layout(zarr.open_group(t, mode="r"), c)
    again.finalize()  # already complete: no-op


def _record_json(t, i):
    import json
    import struct

    raw = (t / "_blocks" / f"block_{i}").read_bytes()
    rows = struct.unpack_from("<8sq", raw)[1]
    return json.loads(raw[16 + 8 * rows:])


def test_csr_carry_without_values_needs_produce(tmp_path):
    n = 10
    x = _result(n, 4, 4, density=0.4)
    c = scipy.sparse.csr_matrix(x.reshape(n, -1))
    bounds = _bounds(n, 4)
    out = create_output(tmp_path / "c.zarr", "csr", n, (4, 4), "float64", bounds, chunk_nnz=1000)
    carry = out.carry(0, None, None, np.diff(c[0:4].indptr))
    assert carry.nnz == c[0:4].nnz and not carry.in_memory
    assert out.write_chunks(1, carry, c[4:8]) == c[4:8].nnz  # no chunk ends in block 1: nothing needed
    carry = out.carry(1, carry, c[4:8], np.diff(c[4:8].indptr))
    with pytest.raises(ValueError, match="come from blocks that were not computed in this run; pass produce="):
        out.write_chunks(2, carry, c[8:10])  # the last block writes everything carried
    with pytest.raises(ValueError, match=r"recomputing images 0-7 .* gave \d+ values where the blocks' records say"):
        out.write_chunks(2, carry, c[8:10], produce=lambda f0, f1: c[f0:f1][:, :8])
    with pytest.raises(ValueError, match=r"block 1: result must have shape \(4, 16\); got \(3, 16\)"):
        out.write_chunks(1, carry, c[0:3])


def test_csr_all_empty_and_pickled_writer(tmp_path):
    bounds = _bounds(6, 4)
    url = f"memory://out-{uuid.uuid4().hex}/empty.zarr"
    out = create_output(url, "csr", 6, (3, 3), "float64", bounds)
    shipped = pickle.loads(pickle.dumps(out))
    nnz = [shipped.write_block(i, a, b, scipy.sparse.csr_matrix((b - a, 9))) for i, (a, b) in enumerate(bounds)]
    assert nnz == [0, 0] and out.done_blocks() == {0, 1}
    shipped.finalize()
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
    out.write_block(0, 0, 8, x)
    out.finalize()
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


def test_csr_block_records_list_their_chunks_raw_and_old_records_still_verify(tmp_path):
    """A block's record lists the data and indices chunks it wrote as stored
    (size and digest of the encoded bytes), so a resumed run checks them
    without decoding; a record of an earlier version (a CRC-32 of the decoded
    values) is still checked, and still catches a damaged chunk."""
    from dask_sparseconv.storage import progress
    from dask_sparseconv.storage.csr_store.output import BLOCKS, _pack_record

    n, (c, bounds, t, _) = 17, _three_of_five_blocks_written(tmp_path)
    rec = _record_json(t, 1)
    lo, hi = rec["written"]["values"]
    chunks = rec["written"]["chunks"]
    assert sorted(chunks) == sorted(f"{a}/c/{j}" for a in ("data", "indices") for j in range((lo // 5), (hi - 1) // 5 + 1))
    assert all(v[0] > 0 and v[1].startswith("xxh3:") for v in chunks.values())

    # block 1's record as an earlier version wrote it
    again = create_output(t, "csr", n, (5, 5), "float32", bounds, resume=True)
    counts, old = again.block_record(1)
    values = [np.asarray(zarr.open_array(t / name, mode="r")[lo:hi]) for name in ("data", "indices")]
    old = {k: v for k, v in old.items() if k not in ("rows", "nnz", "crc32")}
    old["written"] = {"values": [lo, hi], "crc32": progress.checksum(*values)}
    (t / BLOCKS / "block_1").write_bytes(_pack_record(counts, old))
    assert again.block_record(1) is not None and "chunks" not in again.block_record(1)[1]["written"]
    np.testing.assert_array_equal(again.block_record(1)[0], np.diff(c[slice(*bounds[1])].indptr))
    victim = t / "indices" / "c" / str(lo // 5)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    assert again.block_record(1) is None and again.block_record(0) is not None


@pytest.mark.parametrize("hash", ["xxh3", "crc32"])
def test_stored_chunks_of_local_files_match_the_store_read(tmp_path, hash):
    """Local chunks are digested from their files in pieces; the record is the
    same as a whole read through the store (an fsspec ``file://`` store here,
    which takes the store path), for chunks larger than a piece, a chunk of
    one piece and a chunk zarr did not store (all fill value)."""
    import zlib

    import xxhash

    from dask_sparseconv.storage import progress

    rng = np.random.default_rng(3)
    target = tmp_path / "a.zarr"
    big = progress._PIECE // 4 * 3  # float32 values: a chunk ~3 pieces long, uncompressed
    arr = zarr.create_array(target, shape=(3, big), chunks=(1, big), dtype="float32", compressors=None,
                            fill_value=0)
    arr[0] = rng.random(big, dtype=np.float32)
    arr[2, :10] = 1.0  # mostly fill value, stored whole (no compressor)
    keys = ["c/0/0", "c/1/0", "c/2/0"]
    local = progress.stored_chunks(zarr.open_array(target, mode="r"), keys, hash)
    through_store = progress.stored_chunks(zarr.open_array(f"file://{target}", mode="r"), keys, hash)
    assert progress._local_folder(zarr.open_array(f"file://{target}", mode="r")) is None
    assert local == through_store
    for key in ("c/0/0", "c/2/0"):
        raw = (target / key).read_bytes()
        assert len(raw) > progress._PIECE
        want = f"xxh3:{xxhash.xxh3_64_hexdigest(raw)}" if hash == "xxh3" else f"{zlib.crc32(raw):08x}"
        assert local[key] == [len(raw), want]
    assert local["c/1/0"] is None
