"""The CSR output chain's graph (pipeline/csr_chain.py): what the scheduler is
told about it (sizes, order, dependencies) and that a job built that way
still gives scipy's result on a real LocalCluster."""

import numpy as np
import pytest
import scipy.sparse
from dask.sizeof import sizeof
from pipeline_support import KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.pipeline.csr_chain import BlockResult
from dask_sparseconv.pipeline.tasks import BlockStats
from dask_sparseconv.storage import write_csr_stack

pytestmark = pytest.mark.xdist_group("cluster")


def test_block_result_reports_the_bytes_it_holds():
    # the scheduler places a block's carry and write by its result's size: an
    # unregistered object would read as ~50 bytes and the result would move
    csr = scipy.sparse.random(40, 5000, density=0.05, format="csr", dtype=np.float32, random_state=1)
    counts = np.diff(csr.indptr).astype(np.int64)
    stats = BlockStats(0, 0, 40, 100, int(csr.nnz), 0.0, 0.0, 0.0, 0.0, 1, counts=counts)
    held = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
    assert held > 40_000
    assert held + counts.nbytes <= sizeof(BlockResult(stats, csr)) <= held + counts.nbytes + 4096


def _task_keys(hlg, kind):
    return sorted(k for k in hlg if isinstance(k, str) and k.startswith(f"sparseconv-{kind}-"))


def test_chain_graph_orders_carries_before_writes_and_matches_scipy(local_cluster, tmp_path):
    from distributed import Client

    x = sparse_stack(60, 24, 20, density=0.05, seed=4)
    src, target = str(tmp_path / "in.zarr"), str(tmp_path / "out.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(60, -1)), (24, 20), chunk_size=50)
    with Client(local_cluster) as client:
        graph = convolve_zarr(src, KERNEL, target, "same", block_memory="8KiB", compute=False)
        hlg = graph.__dask_graph__()
        deps = hlg.get_all_dependencies()
        computes, carries, writes = (_task_keys(hlg, k) for k in ("compute", "carry", "block"))
        assert len(writes) >= 6 and len(carries) == len(writes) - 1 and len(computes) == len(writes)
        for i, (w, c) in enumerate(zip(writes, carries)):
            # write i waits for carry i, so the carry chain never waits behind a write
            assert c in deps[w], f"block {i}: its write does not wait for its carry"
            assert computes[i] in deps[c]
        priority = {}
        for layer in hlg.layers.values():
            for key in layer:
                if (layer.annotations or {}).get("priority") is not None:
                    priority[key] = layer.annotations["priority"]
        assert min(priority[c] for c in carries) > max(priority[w] for w in writes) > max(priority[c] for c in computes)
        assert [priority[c] for c in computes] == sorted((priority[c] for c in computes), reverse=True)
        client.compute(graph, sync=True)
    got = open_stack(target)
    assert_matches(got[:].compute().toarray().reshape(60, 24, 20), reference(x, KERNEL, "same"))


@pytest.mark.parametrize("damage", ["record", "chunk"])
def test_resumed_chain_carries_over_written_blocks_and_redoes_a_damaged_one(local_cluster, tmp_path, damage,
                                                                           monkeypatch):
    """A resumed run's written blocks are not links of the chain: each run of
    them is verified in parallel pieces and carried over by one segment task;
    a block in a segment whose record no longer checks out, or whose record is
    whole but one of whose chunks was damaged, is redone there, at the offset
    the segment knows, and the output still matches scipy."""
    import json

    import dask
    import zarr
    from distributed import Client

    import dask_sparseconv.storage.csr_store.output as csr_output
    from dask_sparseconv.pipeline.graph import key_blocks
    from dask_sparseconv.storage import progress

    # output chunks of 64 values (the output is created here, in the client): most blocks write chunks of their own
    monkeypatch.setattr(csr_output, "DEFAULT_CHUNK_NNZ", 64)
    x = sparse_stack(90, 16, 16, density=0.05, seed=9)
    src, target = str(tmp_path / "in.zarr"), tmp_path / "out.zarr"
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(90, -1)), (16, 16), chunk_size=40)
    kw = dict(block_memory="4KiB", output_format="csr")
    graph = convolve_zarr(src, KERNEL, str(target), "same", compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    n = len(_task_keys(hlg, "block"))
    assert n >= 12
    dask.get(hlg, [k for k in _task_keys(hlg, "block") if 3 <= int(k.rsplit("-", 1)[1]) < 10], scheduler="sync")
    done = sorted(int(i) for i in progress.done_blocks(zarr.open(str(target), mode="r")))
    assert set(range(3, 10)) <= set(done) and len(done) < n
    def written_chunks(i):
        raw = (target / "_blocks" / f"block_{i}").read_bytes()
        rows = int.from_bytes(raw[8:16], "little")
        return (json.loads(raw[16 + 8 * rows:]).get("written") or {}).get("chunks") or {}

    # inside a run of written blocks, one that wrote chunks of its own
    victim = next(i for i in done if i - 1 in done and i + 1 in done and written_chunks(i))
    path = (target / "_blocks" / f"block_{victim}" if damage == "record"
            else target / sorted(k for k in written_chunks(victim) if k.startswith("data/"))[0])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    with Client(local_cluster) as client:
        graph = convolve_zarr(src, KERNEL, str(target), "same", compute=False, **kw)
        hlg = dict(graph.__dask_graph__())
        computed = {int(k.rsplit("-", 1)[1]) for k in _task_keys(hlg, "compute")}
        assert computed == set(range(n)) - set(done)  # no compute task for a written block
        verified = sorted(i for k in _task_keys(hlg, "verify") for i, _, _ in hlg[k].args[1])
        assert verified == done
        # each run of written blocks is one block key (no task per written block), counted as its blocks
        spans = [(int(a), int(b)) for a, b in (k.rsplit("-", 2)[1:] for k in _task_keys(hlg, "block")
                                               if key_blocks(k) > 1)]
        assert spans and all(set(range(a, b)) <= set(done) for a, b in spans)
        assert sum(key_blocks(k) for k in _task_keys(hlg, "block")) == n
        assert len(_task_keys(hlg, "block")) == n - sum(b - a for a, b in spans) + len(spans)
        summary = client.compute(graph, sync=True)
    assert summary.resumed
    assert (summary.blocks_skipped, summary.blocks_computed) == (len(done) - 1, n - len(done) + 1)
    got = open_stack(str(target))
    assert_matches(got[:].compute().toarray().reshape(90, 16, 16), reference(x, KERNEL, "same"))
