"""Object stores for real: ``s3://`` URLs through s3fs against moto's S3 server
(a separate process on 127.0.0.1, tests/s3_server.py), with the cluster's
worker processes reading and writing the bucket themselves.

API and command line; dense and CSR in and out; resume after an interrupt;
credentials from ``storage_options`` and from the environment; a missing
bucket and wrong credentials (one clear line, nothing written)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse
import yaml
from scipy_oracle import convolve_stack

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.storage import describe_stack, write_csr_stack, write_dense_stack

pytest.importorskip("s3fs", reason="the object-store tests need s3fs (pip install 'dask-sparseconv[test]')")

N, H, W = 48, 24, 20
KERNEL = np.array([[0.5, 1.0, 0.0, -0.25], [1.0, -3.0, 1.0, 0.5], [0.0, 1.0, 0.25, 0.0]], dtype=np.float32)


def reference(x, kernel, mode):
    return convolve_stack(x, kernel, mode)


def assert_matches(result, ref):
    if scipy.sparse.issparse(result):
        result = result.toarray()
    np.testing.assert_allclose(np.asarray(result).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def client():
    """2 worker processes x 1 thread. Not the pipeline tests' 400 MB cluster:
    a worker that has loaded s3fs/aiobotocore sits near 270 MB, and under a
    busy suite crossed the 80 % of 400 MB where dask pauses it (both paused:
    the job waited forever)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, memory_limit="2GiB",
                      dashboard_address=":0", host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(41)
    x = np.where(rng.random((N, H, W)) < 0.05, rng.standard_normal((N, H, W)), 0).astype(np.float32)
    x[[3, 17]] = 0  # empty frames
    return x


def _write_input(url: str, fmt: str, x: np.ndarray, opts: dict) -> None:
    if fmt == "dense":
        write_dense_stack(url, x, chunks=4, storage_options=opts)
    else:
        write_csr_stack(url, scipy.sparse.csr_matrix(x.reshape(len(x), -1)), x.shape[1:], storage_options=opts,
                        chunk_size=128)


def _bucket_with_input(s3_server, fmt: str, x: np.ndarray) -> tuple[str, dict, str, str]:
    """A new bucket holding ``x`` as ``in.zarr`` (dense or CSR): ``(bucket, storage options, input URL, output URL)``."""
    bucket = s3_server.bucket()
    opts = s3_server.storage_options()
    src, target = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
    _write_input(src, fmt, x, opts)
    return bucket, opts, src, target


def _leave_partial(src: str, target: str, k: int, **kw) -> int:
    """What a run stopped part-way leaves: build the job's graph and compute
    only its first ``k`` block tasks (here, on the threaded scheduler);
    return the number of blocks."""
    import dask

    graph = convolve_zarr(src, KERNEL, target, "same", compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    blocks = sorted((key for key in hlg if isinstance(key, str) and key.startswith("sparseconv-block-")),
                    key=lambda key: int(key.rsplit("-", 1)[1]))
    dask.get(hlg, blocks[:k])
    return len(blocks)


# -- the API on a LocalCluster of worker processes -------------------------------------------
@pytest.mark.parametrize("in_fmt, out_fmt", [("dense", "dense"), ("csr", "csr"), ("dense", "csr")])
def test_convolve_zarr_reads_and_writes_s3_on_worker_processes(s3_server, client, frames, in_fmt, out_fmt):
    bucket = s3_server.bucket()
    opts = s3_server.storage_options()
    src, target = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out/{out_fmt}.zarr"
    _write_input(src, in_fmt, frames, opts)
    summary = convolve_zarr(src, KERNEL, target, "full", output_format=out_fmt, block_memory=20_000,
                            storage_options=opts, target_storage_options=opts)
    assert summary.blocks >= 3 and os.getpid() not in summary.extra["worker_pids"]
    result = open_stack(target, storage_options=opts).compute()
    assert scipy.sparse.issparse(result) == (out_fmt == "csr")
    assert_matches(result, reference(frames, KERNEL, "full"))
    info = describe_stack(target, storage_options=opts)
    assert info["complete"] is True and info["format"] == out_fmt
    keys = s3_server.keys(bucket)
    assert any(k.startswith("out/") for k in keys) and not any(k.endswith(".lock") for k in keys)


def test_resume_on_s3_keeps_written_blocks(s3_server, client, frames):
    """A run stopped part-way (only some block tasks computed) leaves an
    incomplete output in the bucket; the next run skips the written blocks
    and ends equal to scipy."""
    bucket, opts, src, target = _bucket_with_input(s3_server, "csr", frames)
    kw = dict(output_format="dense", block_memory=20_000, storage_options=opts, target_storage_options=opts)
    n_blocks = _leave_partial(src, target, 2, **kw)
    assert n_blocks >= 4
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target, storage_options=opts)
    # the input's fingerprint came from the objects' ETags (listed, not re-read)
    prov = describe_stack(target, storage_options=opts)["provenance"]
    assert prov["source_fingerprint"]["method"] == "store-checksum"
    summary = convolve_zarr(src, KERNEL, target, "same", **kw)
    assert summary.resumed and (summary.blocks_skipped, summary.blocks_computed) == (2, n_blocks - 2)
    assert_matches(open_stack(target, storage_options=opts).compute(), reference(frames, KERNEL, "same"))


