"""Input fingerprints (dask_sparseconv.storage.fingerprint): equal for the
same bytes however they are reached, different when any value, index,
pointer or metadata document changes; computed in parallel by dask tasks for
large inputs with the same result."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import zarr

from dask_sparseconv.storage import fingerprint as fpmod
from dask_sparseconv.storage import resolve_location, write_csr_stack, write_dense_stack
from dask_sparseconv.storage.fingerprint import InputChangedError, check_unchanged, fingerprint


def _stack(seed=0, n=24, H=16, W=12, density=0.05):
    rng = np.random.default_rng(seed)
    return ((rng.random((n, H, W)) < density) * rng.standard_normal((n, H, W))).astype(np.float32)


def _fp(path, array=None):
    return fingerprint(resolve_location(str(path), array))


def test_same_bytes_same_fingerprint_and_rewrites_are_caught(tmp_path):
    x = _stack()
    write_dense_stack(tmp_path / "a.zarr", x, chunks=4)
    write_dense_stack(tmp_path / "b.zarr", x, chunks=4)
    a, b = _fp(tmp_path / "a.zarr"), _fp(tmp_path / "b.zarr")
    assert a.method == "crc32c" and a.arrays[""]["keys"] > 0
    assert a.differences(b) == []  # the same values written elsewhere: same content
    # an upstream step re-exports the stack in place: same shape, chunks, codecs, new values
    y = x.copy()
    y[5, 3, 4] += 1.0
    write_dense_stack(tmp_path / "a.zarr", y, chunks=4, overwrite=True)
    changed = a.differences(_fp(tmp_path / "a.zarr"))
    assert len(changed) == 1 and "chunks of the array" in changed[0]
    # the same values again: the fingerprint comes back
    write_dense_stack(tmp_path / "a.zarr", x, chunks=4, overwrite=True)
    assert a.differences(_fp(tmp_path / "a.zarr")) == []
    # an attribute is metadata
    zarr.open_array(str(tmp_path / "a.zarr"), mode="r+").attrs["note"] = "edited"
    assert any("metadata" in d for d in a.differences(_fp(tmp_path / "a.zarr")))


@pytest.mark.parametrize("member", ["data", "indices", "indptr"])
def test_every_csr_array_is_covered(tmp_path, member):
    x = _stack(n=30)
    csr = scipy.sparse.csr_matrix(x.reshape(30, -1))
    write_csr_stack(tmp_path / "c.zarr", csr, (16, 12), chunk_size=64)
    before = _fp(tmp_path / "c.zarr")
    assert {"data", "indices", "indptr"} <= set(before.arrays)
    arr = zarr.open_array(str(tmp_path / "c.zarr"), path=member, mode="r+")
    vals = arr[:]
    if member == "data":
        vals[7] += 1
    elif member == "indices":
        vals[7] = (vals[7] + 1) % (16 * 12)
    else:
        vals[3] += 1
    arr[:] = vals
    diff = before.differences(_fp(tmp_path / "c.zarr"))
    assert len(diff) == 1 and repr(member) in diff[0], diff


def test_zarr_v2_and_store_objects(tmp_path):
    x = _stack()
    write_dense_stack(tmp_path / "v2.zarr", x, chunks=4, zarr_format=2)
    v2 = _fp(tmp_path / "v2.zarr")
    assert v2.arrays[""]["keys"] == 6
    # a group in an in-memory store, opened as a zarr object
    store = zarr.storage.MemoryStore()
    g = zarr.open_group(store, mode="w")
    g.create_array("stack", data=x, chunks=(4, 16, 12))
    m1 = fingerprint(resolve_location(g, "stack"))
    assert m1.arrays[""]["keys"] == 6
    g["stack"][0] = x[0] + 1
    assert m1.differences(fingerprint(resolve_location(g, "stack")))
    # an fsspec URL reaches the same bytes as the local path
    assert _fp(f"file://{tmp_path / 'v2.zarr'}").differences(v2) == []


def test_large_inputs_are_read_by_dask_tasks_with_the_same_result(tmp_path, monkeypatch):
    x = _stack(n=64)
    write_dense_stack(tmp_path / "a.zarr", x, chunks=2)
    local = _fp(tmp_path / "a.zarr")
    calls = []
    real = fpmod._read_digests

    def counted(*args):
        calls.append(len(args[2]))
        return real(*args)

    monkeypatch.setattr(fpmod, "PARALLEL_BYTES", 0)  # every input counts as large
    monkeypatch.setattr(fpmod, "_read_digests", counted)
    tasks = fingerprint(resolve_location(str(tmp_path / "a.zarr")), scheduler_threads=2)
    assert len(calls) == 8 and sum(calls) == local.arrays[""]["keys"]  # 4 x 2 shares, every key once
    assert tasks.differences(local) == [] and tasks.arrays == local.arrays


def test_check_unchanged_messages(tmp_path):
    x = _stack()
    write_dense_stack(tmp_path / "a.zarr", x, chunks=4)
    before = _fp(tmp_path / "a.zarr")
    check_unchanged(before.as_dict(), _fp(tmp_path / "a.zarr"), "a.zarr", "out.zarr")  # no error
    write_dense_stack(tmp_path / "a.zarr", x * 2, chunks=4, overwrite=True)
    with pytest.raises(InputChangedError, match=r"cannot resume out.zarr: its input a.zarr changed.*overwrite=True "
                                                r"\(CLI: --restart\)"):
        check_unchanged(before.as_dict(), _fp(tmp_path / "a.zarr"), "a.zarr", "out.zarr")
    with pytest.raises(InputChangedError, match="records no fingerprint"):
        check_unchanged(None, before, "a.zarr", "out.zarr")
    assert issubclass(InputChangedError, ValueError)
