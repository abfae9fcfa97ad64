"""Frames larger than a block (dask_sparseconv.tiles): images cut into tiles
with halos, against scipy.signal.convolve2d / correlate2d.

The block budget is set small so that small frames are tiled the way huge
ones are with the defaults; each test checks the plan really cut the frame
as intended before checking values."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import scipy.sparse
import zarr
from scipy_oracle import operate_stack

from dask_sparseconv import convolve_zarr, open_stack, plan_job, write_csr_stack, write_dense_stack
from dask_sparseconv.storage import progress

H, W = 40, 60
KERNEL_7 = np.arange(1, 50, dtype=np.float64).reshape(7, 7) / 49.0  # halo 6: more than a 4-row tile
EVEN = np.arange(1, 25, dtype=np.float64).reshape(4, 6) / 10.0


def _frames(n=2, density=0.05, seed=3):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, H, W)) < density, rng.standard_normal((n, H, W)), 0).astype(np.float32)
    return x


def _result(target) -> np.ndarray:
    y = open_stack(str(target)).compute()
    return y.toarray() if scipy.sparse.issparse(y) else np.asarray(y)


def _check(target, x, kernel, mode, **op):
    ref = operate_stack(x, kernel, mode, **op)
    np.testing.assert_allclose(_result(target).reshape(ref.shape), ref, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiles")
    x = _frames()
    write_csr_stack(str(d / "x_csr.zarr"), scipy.sparse.csr_matrix(x.reshape(len(x), -1)), (H, W))
    # spatially chunked: 2 x 3 chunks of 20 x 20 per frame
    write_dense_stack(str(d / "x_dense.zarr"), x, chunks=(1, 20, 20))
    return d, x


OPS = [
    dict(boundary="fill", fillvalue=0.0, correlate=False),
    dict(boundary="fill", fillvalue=1.5, correlate=False),
    dict(boundary="wrap", fillvalue=0.0, correlate=False),
    dict(boundary="symm", fillvalue=0.0, correlate=True),
    dict(boundary="mirror", fillvalue=0.0, correlate=False),
    dict(boundary="nearest", fillvalue=0.0, correlate=True),
]
OP_IDS = ["zero", "fill1.5", "wrap", "symm-corr", "mirror", "nearest-corr"]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize("kernel", [KERNEL_7, EVEN], ids=["7x7", "4x6"])
def test_csr_bands_match_scipy(stores, tmp_path, mode, op, kernel):
    """CSR in and out: bands of 4 output rows, narrower than the kernel's halo."""
    d, x = stores
    src = str(d / "x_csr.zarr")
    plan = plan_job(src, kernel, mode, block_memory="12KiB", threads=2, **op)
    tiles = plan.blocks.tiles
    assert tiles is not None and tiles.bands and tiles.per_image >= 6
    if kernel is KERNEL_7:
        assert tiles.band_rows < kernel.shape[0] - 1
    summary = convolve_zarr(src, kernel, str(tmp_path / "y.zarr"), mode, block_memory="12KiB", **op)
    assert summary.blocks == plan.blocks.n_blocks
    assert summary.nnz_in == int(np.count_nonzero(x))  # each input nonzero counted once, halos and ghosts not
    _check(tmp_path / "y.zarr", x, kernel, mode, **op)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
def test_dense_2d_tiles_follow_the_chunk_grid(stores, tmp_path, mode, op):
    """Dense in (chunks 20 x 20) and dense out: 2-D tiles on the chunk grid,
    2 x 3 per frame in 'same' mode, each one output chunk."""
    d, x = stores
    src = str(d / "x_dense.zarr")
    plan = plan_job(src, KERNEL_7, mode, block_memory="16KiB", threads=2, **op)
    tiles = plan.blocks.tiles
    assert tiles is not None and (tiles.band_rows, tiles.band_cols) == (20, 20)
    if mode == "same":
        assert tiles.grid == (2, 3)
    summary = convolve_zarr(src, KERNEL_7, str(tmp_path / "y.zarr"), mode, block_memory="16KiB", **op)
    assert summary.nnz_in == int(np.count_nonzero(x))
    out = zarr.open_array(str(tmp_path / "y.zarr"))
    assert out.chunks == (1, 20, 20) and progress.provenance(out)["tiles"]["per_image"] == tiles.per_image
    _check(tmp_path / "y.zarr", x, KERNEL_7, mode, **op)


