"""OME-Zarr (NGFF 0.4 and 0.5) images as inputs, written by the OME-Zarr
reference implementation (``ome_zarr.writer.write_image``) and read in
place: level 0 by default, another with ``level=``; the last two axes are
the frame, every other axis counts images. Values against scipy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
import zarr
from scipy_oracle import convolve_stack

from dask_sparseconv import convolve_zarr, open_stack
from dask_sparseconv.storage import describe_stack, open_input, write_dense_stack

ome_writer = pytest.importorskip("ome_zarr.writer", reason="needs ome-zarr (pip install 'dask-sparseconv[test]')")
ome_format = pytest.importorskip("ome_zarr.format")

KERNEL = np.array([[0.0, 1.0, 0.5], [1.0, -2.0, 1.0], [0.25, 1.0, 0.0], [0.0, 0.5, 0.0]], dtype=np.float32)


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < 0.03, rng.standard_normal(shape), 0).astype(np.float32)


def _write_ome(path, image, axes: str, version: str, chunks=None):
    """An NGFF image with a 2-level pyramid, as ome-zarr writes it."""
    fmt = ome_format.FormatV04() if version == "0.4" else ome_format.FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    kw = {"storage_options": {"chunks": chunks}} if chunks else {}
    ome_writer.write_image(image, group, axes=axes, fmt=fmt, scale_factors=(2,),
                           axes_units={"y": "micrometer", "x": "micrometer"}, **kw)
    return group


def _level_path(group, level: int) -> str:
    attrs = group.attrs.asdict()
    ms = (attrs.get("ome") or attrs)["multiscales"][0]
    return ms["datasets"][level]["path"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("out_fmt", ["dense", "csr"])
def test_tczyx_image_level_0_matches_scipy(tmp_path, version, out_fmt):
    image = _image((2, 3, 5, 40, 36), seed=1)
    # chunks that split z (and so the runs of images) unevenly: 5 planes in chunks of 2
    group = _write_ome(tmp_path / "img.zarr", image, "tczyx", version, chunks=(1, 1, 2, 40, 36))
    stored = group[_level_path(group, 0)][:]
    before = sorted(p.name for p in (tmp_path / "img.zarr").rglob("*"))
    target = tmp_path / "out.zarr"
    summary = convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(target), "same", output_format=out_fmt,
                            block_memory="40KB")
    assert summary.n_images == 30 and summary.blocks > 3
    result = open_stack(str(target)).compute()
    result = result.toarray() if out_fmt == "csr" else np.asarray(result)
    ref = convolve_stack(stored.reshape(30, 40, 36), KERNEL, "same")
    np.testing.assert_allclose(result.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    prov = describe_stack(str(target))["provenance"]
    assert prov["source_ngff"]["frame_axes"] == ["t", "c", "z"]
    assert prov["source_ngff"]["frame_axes_shape"] == [2, 3, 5] and prov["source_ngff"]["version"] == version
    assert "OME-Zarr level 0" in prov["source"]
    # read in place: the image store is as it was
    assert sorted(p.name for p in (tmp_path / "img.zarr").rglob("*")) == before


def test_level_picks_a_pyramid_level_and_bad_levels_are_named(tmp_path):
    image = _image((4, 48, 40), seed=2)
    group = _write_ome(tmp_path / "img.zarr", image, "cyx", "0.5")
    level1 = group[_level_path(group, 1)][:]
    assert level1.shape == (4, 24, 20)
    src = open_input(str(tmp_path / "img.zarr"), level=1)
    assert (src.n_images, src.frame_shape) == (4, (24, 20))
    convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(tmp_path / "out.zarr"), "full", level=1)
    np.testing.assert_allclose(open_stack(str(tmp_path / "out.zarr")).compute(),
                               convolve_stack(level1, KERNEL, "full"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"level must be an integer from 0 to 1 .* got 2"):
        open_input(str(tmp_path / "img.zarr"), level=2)
    write_dense_stack(str(tmp_path / "plain.zarr"), image)
    with pytest.raises(ValueError, match=r"level=1 picks a pyramid level of an OME-Zarr image; .*plain\.zarr"):
        convolve_zarr(str(tmp_path / "plain.zarr"), KERNEL, str(tmp_path / "o2.zarr"), level=1)
    assert not (tmp_path / "o2.zarr").exists()


def test_single_yx_image(tmp_path):
    image = _image((64, 50), seed=3)
    group = _write_ome(tmp_path / "img.zarr", image, "yx", "0.4")
    stored = group[_level_path(group, 0)][:]
    convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(tmp_path / "out.zarr"), "valid")
    np.testing.assert_allclose(open_stack(str(tmp_path / "out.zarr")).compute(),
                               convolve_stack(stored[None], KERNEL, "valid"), rtol=1e-5, atol=1e-5)


def test_cli_info_and_run_with_input_level(tmp_path):
    image = _image((3, 2, 32, 28), seed=4)
    group = _write_ome(tmp_path / "img.zarr", image, "tcyx", "0.5")
    r = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "info", str(tmp_path / "img.zarr")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OME-Zarr image (NGFF 0.5)" in r.stdout and "images run over t x c" in r.stdout
    assert "levels:     0: " in r.stdout and "(read)" in r.stdout
    level1 = group[_level_path(group, 1)][:]
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "img.zarr"), "level": 1},
        "kernel": {"values": KERNEL.tolist()},
        "mode": "same",
        "output": {"path": str(tmp_path / "out.zarr"), "format": "csr"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": None},
    }))
    r = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "run", str(wf)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "6 images of 16 x 14" in r.stdout
    result = open_stack(str(tmp_path / "out.zarr")).compute().toarray()
    ref = convolve_stack(level1.reshape(6, 16, 14), KERNEL, "same")
    np.testing.assert_allclose(result.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    # a level the image does not have: exit 2, the key named
    wf.write_text(wf.read_text().replace("level: 1", "level: 4"))
    r = subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", "validate", str(wf)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "input.level" in r.stderr and "from 0 to 1" in r.stderr, r.stderr
