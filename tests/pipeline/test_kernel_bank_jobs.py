"""Kernel banks through the pipeline: lazy ``convolve`` and ``convolve_zarr``
with dense and CSR stores, resume, names and provenance, the workflow's
``kernels:`` and the CLI, a LocalCluster with worker processes. A bank's
output for kernel k equals a single-kernel job with kernel k."""

from __future__ import annotations

import subprocess
import sys

import anndata
import dask
import numpy as np
import pytest
import scipy.sparse
import zarr
from pipeline_support import assert_matches, reference

import dask_sparseconv as dsc
from dask_sparseconv import convolve, convolve_zarr, kernels, open_bank, open_stack
from dask_sparseconv.sample_data import sample_rois
from dask_sparseconv.storage import write_csr_stack, write_dense_stack

N, H, W = 26, 40, 36
BANK = np.stack([kernels.gaussian(0.8, size=5), kernels.box(5), np.arange(25.0).reshape(5, 5) / 25 - 0.4])
NAMES = ["fine", "box", "ramp"]
BM = 200_000  # small blocks: several per job


def _stack():
    x = sample_rois(N, (H, W), max_rois=2, radius=4.0, seed=9).toarray().reshape(N, H, W).astype(np.float64)
    x[4] = 0
    return x


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    x = _stack()
    root = tmp_path_factory.mktemp("bank")
    dense, csr = str(root / "dense.zarr"), str(root / "csr.zarr")
    write_dense_stack(dense, x, chunks=2)
    write_csr_stack(csr, scipy.sparse.csr_matrix(x.reshape(N, -1)), (H, W), chunk_size=128)
    return x, {"dense": dense, "csr": csr}


def _refs(x, mode="same"):
    return [reference(x, k, mode) for k in BANK]


def test_lazy_banks_dense_4d_and_csr_list():
    x = _stack()
    with dask.config.set(scheduler="threads", num_workers=2):
        y = convolve(x, BANK, "full", block_memory=BM)
        assert y.shape == (N, 3, H + 4, W + 4) and y.numblocks[0] > 1
        got = y.compute()
        for k, ref in enumerate(_refs(x, "full")):
            assert_matches(got[:, k], ref)
        ys = convolve(scipy.sparse.csr_matrix(x.reshape(N, -1)), BANK, "same", frame_shape=(H, W), block_memory=BM)
        assert isinstance(ys, list) and len(ys) == 3
        # computed together, the K arrays share their block tasks (one read and convolution per block)
        outs = dask.compute(*ys)
        for k, ref in enumerate(_refs(x)):
            assert_matches(outs[k], ref)


@pytest.mark.parametrize("in_fmt, out_fmt", [("dense", "dense"), ("csr", "csr"), ("dense", "csr"), ("csr", "dense")])
def test_convolve_zarr_bank_matches_single_kernel_jobs(stores, tmp_path, in_fmt, out_fmt):
    x, paths = stores
    target = str(tmp_path / "bank.zarr")
    with dask.config.set(scheduler="threads", num_workers=2):
        summary = convolve_zarr(paths[in_fmt], BANK, target, output_format=out_fmt, block_memory=BM,
                                kernel_names=NAMES)
        assert summary.blocks > 2 and summary.kernels == NAMES
        singles = []
        for k in range(3):
            single = str(tmp_path / f"single{k}.zarr")
            convolve_zarr(paths[in_fmt], BANK[k], single, output_format=out_fmt, block_memory=BM)
            singles.append(open_stack(single).compute())
    bank = open_bank(target)
    assert list(bank) == NAMES
    for k, (name, ref) in enumerate(zip(NAMES, _refs(x))):
        got = bank[name].compute()
        assert_matches(got, ref)
        if out_fmt == "csr":
            assert (got != singles[k]).nnz == 0  # the same values as the job with kernel k alone
        else:
            np.testing.assert_array_equal(got, singles[k])
    if out_fmt == "dense":
        arr = zarr.open_array(target)
        assert arr.shape == (N, 3, H, W) and arr.chunks[1:] == (3, H, W)
        assert open_stack(target).shape == (N, 3, H, W)
        prov = arr.attrs["dask_sparseconv"]
    else:
        group = zarr.open_group(target)
        prov = group.attrs["dask_sparseconv"]
        assert summary.nnz_per_kernel == prov["nnz_per_kernel"] and sum(summary.nnz_per_kernel) == summary.nnz_out
        for k, name in enumerate(NAMES):
            # each member is an anndata csr_matrix other tools read, with its own provenance
            m = anndata.io.read_elem(group[name])
            assert (m != bank[name].compute()).nnz == 0
            member = group[name].attrs["dask_sparseconv"]
            assert member["complete"] and member["kernel_sha"] == prov["kernels"][k]["kernel_sha"]
            assert group[name].attrs["frame_shape"] == [H, W]
        with pytest.raises(ValueError, match="open_bank"):
            open_stack(target)
    assert prov["complete"] and [r["name"] for r in prov["kernels"]] == NAMES
    assert prov["kernels"][1]["kernel"] == BANK[1].tolist()


