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


def _cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dask-sparseconv ARGS`` in a subprocess (its local cluster's workers are processes too)."""
    return subprocess.run([sys.executable, "-m", "dask_sparseconv.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def _workflow(tmp_path, inp: dict, mode: str, output: dict) -> dict:
    """A workflow on this image (``inp`` beside the input path), written to ``tmp_path/wf.yaml``."""
    wf = {
        "input": {"path": str(tmp_path / "img.zarr"), **inp},
        "kernel": {"values": KERNEL.tolist()},
        "mode": mode,
        "output": {"path": str(tmp_path / "out.zarr"), **output},
        "cluster": {"n_workers": 1, "threads_per_worker": 1, "dashboard_address": None},
    }
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf))
    return wf


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
    r = _cli("info", str(tmp_path / "img.zarr"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OME-Zarr image (NGFF 0.5)" in r.stdout and "images run over t x c" in r.stdout
    assert "levels:     0: " in r.stdout and "(read)" in r.stdout
    level1 = group[_level_path(group, 1)][:]
    wf = tmp_path / "wf.yaml"
    _workflow(tmp_path, {"level": 1}, "same", {"format": "csr"})
    r = _cli("run", str(wf), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "6 images of 16 x 14" in r.stdout
    result = open_stack(str(tmp_path / "out.zarr")).compute().toarray()
    ref = convolve_stack(level1.reshape(6, 16, 14), KERNEL, "same")
    np.testing.assert_allclose(result.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    # a level the image does not have: exit 2, the key named
    wf.write_text(wf.read_text().replace("level: 1", "level: 4"))
    r = _cli("validate", str(wf), timeout=120)
    assert r.returncode == 2 and "input.level" in r.stderr and "from 0 to 1" in r.stderr, r.stderr


# -- OME-Zarr out ----------------------------------------------------------------------------
ome_models = pytest.importorskip("ome_zarr_models.v05")


def _validated(path):
    """The output checked against the NGFF 0.5 JSON schema (strict), as
    bundled and applied by ngff-zarr, then read by the OME-Zarr community's
    models (each raises if it is not valid NGFF 0.5)."""
    from ngff_zarr.validate import validate

    group = zarr.open_group(str(path), mode="r")
    validate(group.attrs.asdict(), version="0.5", model="image", strict=True)
    return ome_models.Image.from_zarr(group)


@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_ome_zarr_output_keeps_axes_units_and_moves_the_translation(tmp_path, mode):
    image = _image((2, 3, 30, 26), seed=6)
    group = _write_ome(tmp_path / "img.zarr", image, "tzyx", "0.5", chunks=(1, 3, 30, 26))
    stored = group[_level_path(group, 0)][:]
    target = tmp_path / "out.ome.zarr"
    summary = convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(target), mode, output_format="ome-zarr",
                            block_memory="30KB")
    assert summary.format == "ome-zarr" and summary.blocks >= 2
    image_model = _validated(target)
    ms = image_model.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["t", "z", "y", "x"]
    assert [a.unit for a in ms.axes][-2:] == ["micrometer", "micrometer"]
    out = zarr.open_group(str(target), mode="r")
    ref = convolve_stack(stored.reshape(6, 30, 26), KERNEL, mode)
    level = out["0"][:]
    assert level.shape == (2, 3) + ref.shape[1:]
    np.testing.assert_allclose(level.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    # output pixel o is input pixel o + s: s = -(k-1)//2 (full), 0 (same), k//2 (valid); kernel 4 x 3
    shift = {"full": [-1, -1], "same": [0, 0], "valid": [2, 1]}[mode]
    transforms = out.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms[1]["translation"] == [0.0, 0.0, float(shift[0]), float(shift[1])]
    assert out.attrs["dask_sparseconv"]["complete"] is True
    # read back by the reference reader and by this package
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(target)))())
    np.testing.assert_allclose(np.asarray(nodes[0].data[0]).reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(open_stack(str(target)).compute()), ref.astype(np.float32),
                               rtol=1e-5, atol=1e-5)


def test_plain_stack_to_ome_zarr_and_resume(tmp_path):
    """A plain (n, H, W) stack becomes a t, y, x image; an interrupted run
    resumes from the block records under the level array."""
    import dask

    x = _image((40, 20, 18), seed=8)
    write_dense_stack(str(tmp_path / "in.zarr"), x, chunks=4)
    target = str(tmp_path / "out.zarr")
    kw = dict(output_format="ome-zarr", block_memory="20KB")
    graph = convolve_zarr(str(tmp_path / "in.zarr"), KERNEL, target, "same", compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    blocks = sorted((k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-")),
                    key=lambda k: int(k.rsplit("-", 1)[1]))
    assert len(blocks) >= 4
    dask.get(hlg, blocks[:3])
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target)
    assert describe_stack(target)["done_blocks"] == 3
    summary = convolve_zarr(str(tmp_path / "in.zarr"), KERNEL, target, "same", **kw)
    assert summary.resumed and (summary.blocks_skipped, summary.blocks_computed) == (3, len(blocks) - 3)
    ms = _validated(target).ome_attributes.multiscales[0]
    assert [(a.name, a.type) for a in ms.axes] == [("t", "time"), ("y", "space"), ("x", "space")]
    np.testing.assert_allclose(zarr.open_group(target, mode="r")["0"][:], convolve_stack(x, KERNEL, "same"),
                               rtol=1e-5, atol=1e-5)


def test_ome_zarr_output_from_the_cli_and_refusals(tmp_path):
    image = _image((4, 24, 22), seed=9)
    _write_ome(tmp_path / "img.zarr", image, "cyx", "0.4")
    wf = tmp_path / "wf.yaml"
    _workflow(tmp_path, {}, "valid", {"format": "ome-zarr"})
    r = _cli("run", str(wf), timeout=300)
    assert r.returncode == 0, r.stderr
    _validated(tmp_path / "out.zarr")
    r = _cli("info", str(tmp_path / "out.zarr"), timeout=120)
    assert r.returncode == 0 and "OME-Zarr image (NGFF 0.5)" in r.stdout and "provenance: written by" in r.stdout
    from dask_sparseconv import convolve

    with pytest.raises(ValueError, match="output_format='ome-zarr' names a store format: write it with convolve_zarr"):
        convolve(image, KERNEL, output_format="ome-zarr")
    with pytest.raises(ValueError, match="output_format='ome-zarr' takes one kernel"):
        convolve_zarr(str(tmp_path / "img.zarr"), np.stack([KERNEL, KERNEL]), str(tmp_path / "o2.zarr"),
                      output_format="ome-zarr")
    assert not (tmp_path / "o2.zarr").exists()


def test_pyramid_levels_are_means_of_level_0_and_resume_checks_them(tmp_path):
    import dask

    image = _image((2, 4, 40, 36), seed=10)
    _write_ome(tmp_path / "img.zarr", image, "czyx", "0.5", chunks=(1, 2, 40, 36))
    target = str(tmp_path / "out.zarr")
    kw = dict(output_format="ome-zarr", pyramid=2, block_memory="30KB")
    graph = convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, target, "same", compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    blocks = sorted(k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-"))
    dask.get(hlg, blocks[:1])
    # damage a written level-2 chunk: that block is recomputed, not trusted
    g = zarr.open_group(target, mode="r+")
    g["2"][0, 0] = 99.0
    summary = convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, target, "same", **kw)
    assert summary.resumed and summary.blocks_skipped == 0
    image_model = _validated(target)
    datasets = image_model.ome_attributes.multiscales[0].datasets
    assert [d.path for d in datasets] == ["0", "1", "2"]
    g = zarr.open_group(target, mode="r")
    level0 = g["0"][:]
    np.testing.assert_allclose(level0.reshape(8, 40, 36), convolve_stack(image.reshape(8, 40, 36), KERNEL, "same"),
                               rtol=1e-5, atol=1e-5)
    for j, f in ((1, 2), (2, 4)):
        pooled = level0.reshape(2, 4, 40 // f, f, 36 // f, f).mean(axis=(3, 5))
        np.testing.assert_allclose(g[str(j)][:], pooled, rtol=1e-5, atol=1e-6)
    tr = g.attrs["ome"]["multiscales"][0]["datasets"][2]["coordinateTransformations"]
    assert tr[0]["scale"][-2:] == [4.0, 4.0] and tr[1]["translation"][-2:] == [1.5, 1.5]
    with pytest.raises(ValueError, match=r"pyramid=1 applies to output_format='ome-zarr' only"):
        convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(tmp_path / "o.zarr"), pyramid=1)
    with pytest.raises(ValueError, match=r"pyramid=6 needs output frames of at least 64 pixels"):
        convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(tmp_path / "o.zarr"), output_format="ome-zarr",
                      pyramid=6)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.lock").exists()


def test_spatial_axes_convolve_other_sections(tmp_path):
    """spatial_axes=("z", "x"): x-z sections are the frames; c and y count
    images (in array order); an OME-Zarr output keeps that axis order."""
    from dask_sparseconv import convolve

    image = _image((2, 6, 20, 18), seed=11)
    group = _write_ome(tmp_path / "img.zarr", image, "czyx", "0.5", chunks=(1, 3, 10, 18))
    stored = group[_level_path(group, 0)][:]
    sections = stored.transpose(0, 2, 1, 3).reshape(40, 6, 18)  # c, y, z, x
    src = open_input(str(tmp_path / "img.zarr"), spatial_axes=("z", "x"))
    assert (src.n_images, src.frame_shape) == (40, (6, 18))
    np.testing.assert_array_equal(src.read_dense_block(7, 29), sections[7:29])
    ref = convolve_stack(sections, KERNEL, "full")
    target = tmp_path / "out.zarr"
    convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(target), "full", output_format="ome-zarr",
                  spatial_axes=["z", "x"], block_memory="20KB")
    ms = _validated(target).ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "z", "x"]
    level = zarr.open_group(str(target), mode="r")["0"][:]
    np.testing.assert_allclose(level.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    lazy = convolve(str(tmp_path / "img.zarr"), KERNEL, "full", spatial_axes=("z", "x"))
    np.testing.assert_allclose(lazy.compute(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"spatial_axes must name two different axes .*its axes: c, z, y, x"):
        open_input(str(tmp_path / "img.zarr"), spatial_axes=("z", "q"))
    write_dense_stack(str(tmp_path / "plain.zarr"), image[0])
    with pytest.raises(ValueError, match=r"spatial_axes=.* names axes of an OME-Zarr image"):
        open_input(str(tmp_path / "plain.zarr"), spatial_axes=("y", "x"))


def test_workflow_spatial_axes_key(tmp_path):
    image = _image((3, 5, 16, 14), seed=12)
    group = _write_ome(tmp_path / "img.zarr", image, "tzyx", "0.5")
    stored = group[_level_path(group, 0)][:]
    wf = _workflow(tmp_path, {"spatial_axes": ["z", "y"]}, "same", {})
    path = tmp_path / "wf.yaml"
    r = _cli("run", str(path), timeout=300)
    assert r.returncode == 0, r.stderr
    ref = convolve_stack(stored.transpose(0, 3, 1, 2).reshape(42, 5, 16), KERNEL, "same")  # t, x, z, y
    np.testing.assert_allclose(open_stack(str(tmp_path / "out.zarr")).compute(), ref, rtol=1e-5, atol=1e-5)
    for bad, says in ((["y", "y"], "two different axis names"), (["z", "w"], "its axes: t, z, y, x")):
        wf["input"]["spatial_axes"] = bad
        wf["output"]["path"] = str(tmp_path / "out2.zarr")
        path.write_text(yaml.safe_dump(wf))
        r = _cli("validate", str(path), timeout=120)
        assert r.returncode == 2 and "input.spatial_axes" in r.stderr and says in r.stderr, r.stderr


# budgets that cut every frame into several tiles, with either output, without
# the 960 blocks of a 3 KB budget (~12 s a pair of outputs): 192-216 blocks for
# the 24 frames of 40 x 36, 320-360 for the 80 of 12 x 36
@pytest.mark.parametrize("spatial_axes, budget", [(None, "8KB"), (("z", "x"), "5KB")], ids=["yx", "zx"])
def test_ome_zarr_input_in_tiles(tmp_path, spatial_axes, budget):
    """An OME-Zarr image whose frames do not fit the block budget is read in
    tiles (through the transposing view for other spatial axes too), with a
    dense or a CSR output, equal to scipy."""
    image = _image((2, 12, 40, 36), seed=5)
    group = _write_ome(tmp_path / "img.zarr", image, "czyx", "0.5", chunks=(1, 4, 16, 16))
    stored = group[_level_path(group, 0)][:]
    frames = stored.reshape(24, 40, 36) if spatial_axes is None else stored.transpose(0, 2, 1, 3).reshape(80, 12, 36)
    ref = convolve_stack(frames, KERNEL, "same")
    for out_fmt in ("dense", "csr"):
        target = tmp_path / f"out_{out_fmt}.zarr"
        summary = convolve_zarr(str(tmp_path / "img.zarr"), KERNEL, str(target), "same", output_format=out_fmt,
                                spatial_axes=spatial_axes, block_memory=budget)
        got = open_stack(str(target)).compute()
        got = got.toarray() if hasattr(got, "toarray") else np.asarray(got)
        assert summary.blocks > frames.shape[0]  # more blocks than images: tiles
        np.testing.assert_allclose(got.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
