"""`dask-sparseconv run` end to end on real dask clusters: every workflow in
workflows/ (the scheduler one against a `dask scheduler` + `dask worker`
started here), --restart, a runtime failure, and outputs checked against
scipy.signal.convolve2d."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from dask_processes import DaskProcesses
from scipy_oracle import convolve_stack

from dask_sparseconv.workflow import load_workflow

# Not in the serial ``cluster`` xdist group: these runs start their own
# clusters (free ports) and assert results, not timings, so they may run
# beside the group, which is the suite's longest path.

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env(), timeout=timeout,
    )  # fmt: skip


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return res


def copy_workflow(name: str, tmp_path: Path, **replace) -> Path:
    """Copy workflows/<name> into tmp_path/workflows/ so that its relative
    paths (../data, ../out) land inside tmp_path; top-level sections in
    ``replace`` are updated key by key."""
    dest = tmp_path / "workflows" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        data = yaml.safe_load((REPO / "workflows" / name).read_text())
        for section, values in replace.items():
            data[section].update(values)
        dest.write_text(yaml.safe_dump(data))
    else:
        shutil.copy(REPO / "workflows" / name, dest)
    return dest


def reference(frames: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    return convolve_stack(frames, kernel, mode)


def check_against_scipy(wf_path: Path, picks) -> None:
    from dask_sparseconv.geometry import geometry
    from dask_sparseconv.storage import open_input

    wf = load_workflow(wf_path)
    src = open_input(wf.input.path)
    out = open_input(wf.output.path)
    assert out.n_images == src.n_images
    geo = geometry(src.frame_shape, wf.kernel.array.shape, wf.mode)
    assert tuple(out.frame_shape) == geo.out_shape
    for i in picks:
        x = src.read_dense_block(i, i + 1)
        y = out.read_dense_block(i, i + 1)
        ref = reference(x, wf.kernel.array, wf.mode)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(ref).max()))


def nonzero_picks(wf_path: Path, n: int = 8) -> list[int]:
    from dask_sparseconv.storage import open_input

    src = open_input(load_workflow(wf_path).input.path)
    counts = np.diff(src.read_block(0, src.n_images).indptr)
    nz = np.flatnonzero(counts)
    return sorted(set(nz[:n].tolist()) | {0, src.n_images - 1})


def test_quickstart_runs_on_a_fresh_folder(tmp_path):
    # The quickstart as shipped except a smaller sample (64 frames of 256 x 256
    # instead of 200 of 512 x 512) to keep the suite quick; the full-size run
    # is what `dask-sparseconv run workflows/quickstart.yaml` does.
    wf = copy_workflow("quickstart.yaml", tmp_path, input={"sample": {"n_images": 64, "frame_shape": [256, 256]}})
    res = ok(cli("run", wf))
    out = res.stdout
    assert "generating the sample stack (64 images of 256 x 256, dense)" in out
    assert "dashboard:" in out
    assert "images:     64 (256 x 256 -> 256 x 256, mode same)" in out
    for word in ("nnz:", "time:", "throughput:", "images/s", f"output:     {tmp_path / 'out' / 'quickstart_blurred.zarr'}"):
        assert word in out
    # not a TTY here: plain progress lines ending at 100 %
    assert "progress:" in res.stderr and "blocks (100%)" in res.stderr
    check_against_scipy(wf, nonzero_picks(wf))
    # the sample is there now: nothing left to generate, the output may be replaced (overwrite: true)
    res = ok(cli("validate", wf))
    assert "will be generated" not in res.stdout and "exists; will be replaced" in res.stdout


def test_csr_to_csr_workflow(tmp_path):
    wf = copy_workflow("csr_to_csr.yaml", tmp_path, input={"sample": {"n_images": 60, "frame_shape": [128, 96], "format": "csr", "seed": 1}})
    ok(cli("run", wf))
    from dask_sparseconv.storage import describe_stack, open_input

    w = load_workflow(wf)
    assert open_input(w.input.path).format == "csr"
    d = describe_stack(w.output.path)
    assert d["format"] == "csr" and d["complete"] is True and d["shape"] == [60, 132 * 100]
    check_against_scipy(wf, range(60))
    info = ok(cli("info", w.output.path)).stdout
    assert "format:     csr" in info and "state:      complete" in info and "mode:         full" in info


# a distributed worker preload: each worker records the allocator settings it started with
RECORD_MALLOC = textwrap.dedent("""
    import json, os

    def dask_setup(worker):
        path = os.path.join(os.environ["DSC_TEST_ENV_DIR"], f"{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, f)
""")


@pytest.mark.parametrize("fork, user, limit", [("1", None, "2GiB"), ("0", None, "2GiB"), ("1", "65536", "2GiB"),
                                               ("1", None, "1GiB")],
                         ids=["forked", "spawned", "user-setting", "small-memory-limit"])
def test_local_workers_reuse_block_memory(tmp_path, fork, user, limit):
    """The command's local workers start with glibc's allocator set to reuse
    a block's memory (runtime/allocator.py), forked or spawned; a
    MALLOC_* variable of the user's stands instead, and so does
    distributed's setting under a memory limit below 2 GiB. The output is right."""
    from dask_sparseconv.runtime.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

    wf = copy_workflow("csr_to_csr.yaml", tmp_path, input={"sample": {"n_images": 24, "frame_shape": [64, 48],
                                                                      "format": "csr", "seed": 2}},
                       cluster={"memory_limit": limit})
    (tmp_path / "record_malloc.py").write_text(RECORD_MALLOC)
    (tmp_path / "envs").mkdir()
    e = {k: v for k, v in env().items() if not k.startswith("MALLOC_")}
    e.update(DSC_TEST_ENV_DIR=str(tmp_path / "envs"), DASK_SPARSECONV_FORK_WORKERS=fork,
             DASK_DISTRIBUTED__WORKER__PRELOAD=f"['{tmp_path / 'record_malloc.py'}']")
    if user is not None:
        e["MALLOC_TRIM_THRESHOLD_"] = user
    res = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "run", str(wf)], capture_output=True,
                         text=True, cwd=REPO, env=e, timeout=300)
    ok(res)
    check_against_scipy(wf, range(24))
    seen = [json.loads(p.read_text()) for p in (tmp_path / "envs").iterdir()]
    assert len(seen) == 2  # the workflow's two workers
    if user is not None:
        want = {"MALLOC_TRIM_THRESHOLD_": user}
    elif limit == "1GiB":
        want = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # distributed's
    else:
        want = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    assert seen == [want, want]


