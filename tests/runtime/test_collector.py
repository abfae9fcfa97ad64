"""The collector paused for the command's start-up
(:mod:`dask_sparseconv.runtime.collector`): off while the command imports,
checks and plans; on again, with the start-up's objects frozen, once a job's
client is connected; never touched for code that calls ``main`` itself or
has turned the collector off on its own. Each case runs in a fresh
interpreter, so that this process keeps its own collector."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy_oracle import convolve_stack

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=240)


def test_pause_and_resume():
    res = _python("""
        import gc
        from dask_sparseconv.runtime import collector
        collector.pause()
        off = (gc.isenabled(), collector.paused())
        junk = [[i] for i in range(1000)]
        collector.resume()
        on = (gc.isenabled(), collector.paused(), gc.get_freeze_count() >= len(junk))
        collector.resume()  # a second resume changes nothing
        again = gc.isenabled()
        gc.disable()  # the caller's own choice: pause and resume leave it as it is
        collector.pause(); collector.resume()
        print(off, on, again, gc.isenabled())
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["(False,", "True)", "(True,", "False,", "True)", "True", "False"]


@pytest.mark.xdist_group("cluster")
def test_the_command_resumes_it_for_the_job_and_short_commands_end_paused(tmp_path):
    from dask_sparseconv.storage import write_dense_stack

    rng = np.random.default_rng(5)
    frames = np.where(rng.random((6, 20, 24)) < 0.1, rng.random((6, 20, 24)), 0).astype(np.float32)
    write_dense_stack(str(tmp_path / "in.zarr"), frames, chunks=3)
    (tmp_path / "wf.yaml").write_text("input: {path: in.zarr}\nkernel: {values: [[1, 2], [3, -1]]}\nmode: full\n"
                                      "output: {path: out.zarr}\n"
                                      "cluster: {n_workers: 1, threads_per_worker: 1, dashboard_address: null}\n")
    code = """
        import gc, sys
        from dask_sparseconv.cli.main import console_main
        sys.argv = ["dask-sparseconv", *sys.argv[1:]]
        rc = console_main()
        print("collector", rc, gc.isenabled(), gc.get_freeze_count() > 0)
    """
    val = _python(code, "validate", "wf.yaml", cwd=tmp_path)
    assert val.returncode == 0, val.stderr
    assert val.stdout.splitlines()[-1] == "collector 0 False True"  # frozen at exit, never resumed
    run = _python(code, "run", "wf.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "collector 0 True True"
    got = np.asarray(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:])
    kernel = np.array([[1, 2], [3, -1]], dtype=np.float32)
    np.testing.assert_allclose(got, convolve_stack(frames, kernel, "full"), rtol=1e-5, atol=1e-6)
