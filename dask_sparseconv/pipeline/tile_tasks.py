"""The work of one block of tiles (:mod:`dask_sparseconv.tiles`): for each
tile, read its input window, convolve it, place the result.

A tile of output rows ``[y0, y1)`` depends on rows ``[y0 + top - kH + 1,
y1 + top)`` of the *padded* frame (the boundary's padding included) and on
columns ``[left - kW + 1, W_out + left)``. That window, convolved in
``'valid'`` mode with the kernel as the engines apply it (flipped for
correlation), is exactly the tile's output in the requested mode: the same
arithmetic the whole frame would get, so results match ``scipy.signal``
bit for bit in layout and to rounding in value. The padding is made here,
only for the window:

* zero fill (the default): the input rows inside the frame, shifted;
* a nonzero ``fillvalue``: plus the constant at every padded position of
  the window (only tiles at the frame's edges have any);
* a fold (``wrap``, ``symm``, ``mirror``, ``nearest``): each padded row and
  column maps back to the input one it copies
  (:data:`dask_sparseconv.boundaries.FOLDS`); the distinct input rows are
  read in runs, so a wrapped top tile reads the frame's last rows, not the
  whole frame.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from ..boundaries import FOLDS
from ..geometry import Geometry
from ..operation import DEFAULT
from ..tiles import TileGrid, as_one_image
from .spec import BlockSpec


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: maximal runs of consecutive values."""
    cuts = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    return [(int(p[0]), int(p[-1]) + 1) for p in np.split(sorted_rows, cuts)]


def _owned(y0: int, y1: int, n_out: int, n_in: int, offset: int) -> tuple[int, int]:
    """The input rows (or columns) a tile of output rows ``[y0, y1)`` counts
    as its own: from where the previous tile's window ends to where its own
    ends (the first tile from 0, the last to the frame's end), so that the
    tiles of an image count each input nonzero once."""
    return (0 if y0 == 0 else y0 + offset), (n_in if y1 >= n_out else y1 + offset)


def _count_in(m: scipy.sparse.csr_matrix, row_ids: np.ndarray, col_ids: np.ndarray, rows: tuple[int, int],
              cols: tuple[int, int]) -> int:
    """Stored values of ``m`` whose frame row and column (``row_ids``/``col_ids``
    of its rows and columns) lie in ``rows`` x ``cols``."""
    if m.nnz == 0:
        return 0
    r = np.repeat(row_ids, np.diff(m.indptr))
    c = col_ids[m.indices]
    return int(np.count_nonzero((r >= rows[0]) & (r < rows[1]) & (c >= cols[0]) & (c < cols[1])))


def tile_window(src, grid: TileGrid, geo: Geometry, spec: BlockSpec, image: int, y0: int, y1: int, x0: int,
                x1: int) -> tuple[scipy.sparse.csr_matrix, int]:
    """The padded input window of output pixels ``[y0, y1) x [x0, x1)`` of
    ``image``: 2-D CSR ``(y1 - y0 + kH - 1, x1 - x0 + kW - 1)``, and the
    input nonzeros the tile counts as its own (each nonzero of the frame is
    counted by one tile, halos and ghosts by none)."""
    H, W = grid.frame_shape
    Ho, Wo = grid.out_shape
    r0, r1, c0, c1 = grid.window(y0, y1, x0, x1, geo)
    own = _owned(y0, y1, Ho, H, geo.top), _owned(x0, x1, Wo, W, geo.left)
    shape = (r1 - r0, c1 - c0)
    op = spec.operation
    fold = FOLDS[op.boundary]
    if fold is None:
        part = src.read_frame_rows(image, r0, r1, c0, c1)  # the window clipped to the frame
        top, left = max(r0, 0) - r0, max(c0, 0) - c0
        n_own = _count_in(part, np.arange(max(r0, 0), max(r0, 0) + part.shape[0]),
                          np.arange(max(c0, 0), max(c0, 0) + part.shape[1]), *own)
        indptr = np.concatenate((np.zeros(top, np.int64), np.asarray(part.indptr, np.int64),
                                 np.full(shape[0] - top - part.shape[0], part.nnz, np.int64)))
        win = scipy.sparse.csr_matrix((part.data, np.asarray(part.indices, np.int64) + left, indptr), shape=shape)
        if op.fillvalue:
            win = win + _fill_positions(r0, r1, c0, c1, H, W, op.fillvalue, part.dtype)
        return win, n_own
    rows = fold(np.arange(r0, r1, dtype=np.int64), H)
    cols = fold(np.arange(c0, c1, dtype=np.int64), W)
    # the distinct input rows and columns the window copies, read in runs
    # (a wrapped corner tile reads the frame's far edges, not the frame)
    want_r, want_c = np.unique(rows), np.unique(cols)
    runs_c = _runs(want_c)
    parts = [scipy.sparse.hstack([src.read_frame_rows(image, a, b, ca, cb) for ca, cb in runs_c], format="csr")
             for a, b in _runs(want_r)]
    band = scipy.sparse.csr_matrix(parts[0] if len(parts) == 1 else scipy.sparse.vstack(parts, format="csr"))
    n_own = _count_in(band, want_r, want_c, *own)
    return scipy.sparse.csr_matrix(band[np.searchsorted(want_r, rows)][:, np.searchsorted(want_c, cols)]), n_own