def test_allocator_settings_leave_the_users_choice():
    """A MALLOC_* variable in the environment or in dask's
    ``distributed.nanny.pre-spawn-environ`` is the user's choice; distributed's
    own default there is not. Workers limited to less than 2 GiB keep
    distributed's setting (near its limit a worker pauses on its resident
    memory)."""
    import dask

    from dask_sparseconv.runtime.allocator import MIN_MEMORY_LIMIT, block_worker_malloc, worker_memory_limit

    assert set(block_worker_malloc({}, {})) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    assert block_worker_malloc({}, {}, memory_limit=MIN_MEMORY_LIMIT) != {}
    assert block_worker_malloc({}, {}, memory_limit=MIN_MEMORY_LIMIT - 1) == {}
    assert worker_memory_limit(None) is None and worker_memory_limit(0) is None and worker_memory_limit("0") is None
    assert worker_memory_limit("1.5GiB") == 3 * 2**29 and worker_memory_limit(4096) == 4096
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < worker_memory_limit("auto", 1) <= machine and worker_memory_limit("auto", 10**6) <= machine
    with pytest.raises(ValueError):
        worker_memory_limit("lots")
    assert block_worker_malloc({"MALLOC_ARENA_MAX": "2"}, {}) == {}
    assert block_worker_malloc({}, {"MALLOC_TRIM_THRESHOLD_": 0}) == {}
    assert block_worker_malloc({}, {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": 1}) != {}
    import distributed  # noqa: F401  (puts its defaults, MALLOC_TRIM_THRESHOLD_ 65536, into dask's config)

    assert block_worker_malloc({}) != {}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 0}):
        assert block_worker_malloc({}) == {}


