"""Resume after an interruption, through the command line (Ctrl-C and
SIGTERM sent to a real `dask-sparseconv run` with its local cluster) and
through the API (a partial output left by computing only some block tasks).

Checked every time: the partial output never looks complete (open_stack,
`info`, validate), the next run skips exactly the blocks that were written
and verify, recomputes the rest, and ends bit-identical to a clean run; a
complete output is never modified without --restart/overwrite; the input is
never modified."""

from __future__ import annotations

import os
import signal
import textwrap

import dask
import numpy as np
import pytest
from reliability_support import (
    assert_identical,
    cli,
    done_count,
    kill_group,
    one_line_error,
    provenance,
    stack,
    start_cli,
    tree_digest,
    wait_for_blocks,
    write_inputs,
)

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.workflow import load_workflow

N, H, W = 480, 32, 32
KERNEL = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=np.float32)


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path, stack(N, H, W, density=0.03, seed=11), dense_chunks=2, csr_chunk=64)


def _workflow(tmp_path, src: str, fmt: str, memory: str = "16KiB") -> str:
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent(f"""
        input: {{path: {src}}}
        kernel: {{gaussian: {{sigma: 1.0}}}}
        mode: same
        output: {{path: out.zarr, format: {fmt}}}
        cluster: {{n_workers: 1, threads_per_worker: 2, memory_limit: 1GiB, dashboard_address: null}}
        block: {{memory: {memory}}}
    """))
    return str(wf)


def _interrupt(tmp_path, wf: str, sig: int, extra_env: dict[str, str] | None = None) -> tuple[int, str, int]:
    """Start `run`, send ``sig`` once a few blocks are written; return (rc, stderr, markers at exit).

    SIGINT goes to the whole process group, as Ctrl-C in a terminal does:
    the command's workers and fork server get it too. SIGTERM goes to the
    command alone (what a batch scheduler or ``kill`` sends)."""
    out = tmp_path / "out.zarr"
    proc, _, err = start_cli("run", wf, cwd=tmp_path, log_dir=tmp_path, extra_env=extra_env)
    try:
        wait_for_blocks(out, 12, proc, timeout=150)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(60)
    finally:
        kill_group(proc)  # the CLI and any worker it left behind
    return rc, err.read_text(), done_count(out)


def _clean(tmp_path, src: str, wf: str, fmt: str) -> str:
    clean = str(tmp_path / "clean.zarr")
    convolve_zarr(src, load_workflow(wf).kernel.array, clean, "same", output_format=fmt, block_memory="1MiB")
    return clean


