"""The napari reader (dask_sparseconv/napari_reader.py, manifest napari.yaml),
run headless through napari's own plugin engine (npe2): found by entry
point, picks our outputs and declines other paths, reads CSR outputs
lazily frame by frame with the provenance as layer metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from scipy_oracle import convolve_stack

import dask_sparseconv
from dask_sparseconv import convolve_zarr
from dask_sparseconv.napari_reader import CSRFrames, get_reader
from dask_sparseconv.storage import write_csr_stack

npe2 = pytest.importorskip("npe2", reason="napari's plugin engine (pip install 'dask-sparseconv[test]')")

KERNEL = np.array([[0.5, 1.0, 0.0], [1.0, -2.0, 1.0], [0.0, 1.0, 0.25]], dtype=np.float32)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("napari")
    rng = np.random.default_rng(5)
    x = np.where(rng.random((30, 24, 20)) < 0.05, rng.standard_normal((30, 24, 20)), 0).astype(np.float32)
    src = str(tmp / "in.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(30, -1)), (24, 20), chunk_size=100)
    for fmt in ("csr", "dense"):
        convolve_zarr(src, KERNEL, str(tmp / f"{fmt}.zarr"), "same", output_format=fmt, block_memory="40KB")
    (tmp / "notes").mkdir()
    return tmp, convolve_stack(x, KERNEL, "same")


def test_manifest_is_valid_and_found_by_entry_point():
    manifest = npe2.PluginManifest.from_file(Path(dask_sparseconv.__file__).with_name("napari.yaml"))
    assert manifest.name == "dask-sparseconv" and manifest.contributions.readers
    pm = npe2.PluginManager()
    pm.discover()
    assert "dask-sparseconv" in pm._manifests  # through the napari.manifest entry point of the installed package


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_npe2_reads_outputs_with_provenance(outputs, fmt):
    tmp, ref = outputs
    pm = npe2.PluginManager.instance()
    pm.discover()
    layers = npe2.read([str(tmp / f"{fmt}.zarr")], stack=False, plugin_name="dask-sparseconv")
    assert len(layers) == 1
    data, meta, kind = layers[0]
    assert kind == "image" and data.shape == ref.shape and meta["name"] == f"{fmt}.zarr"
    prov = meta["metadata"]["dask_sparseconv"]
    assert prov["mode"] == "same" and prov["complete"] is True and prov["format"] == fmt
    if fmt == "csr":
        assert isinstance(data, CSRFrames)  # lazy: frames decoded when asked for
    np.testing.assert_allclose(np.asarray(data[7]), ref[7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(data[2:5, 3:9, ::2]), ref[2:5, 3:9, ::2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(data[-1, 4]), ref[-1, 4], rtol=1e-5, atol=1e-5)


def test_declines_what_it_cannot_read(outputs, tmp_path):
    tmp, _ = outputs
    assert get_reader(str(tmp / "notes")) is None  # a folder that is no zarr store
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert get_reader(str(tmp_path / "image.png")) is None
    assert get_reader([str(tmp / "csr.zarr"), str(tmp / "dense.zarr")]) is None  # one stack per call
    assert get_reader([str(tmp / "csr.zarr")]) is not None


def test_csr_frames_index_like_numpy(outputs):
    """Every kind of key a caller (or napari) uses gives what numpy gives on
    the dense stack: ints, negative ints, slices with steps, arrays,
    booleans, a dropped axis."""
    from dask_sparseconv.storage import open_input

    tmp, ref = outputs
    frames = CSRFrames(open_input(str(tmp / "csr.zarr")))
    ref = ref.astype(np.float32)
    mask = np.zeros(20, bool)
    mask[[1, 4, 19]] = True
    keys = [5, -1, (3, 7), (3, -2, slice(2, 9)), (slice(1, 6, 2), slice(None, None, 3), 4), ([0, 29, 2], slice(5, 6)),
            (slice(None), 10, mask), (2, [23, 0, 7], slice(18, None)), (slice(4, 4),), (1, slice(None), slice(None, None, -1))]
    for key in keys:
        got, want = frames[key], ref[key]
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(key))
    with pytest.raises(IndexError):
        frames[0, 24]
    with pytest.raises(IndexError):
        frames[0, 0, 0, 0]


def test_huge_frames_are_read_by_window_and_not_opened_whole(tmp_path, monkeypatch):
    """A frame over the limit cannot be shown whole (napari densifies whole
    frames): the reader refuses it with the frame size and how to look at a
    window; windows of it read only their rows and columns."""
    import dask_sparseconv.napari_reader as reader
    from dask_sparseconv.napari_reader import read_stack
    from dask_sparseconv.storage import open_input

    monkeypatch.setattr(reader, "MAX_WINDOW_PIXELS", 40 * 40)
    rng = np.random.default_rng(2)
    x = np.where(rng.random((3, 120, 90)) < 0.02, rng.random((3, 120, 90)) + 1, 0).astype(np.float32)
    path = str(tmp_path / "big.zarr")
    write_csr_stack(path, scipy.sparse.csr_matrix(x.reshape(3, -1)), (120, 90), chunk_size=50)
    with pytest.raises(ValueError, match=r"frames of 120 x 90 pixels are too large to show whole in napari "
                                         r"\(limit: 1,600 pixels per frame\); look at windows"):
        read_stack(path)
    frames = CSRFrames(open_input(path))
    np.testing.assert_array_equal(frames[1, 70:110, 30:70], x[1, 70:110, 30:70])
    np.testing.assert_array_equal(frames[:, 5, :], x[:, 5, :])
    with pytest.raises(ValueError, match=r"would densify 10,800 pixels per frame \(limit: 1,600\); index a smaller"):
        frames[0]