def _fill_positions(r0, r1, c0, c1, H, W, value, dtype) -> scipy.sparse.csr_matrix:
    """``value`` at the window's padded positions (outside the frame), as
    CSR: whole rows above and below the frame, the side columns in between."""
    w = c1 - c0
    side = np.concatenate((np.arange(0, max(0, -c0)), np.arange(max(0, W - c0), w))).astype(np.int64)
    outside = (np.arange(r0, r1) < 0) | (np.arange(r0, r1) >= H)
    per_row = np.where(outside, w, side.size)
    indptr = np.concatenate(([0], np.cumsum(per_row))).astype(np.int64)
    indices = np.concatenate([np.arange(w, dtype=np.int64) if o else side for o in outside]) if outside.size else \
        np.empty(0, np.int64)
    data = np.full(indices.size, value, dtype=np.result_type(dtype, np.float32))
    return scipy.sparse.csr_matrix((data, indices, indptr), shape=(r1 - r0, w))


def tile_convolver(spec: BlockSpec, kernel: np.ndarray, window_shape: tuple[int, int]):
    """The worker's cached convolver for a window: ``'valid'`` mode, the kernel as applied."""
    from .tasks import block_convolver

    return block_convolver(spec, spec.operation.engine_kernel(kernel), frame_shape=window_shape, mode="valid",
                           operation=DEFAULT)


def convolve_tiles(src, spec: BlockSpec, kernel: np.ndarray, start: int, stop: int):
    """Tiles ``[start, stop)``: ``(their own input nonzeros, result, convolver)``.

    The result is CSR ``(stop - start, H_out*W_out)`` for CSR outputs (each
    band's values at their columns in the whole output frame: a tile's row
    holds only its band), dense ``(stop - start, band_rows, band_cols)`` for
    dense outputs (tiles at the frame's far edges zero-padded)."""
    grid = spec.tiles
    if grid is None:
        raise ValueError("convolve_tiles needs a job planned in tiles (spec.tiles)")
    geo = spec.geometry(kernel)
    Ho, Wo = grid.out_shape
    dense = spec.out_format == "dense"
    out = np.zeros((stop - start, grid.band_rows, grid.band_cols) if dense else (0, 0, 0), dtype=spec.dtype)
    rows: list[scipy.sparse.csr_matrix] = []
    nnz_in = 0
    conv = None
    for k, u in enumerate(range(start, stop)):
        image, y0, y1, x0, x1 = grid.tile(u)
        win, own = tile_window(src, grid, geo, spec, image, y0, y1, x0, x1)
        nnz_in += own
        conv = tile_convolver(spec, kernel, win.shape)
        if dense:
            res = conv(as_one_image(win), out="dense", batched=True)
            out[k, : y1 - y0, : x1 - x0] = np.asarray(res).reshape(y1 - y0, x1 - x0)
        else:  # the tile's row-major positions in the whole output frame (increasing, as CSR needs)
            res = scipy.sparse.csr_matrix(conv(as_one_image(win), out="csr", batched=True))
            res.sum_duplicates()
            local = np.asarray(res.indices, np.int64)
            w = x1 - x0
            flat = (y0 + local // w) * Wo + x0 + local % w
            rows.append(scipy.sparse.csr_matrix((res.data, flat, np.array([0, res.nnz])), shape=(1, Ho * Wo)))
    if dense:
        return nnz_in, out, conv
    return nnz_in, scipy.sparse.vstack(rows, format="csr"), conv