@pytest.mark.xdist_group("cluster")
@pytest.mark.parametrize("sig, fmt, src, workers, every_step", [
    (signal.SIGINT, "dense", "dense", "forked", True),
    # what spawned workers and SIGTERM change is how the run starts and
    # stops; info, validate, a finished output and --restart are the first
    # case's (~10 s of commands each time)
    (signal.SIGINT, "csr", "csr", "spawned", False),
    (signal.SIGTERM, "csr", "csr", "forked", False),
], ids=["ctrl-c-dense", "ctrl-c-csr-spawned-workers", "sigterm-csr"])
def test_cli_interrupted_run_resumes(tmp_path, inputs, sig, fmt, src, workers, every_step):
    wf = _workflow(tmp_path, inputs[src], fmt, "16KiB" if fmt == "dense" else "64KiB")
    out = tmp_path / "out.zarr"
    before = tree_digest(inputs[src])
    plan = cli("run", wf, "--dry-run", cwd=tmp_path)
    n_blocks = int(plan.stdout.split("row blocks:")[1].split()[0].replace(",", ""))
    assert n_blocks >= 100, plan.stdout

    # workers forked from the command's warm server (the default), or spawned (DASK_SPARSECONV_FORK_WORKERS=0)
    rc, stderr, written = _interrupt(tmp_path, wf, sig, {"DASK_SPARSECONV_FORK_WORKERS": "0"} if workers == "spawned" else None)
    # a clean exit: 130 (Ctrl-C) / 143 (SIGTERM), one line saying what to do, no traceback
    assert rc == (130 if sig == signal.SIGINT else 143), stderr
    line = one_line_error(stderr)
    assert "incomplete" in line and "again to resume" in line and "--restart" in line and str(out) in line
    assert 12 <= written < n_blocks
    # the partial output never looks complete
    assert provenance(out)["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(str(out))
    if every_step:
        info = cli("info", out)
        assert info.returncode == 0 and "INCOMPLETE" in info.stdout and f"{written} of {n_blocks} blocks" in info.stdout
        val = cli("validate", wf, cwd=tmp_path)
        assert val.returncode == 0 and "will resume" in val.stdout, val.stdout + val.stderr

    # the same command again resumes: exactly the written blocks are skipped
    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resumed:    {n_blocks - written:,} blocks computed, {written:,} skipped" in res.stdout, res.stdout
    # progress counts every block (a CSR run's written blocks are one task per run of them)
    assert f"progress: {n_blocks}/{n_blocks} blocks (100%)" in res.stderr, res.stderr
    assert_identical(out, _clean(tmp_path, inputs[src], wf, fmt))
    assert tree_digest(inputs[src]) == before  # the input was never touched

    if not every_step:
        return
    # a finished output is left alone: refused without --restart, recomputed with it
    done_digest = tree_digest(out)
    again = cli("run", wf, cwd=tmp_path)
    assert again.returncode == 2 and "already exists and is complete" in again.stderr, again.stderr
    assert "--restart" in again.stderr and "Traceback" not in again.stderr
    assert tree_digest(out) == done_digest
    restart = cli("run", wf, "--restart", cwd=tmp_path)
    assert restart.returncode == 0, restart.stderr
    assert "resumed:" not in restart.stdout and "will be replaced" in restart.stdout
    assert_identical(out, tmp_path / "clean.zarr")



@pytest.mark.xdist_group("cluster")
def test_cli_ctrl_c_on_a_job_in_tiles_resumes(tmp_path):
    """Frames larger than a block are convolved in tiles, each tile a block
    of the plan: Ctrl-C leaves written tiles, the same command keeps exactly
    those and ends identical to a clean run (and to the whole-frame engine)."""
    import scipy.sparse

    from dask_sparseconv import Convolver, write_csr_stack
    from dask_sparseconv.kernels import gaussian
    from dask_sparseconv.sample_data import sample_raster

    S = 1500
    frames = scipy.sparse.vstack([sample_raster((S, S), 20_000, mean_cluster=40, seed=s) for s in (1, 2)]).tocsr()
    src = str(tmp_path / "raster.zarr")
    write_csr_stack(src, frames, (S, S))
    wf = _workflow(tmp_path, src, "csr", "512KiB")  # bands of ~13 rows: ~230 tiles
    plan = cli("run", wf, "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0 and "tiles:" in plan.stdout, plan.stdout + plan.stderr
    n_blocks = int(plan.stdout.split("\n  blocks:")[1].split()[0].replace(",", ""))
    assert n_blocks >= 100, plan.stdout

    rc, stderr, written = _interrupt(tmp_path, wf, signal.SIGINT)
    assert rc == 130, stderr
    assert "again to resume" in one_line_error(stderr)
    assert 12 <= written < n_blocks
    assert provenance(tmp_path / "out.zarr")["complete"] is False

    res = cli("run", wf, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"resumed:    {n_blocks - written:,} blocks computed, {written:,} skipped" in res.stdout, res.stdout
    k = load_workflow(wf).kernel.array
    clean = str(tmp_path / "clean.zarr")
    convolve_zarr(src, k, clean, "same", output_format="csr", block_memory="512KiB")
    assert_identical(tmp_path / "out.zarr", clean)
    got = scipy.sparse.csr_matrix(open_stack(str(tmp_path / "out.zarr")).compute(scheduler="sync"))
    whole = Convolver((S, S), gaussian(sigma=1.0).astype(np.float32), mode="same")(frames, out="csr")
    assert abs(got - whole).max() <= 1e-5 * max(1.0, abs(whole).max())

# -- the API: partial outputs made by computing only some of the block tasks ------------
def _partial(src, target, fmt, keep, **kw):
    """Build convolve_zarr's graph and run only the block tasks ``keep`` picks
    (what a run stopped mid-way leaves behind); return the block count."""
    graph = convolve_zarr(src, KERNEL, target, "full", output_format=fmt, block_memory=20_000, compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    keys = sorted((k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-")),
                  key=lambda k: int(k.rsplit("-", 1)[1]))
    dask.get(hlg, [k for i, k in enumerate(keys) if keep(i)])
    return len(keys), hlg


@pytest.mark.parametrize("src_fmt, out_fmt", [("dense", "dense"), ("csr", "csr"), ("dense", "csr"), ("csr", "dense")])
def test_api_resume_skips_verified_blocks(tmp_path, inputs, src_fmt, out_fmt):
    src, target, clean = inputs[src_fmt], str(tmp_path / "out.zarr"), str(tmp_path / "clean.zarr")
    convolve_zarr(src, KERNEL, clean, "full", output_format=out_fmt)
    # every third block of the first 30 (a CSR block's write also waits for the
    # write a few blocks back, so the chain writes a few more of those)
    n_blocks, _ = _partial(src, target, out_fmt, lambda i: i % 3 == 0 and i < 30)
    written = done_count(target)
    assert 10 <= written < 30 < n_blocks
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target)
    summary = convolve_zarr(src, KERNEL, target, "full", output_format=out_fmt, block_memory=20_000)
    assert summary.resumed and summary.blocks == n_blocks
    assert (summary.blocks_skipped, summary.blocks_computed) == (written, n_blocks - written)
    assert_identical(target, clean)


def test_api_resume_recomputes_blocks_computed_but_not_written(tmp_path, inputs):
    """A CSR block's result waits in worker memory for its offset (the carry
    of the blocks before it): blocks computed but not yet written when a run
    stops leave nothing to skip, and the next run computes them again and
    ends identical to a clean run."""
    src, target, clean = inputs["csr"], str(tmp_path / "out.zarr"), str(tmp_path / "clean.zarr")
    convolve_zarr(src, KERNEL, clean, "full", output_format="csr", block_memory=20_000)
    graph = convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000, compute=False)
    hlg = dict(graph.__dask_graph__())
    computes = sorted(k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-compute-"))
    results = dask.get(hlg, computes[:2])  # the first two have no earlier write to wait for
    assert all(r.csr is not None and r.stats.nnz_out == r.csr.nnz for r in results)
    assert done_count(target) == 0 and provenance(target)["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target)
    summary = convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000)
    assert summary.resumed and (summary.blocks_skipped, summary.blocks_computed) == (0, len(computes))
    assert not (tmp_path / "out.zarr" / "_blocks").exists()
    assert_identical(target, clean)


@pytest.mark.parametrize("out_fmt, damage", [("dense", "flip"), ("csr", "flip"), ("csr", "truncate")])
def test_api_resume_recomputes_a_damaged_block(tmp_path, inputs, out_fmt, damage):
    """A block whose marker is set but whose data no longer matches its record
    (here: one stored chunk or CSR block record overwritten, or a record cut
    short as by a crash mid-write) is recomputed, not trusted. (Damaged CSR
    value chunks: tests/storage/test_storage_outputs.py.)"""
    src, target, clean = inputs["dense"], tmp_path / "out.zarr", str(tmp_path / "clean.zarr")
    convolve_zarr(src, KERNEL, clean, "full", output_format=out_fmt)
    n_blocks, _ = _partial(src, str(target), out_fmt, lambda i: i < 6)
    assert done_count(target) == 6
    if out_fmt == "dense":
        victim = target / "c" / "2" / "0" / "0"  # block 2's chunk (one block per chunk)
    else:
        victim = target / "_blocks" / "block_2"
    assert victim.is_file()
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    else:
        del raw[len(raw) // 2:]
    victim.write_bytes(bytes(raw))
    summary = convolve_zarr(src, KERNEL, str(target), "full", output_format=out_fmt, block_memory=20_000)
    assert (summary.blocks_skipped, summary.blocks_computed) == (5, n_blocks - 5)
    assert_identical(target, clean)


def test_api_resume_refuses_another_job_and_never_touches_a_complete_output(tmp_path, inputs):
    src, target = inputs["csr"], str(tmp_path / "out.zarr")
    _partial(src, target, "csr", lambda i: i < 4)
    partial = tree_digest(target)
    with pytest.raises(ValueError, match="different settings.*kernel"):
        convolve_zarr(src, KERNEL * 2, target, "full", output_format="csr", block_memory=20_000)
    with pytest.raises(ValueError, match="different settings.*mode"):
        convolve_zarr(src, KERNEL, target, "same", output_format="csr", block_memory=20_000)
    with pytest.raises(FileExistsError, match="incomplete run; pass resume=True"):
        convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000, resume=False)
    assert tree_digest(target) == partial  # refusals wrote nothing
    convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000)
    finished = tree_digest(target)
    for kw in ({}, {"resume": True}):
        with pytest.raises(FileExistsError, match="complete.*overwrite=True"):
            convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000, **kw)
    assert tree_digest(target) == finished
    summary = convolve_zarr(src, KERNEL, target, "full", output_format="csr", overwrite=True)
    assert not summary.resumed and summary.blocks_skipped == 0


def test_api_resume_after_every_block_was_written(tmp_path, inputs):
    """Every block written, the last task (indptr, completion flag) not run:
    the resumed run recomputes no block and only finishes."""
    src, target, clean = inputs["dense"], str(tmp_path / "out.zarr"), str(tmp_path / "clean.zarr")
    convolve_zarr(src, KERNEL, clean, "full", output_format="csr")
    n_blocks, hlg = _partial(src, target, "csr", lambda i: True)
    assert (tmp_path / "out.zarr" / "_blocks").is_dir() and provenance(target)["complete"] is False
    summary = convolve_zarr(src, KERNEL, target, "full", output_format="csr", block_memory=20_000)
    assert (summary.blocks_skipped, summary.blocks_computed) == (n_blocks, 0)
    assert_identical(target, clean)
