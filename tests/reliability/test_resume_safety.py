"""Resume that is safe (issue #11): a resumed run never mixes two inputs or
two kernels, two runs of one job never write the target at once, and every
failure ends with its cause. Real `dask-sparseconv run` processes with their
local clusters, real zarr stores on disk, a real full disk (a small tmpfs;
CI runs as root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest
import zarr
from reliability_support import (
    cli,
    done_count,
    kill_group,
    provenance,
    stack,
    start_cli,
    tree_digest,
    wait_for_blocks,
    write_inputs,
)
from scipy_oracle import convolve_stack

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.storage import write_dense_stack
from dask_sparseconv.storage.fingerprint import InputChangedError

N, H, W = 480, 32, 32
KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=np.float32)


def _workflow(tmp_path, src: str, fmt: str, memory: str = "16KiB", out: str = "out.zarr", kernel: str | None = None,
              name: str = "wf.yaml") -> str:
    wf = tmp_path / name
    kern = f"{{file: {kernel}}}" if kernel else "{gaussian: {sigma: 1.0}}"
    wf.write_text(textwrap.dedent(f"""
        input: {{path: {src}}}
        kernel: {kern}
        mode: same
        output: {{path: {out}, format: {fmt}}}
        cluster: {{n_workers: 1, threads_per_worker: 2, memory_limit: 1GiB, dashboard_address: null}}
        block: {{memory: {memory}}}
    """))
    return str(wf)


def _interrupt(tmp_path, wf: str, out, blocks: int = 12) -> int:
    proc, _, err = start_cli("run", wf, cwd=tmp_path, log_dir=tmp_path)
    try:
        wait_for_blocks(out, blocks, proc, timeout=150)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        kill_group(proc)
    assert rc == 130, err.read_text()
    return done_count(out)


def _reference(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return convolve_stack(x, kernel, "same")


def _dense_result(out) -> np.ndarray:
    """The output as a dense (n, H, W) array, whatever its format."""
    import scipy.sparse

    res = open_stack(str(out)).compute()
    if scipy.sparse.issparse(res):
        return res.toarray().reshape((res.shape[0], H, W))
    return np.asarray(res)


@pytest.mark.xdist_group("cluster")
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_cli_refuses_to_resume_when_the_input_was_re_exported(tmp_path, fmt):
    """Ctrl-C, the input rewritten in place with new values (same shape,
    chunks and codecs, as a re-run of an upstream step does), run again: the
    run refuses in one line naming the input and --restart, and writes
    nothing; --restart gives the convolution of the new input."""
    x = stack(N, H, W, density=0.03, seed=11)
    paths = write_inputs(tmp_path, x, dense_chunks=2, csr_chunk=64)
    src = paths[fmt]
    out = tmp_path / "out.zarr"
    wf = _workflow(tmp_path, src, fmt, "16KiB" if fmt == "dense" else "64KiB")
    written = _interrupt(tmp_path, wf, out)
    assert written >= 12
    partial = tree_digest(out)

    # re-export: new values at the same place, same layout
    x2 = stack(N, H, W, density=0.03, seed=12)
    shutil.rmtree(tmp_path / "in_dense.zarr")
    shutil.rmtree(tmp_path / "in_csr.zarr")
    write_inputs(tmp_path, x2, dense_chunks=2, csr_chunk=64)

    val = cli("validate", wf, cwd=tmp_path)
    assert val.returncode == 2 and "changed since the run that wrote it started" in val.stderr, val.stderr
    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    assert f"its input {src} changed since the run that wrote it started" in res.stderr, res.stderr
    assert "--restart" in last and "chunks of" in res.stderr, res.stderr
    assert tree_digest(out) == partial  # nothing touched
    assert provenance(out)["complete"] is False

    restart = cli("run", wf, "--restart", cwd=tmp_path)
    assert restart.returncode == 0, restart.stderr
    kernel = np.asarray(zarr.open(str(out), mode="r").attrs["dask_sparseconv"]["kernel"], dtype=np.float32)
    got = _dense_result(out).reshape(N, H, W)
    np.testing.assert_allclose(got, _reference(x2, kernel), rtol=1e-5, atol=1e-6)


@pytest.mark.xdist_group("cluster")
def test_cli_refuses_to_resume_after_the_kernel_file_was_edited(tmp_path):
    x = stack(N, H, W, density=0.03, seed=3)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    np.save(tmp_path / "k.npy", KERNEL)
    out = tmp_path / "out.zarr"
    wf = _workflow(tmp_path, src, "dense", kernel="k.npy")
    _interrupt(tmp_path, wf, out)
    partial = tree_digest(out)
    np.save(tmp_path / "k.npy", KERNEL * 2)  # edited in place
    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "different settings" in res.stderr and "kernel_sha" in res.stderr and "overwrite" in res.stderr
    assert tree_digest(out) == partial
    # put the kernel back: the same job again, and it resumes
    np.save(tmp_path / "k.npy", KERNEL)
    ok = cli("run", wf, cwd=tmp_path)
    assert ok.returncode == 0 and "resumed:" in ok.stdout, ok.stderr
    np.testing.assert_allclose(_dense_result(out), _reference(x, KERNEL), rtol=1e-5, atol=1e-5)


def test_api_refuses_a_changed_input_and_resumes_an_unchanged_one(tmp_path):
    x = stack(N, H, W, density=0.03, seed=5)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    target = str(tmp_path / "out.zarr")
    graph = convolve_zarr(src, KERNEL, target, "same", block_memory=20_000, compute=False)
    hlg = dict(graph.__dask_graph__())
    import dask

    blocks = sorted(k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-"))
    dask.get(hlg, blocks[:5])
    # the same values written again (an upstream re-run that changed nothing): resumes
    write_dense_stack(src, x, chunks=2, overwrite=True)
    snap = str(tmp_path / "snap.zarr")
    shutil.copytree(target, snap)
    s = convolve_zarr(src, KERNEL, target, "same", block_memory=20_000)
    assert s.resumed and s.blocks_skipped == 5
    np.testing.assert_allclose(_dense_result(target), _reference(x, KERNEL), rtol=1e-5, atol=1e-5)
    # one value changed: refused, the partial output left as it was
    shutil.rmtree(target)
    shutil.copytree(snap, target)
    y = x.copy()
    y[400, 10, 10] = 3.0
    write_dense_stack(src, y, chunks=2, overwrite=True)
    before = tree_digest(target)
    with pytest.raises(InputChangedError, match="changed since the run that wrote it started.*overwrite=True"):
        convolve_zarr(src, KERNEL, target, "same", block_memory=20_000)
    assert tree_digest(target) == before
    s = convolve_zarr(src, KERNEL, target, "same", block_memory=20_000, overwrite=True)
    assert not s.resumed
    np.testing.assert_allclose(_dense_result(target), _reference(y, KERNEL), rtol=1e-5, atol=1e-5)


@pytest.mark.xdist_group("cluster")
def test_two_runs_of_one_job_at_once(tmp_path):
    """The second run (with or without --restart) is refused at once, naming
    the first (host, pid, start); the first finishes exact; its lock is gone
    afterwards."""
    x = stack(N, H, W, density=0.03, seed=7)
    src = write_inputs(tmp_path, x, dense_chunks=2, csr_chunk=64)["csr"]
    out = tmp_path / "out.zarr"
    wf = _workflow(tmp_path, src, "csr", "32KiB")
    first, _, err1 = start_cli("run", wf, cwd=tmp_path, log_dir=tmp_path)
    try:
        wait_for_blocks(out, 2, first, timeout=150)
        # Hold the first run where it is, mid-job: its processes alive, its
        # lock held, as a run on a slower machine would be (rather than a job
        # made long enough to outlast two refused runs on a loaded machine).
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            for extra in (["--restart"], []):  # the lock protects the target, whatever the flags
                t0 = time.monotonic()
                second = cli("run", wf, *extra, cwd=tmp_path)
                t_refused = time.monotonic() - t0
                assert first.poll() is None
                assert second.returncode == 1, second.stdout + second.stderr
                last = second.stderr.strip().splitlines()[-1]
                assert last.startswith("error: output.path: target") and "being written by another run" in last
                assert f"pid {first.pid}" in last and "started" in last and "out.zarr.lock" in last
                assert "cluster:" not in second.stdout  # refused before starting a cluster
                assert t_refused < 60
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(300) == 0, err1.read_text()
    finally:
        kill_group(first)
    assert not (tmp_path / "out.zarr.lock").exists()
    kernel = np.asarray(provenance(out)["kernel"], dtype=np.float32)
    np.testing.assert_allclose(_dense_result(out), _reference(x, kernel), rtol=1e-5, atol=1e-6)


@pytest.mark.xdist_group("cluster")
def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    x = stack(N, H, W, density=0.03, seed=8)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    out = tmp_path / "out.zarr"
    wf = _workflow(tmp_path, src, "dense")
    proc, _, _ = start_cli("run", wf, cwd=tmp_path, log_dir=tmp_path)
    try:
        wait_for_blocks(out, 6, proc, timeout=150)
    finally:
        kill_group(proc)  # SIGKILL: no handler runs, the lock stays behind
    assert (tmp_path / "out.zarr.lock").exists()
    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"taking over the stale lock {tmp_path / 'out.zarr.lock'}" in res.stderr and "is gone" in res.stderr
    assert "resumed:" in res.stdout
    assert not (tmp_path / "out.zarr.lock").exists()
    kernel = np.asarray(provenance(out)["kernel"], dtype=np.float32)
    np.testing.assert_allclose(_dense_result(out), _reference(x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.xdist_group("cluster")
def test_dry_run_on_a_finished_output(tmp_path):
    x = stack(64, H, W, density=0.03, seed=9)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    wf = _workflow(tmp_path, src, "dense")
    assert cli("run", wf, cwd=tmp_path).returncode == 0
    out = tmp_path / "out.zarr"
    done = tree_digest(out)
    dry = cli("run", wf, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "row blocks:" in dry.stdout and "(complete, written" in dry.stdout
    assert "would be left as it is" in dry.stdout and "--restart" in dry.stdout
    assert tree_digest(out) == done
    run = cli("run", wf, cwd=tmp_path)  # run itself still refuses
    assert run.returncode == 2 and "already exists and is complete" in run.stderr


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.xdist_group("cluster")
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_full_disk_ends_with_its_cause_and_resumes_exact(tmp_path):
    """A run whose output fills a small tmpfs: exit 1, the output marked
    incomplete, the lock released, and the last line the cause (ENOSPC,
    which block, which store); after space is freed the same run resumes and
    ends exact."""
    rng = np.random.default_rng(0)
    x = np.where(rng.random((400, 64, 64)) < 0.05, rng.random((400, 64, 64)), 0).astype(np.float32)
    src = str(tmp_path / "in.zarr")
    write_dense_stack(src, x, chunks=4)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.fail("could not mount a tmpfs although running as root")
    try:
        wf = _workflow(tmp_path, src, "dense", "256KiB", out="disk/out.zarr")
        res = cli("run", wf, cwd=tmp_path)
        assert res.returncode == 1, res.stdout + res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in res.stderr
        last = lines[-1]
        assert last.startswith("error: OSError: [Errno 28] No space left on device") and "while writing block" in last
        assert str(disk / "out.zarr") in last and "--verbose" in last
        assert any("is incomplete" in ln and "run the same workflow again to resume" in ln for ln in lines[:-1])
        assert provenance(disk / "out.zarr")["complete"] is False
        assert not (disk / "out.zarr.lock").exists()
        written = done_count(disk / "out.zarr")
        # free space: the tmpfs grows, the same command resumes
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        again = cli("run", wf, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert f"{written:,} skipped" in again.stdout if written else "resumed:" in again.stdout
        kernel = np.asarray(provenance(disk / "out.zarr")["kernel"], dtype=np.float32)
        np.testing.assert_allclose(_dense_result(disk / "out.zarr"), _reference(x, kernel), rtol=1e-5, atol=1e-6)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.xdist_group("cluster")
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_late_block_tasks_of_a_stopped_run_write_nothing(tmp_path, local_cluster, fmt):
    """A run's block tasks on a cluster it does not own outlive the run (dask
    cannot stop a running task). Once the run has let go of the target's
    lock, such a late task fails and writes nothing: neither into the
    partial output, nor into the output of a run that started the target
    over with another kernel (where the old values would sit under a record
    that verifies)."""
    from distributed import Client

    from dask_sparseconv.storage import resolve_location
    from dask_sparseconv.storage.job_lock import LockLostError, read_lock, release_token

    x = stack(N, H, W, density=0.03, seed=7)
    src = write_inputs(tmp_path, x, dense_chunks=2)["dense"]
    target = str(tmp_path / "out.zarr")
    loc = resolve_location(target)
    kw = dict(output_format=fmt, block_memory="16KiB" if fmt == "dense" else "64KiB")
    old = convolve_zarr(src, KERNEL, target, "same", compute=False, **kw)  # run A: holds the lock
    hlg = dict(old.__dask_graph__())
    blocks = sorted(k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-"))
    assert len(blocks) >= 4
    other = np.full((5, 5), 1 / 25, dtype=np.float32)
    with Client(local_cluster) as client:
        client.get(hlg, blocks[:2])  # A's first blocks, while A holds the lock
        assert done_count(target) == 2
        release_token(loc, read_lock(loc)["token"])  # A stops: the command lets go of the lock
        with pytest.raises(LockLostError, match="no longer holds the lock.*released"):
            client.get(hlg, [blocks[2]])
        assert done_count(target) == 2  # nothing written by the late task
        # run B starts the target over with another kernel and finishes
        s = convolve_zarr(src, other, target, "same", overwrite=True, **kw)
        assert not s.resumed and s.blocks_computed == s.blocks
        after_b = tree_digest(target)
        with pytest.raises(LockLostError, match="no longer holds the lock"):
            client.get(hlg, blocks[1:4])  # A's late tasks again, after B released the lock
    assert tree_digest(target) == after_b
    np.testing.assert_allclose(_dense_result(target), _reference(x, other), rtol=1e-5, atol=1e-5)
