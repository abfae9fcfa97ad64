"""Job locks (dask_sparseconv.storage.job_lock) on a local path, an fsspec
URL and a zarr store object: exclusive, refused while a live run holds
them, taken over when stale, released only by their holder. Holders are
real processes (a sleeping subprocess for a live one, an exited one for a
dead pid)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import zarr

import dask_sparseconv as dsc
from dask_sparseconv.storage import resolve_location, write_dense_stack
from dask_sparseconv.storage.job_lock import (
    STALE_SECONDS,
    JobLock,
    LockStaleWarning,
    TargetLockedError,
    lock_location,
    read_lock,
)


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _targets(tmp_path, request_id):
    store = zarr.storage.MemoryStore()
    return {
        "local": resolve_location(str(tmp_path / "out.zarr")),
        "fsspec": resolve_location(f"memory://locks-{request_id}/out.zarr"),
        "store": resolve_location(store),
    }


def _plant(loc, **rec):
    """Write a lock record as another run would have."""
    base = {"package": "dask-sparseconv", "host": socket.gethostname(), "pid": 1, "user": "someone",
            "started": time.time(), "renewed": time.time(), "token": "theirs"}
    base.update(rec)
    assert lock_location(loc).create(json.dumps(base).encode())
    return base


@pytest.mark.parametrize("kind", ["local", "fsspec", "store"])
def test_refused_while_held_taken_when_stale(tmp_path, kind, live_pid, dead_pid):
    loc = _targets(tmp_path, f"{kind}-{time.time_ns()}")[kind]
    _plant(loc, pid=live_pid)
    with pytest.raises(TargetLockedError, match=rf"being written by another run \(host .*, pid {live_pid}, "
                                                r"user someone, started .*lock .*\.lock"):
        JobLock.acquire(loc)
    assert read_lock(loc)["token"] == "theirs"  # refusal leaves their lock alone
    lock_location(loc).delete()
    # a lock of a process that is gone: taken over, with a warning
    _plant(loc, pid=dead_pid)
    with pytest.warns(LockStaleWarning, match=f"process {dead_pid} is gone"):
        lock = JobLock.acquire(loc)
    assert read_lock(loc)["token"] == lock.token and read_lock(loc)["pid"] != dead_pid
    # a second acquisition by another live process is refused; release deletes ours only
    lock.release()
    assert read_lock(loc) is None


def test_other_hosts_are_judged_by_renewal(tmp_path):
    loc = resolve_location(str(tmp_path / "out.zarr"))
    _plant(loc, host="node-17.cluster", pid=4242, renewed=time.time() - 5)
    with pytest.raises(TargetLockedError, match="host node-17.cluster, pid 4242"):
        JobLock.acquire(loc)
    lock_location(loc).delete()
    _plant(loc, host="node-17.cluster", pid=4242, renewed=time.time() - STALE_SECONDS - 60)
    with pytest.warns(LockStaleWarning, match="last renewed"):
        JobLock.acquire(loc).release()


def test_unreadable_lock_is_stale_and_renewal_keeps_it_fresh(tmp_path):
    loc = resolve_location(str(tmp_path / "out.zarr"))
    (tmp_path / "out.zarr.lock").write_bytes(b"\x00garbage")
    with pytest.warns(LockStaleWarning, match="cannot be read"):
        lock = JobLock.acquire(loc)
    first = read_lock(loc)["renewed"]
    time.sleep(0.05)
    assert lock.renew() and read_lock(loc)["renewed"] > first
    lock.start_renewing(every=0.05)
    time.sleep(0.3)
    assert read_lock(loc)["renewed"] > first + 0.1
    lock.release()
    assert not (tmp_path / "out.zarr.lock").exists()
    assert not lock.renew()  # nothing to renew once released


def test_same_process_takes_over_its_own_lock(tmp_path):
    loc = resolve_location(str(tmp_path / "out.zarr"))
    a = JobLock.acquire(loc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: a graph of ours that was never computed
        b = JobLock.acquire(loc)
    assert read_lock(loc)["token"] == b.token
    a.release()  # no longer ours: left in place
    assert read_lock(loc)["token"] == b.token
    b.release()


def test_convolve_zarr_takes_and_releases_the_lock(tmp_path, live_pid):
    x = (np.random.default_rng(0).random((12, 10, 10)) < 0.1).astype(np.float32)
    write_dense_stack(tmp_path / "in.zarr", x, chunks=4)
    target = tmp_path / "out.zarr"
    _plant(resolve_location(str(target)), pid=live_pid)
    with pytest.raises(TargetLockedError, match=f"pid {live_pid}"):
        dsc.convolve_zarr(str(tmp_path / "in.zarr"), np.ones((3, 3)), str(target))
    assert not target.exists()  # refused before anything was written
    (tmp_path / "out.zarr.lock").unlink()
    dsc.convolve_zarr(str(tmp_path / "in.zarr"), np.ones((3, 3)), str(target))
    assert not (tmp_path / "out.zarr.lock").exists()
    # compute=False: the graph holds it until its last task ran
    graph = dsc.convolve_zarr(str(tmp_path / "in.zarr"), np.ones((3, 3)), str(target), overwrite=True, compute=False)
    assert read_lock(resolve_location(str(target)))["pid"] > 0
    summary = graph.compute()
    assert summary.blocks_computed == summary.blocks
    assert not (tmp_path / "out.zarr.lock").exists()
    from scipy.signal import convolve2d

    out = dsc.open_stack(str(target)).compute()
    np.testing.assert_allclose(out[3], convolve2d(x[3], np.ones((3, 3)), mode="same"), rtol=1e-6)
