"""Estimates the planner sizes blocks by, sampled from the data on the
client: nonzeros per image (dense stores) and output nonzeros per input
nonzero (CSR outputs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse

from ..geometry import output_support

#: Safety factor on a sampled density (other chunks may be denser).
_DENSITY_SAFETY = 2.0


#: CSR output estimate: at most this many images are sampled, holding at most
#: this many units of counting work (nonzeros x the kernel's row intervals, a
#: bound of support_counts' runs x intervals) and output pixels, so sampling
#: stays a small cost on the client; and the safety factor on the sampled
#: ratio (other parts of the stack may spread more). Counting by taps (as
#: before runs were counted) left no image of 370 nonzeros under the limit
#: with a 19 x 19 kernel, and such jobs were planned for the worst case.
_EXPANSION_SAMPLE_IMAGES = 16
_EXPANSION_MAX_POSITIONS = 1 << 16
_EXPANSION_MAX_PIXELS = 1 << 23
_EXPANSION_SAFETY = 2.0


def sample_rows(n_images: int, geo) -> int:
    """Images per sample of the output estimate (0: frames too large to sample)."""
    return min(_EXPANSION_SAMPLE_IMAGES, n_images, _EXPANSION_MAX_PIXELS // max(1, geo.out_pixels))


def sample_expansion(samples, kernel: np.ndarray, geo) -> float | None:
    """Output nonzeros per input nonzero, estimated from the first sample
    (CSR row blocks, taken lazily from ``samples``) that holds nonzeros,
    times a safety factor and never above the kernel's tap count (the worst
    case, right for scattered pixels; clustered ones reach far fewer output
    pixels: ~2 per input pixel for the ROI benchmark's disks with 49 taps).

    Only the first images of a sample that fit the limits above are used.
    ``None`` when no sample holds nonzeros, or one image alone is over the
    limits: the planner then assumes the worst case. A kernel bank
    ``(K, kH, kW)`` gives the mean over its kernels."""
    from ..engine.support import kernel_row_intervals

    if kernel.ndim == 3:
        # a kernel bank: the mean of its kernels' expansions on the same
        # samples (the planner multiplies by K), not K times the largest
        blocks = list(samples)
        each = [sample_expansion(blocks, k, geo) for k in kernel]
        known = [e for e in each if e is not None]
        return float(np.mean(known)) if len(known) == len(each) else None
    taps = int(np.count_nonzero(kernel))
    if taps == 0:
        return None
    intervals = max(1, int(kernel_row_intervals(kernel)[0].size))
    for block in samples:
        block = block[: sample_rows(block.shape[0], geo)]
        if block.nnz == 0:
            continue
        fit = int(np.searchsorted(block.indptr, _EXPANSION_MAX_POSITIONS // intervals, side="right")) - 1
        if fit < 1:
            return None
        block = block[:fit]
        if block.nnz:
            return min(float(taps), _EXPANSION_SAFETY * output_support(block, kernel, geo) / block.nnz)
    return None


def sample_starts(n_images: int, rows: int) -> list[int]:
    """Where the samples of a stack begin: its start, then its middle."""
    return list(dict.fromkeys((0, max(0, min(n_images // 2, n_images - rows)))))


def matrix_expansion(csr: scipy.sparse.csr_matrix, kernel: np.ndarray, geo) -> float | None:
    """:func:`sample_expansion` of an in-memory CSR stack ``(n, H*W)``
    (frames too large to sample whole: sampled in bands of rows, as a store
    of the same stack would be, so that both plan alike)."""
    n = int(csr.shape[0])
    rows = sample_rows(n, geo)
    if rows:
        return sample_expansion((csr[a:a + rows] for a in sample_starts(n, rows)), kernel, geo)
    if n == 0 or csr.nnz == 0:
        return None
    samples, sample_geo, _ = frame_samples(MatrixFrames(csr, geo.frame_shape), geo)
    return sample_expansion(samples, kernel, sample_geo)


class MatrixFrames:
    """An in-memory CSR stack ``(n, H*W)`` read by rows of its frames, as
    :func:`frame_samples` reads a store (canonical CSR: sorted indices)."""

    def __init__(self, csr: scipy.sparse.csr_matrix, frame_shape: tuple[int, int]):
        self.csr = csr
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.n_images = int(csr.shape[0])

    def read_frame_rows(self, image: int, r0: int, r1: int) -> scipy.sparse.csr_matrix:
        H, W = self.frame_shape
        from ..tiles import band_csr

        r0, r1 = max(0, int(r0)), min(H, int(r1))
        a, b = int(self.csr.indptr[image]), int(self.csr.indptr[image + 1])
        idx = np.asarray(self.csr.indices[a:b], dtype=np.int64)
        lo, hi = np.searchsorted(idx, [r0 * W, r1 * W])
        return band_csr(self.csr.data[a + lo: a + hi], idx[lo:hi] - r0 * W, max(0, r1 - r0), W)


#: Frames too large to sample whole (see sample_rows) are sampled in this
#: many bands of rows, spread evenly down the first and the middle image,
#: holding _EXPANSION_MAX_PIXELS pixels in all; and a dense store's chunks
#: are read whole for its density only up to this many bytes.
_FRAME_SAMPLE_BANDS = 8
_DENSE_SAMPLE_MAX_BYTES = 64 << 20


def frame_samples(src, geo) -> tuple[list[scipy.sparse.csr_matrix], Any, int]:
    """Bands of rows sampled from frames too large to sample whole:
    ``(samples, their geometry, pixels read)``. Each sample is one band as
    a one-image CSR ``(1, rows*W)`` of a frame of ``rows x W`` pixels; the
    geometry is ``'full'`` mode on such a frame, which counts every output
    pixel a sampled nonzero reaches (the band's edges cut no reach short)."""
    from ..geometry import geometry

    H, W = (int(v) for v in src.frame_shape)
    n = int(src.n_images)
    images = sorted({0, n // 2})
    per_band = max(1, min(H, _EXPANSION_MAX_PIXELS // (W * _FRAME_SAMPLE_BANDS * len(images))))
    starts = sorted({int(r) for r in np.linspace(0, H - per_band, _FRAME_SAMPLE_BANDS)})
    from ..tiles import as_one_image

    samples = [as_one_image(src.read_frame_rows(image, r, r + per_band)) for image in images for r in starts]
    sample_geo = geometry((per_band, W), geo.kernel_shape, "full")
    return samples, sample_geo, len(samples) * per_band * W


def source_estimates(src, kernel: np.ndarray, geo, out_format: str) -> tuple[float | None, float | None]:
    """``(nonzeros per image, output nonzeros per input nonzero)`` of a store
    source, for sizing its row blocks and choosing how dense-output blocks
    are computed (either may be None: unknown).

    CSR stores know their nonzeros; their sparsity pattern (``indptr`` and
    ``indices``, no values) is sampled for the output estimate, which only
    CSR outputs need. A dense store's nonzeros per image come from its first
    and middle chunk (read on the client, times a safety factor: reading two
    chunks is cheap next to the job, and far better than assuming every pixel
    is nonzero, which would make blocks several times too small and split
    input chunks needlessly); the output estimate reuses those chunks.

    Frames too large to sample whole (tens of megapixels and up) are sampled
    in bands of rows (:func:`frame_samples`): only those rows are read, so
    planning a 100,000 x 100,000 frame reads a few MB, not the frame.
    """
    n = int(src.n_images)
    if n == 0:
        return None, None
    # the expansion also serves dense outputs: block tasks scatter a sparse
    # result into the dense block instead of convolving densely (pipeline/tasks.py)
    rows = sample_rows(n, geo)
    huge = not rows and hasattr(src, "read_frame_rows")
    if src.nnz is not None:
        if huge:
            samples, sample_geo, _ = frame_samples(src, geo)
            return src.nnz / n, sample_expansion(samples, kernel, sample_geo)
        if not rows:
            return src.nnz / n, None
        patterns = (src.read_pattern(a, a + rows) for a in sample_starts(n, rows))
        return src.nnz / n, sample_expansion(patterns, kernel, geo)
    c = max(1, int(src.chunk_rows))
    H, W = (int(v) for v in src.frame_shape)
    if hasattr(src, "read_frame_rows") and c * H * W * np.dtype(src.dtype).itemsize > _DENSE_SAMPLE_MAX_BYTES:
        samples, sample_geo, pixels = frame_samples(src, geo)
        nnz_per_image = _DENSITY_SAFETY * sum(int(b.nnz) for b in samples) / pixels * H * W
        return nnz_per_image, sample_expansion(samples, kernel, sample_geo)
    # numpy, not the compiled reader: the client plans without loading compiled code (~0.3 s)
    blocks = [src.read_block(a, min(a + c, n), compiled=False) for a in sorted({0, ((n // c) // 2) * c})]
    rows_read = sum(blk.shape[0] for blk in blocks)
    nnz_per_image = _DENSITY_SAFETY * sum(int(blk.nnz) for blk in blocks) / rows_read
    return nnz_per_image, (sample_expansion(blocks, kernel, geo) if rows else None)