def test_resume_on_s3_refuses_an_input_rewritten_in_place(s3_server, client, frames):
    """The input re-exported to the same URL with new values between the
    interrupted run and the next (same shape, chunks and codecs): the next
    run refuses to mix the two and names the input."""
    bucket, opts, src, target = _bucket_with_input(s3_server, "dense", frames)
    kw = dict(output_format="csr", block_memory=20_000, storage_options=opts, target_storage_options=opts)
    _leave_partial(src, target, 1, **kw)
    changed = frames.copy()
    changed[0, 0, 0] += 1.0  # one value in the first chunk
    write_dense_stack(src, changed, chunks=4, storage_options=opts, overwrite=True)
    with pytest.raises(ValueError, match=r"in\.zarr.*changed"):
        convolve_zarr(src, KERNEL, target, "same", **kw)
    summary = convolve_zarr(src, KERNEL, target, "same", overwrite=True, **kw)
    assert not summary.resumed
    assert_matches(open_stack(target, storage_options=opts).compute(), reference(changed, KERNEL, "same"))


# -- the command line ----------------------------------------------------------------------
def _workflow(folder, src: str, target: str, opts: dict | None, out_fmt: str = "dense", memory: str = "60KB") -> str:
    """A workflow on the bucket. The default block budget takes ~4 of the
    small frames a block (12 blocks of 48 frames): several blocks on each
    worker, without a block's ~0.1 s of requests to moto paid per frame."""
    wf = {
        "input": {"path": src},
        "kernel": {"values": KERNEL.tolist()},
        "mode": "same",
        "output": {"path": target, "format": out_fmt},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None},
        "block": {"memory": memory},
    }
    if opts is not None:
        wf["input"]["storage_options"] = opts
        wf["output"]["storage_options"] = opts
    path = folder / "wf.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return str(path)


