"""Frames larger than a block: each image cut into bands of output rows.

When one image (its input as read, its output, the engine's scratch) does
not fit the block budget, the unit of work becomes a *tile*: a band of
``band_rows`` output rows of one image, across its whole width. A tile reads
only the input rows its outputs depend on, the band plus the kernel's halo
(``kH - 1`` rows), and is computed as a ``'valid'`` convolution of that
window, so every mode, boundary and operation gives exactly what the whole
frame would (see :mod:`dask_sparseconv.pipeline.tile_tasks`).

Tiles are numbered image by image, top band first: tile ``u`` is band
``u % T`` of image ``u // T`` (``T`` bands per image). In that order a tile's
output values are a contiguous run of the CSR output (indices are row-major),
and in a dense output each tile is one chunk ``(1, band_rows, W_out)``. Row
blocks of the pipeline then simply count tiles instead of images.

Why full-width bands and not a 2-D grid: a band's values are contiguous in a
CSR output, so the CSR writer's chain needs no change, and one band of the
largest frames in view (100,000 pixels wide) holds a few MB per output row
at most, well inside a block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .geometry import Geometry


@dataclass(frozen=True)
class TileGrid:
    """Bands of output rows: ``T = ceil(H_out / band_rows)`` tiles per image.

    Attributes
    ----------
    n_images : int
    frame_shape : (int, int)
        Input ``(H, W)``.
    out_shape : (int, int)
        Output ``(H_out, W_out)``.
    band_rows : int
        Output rows per tile (the last tile of an image may have fewer).
    band_limit : int
        The most output rows per band that fit the block budget.
    """

    n_images: int
    frame_shape: tuple[int, int]
    out_shape: tuple[int, int]
    band_rows: int
    #: the most rows a band may have within the budget (a resume may reuse any band up to it)
    band_limit: int = field(default=0, compare=False)

    @property
    def per_image(self) -> int:
        """Tiles per image (``T``)."""
        return -(-self.out_shape[0] // self.band_rows)

    @property
    def n_tiles(self) -> int:
        return self.n_images * self.per_image

    def tile(self, u: int) -> tuple[int, int, int]:
        """``(image, first output row, stop output row)`` of tile ``u``."""
        image, t = divmod(int(u), self.per_image)
        y0 = t * self.band_rows
        return image, y0, min(self.out_shape[0], y0 + self.band_rows)

    def window_rows(self, y0: int, y1: int, geo: Geometry) -> tuple[int, int]:
        """Rows ``[r0, r1)`` of the padded input frame that output rows
        ``[y0, y1)`` depend on (may reach outside ``[0, H)``: the padding)."""
        kh = geo.kernel_shape[0]
        return y0 + geo.top - kh + 1, y1 + geo.top

    def as_attrs(self) -> dict:
        """The provenance entry (part of the output's layout: a resume compares it)."""
        return {"band_rows": self.band_rows, "per_image": self.per_image}

    def describe(self) -> str:
        return (f"{self.per_image} tiles of {self.band_rows} x {self.out_shape[1]} output pixels per image "
                f"({self.n_tiles} in all)")


def plan_band_rows(out_rows: int, band_bytes: Callable[[int], int], budget: int, *,
                   chunk_rows: int | None = None) -> int | None:
    """The most output rows per band whose estimate fits ``budget``
    (``band_bytes(rows)``, non-decreasing), aligned down to a multiple of
    ``chunk_rows`` (the input's spatial chunk height) when at least one
    such multiple fits, so that bands read whole input chunks; ``None``
    when not even one row fits."""
    if band_bytes(1) > budget:
        return None
    lo, hi = 1, max(1, int(out_rows))
    while lo < hi:  # the largest rows with band_bytes(rows) <= budget
        mid = (lo + hi + 1) // 2
        if band_bytes(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if chunk_rows and 1 < chunk_rows <= lo:
        lo = (lo // chunk_rows) * chunk_rows
    # equal bands: the same rows for each, the last no smaller than needed
    bands = math.ceil(out_rows / lo)
    return -(-int(out_rows) // bands) if not chunk_rows or chunk_rows <= 1 or chunk_rows > lo else lo


__all__ = ["TileGrid", "plan_band_rows"]