def _partial(src, target, fmt, keep):
    graph = convolve_zarr(src, BANK, target, output_format=fmt, block_memory=BM, compute=False, kernel_names=NAMES)
    hlg = dict(graph.__dask_graph__())
    keys = sorted((k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-")),
                  key=lambda k: int(k.rsplit("-", 1)[1]))
    dask.get(hlg, [k for i, k in enumerate(keys) if keep(i)])
    return len(keys)


@pytest.mark.parametrize("out_fmt", ["dense", "csr"])
def test_an_interrupted_bank_job_resumes_exactly(stores, tmp_path, out_fmt):
    x, paths = stores
    target = str(tmp_path / "bank.zarr")
    with dask.config.set(scheduler="sync"):
        n_blocks = _partial(paths["csr"], target, out_fmt, lambda i: i < 4)
        with pytest.raises(ValueError, match="incomplete"):
            open_bank(target)
        info = dsc.describe_stack(target)
        assert info["complete"] is False and info["kernels"] == NAMES and 4 <= info["done_blocks"] < n_blocks
        # another bank (other names) is refused, naming what differs
        with pytest.raises(ValueError, match="kernels"):
            convolve_zarr(paths["csr"], BANK, target, output_format=out_fmt, block_memory=BM, kernel_names=["a", "b", "c"])
        summary = convolve_zarr(paths["csr"], BANK, target, output_format=out_fmt, block_memory=BM, kernel_names=NAMES)
    assert summary.resumed and summary.blocks_skipped >= 4 and summary.blocks_computed + summary.blocks_skipped == n_blocks
    bank = open_bank(target)
    for name, ref in zip(NAMES, _refs(x)):
        assert_matches(bank[name].compute(), ref)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kernel=BANK, kernel_names=["a", "b"]), ["each of the 3 kernels"]),
    (dict(kernel=BANK, kernel_names=["a", "a", "b"]), ["distinct"]),
    (dict(kernel=BANK, kernel_names=["a", "b/c", "d"]), ["'b/c'", "not a usable name"]),
    (dict(kernel=BANK[0], kernel_names=["a"]), ["kernel_names is for a kernel bank"]),
])
def test_bad_kernel_names_are_refused_before_anything_is_written(stores, tmp_path, kwargs, words):
    _, paths = stores
    target = tmp_path / "out.zarr"
    with pytest.raises((ValueError, TypeError)) as info:
        convolve_zarr(paths["csr"], target=str(target), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not target.exists()


def test_workflow_kernels_list_runs_from_the_cli(tmp_path):
    wf = tmp_path / "bank.yaml"
    wf.write_text(
        "input:\n  path: in.zarr\n  sample: {n_images: 12, frame_shape: [48, 40], seed: 3}\n"
        "kernels:\n  - {name: small, gaussian: {sigma: 1}}\n  - {name: large, gaussian: {sigma: 2}}\n"
        "  - box: {size: 3}\n"
        "output:\n  path: out.zarr\n  format: csr\n"
        "cluster: {n_workers: 1, threads_per_worker: 2}\n"
    )
    cli = [sys.executable, "-m", "dask_sparseconv.cli"]
    proc = subprocess.run(cli + ["validate", str(wf)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "a bank of 3 kernels (small: gaussian(sigma=1), large: gaussian(sigma=2), 2: box(size=3)), 13 x 13" \
        in proc.stdout
    proc = subprocess.run(cli + ["run", str(wf)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "preview.png"
    proc = subprocess.run(cli + ["preview", str(wf), "-o", str(png), "--images", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and png.stat().st_size > 0, proc.stderr
    from PIL import Image

    assert Image.open(png).height > 3 * 48  # one row per kernel
    info = subprocess.run(cli + ["info", str(tmp_path / "out.zarr")], capture_output=True, text=True, timeout=300)
    assert "kernels:    3: small, large, 2" in info.stdout and "state:      complete" in info.stdout
    x = open_stack(str(tmp_path / "in.zarr")).compute().astype(np.float64)
    bank = open_bank(str(tmp_path / "out.zarr"))
    # smaller kernels are zero-padded, centred, to 13 x 13: in mode 'same' each result is the kernel's own
    for name, kern in [("small", kernels.gaussian(1)), ("large", kernels.gaussian(2)), ("2", kernels.box(3))]:
        assert_matches(bank[name].compute(), reference(x, kern, "same"))


def test_workflow_kernels_problems_are_listed_with_their_keys(tmp_path):
    from dask_sparseconv.workflow import WorkflowError, load_workflow

    wf = tmp_path / "bad.yaml"
    wf.write_text(
        "input: {path: in.zarr}\n"
        "kernels:\n  - {name: a, gaussian: {sigma: -1}}\n  - {name: a/b, box: {size: 3}}\n  - {box: {size: 4}}\n"
        "output: {path: out.zarr}\n"
    )
    with pytest.raises(WorkflowError) as info:
        load_workflow(wf)
    text = str(info.value)
    assert "kernels.0.gaussian.sigma" in text and "kernels.1.name" in text
    wf.write_text("input: {path: in.zarr}\nkernels:\n  - {box: {size: 3}}\n  - {box: {size: 4}}\noutput: {path: o.zarr}\n")
    with pytest.raises(WorkflowError, match="odd number of rows or columns"):
        load_workflow(wf)
    wf.write_text("input: {path: in.zarr}\nkernel: {box: {size: 3}}\nkernels:\n  - {box: {size: 3}}\noutput: {path: o.zarr}\n")
    with pytest.raises(WorkflowError, match="not both"):
        load_workflow(wf)
    wf.write_text("input: {path: in.zarr}\noutput: {path: o.zarr}\n")
    with pytest.raises(WorkflowError, match="or give kernels"):
        load_workflow(wf)


@pytest.mark.xdist_group("cluster")
def test_csr_bank_on_a_local_cluster_with_worker_processes(local_cluster, stores, tmp_path):
    from distributed import Client

    x, paths = stores
    target = str(tmp_path / "bank.zarr")
    with Client(local_cluster):
        summary = convolve_zarr(paths["csr"], BANK, target, block_memory=BM, kernel_names=NAMES)
    assert summary.blocks > 2 and len(summary.extra["worker_pids"]) >= 1
    bank = open_bank(target)
    for name, ref in zip(NAMES, _refs(x)):
        assert_matches(bank[name].compute(), ref)