def _cli(*args, env_extra: dict | None = None, drop_aws: bool = True):
    import subprocess
    import sys

    from dask_processes import base_env

    env = base_env()
    if drop_aws:  # only what the test gives: no credentials or endpoint from the machine
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def _error(stderr: str) -> str:
    """The command's failure: one ``error:`` message (a validation error lists
    its problems on the lines below it, each with its workflow key), no
    traceback; returned as one string."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    rest = lines[errors[0] + 1:]
    assert all(ln.startswith("  ") for ln in rest), stderr  # only the problem list may follow
    return " ".join(lines[errors[0]:])


@pytest.mark.parametrize("out_fmt", ["dense", "csr"])
def test_cli_run_with_credentials_in_the_workflow(s3_server, frames, tmp_path, out_fmt):
    bucket, opts, src, target = _bucket_with_input(s3_server, "dense", frames)
    wf = _workflow(tmp_path, src, target, opts, out_fmt)
    r = _cli("run", wf)
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout
    assert_matches(open_stack(target, storage_options=opts).compute(), reference(frames, KERNEL, "same"))
    r = _cli("info", target, *[f"--storage-option={k}={v}" for k, v in (("key", s3_server.key),
                                                                     ("secret", s3_server.secret))],
             env_extra={"AWS_ENDPOINT_URL": s3_server.endpoint})
    assert r.returncode == 0 and "complete" in r.stdout.lower(), r.stdout + r.stderr


def test_cli_credentials_and_endpoint_from_the_environment(s3_server, frames, tmp_path):
    """No storage_options in the workflow: boto's environment variables give
    the endpoint and the keys, to the command and to its worker processes.
    Without them the same workflow fails with one line and writes nothing."""
    bucket = s3_server.bucket()
    src, target = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
    _write_input(src, "csr", frames, s3_server.storage_options())
    wf = _workflow(tmp_path, src, target, None, "csr")
    before = s3_server.keys(bucket)
    r = _cli("run", wf)  # no credentials, no endpoint: the real AWS is not reachable from here either
    assert r.returncode == 2, r.stdout + r.stderr
    assert "input.path" in _error(r.stderr) and "Unable to locate credentials" in r.stderr
    assert s3_server.keys(bucket) == before
    r = _cli("run", wf, env_extra=s3_server.env())
    assert r.returncode == 0, r.stderr
    assert_matches(open_stack(target, storage_options=s3_server.storage_options()).compute(),
                   reference(frames, KERNEL, "same"))


def test_cli_resumes_an_interrupted_s3_output(s3_server, tmp_path):
    """Ctrl-C (SIGINT) once the command reports written blocks: exit 130, the
    output in the bucket is marked incomplete; the same command again
    resumes it (written blocks verified and kept) and ends equal to scipy."""
    import re
    import signal
    import subprocess
    import sys

    from dask_processes import base_env

    rng = np.random.default_rng(43)
    x = np.where(rng.random((240, H, W)) < 0.05, rng.standard_normal((240, H, W)), 0).astype(np.float32)
    bucket, opts, src, target = _bucket_with_input(s3_server, "dense", x)
    # ~9 frames a block: 27 blocks, enough for a Ctrl-C to land between the first and the last
    wf = _workflow(tmp_path, src, target, opts, "csr", memory="120KB")
    for _attempt in range(3):  # SIGINT can land after the last block: then try again from scratch
        # a test run from a shell's background inherits an ignored SIGINT: give the command Ctrl-C back
        proc = subprocess.Popen([sys.executable, "-m", "dask_sparseconv.cli", "run", wf, "--restart"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=base_env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            for line in proc.stderr:
                m = re.search(r"progress: (\d+)/(\d+) blocks", line)
                if m and 0 < int(m.group(1)) < int(m.group(2)):
                    proc.send_signal(signal.SIGINT)
                    break
            err = proc.stderr.read()
            rc = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
        if rc == 130:
            break
    assert rc == 130, err
    assert "incomplete" in err
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target, storage_options=opts)
    r = _cli("run", wf)
    assert r.returncode == 0, r.stderr
    m = re.search(r"resumed:\s+([\d,]+) blocks computed, ([\d,]+) skipped", r.stdout)
    assert m and int(m.group(2).replace(",", "")) > 0, r.stdout
    assert_matches(open_stack(target, storage_options=opts).compute(), reference(x, KERNEL, "same"))


@pytest.mark.parametrize("where", ["input", "output"])
def test_cli_missing_bucket_is_one_line_exit_2(s3_server, frames, tmp_path, where):
    bucket, opts, src, target = _bucket_with_input(s3_server, "dense", frames)
    if where == "input":
        src = "s3://no-such-bucket-dsc/in.zarr"
    else:
        target = "s3://no-such-bucket-dsc/out.zarr"
    before = s3_server.keys(bucket)
    r = _cli("run", _workflow(tmp_path, src, target, opts))
    assert r.returncode == 2, r.stdout + r.stderr
    line = _error(r.stderr)
    assert f"{where}.path" in line and "no-such-bucket-dsc" in line
    assert s3_server.keys(bucket) == before


def test_cli_wrong_credentials_is_one_line_exit_1(tmp_path, frames):
    """Against a server that checks signatures: a wrong secret is refused
    by S3 on the first request; the command says so in one line (exit 1)
    and nothing is written."""
    from s3_server import MotoServer

    server = MotoServer(tmp_path, auth=True)
    try:
        bucket = server.bucket()
        src, target = f"s3://{bucket}/in.zarr", f"s3://{bucket}/out.zarr"
        # an object the server holds (written with the right key): what a stack's metadata would be
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint, region_name=server.REGION, aws_access_key_id=server.key,
                     aws_secret_access_key=server.secret).put_object(Bucket=bucket, Key="in.zarr/zarr.json",
                                                                     Body=b"{}")
        wrong = server.storage_options(secret="not-the-secret")
        r = _cli("run", _workflow(tmp_path, src, target, wrong))
        assert r.returncode == 1, r.stdout + r.stderr
        line = _error(r.stderr)
        assert "input.path" in line and "refused access" in line and "storage_options" in line, line
        assert server.keys(bucket) == ["in.zarr/zarr.json"]
    finally:
        server.stop()


def test_cli_refuses_a_target_whose_s3_lock_is_held(s3_server, frames, tmp_path):
    """The job lock is an object created with S3's if-absent condition: a
    run while another process holds it is refused in one line naming the
    holder, and writes nothing."""
    from dask_sparseconv.storage import resolve_location
    from dask_sparseconv.storage.job_lock import JobLock

    bucket, opts, src, target = _bucket_with_input(s3_server, "dense", frames)
    loc = resolve_location(target, None, opts, name="target")
    with JobLock.acquire(loc, what="the test"):
        before = s3_server.keys(bucket)
        assert "out.zarr.lock" in before
        r = _cli("run", _workflow(tmp_path, src, target, opts))
        assert r.returncode == 1, r.stdout + r.stderr
        line = _error(r.stderr)
        assert "being written by another run" in line and f"pid {os.getpid()}" in line, line
        assert s3_server.keys(bucket) == before
    assert "out.zarr.lock" not in s3_server.keys(bucket)