@pytest.mark.parametrize("out_fmt", ["csr", "dense"])
@pytest.mark.parametrize("src_fmt", ["csr", "dense"])
def test_halo_wider_than_two_tiles_across_formats(stores, tmp_path, src_fmt, out_fmt):
    """Tiles of 1 output row (or 5 x 10 pixels) with a 7 x 7 kernel: each
    window spans more than one tile's worth of input rows."""
    d, x = stores
    src = str(d / f"x_{src_fmt}.zarr")
    budget = {("csr", "csr"): "6KiB", ("csr", "dense"): "4KiB", ("dense", "csr"): "8KiB", ("dense", "dense"): "4KiB"}
    kw = dict(output_format=out_fmt, block_memory=budget[src_fmt, out_fmt])
    tiles = plan_job(src, KERNEL_7, "same", threads=2, **kw).blocks.tiles
    assert tiles is not None and min(tiles.band_rows, tiles.band_cols) < KERNEL_7.shape[0] - 1
    convolve_zarr(src, KERNEL_7, str(tmp_path / "y.zarr"), "same", **kw)
    _check(tmp_path / "y.zarr", x, KERNEL_7, "same")


def test_nonzeros_in_one_tile_and_empty_tiles(tmp_path):
    """A frame whose nonzeros all sit in one band: every other tile is empty
    (no values read, none written) and the output is exact."""
    x = np.zeros((1, 200, 50), np.float32)
    x[0, 120:126, 10:40] = np.arange(180, dtype=np.float32).reshape(6, 30) + 1
    src = str(tmp_path / "x.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(1, -1)), (200, 50))
    plan = plan_job(src, KERNEL_7, "same", block_memory="24KiB", threads=2)
    assert plan.blocks.tiles is not None and plan.blocks.tiles.per_image >= 4
    summary = convolve_zarr(src, KERNEL_7, str(tmp_path / "y.zarr"), "same", block_memory="24KiB")
    assert summary.nnz_in == int(np.count_nonzero(x))
    ref = operate_stack(x, KERNEL_7, "same")
    assert summary.nnz_out == int(np.count_nonzero(ref))
    np.testing.assert_allclose(_result(tmp_path / "y.zarr").reshape(ref.shape), ref, rtol=1e-5, atol=1e-4)
    empty = np.zeros((1, 200, 50), np.float32)
    write_csr_stack(str(tmp_path / "e.zarr"), scipy.sparse.csr_matrix(empty.reshape(1, -1)), (200, 50))
    convolve_zarr(str(tmp_path / "e.zarr"), KERNEL_7, str(tmp_path / "ye.zarr"), "same", block_memory="24KiB")
    assert _result(tmp_path / "ye.zarr").sum() == 0


@pytest.mark.parametrize("out_fmt", ["csr", "dense"])
def test_resume_after_an_interrupt_between_tiles(stores, tmp_path, out_fmt):
    """Only some block tasks of a tiled job run (what an interrupted run
    leaves); the next run skips the tiles written, computes the rest, and
    ends equal to scipy."""
    d, x = stores
    src = str(d / "x_dense.zarr")
    target = str(tmp_path / "y.zarr")
    kw = dict(output_format=out_fmt, block_memory="12KiB")
    graph = convolve_zarr(src, KERNEL_7, target, "same", compute=False, **kw)
    hlg = dict(graph.__dask_graph__())
    keys = sorted((k for k in hlg if isinstance(k, str) and k.startswith("sparseconv-block-")),
                  key=lambda k: int(k.rsplit("-", 1)[1]))
    assert len(keys) >= 8
    dask.get(hlg, keys[: len(keys) // 2])
    with pytest.raises(ValueError, match="incomplete"):
        open_stack(target)
    summary = convolve_zarr(src, KERNEL_7, target, "same", **kw)
    assert summary.resumed and summary.blocks_skipped >= len(keys) // 2 - 2 and summary.blocks_computed > 0
    assert summary.blocks_skipped + summary.blocks_computed == len(keys)
    _check(target, x, KERNEL_7, "same")


def test_a_sparse_huge_frame_runs_with_the_defaults(tmp_path):
    """One 12,000 x 12,000 frame of 60,000 scattered nonzeros with the
    default block budget: planned from its nonzeros (the bands sampled for
    the output estimate read a few rows, not the frame), cut into bands
    because its output does not fit 64 MiB, and exact against the in-memory
    engine on the whole frame (scipy on 144 Mpixel would take minutes)."""
    from dask_sparseconv import Convolver
    from dask_sparseconv.kernels import gaussian

    n_pix = 12_000
    rng = np.random.default_rng(5)
    idx = np.sort(rng.choice(n_pix * n_pix, 60_000, replace=False))
    frame = scipy.sparse.csr_matrix((rng.random(idx.size).astype(np.float32) + 0.5, idx, [0, idx.size]),
                                    shape=(1, n_pix * n_pix))
    src = str(tmp_path / "huge.zarr")
    write_csr_stack(src, frame, (n_pix, n_pix))
    k = gaussian(sigma=2.0)
    plan = plan_job(src, k, "same", threads=2)
    assert plan.blocks.tiles is not None and plan.blocks.tiles.bands
    summary = convolve_zarr(src, k, str(tmp_path / "out.zarr"), "same")
    y = open_stack(str(tmp_path / "out.zarr")).compute()
    ref = Convolver((n_pix, n_pix), k, mode="same")(frame, out="csr")
    assert y.shape == ref.shape and summary.nnz_out == ref.nnz
    assert abs(y - ref).max() <= 1e-6


def test_small_frames_are_not_tiled(stores):
    d, _ = stores
    assert plan_job(str(d / "x_csr.zarr"), KERNEL_7, "same", threads=2).blocks.tiles is None


def test_kernel_banks_and_ome_zarr_outputs_are_not_tiled(stores, tmp_path):
    """Tiles are not built for kernel banks or OME-Zarr outputs: such jobs
    keep the whole-image plan and its clear error when one image does not fit."""
    d, _ = stores
    bank = np.stack([KERNEL_7, KERNEL_7 * 2])
    with pytest.raises(ValueError, match="too small for one image.*not cut into tiles for kernel banks"):
        plan_job(str(d / "x_csr.zarr"), bank, "same", block_memory="4KiB", threads=2)
    with pytest.raises(ValueError, match="too small for one image"):
        plan_job(str(d / "x_dense.zarr"), KERNEL_7, "same", block_memory="4KiB", output_format="ome-zarr", threads=2)


@pytest.mark.parametrize("layout", ["zstd", "blosc-zstd", "none", "zarr2-zstd", "images-per-chunk-2"])
def test_window_reads_across_chunks_match_the_array(tmp_path, layout):
    """A spatially chunked dense input reads tile windows chunk by chunk
    through its per-process CSR cache, each chunk decoded straight into a
    reused buffer where its codecs allow (one compressor) and through zarr
    where not: every window (across chunk edges, partial edge chunks,
    clipped at the frame) equals the array's pixels, CSR windows of a CSR
    input too, and the cache stays within its bound."""
    from dask_sparseconv.storage import open_input

    rng = np.random.default_rng(7)
    x = np.where(rng.random((2, 45, 38)) < 0.2, rng.standard_normal((2, 45, 38)), 0).astype(np.float32)
    x[1, 16:32] = 0  # a row of chunks zarr does not store (all fill value)
    if layout == "zarr2-zstd":
        import numcodecs

        z = zarr.create_array(str(tmp_path / "d.zarr"), shape=x.shape, chunks=(1, 16, 10), dtype=x.dtype,
                              zarr_format=2, compressors=numcodecs.Zstd(level=1), fill_value=0)
        z[...] = x
    elif layout == "images-per-chunk-2":
        write_dense_stack(str(tmp_path / "d.zarr"), x, chunks=(2, 16, 10))
    else:
        write_dense_stack(str(tmp_path / "d.zarr"), x, chunks=(1, 16, 10),
                          compressor=None if layout == "none" else layout)
    write_csr_stack(str(tmp_path / "c.zarr"), scipy.sparse.csr_matrix(x.reshape(2, -1)), (45, 38))
    dense, csr = open_input(str(tmp_path / "d.zarr")), open_input(str(tmp_path / "c.zarr"))
    dense._TILE_CHUNK_CACHE_BYTES = 600  # a few chunks' CSR: eviction happens
    whole = open_input(str(tmp_path / "d.zarr"))
    whole._TILE_CHUNK_MAX_BYTES = 100  # chunks too large to decode whole: windows read through zarr
    for _ in range(60):
        image = int(rng.integers(0, 2))
        r0, c0 = (int(v) for v in rng.integers(-5, 40, 2))
        r1, c1 = r0 + int(rng.integers(1, 30)), c0 + int(rng.integers(1, 30))
        want = x[image, max(r0, 0):max(r0, 0) + max(0, min(r1, 45) - max(r0, 0)),
                 max(c0, 0):max(c0, 0) + max(0, min(c1, 38) - max(c0, 0))]
        for src in (dense, csr, whole):
            got = src.read_frame_rows(image, r0, r1, c0, c1)
            assert got.shape == want.shape and got.has_canonical_format
            np.testing.assert_array_equal(got.toarray(), want)
        cache = dense.__dict__["_tile_cache"]
        held = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in cache.values())
        assert len(cache) == 1 or held <= 600
    assert "_tile_cache" not in whole.__dict__


def _engines():
    from dask_sparseconv.engine import REGISTRY
    from dask_sparseconv.validation import module_available

    return [pair for pair in REGISTRY if pair[1] != "torch" or module_available("torch")]


@pytest.mark.parametrize("method, backend", _engines())
def test_every_engine_on_tiles(stores, tmp_path, method, backend):
    """Every method x backend (torch on CPU where installed) convolves the
    tiles' windows: bands of a CSR output and 2-D tiles of a dense one, a
    fold boundary and correlation, float64 out."""
    from dask_sparseconv.kernels import gaussian

    d, x = stores
    k = gaussian(sigma=1.0)  # rank 1: the separable method takes it too
    op = dict(boundary="symm", correlate=True)
    for src, out_fmt, budget in (("x_csr.zarr", "csr", "12KiB"), ("x_dense.zarr", "dense", "16KiB")):
        target = tmp_path / f"{out_fmt}.zarr"
        summary = convolve_zarr(str(d / src), k, str(target), "same", output_format=out_fmt, block_memory=budget,
                                method=method, backend=backend, dtype="float64", **op)
        assert summary.blocks >= 6 and summary.dtype == "float64"
        _check(target, x, k, "same", **op)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("mode", ["full", "same", "valid"])
@pytest.mark.parametrize("kernel", [KERNEL_7[:5, :5], EVEN], ids=["5x5", "4x6"])
def test_2_by_3_tiles_smaller_than_the_halo(tmp_path, mode, op, kernel):
    """A frame of 8 x 12 cut into 2 x 3 tiles of 4 x 4 output pixels (the
    plan's tile grid set by hand: so small a frame is never tiled by the
    planner, its halo would cost as much as the frame) with kernels whose
    halo (4 rows or 5 columns) spans more than one tile, odd and even, in
    every mode and boundary, written dense (2-D tiles) and CSR (bands)."""
    import dataclasses

    from dask_sparseconv.row_blocks import RowBlocks
    from dask_sparseconv.tiles import TileGrid

    rng = np.random.default_rng(11)
    x = np.where(rng.random((2, 8, 12)) < 0.4, rng.standard_normal((2, 8, 12)), 0).astype(np.float32)
    src = str(tmp_path / "x.zarr")
    write_dense_stack(src, x, chunks=(1, 4, 4))
    for out_fmt, shape in (("dense", (4, 4)), ("csr", (4, None)), ("csr", (1, 5))):
        plan = plan_job(src, kernel, mode, output_format=out_fmt, threads=2, **op)
        Ho, Wo = plan.out_shape
        grid = TileGrid(2, (8, 12), (Ho, Wo), shape[0], shape[1] or Wo)  # CSR: bands, or single rows cut in columns
        if mode == "same" and out_fmt == "dense":
            assert grid.grid == (2, 3)
        blocks = RowBlocks(grid.n_tiles, 2, 1, plan.settings.block_memory, 1000, tiles=grid)
        target = str(tmp_path / f"y_{out_fmt}_{shape[0]}.zarr")
        summary = convolve_zarr(src, kernel, target, mode, output_format=out_fmt,
                                plan=dataclasses.replace(plan, blocks=blocks), **op)
        assert summary.blocks == blocks.n_blocks and summary.nnz_in == int(np.count_nonzero(x))
        assert progress.provenance(zarr.open(target, mode="r"))["tiles"]["per_image"] == grid.per_image
        _check(target, x, kernel, mode, **op)


def test_the_lazy_convolve_computes_whole_images_and_says_so(stores):
    """convolve() on a store (or an array) whose image does not fit the
    budget is refused with a message naming the budget and pointing to
    convolve_zarr, which tiles; a lazy array is never planned in tiles."""
    from dask_sparseconv import convolve

    d, x = stores
    for src in (str(d / "x_csr.zarr"), str(d / "x_dense.zarr"), x):
        with pytest.raises(ValueError, match=r"block_memory=.*too small for one image.*convolve_zarr\(\) cuts images"):
            convolve(src, KERNEL_7, "same", block_memory="8KiB")
    lazy = convolve(str(d / "x_dense.zarr"), KERNEL_7, "same", block_memory="64KiB")
    ref = operate_stack(x, KERNEL_7, "same")
    np.testing.assert_allclose(np.asarray(lazy.compute()), ref, rtol=1e-5, atol=1e-4)


def test_resume_on_a_cluster_of_another_size_keeps_the_written_tiles(tmp_path):
    """A single frame is cut into more bands for more threads; a run planned
    for 1 thread, interrupted, is resumed by a plan for 8 threads: the
    resume takes the stored bands (they fit the budget), skips the tiles
    written, and ends exact."""
    from dask_sparseconv import Convolver
    from dask_sparseconv.kernels import gaussian
    from dask_sparseconv.sample_data import sample_raster

    frame = sample_raster((3000, 3000), 40_000, mean_cluster=30, seed=3)
    src, target = str(tmp_path / "r.zarr"), str(tmp_path / "y.zarr")
    write_csr_stack(src, frame, (3000, 3000))
    k = gaussian(sigma=1.0)
    one, eight = (plan_job(src, k, "same", block_memory="16MiB", threads=t) for t in (1, 8))
    assert one.blocks.tiles.band_rows > eight.blocks.tiles.band_rows  # more threads, more bands
    graph = convolve_zarr(src, k, target, "same", block_memory="16MiB", plan=one, compute=False)
    hlg = dict(graph.__dask_graph__())
    keys = sorted((key for key in hlg if isinstance(key, str) and key.startswith("sparseconv-block-")),
                  key=lambda key: int(key.rsplit("-", 1)[1]))
    dask.get(hlg, keys[:2])
    summary = convolve_zarr(src, k, target, "same", block_memory="16MiB", plan=eight)
    assert summary.resumed and summary.blocks == len(keys) and summary.blocks_skipped == 2
    y = open_stack(target).compute(scheduler="sync")
    ref = Convolver((3000, 3000), k, mode="same")(frame, out="csr")
    assert abs(scipy.sparse.csr_matrix(y) - ref).max() <= 1e-6


@pytest.mark.parametrize("in_dtype, dtype", [("uint16", None), ("int32", "float32"), ("bool", "float32"),
                                             ("float64", "float32")])
def test_input_dtypes_and_dtype_on_tiles(tmp_path, in_dtype, dtype):
    """Integer, boolean and float64 inputs, with and without a compute dtype,
    give on tiles what scipy gives on whole frames (dense and CSR out)."""
    rng = np.random.default_rng(2)
    x = ((rng.random((2, 40, 60)) < 0.1) * rng.integers(1, 50, (2, 40, 60))).astype(in_dtype)
    src = str(tmp_path / "x.zarr")
    write_dense_stack(src, x, chunks=(1, 20, 20))
    k = np.arange(1, 26, dtype=np.float64).reshape(5, 5) / 25
    ref = operate_stack(x.astype(np.float64), k, "same")
    for out_fmt in ("dense", "csr"):
        target = tmp_path / f"y_{out_fmt}.zarr"
        summary = convolve_zarr(src, k, str(target), "same", output_format=out_fmt, block_memory="20KiB", dtype=dtype)
        assert summary.blocks > 2 and summary.dtype == (dtype or "float64")
        tol = 1e-10 if dtype is None else 1e-4
        np.testing.assert_allclose(_result(target).reshape(ref.shape), ref, rtol=tol, atol=tol * 100)


def test_rows_too_wide_for_a_block_are_cut_into_columns(tmp_path):
    """A frame so wide that one output row with its halo does not fit the
    budget: CSR out gets single rows cut into columns (their values still
    in order), dense out 2-D tiles; both equal scipy. A CSR output refuses
    tiles that would not keep its values in order."""
    import dataclasses

    from dask_sparseconv.row_blocks import RowBlocks
    from dask_sparseconv.tiles import TileGrid

    rng = np.random.default_rng(4)
    x = np.where(rng.random((1, 9, 4000)) < 0.05, rng.standard_normal((1, 9, 4000)), 0).astype(np.float32)
    src = str(tmp_path / "wide.zarr")
    write_csr_stack(src, scipy.sparse.csr_matrix(x.reshape(1, -1)), (9, 4000))
    for out_fmt in ("csr", "dense"):
        plan = plan_job(src, KERNEL_7[:5, :5], "same", output_format=out_fmt, block_memory="48KiB", threads=2)
        tiles = plan.blocks.tiles
        assert tiles is not None and tiles.band_cols < 4000
        if out_fmt == "csr":
            assert tiles.band_rows == 1 and tiles.contiguous
        target = str(tmp_path / f"y_{out_fmt}.zarr")
        convolve_zarr(src, KERNEL_7[:5, :5], target, "same", output_format=out_fmt, block_memory="48KiB")
        _check(target, x, KERNEL_7[:5, :5], "same")
    plan = plan_job(src, KERNEL_7[:5, :5], "same", output_format="csr", threads=2)
    grid = TileGrid(1, (9, 4000), (9, 4000), 3, 1000)
    bad = dataclasses.replace(plan, blocks=RowBlocks(grid.n_tiles, 1, 1, plan.settings.block_memory, 1000,
                                                     tiles=grid))
    with pytest.raises(ValueError, match="whole-width bands or single rows"):
        convolve_zarr(src, KERNEL_7[:5, :5], str(tmp_path / "bad.zarr"), "same", output_format="csr", plan=bad)
    assert not (tmp_path / "bad.zarr").exists()