def test_periodic_correlation_workflow(tmp_path):
    """The operation keys from a workflow file: correlation with a wrapped
    boundary, CSR out, against scipy.signal.correlate2d(boundary='wrap')."""
    import scipy.signal

    from dask_sparseconv.storage import open_input

    wf = copy_workflow("periodic_correlation.yaml", tmp_path,
                       input={"sample": {"n_images": 40, "frame_shape": [96, 80], "max_rois": 4, "radius": 9}})
    res = ok(cli("run", wf))
    assert "correlation, boundary wrap" in res.stdout
    w = load_workflow(wf)
    src, out = open_input(w.input.path), open_input(w.output.path)
    k = w.kernel.array
    edge = 0
    for i in range(src.n_images):
        x = src.read_dense_block(i, i + 1)[0]
        edge += bool(x[0].any() or x[-1].any() or x[:, 0].any() or x[:, -1].any())
        ref = scipy.signal.correlate2d(x.astype(np.float64), k, "same", boundary="wrap")
        np.testing.assert_allclose(out.read_dense_block(i, i + 1)[0], ref, rtol=1e-5, atol=1e-5)
    assert edge > 0  # some footprints touch an edge, so the wrap is exercised
    info = ok(cli("info", w.output.path)).stdout
    assert "boundary:     wrap" in info and "correlate:    True" in info


def test_dry_run_plan_is_the_plan_run(tmp_path):
    """The block plan `--dry-run` prints (before the CSR sample exists, and
    after) is the one the run uses, with a budget small enough that the
    sampled output estimate decides the block size."""
    import re

    wf = copy_workflow("csr_to_csr.yaml", tmp_path, input={"sample": {"n_images": 60, "frame_shape": [128, 96], "format": "csr", "seed": 1}},
                       block={"memory": "40KiB"})
    plan = re.compile(r"row blocks:\s+(\d+) of up to (\d+) images")
    before = plan.search(ok(cli("run", wf, "--dry-run")).stdout).groups()
    run = re.search(r"blocks:\s+(\d+) of up to (\d+) images", ok(cli("run", wf)).stdout).groups()
    after = plan.search(ok(cli("run", wf, "--dry-run")).stdout).groups()
    assert before == run == after and int(run[0]) > 4  # memory-bound, not the 2-per-thread minimum
    check_against_scipy(wf, range(60))


def test_restart_and_existing_output(tmp_path):
    from dask_sparseconv.sample_data import write_sample_stack

    write_sample_stack(tmp_path / "in.zarr", 30, (40, 40), radius=5, seed=4)
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent(
        """
        input: {path: in.zarr}
        kernel: {values: [[0, 1, 0], [1, -4, 1], [0, 1, 0]]}
        mode: valid
        dtype: float64
        output: {path: out.zarr, format: csr}
        cluster: {n_workers: 1, threads_per_worker: 2, memory_limit: 1GiB, dashboard_address: null}
        block: {memory: 256KiB}
        """
    ))  # fmt: skip
    ok(cli("run", wf))
    check_against_scipy(wf, range(30))
    res = cli("run", wf)
    assert res.returncode == 2 and "already exists" in res.stderr and "--restart" in res.stderr
    assert "Traceback" not in res.stderr
    first = os.path.getmtime(tmp_path / "out.zarr" / "zarr.json")
    time.sleep(0.05)
    res = ok(cli("run", wf, "--restart"))
    assert "exists; will be replaced" in res.stdout
    assert os.path.getmtime(tmp_path / "out.zarr" / "zarr.json") > first
    check_against_scipy(wf, range(30))


def _csr_workflow(tmp_path):
    from dask_sparseconv.sample_data import write_sample_stack

    write_sample_stack(tmp_path / "in.zarr", 20, (16, 16), radius=3, seed=5, format="csr")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "input: {path: in.zarr}\nkernel: {box: {size: 3}}\noutput: {path: out.zarr}\n"
        "cluster: {n_workers: 1, dashboard_address: null}\n"
    )
    return wf


