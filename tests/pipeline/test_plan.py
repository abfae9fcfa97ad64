"""plan_job(): the plan the CLI shows is the plan convolve_zarr runs; lazy
graphs have content keys (equal calls share work, different ones never collide)."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.sparse
from pipeline_support import KERNEL, assert_matches, reference, sparse_stack

from dask_sparseconv import JobPlan, convolve, convolve_zarr, open_stack, plan_job
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 37, 20, 18


@pytest.fixture(autouse=True)
def threaded():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.fixture(scope="module")
def stack():
    return sparse_stack(N, H, W, density=0.05, seed=5)


@pytest.fixture(scope="module")
def stores(stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    dense, csr = str(root / "dense.zarr"), str(root / "csr.zarr")
    write_dense_stack(dense, stack, chunks=4)
    write_csr_stack(csr, scipy.sparse.csr_matrix(stack.reshape(N, -1)), (H, W), chunk_size=101)
    return {"dense": dense, "csr": csr}


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_plan_is_what_runs(stack, stores, tmp_path, fmt):
    plan = plan_job(stores[fmt], KERNEL, "full", output_format="csr", block_memory=20_000, threads=3)
    assert isinstance(plan, JobPlan)
    assert plan.out_shape == (H + 2, W + 2) and plan.threads == 3 and plan.blocks.n_blocks > 1
    # planned for the scheduler that runs it: re-cut for 2 threads, estimates reused
    summary = convolve_zarr(stores[fmt], KERNEL, str(tmp_path / "o.zarr"), "full", output_format="csr",
                            block_memory=20_000, plan=plan)
    assert summary.blocks == plan.with_threads(2).blocks.n_blocks
    assert_matches(open_stack(str(tmp_path / "o.zarr")).compute(), reference(stack, KERNEL, "full"))


def test_plan_for_the_same_threads_is_run_unchanged(stack, stores, tmp_path):
    plan = plan_job(stores["dense"], KERNEL, block_memory=30_000, threads=2)
    summary = convolve_zarr(stores["dense"], KERNEL, str(tmp_path / "o.zarr"), block_memory=30_000, plan=plan)
    assert (summary.blocks, summary.block_rows) == (plan.blocks.n_blocks, plan.blocks.block_rows)
    assert_matches(open_stack(str(tmp_path / "o.zarr")).compute(), reference(stack, KERNEL, "same"))


@pytest.mark.parametrize("change, words", [
    ({"kernel": np.ones((3, 3))}, "kernel"),
    ({"mode": "valid"}, "mode='same'"),
    ({"block_memory": "1MiB"}, "block_memory"),
    ({"source": "csr"}, "source"),
])
def test_a_plan_for_another_job_is_refused(stores, tmp_path, change, words):
    plan = plan_job(stores["dense"], KERNEL, block_memory=30_000)
    kw = {"kernel": KERNEL, "mode": "same", "block_memory": 30_000, "source": "dense", **change}
    target = tmp_path / "o.zarr"
    with pytest.raises(ValueError, match="plan= was made for another job") as info:
        convolve_zarr(stores[kw.pop("source")], kw.pop("kernel"), str(target), kw.pop("mode"), plan=plan, **kw)
    assert words in str(info.value)
    assert not target.exists()
    with pytest.raises(TypeError, match="plan must be a JobPlan"):
        convolve_zarr(stores["dense"], KERNEL, str(target), plan={"blocks": 3})


def test_plan_job_refuses_what_the_run_would(stores, tmp_path):
    with pytest.raises(ValueError, match="valid"):
        plan_job(stores["dense"], np.ones((H + 1, 3)), "valid")
    with pytest.raises(ValueError, match="block_memory"):
        plan_job(stores["dense"], KERNEL, block_memory=100)
    with pytest.raises(FileNotFoundError):
        plan_job(str(tmp_path / "missing.zarr"), KERNEL)


def test_equal_lazy_calls_share_keys_and_different_ones_do_not(stack, stores):
    x = stack
    a, b = convolve(x, KERNEL), convolve(x.copy(), KERNEL)
    assert a.name == b.name  # content tokens: a second identical call reuses the first's tasks
    c = convolve(x * 2, KERNEL)
    d = convolve(x, KERNEL * 3)
    assert len({a.name, c.name, d.name}) == 3
    # computed together, each keeps its own values (a fixed map_blocks name used to make them collide)
    ra, rc, rd = dask.compute(a, c, d)
    assert_matches(ra, reference(x, KERNEL, "same"))
    assert_matches(rc, reference(x * 2, KERNEL, "same"), rtol=1e-5, atol=1e-4)
    assert_matches(rd, reference(x, KERNEL * 3, "same"), rtol=1e-5, atol=1e-4)
    csr = scipy.sparse.csr_matrix(x.reshape(N, -1))
    s1 = convolve(csr, KERNEL, frame_shape=(H, W))
    s2 = convolve(csr.copy(), KERNEL, frame_shape=(H, W))
    s3 = convolve(csr * 2, KERNEL, frame_shape=(H, W))
    assert s1.name == s2.name != s3.name
    z1, z2 = convolve(stores["csr"], KERNEL), convolve(stores["csr"], KERNEL)
    assert z1.name == z2.name
    r1, r3 = dask.compute(s1, s3)
    assert_matches(r1, reference(x, KERNEL, "same"))
    assert_matches(r3, reference(x * 2, KERNEL, "same"), rtol=1e-5, atol=1e-4)


_NO_COMPILED_CODE = """
import gc, sys
import numpy as np
from numba.core.dispatcher import Dispatcher
from dask_sparseconv import plan_job
plan = plan_job(sys.argv[1], np.ones((3, 3)), "same", output_format="csr")
loaded = sorted(d.py_func.__qualname__ for d in gc.get_objects() if isinstance(d, Dispatcher) and d.overloads)
assert len(plan.blocks.bounds) >= 1 and plan.expansion is not None, plan
print("loaded:", loaded)
"""


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_client_plans_without_compiled_code(stores, tmp_path, fmt):
    """Planning reads and samples the input on the client with numpy only:
    loading the first compiled function costs a process ~0.3 s (numba's
    start-up), which the command line would pay on every run
    (docs/benchmarks.md, "Resume"). The plan still samples the output."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _NO_COMPILED_CODE, str(stores[fmt]), str(tmp_path / "out.zarr")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "loaded: []"
