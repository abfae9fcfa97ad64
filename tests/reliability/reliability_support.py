"""Helpers of the reliability tests: input stacks, output comparison, the
command line in a subprocess; dask scheduler/worker processes come from
tests/dask_processes.py."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import zarr
from dask_processes import base_env as env

RUN_TIMEOUT = 180  # seconds: one CLI run in a subprocess


def stack(n: int, H: int, W: int, density: float = 0.03, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.random((n, H, W)) < density) * rng.standard_normal((n, H, W))
    return x.astype(np.float32)


def write_inputs(tmp: Path, x: np.ndarray, dense_chunks: int = 4, csr_chunk: int = 256) -> dict:
    from dask_sparseconv.storage import write_csr_stack, write_dense_stack

    n, H, W = x.shape
    paths = {"dense": str(tmp / "in_dense.zarr"), "csr": str(tmp / "in_csr.zarr")}
    write_dense_stack(paths["dense"], x, chunks=dense_chunks)
    write_csr_stack(paths["csr"], scipy.sparse.csr_matrix(x.reshape(n, -1)), (H, W), chunk_size=csr_chunk)
    return paths


def tree_digest(path) -> dict:
    """relative path -> (sha256, mtime_ns) of every file below ``path``."""
    out = {}
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def output_arrays(path) -> dict:
    """Every array of a finished output, exactly as stored (for bit-identity checks)."""
    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return {"": np.asarray(node[:])}
    return {name: np.asarray(node[name][:]) for name in ("data", "indices", "indptr")}


def assert_identical(a, b) -> None:
    """Two finished outputs hold the same arrays, bit for bit."""
    A, B = output_arrays(a), output_arrays(b)
    assert A.keys() == B.keys()
    for k in A:
        assert A[k].dtype == B[k].dtype and A[k].shape == B[k].shape, k
        assert A[k].tobytes() == B[k].tobytes(), f"array {k!r} differs"
    pa = zarr.open(str(a), mode="r").attrs["dask_sparseconv"]
    pb = zarr.open(str(b), mode="r").attrs["dask_sparseconv"]
    assert pa["complete"] is True and pb["complete"] is True


def done_count(path) -> int:
    """Block markers written so far in an output (0 while it does not exist yet)."""
    from dask_sparseconv.storage import progress

    try:
        return len(progress.done_blocks(zarr.open(str(path), mode="r")))
    except Exception:
        return 0


def provenance(path) -> dict:
    return dict(zarr.open(str(path), mode="r").attrs["dask_sparseconv"])


def wait_for_blocks(path, n: int, proc=None, timeout: float = 120) -> int:
    """Poll the output's done markers until at least ``n`` are set (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        k = done_count(path)
        if k >= n:
            return k
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {n} blocks were written "
                                 f"({k} were)")
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} blocks written after {timeout} s ({done_count(path)})")


# -- the command line ----------------------------------------------------------
def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)]


def cli(*args, cwd=None, timeout: float = RUN_TIMEOUT, pre: str | None = None) -> subprocess.CompletedProcess:
    """Run ``dask-sparseconv ARGS`` in a subprocess; ``pre``: Python run first
    in that process (e.g. hiding a package)."""
    cmd = cli_cmd(*args)
    if pre is not None:
        code = f"{pre}\nimport sys\nfrom dask_sparseconv.cli import main\nsys.exit(main({list(map(str, args))!r}))"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)


def start_cli(*args, cwd=None, log_dir: Path, extra_env: dict[str, str] | None = None,
              ) -> tuple[subprocess.Popen, Path, Path]:
    out, err = log_dir / "cli.out", log_dir / "cli.err"
    # a test run from a shell's background inherits an ignored SIGINT: give the command Ctrl-C back
    proc = subprocess.Popen(cli_cmd(*args), stdout=open(out, "wb"), stderr=open(err, "wb"), cwd=cwd,
                            env={**env(), **(extra_env or {})},
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, out, err


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session and everything it spawned."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass


def one_line_error(stderr: str) -> str:
    """The CLI's error output must be one `error: ...` line, without a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]
