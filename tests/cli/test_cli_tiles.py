"""`dask-sparseconv run` on a frame larger than a block: the dry run shows
the tiles, the run completes with exit 0, and the output equals the
whole-frame engine and scipy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import scipy.sparse

from dask_sparseconv import Convolver, open_stack, write_csr_stack
from dask_sparseconv.kernels import gaussian
from dask_sparseconv.sample_data import sample_raster

pytestmark = pytest.mark.xdist_group("cluster")

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_runs_a_raster_in_tiles(tmp_path):
    S = 6000
    frame = sample_raster((S, S), 30_000, mean_cluster=50, seed=4)
    write_csr_stack(str(tmp_path / "raster.zarr"), frame, (S, S))
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent("""
        input: {path: raster.zarr}
        kernel: {gaussian: {sigma: 1.0}}
        mode: same
        output: {path: out.zarr}
        cluster: {n_workers: 1, threads_per_worker: 2, memory_limit: 1GiB, dashboard_address: null}
        block: {memory: 1MiB}
    """))
    dry = cli("run", wf, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "tiles:" in dry.stdout and "one image does not fit the block budget" in dry.stdout
    run = cli("run", wf, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tiles" in run.stdout and "Traceback" not in run.stderr
    info = cli("info", tmp_path / "out.zarr", cwd=tmp_path)
    assert info.returncode == 0 and "state:      complete" in info.stdout and "per image, up to" in info.stdout
    y = scipy.sparse.csr_matrix(open_stack(str(tmp_path / "out.zarr")).compute(scheduler="sync"))
    k = gaussian(sigma=1.0)
    whole = Convolver((S, S), k, mode="same")(frame, out="csr")
    assert y.shape == whole.shape and abs(y - whole).max() <= 1e-6
    # and scipy on one window around the densest cluster
    cy, cx = divmod(int(frame.indices[np.argmax(frame.data)]), S)
    y0, x0 = min(max(0, cy - 50), S - 100), min(max(0, cx - 50), S - 100)
    dense_in = frame[:, max(0, y0 - 3) * S: min(S, y0 + 103) * S].toarray().reshape(-1, S)
    ref = scipy.signal.convolve2d(dense_in, k, mode="same")[y0 - max(0, y0 - 3):][:100, x0:x0 + 100]
    got = y[:, y0 * S: (y0 + 100) * S].toarray().reshape(100, S)[:, x0:x0 + 100]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_preview_refuses_frames_too_large_to_draw(tmp_path):
    """preview holds whole frames dense in memory: a 10,000 x 10,000 frame is
    refused with exit 2 and a line that says why and what to do instead."""
    S = 10_000
    write_csr_stack(str(tmp_path / "raster.zarr"), sample_raster((S, S), 2_000, mean_cluster=20, seed=2), (S, S))
    wf = tmp_path / "wf.yaml"
    wf.write_text("input: {path: raster.zarr}\nkernel: {box: {size: 3}}\noutput: {path: out.zarr}\n")
    res = cli("preview", wf, "--images", "0", "--output", tmp_path / "p.png", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "frames of 10000 x 10000 pixels are too large for a preview" in res.stderr
    assert not (tmp_path / "p.png").exists()
