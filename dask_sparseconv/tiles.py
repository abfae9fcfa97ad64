"""Frames larger than a block: each image cut into tiles of output pixels.

When one image (its input as read, its output, the engine's scratch) does
not fit the block budget, the unit of work becomes a *tile*: a rectangle of
``band_rows x band_cols`` output pixels of one image. A tile reads only the
input pixels its outputs depend on, its own plus the kernel's halo
(``kH - 1`` rows, ``kW - 1`` columns), and is computed as a ``'valid'``
convolution of that window, so every mode, boundary and operation gives
exactly what the whole frame would (see
:mod:`dask_sparseconv.pipeline.tile_tasks`).

Tiles are numbered image by image, row-major: tile ``u`` of an image with
``Ty x Tx`` tiles is image ``u // (Ty*Tx)``, tile row ``t // Tx``, tile
column ``t % Tx``. The row blocks of the pipeline then simply count tiles
instead of images. Two shapes:

* **bands** (``band_cols == W_out``), for CSR outputs: a band's values are a
  contiguous run of the image's CSR row (indices are row-major), so the CSR
  writer's chain needs no change; one output row of the widest frames in
  view (100,000 pixels) is a few MB at most. When not even one output row
  fits, tiles are single rows cut into columns, whose values are still
  contiguous and in order;
* **2-D tiles**, for dense outputs of spatially chunked inputs: tiles follow
  the input's chunk grid (a chunk, or an equal part of one), so that each
  input chunk is decompressed by the tiles inside it plus the neighbours
  whose halo reaches it, and each tile writes one output chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse

from .geometry import Geometry
from .row_blocks import RowBlocks, plan_row_blocks


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``band_rows x band_cols`` output pixels, ``Ty x Tx`` per image.

    Attributes
    ----------
    n_images : int
    frame_shape : (int, int)
        Input ``(H, W)``.
    out_shape : (int, int)
        Output ``(H_out, W_out)``.
    band_rows, band_cols : int
        Output rows and columns per tile (the last tile row or column of an
        image may be smaller); ``band_cols == W_out`` for bands.
    band_limit : int
        The most output rows per band that fit the block budget (bands only;
        a resume may reuse any band height up to it).
    """

    n_images: int
    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    band_rows: int
    band_cols: int
    band_limit: int = field(default=0, compare=False)

    @property
    def grid(self) -> tuple[int, int]:
        """``(Ty, Tx)``: tile rows and tile columns per image."""
        return -(-self.out_shape[0] // self.band_rows), -(-self.out_shape[1] // self.band_cols)

    @property
    def per_image(self) -> int:
        """Tiles per image (``Ty * Tx``)."""
        ty, tx = self.grid
        return ty * tx

    @property
    def bands(self) -> bool:
        """Whether tiles span the whole output width."""
        return self.band_cols >= self.out_shape[1]

    @property
    def contiguous(self) -> bool:
        """Whether tiles in order hold the output's values in order (whole-width
        bands, or single rows cut into columns), as a CSR output needs."""
        return self.bands or self.band_rows == 1

    @property
    def n_tiles(self) -> int:
        return self.n_images * self.per_image

    def tile(self, u: int) -> tuple[int, int, int, int, int]:
        """``(image, y0, y1, x0, x1)``: the output pixels ``[y0, y1) x [x0, x1)`` of tile ``u``."""
        image, t = divmod(int(u), self.per_image)
        ty, tx = divmod(t, self.grid[1])
        y0, x0 = ty * self.band_rows, tx * self.band_cols
        return image, y0, min(self.out_shape[0], y0 + self.band_rows), x0, min(self.out_shape[1], x0 + self.band_cols)

    @staticmethod
    def window(y0: int, y1: int, x0: int, x1: int, geo: Geometry) -> tuple[int, int, int, int]:
        """``(r0, r1, c0, c1)``: the pixels of the padded input frame that
        output pixels ``[y0, y1) x [x0, x1)`` depend on (they may reach
        outside the frame: the boundary's padding)."""
        kh, kw = geo.kernel_shape
        return y0 + geo.top - kh + 1, y1 + geo.top, x0 + geo.left - kw + 1, x1 + geo.left

    def as_attrs(self) -> dict:
        """The provenance entry (part of the output's layout: a resume compares it)."""
        return {"band_rows": self.band_rows, "band_cols": self.band_cols, "per_image": self.per_image}

    def describe(self) -> str:
        ty, tx = self.grid
        return (f"{self.per_image} tiles of up to {self.band_rows} x {self.band_cols} output pixels per image "
                f"({ty} x {tx}; {self.n_tiles} in all)")


def largest_fit(limit: int, fits: Callable[[int], bool]) -> int:
    """The largest ``v`` in ``[1, limit]`` with ``fits(v)`` (``fits``
    non-increasing in ``v``), or 0 when not even 1 fits."""
    if not fits(1):
        return 0
    lo, hi = 1, max(1, int(limit))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def equal_parts(total: int, most: int) -> int:
    """The size of the fewest equal parts of ``total``, each at most ``most``."""
    return -(-int(total) // -(-int(total) // max(1, int(most))))


def chunk_tile(chunk: tuple[int, int], fits: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """A 2-D tile on an input chunk grid: the chunk itself, or the chunk cut
    in halves (the longer side first) until ``fits(rows, cols)``; ``None``
    when not even a 1 x 1 part fits."""
    rows, cols = (max(1, int(c)) for c in chunk)
    while not fits(rows, cols):
        if rows == cols == 1:
            return None
        if rows >= cols:
            rows = -(-rows // 2)
        else:
            cols = -(-cols // 2)
    return rows, cols


def band_csr(data: np.ndarray, flat: np.ndarray, rows: int, width: int, index_dtype=np.int64) -> scipy.sparse.csr_matrix:
    """Rows of a frame as 2-D CSR ``(rows, width)`` from their values and
    sorted row-major positions ``flat`` counted from the band's first pixel
    (what a frame's sorted CSR indices give for a range of its rows)."""
    flat = np.asarray(flat, dtype=np.int64)
    indptr = np.searchsorted(flat, np.arange(rows + 1, dtype=np.int64) * width)
    cols = flat - np.repeat(np.arange(rows, dtype=np.int64) * width, np.diff(indptr))
    return scipy.sparse.csr_matrix((data, cols.astype(index_dtype), indptr.astype(index_dtype)), shape=(rows, width),
                                   copy=False)


def as_one_image(window: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """A 2-D window ``(h, w)`` as one flattened image ``(1, h*w)`` in row-major
    order (what the engines convolve), duplicates summed."""
    h, w = window.shape
    window = scipy.sparse.csr_matrix(window)
    window.sum_duplicates()
    flat = np.repeat(np.arange(h, dtype=np.int64), np.diff(window.indptr)) * w + window.indices
    return scipy.sparse.csr_matrix((window.data, flat, np.array([0, flat.size])), shape=(1, h * w))


#: Safety factor on a tile's share of an image's nonzeros (a band of a
#: clustered raster may be denser than the image on average)
TILE_DENSITY_SAFETY = 2.0


def plan_tiles(n_images: int, frame_shape: tuple[int, int], out_shape: tuple[int, int], kernel_shape: tuple[int, int],
               block_memory: int, min_blocks: int, cost: Callable, nnz_per_image: float | None, fill_nnz: int,
               out_format: str, spatial_chunk: tuple[int, int] | None) -> RowBlocks:
    """Blocks of tiles for images that do not fit ``block_memory`` (the
    planner's :func:`~dask_sparseconv.pipeline.plan.plan_blocks` calls it).

    ``cost(frame, out, nnz, fill_nnz)``: the planner's estimate of what one
    image of ``frame`` input and ``out`` output pixels holding ``nnz``
    nonzeros needs; a tile is costed as such an image, its input window
    with the halo, its share of the image's nonzeros times
    :data:`TILE_DENSITY_SAFETY`. Bands for CSR outputs (and dense outputs of
    inputs not chunked in space), 2-D tiles on the input's chunk grid for
    dense outputs of spatially chunked inputs (``spatial_chunk``); a few
    huge frames get bands small enough for ``min_blocks`` blocks.

    Raises
    ------
    ValueError
        When not even the smallest tile fits, naming the budget and the minimum.
    """
    H, W = frame_shape
    Ho, Wo = out_shape
    kh, kw = kernel_shape

    def tile_bytes(rows: int, cols: int) -> int:
        window = (rows + kh - 1, cols + kw - 1)
        share = min(1.0, TILE_DENSITY_SAFETY * window[0] * window[1] / (H * W))
        nnz = None if nnz_per_image is None else nnz_per_image * share
        # the window as read, then padded and flattened: two more copies of its nonzeros
        held = 0 if nnz is None else int(2 * nnz * 16)
        return cost(window, (rows, cols), nnz, int(fill_nnz * min(1.0, rows * cols / (Ho * Wo)))) + held

    def fits(rows: int, cols: int) -> bool:
        return tile_bytes(rows, cols) <= block_memory

    limit = largest_fit(Ho, lambda rows: fits(rows, Wo))
    ch, cw = spatial_chunk or (0, 0)
    if out_format == "dense" and (0 < cw < W or not limit):
        # 2-D tiles on the input's chunk grid (or on the whole frame when it has none)
        shape = chunk_tile((ch, cw) if 0 < cw < W else (Ho, Wo), fits)
        if shape is None:
            raise _too_small(block_memory, tile_bytes(1, 1), "one output pixel")
        rows, cols = shape
    elif not limit:
        # not even one output row fits: rows cut into columns, one row per tile,
        # whose values are still contiguous (in order) in a CSR output
        cols = largest_fit(Wo, lambda c: fits(1, c))
        if not cols:
            raise _too_small(block_memory, tile_bytes(1, 1), "one output pixel")
        rows, cols = 1, equal_parts(Wo, cols)
    else:
        # whole input chunks per band when they fit, else equal bands
        rows, cols = ((limit // ch) * ch if 1 < ch <= limit else equal_parts(Ho, limit)), Wo
        if n_images < min_blocks:  # a few huge frames: bands small enough to keep every thread busy
            rows = min(rows, equal_parts(Ho, -(-Ho * n_images // min_blocks)))
    grid = TileGrid(int(n_images), (int(H), int(W)), (int(Ho), int(Wo)), int(rows), int(cols),
                    int(limit) if cols == Wo else 0)
    blocks = plan_row_blocks(grid.n_tiles, 1, tile_bytes(rows, cols), block_memory, min_blocks=min_blocks,
                             strict_chunks=False)
    return dataclasses.replace(blocks, tiles=grid)


def _too_small(block_memory: int, need: int, what: str) -> ValueError:
    from dask.utils import format_bytes

    return ValueError(
        f"block_memory={block_memory} bytes ({format_bytes(block_memory)}) is too small even for the smallest tile "
        f"of an image: {what} with its kernel's halo needs about {need} bytes ({format_bytes(need)}); "
        f"use block_memory >= {need}")


__all__ = ["TILE_DENSITY_SAFETY", "TileGrid", "as_one_image", "band_csr", "chunk_tile", "equal_parts", "largest_fit",
           "plan_tiles"]