def test_runtime_failure_is_one_clear_message(tmp_path):
    """A corrupt chunk that only shows when a worker reads it: exit 1, one line, no traceback."""
    wf = _csr_workflow(tmp_path)
    chunks = sorted((tmp_path / "in.zarr" / "data").rglob("c/*"))
    assert chunks, "expected the data array's chunk files"
    chunks[0].write_bytes(b"\x00\x01 not a zstd frame")
    res = cli("run", wf)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "data" in lines[0] and "chunk" in lines[0], res.stderr


def test_bad_csr_indices_refused_before_writing(tmp_path):
    """Out-of-range CSR indices are found before the output exists: exit 2, one line."""
    import zarr

    wf = _csr_workflow(tmp_path)
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="r+")
    idx = g["indices"][:]
    idx[-1] = 10_000  # column beyond H*W = 256
    g["indices"][:] = idx
    res = cli("run", wf)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "column index 10000 is out of range" in lines[0], res.stderr
    assert not (tmp_path / "out.zarr").exists()


# -- the scheduler workflow, against `dask scheduler` + `dask worker` ------------
@pytest.fixture
def scheduler_address(tmp_path):
    procs = DaskProcesses(tmp_path / "dask", env=env())
    try:
        address = procs.scheduler()
        procs.workers(1)
        yield address
    finally:
        procs.stop()


def test_scheduler_workflow(tmp_path, scheduler_address):
    wf = copy_workflow(
        "scheduler.yaml", tmp_path,
        cluster={"address": scheduler_address, "timeout": f"{START_TIMEOUT}s"},
        input={"sample": {"n_images": 50, "frame_shape": [256, 256], "format": "dense", "seed": 0}},
    )  # fmt: skip
    res = ok(cli("run", wf))
    assert f"existing scheduler at {scheduler_address}" in res.stdout
    assert "cluster: 1 worker, 1 threads" in res.stdout
    assert "images:     50" in res.stdout
    check_against_scipy(wf, nonzero_picks(wf))


# -- progress display --------------------------------------------------------------
def test_progress_reporter_tty_and_plain():
    from dask_sparseconv.cli import ProgressReporter

    buf = io.StringIO()
    p = ProgressReporter(4, stream=buf, tty=True, width=8)
    for i in range(5):
        p.update(i)
    p.close()
    text = buf.getvalue()
    assert text.count("\r[") == 5 and "[########] 4/4 blocks (100%)" in text and text.endswith("\n")

    buf = io.StringIO()
    p = ProgressReporter(100, stream=buf, tty=False, interval=3600)
    for i in range(101):
        p.update(i)
    lines = buf.getvalue().splitlines()
    # one line per 10 % step (plus the start), never a carriage return
    assert len(lines) == 11 and "\r" not in buf.getvalue()
    assert lines[0].startswith("progress: 0/100 blocks (0%)") and lines[-1].startswith("progress: 100/100 blocks (100%)")


def test_raster_tiles_workflow(tmp_path):
    """workflows/raster_tiles.yaml (its raster made smaller, the budget with
    it): the sample raster is generated, the dry run shows the tiles the run
    then uses, and the output equals the whole-frame engine."""
    import scipy.sparse

    from dask_sparseconv import Convolver, open_stack
    from dask_sparseconv.sample_data import sample_raster

    wf = copy_workflow("raster_tiles.yaml", tmp_path,
                       input={"sample": {"kind": "raster", "n_images": 1, "frame_shape": [4000, 4000], "nnz": 30000,
                                         "mean_cluster": 40, "format": "csr", "seed": 0}},
                       block={"memory": "1MiB"})
    dry = ok(cli("run", wf, "--dry-run"))
    tiles_line = next(line for line in dry.stdout.splitlines() if line.strip().startswith("tiles:"))
    run = ok(cli("run", wf))
    assert "generating the sample stack" in run.stdout and tiles_line in run.stdout
    y = scipy.sparse.csr_matrix(open_stack(str(tmp_path / "out" / "raster_smoothed.zarr")).compute(scheduler="sync"))
    frame = sample_raster((4000, 4000), 30000, mean_cluster=40, seed=0)
    ref = Convolver((4000, 4000), load_workflow(str(wf)).kernel.array, mode="same")(frame, out="csr")
    assert abs(y - ref).max() <= 1e-6
