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
  view (100,000 pixels) is a few MB at most;
* **2-D tiles**, for dense outputs of spatially chunked inputs: tiles follow
  the input's chunk grid (a chunk, or an equal part of one), so that each
  input chunk is decompressed by the tiles inside it plus the neighbours
  whose halo reaches it, and each tile writes one output chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .geometry import Geometry


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
        """Whether tiles span the whole output width (as a CSR output needs)."""
        return self.band_cols >= self.out_shape[1]

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


__all__ = ["TileGrid", "chunk_tile", "equal_parts", "largest_fit"]
