"""Cut an image stack into row blocks: the unit of work of the pipeline.

A *row block* is a contiguous range of images ``[start, stop)``. One block is
read, convolved and written by one dask task, so its size is a trade-off:

* **memory** — a task holds the block's input, its output and the engine's
  scratch at once; :func:`image_bytes` estimates that per image and the block
  gets as many images as fit in ``block_memory`` (default 64 MiB);
* **I/O alignment** — a block is a whole number of input chunks whenever the
  budget allows, so no input chunk is read (and decompressed) by two tasks;
  when one input chunk alone exceeds the budget it is split into equal parts
  (a divisor of the chunk size, so the splits still line up with chunks);
* **parallelism** — with ``min_blocks`` the blocks are made small enough that
  there are at least that many, so a small stack still keeps every worker
  busy (for dense stores never below one input chunk because of this rule
  alone: see ``strict_chunks``).

Blocks are uniform except the last one, which is shorter when the block size
does not divide the number of images. Dense outputs are chunked by block
(``(block_rows, H_out, W_out)`` chunks), so every block writes whole output
chunks and no two tasks ever write the same chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

#: Default memory budget of one block (one task), in bytes.
DEFAULT_BLOCK_MEMORY = 64 * 1024**2

#: When an input chunk must be split, a divisor of the chunk size is used only
#: if it keeps at least this fraction of the images the budget allows;
#: otherwise blocks take the budget's size and straddle chunk boundaries.
_MIN_DIVISOR_FILL = 0.5


def parse_block_memory(value: Any, name: str = "block_memory") -> int:
    """Return a memory budget in bytes.

    Accepts ``None`` (the default, 64 MiB), a positive integer number of bytes,
    or a string such as ``'64MiB'``, ``'200 MB'`` or ``'1.5GiB'`` (parsed by
    :func:`dask.utils.parse_bytes`).
    """
    if value is None:
        return DEFAULT_BLOCK_MEMORY
    from .validation import check_bytes

    return check_bytes(value, name)


def image_bytes(
    frame_shape: tuple[int, int],
    out_shape: tuple[int, int],
    in_itemsize: int,
    out_itemsize: int,
    *,
    in_format: str = "dense",
    out_format: str = "dense",
    nnz_per_image: float | None = None,
    kernel_size: int = 1,
    nnz_out_per_image: float | None = None,
    fill_nnz: int = 0,
    outputs: int = 1,
) -> int:
    """Estimate the peak memory one image adds to a block task, in bytes.

    The task holds, per image:

    * the input as read: ``H*W*in_itemsize`` for a dense store (read dense,
      then turned into CSR), ``nnz * (itemsize + 8)`` for a CSR store;
    * its CSR form (values + int32/int64 indices);
    * the output: ``H_out*W_out*out_itemsize`` dense, or for CSR output
      ``min(nnz * kernel_size, H_out*W_out)`` entries (each input nonzero
      touches at most ``kernel_size`` output pixels);
    * once more the output's size, for the encoder's buffers on write.

    ``nnz_per_image`` is the mean number of nonzeros per image; for dense
    input without a known count the dense size bounds it.
    ``nnz_out_per_image`` (CSR output): an estimate of the output's nonzeros
    per image, e.g. from a sample; it replaces the worst case when smaller.
    The worst case is right for scattered pixels but overstates clustered
    ones (the ROI benchmark's disks reach ~2 output pixels per input pixel,
    not 49) and would cut a small job into needlessly many blocks.
    ``fill_nnz``: output nonzeros every image has whatever its input (the
    fill frame of a nonzero ``fillvalue``). ``outputs``: output images per
    input image (``K`` for a kernel bank), each estimated as above.
    """
    H, W = int(frame_shape[0]), int(frame_shape[1])
    Ho, Wo = int(out_shape[0]), int(out_shape[1])
    in_pixels, out_pixels = H * W, Ho * Wo
    nnz = float(in_pixels if nnz_per_image is None else min(max(nnz_per_image, 0.0), in_pixels))
    csr_in = nnz * (in_itemsize + 8) + 8
    read: float
    out: float
    if in_format == "dense":
        read = in_pixels * in_itemsize
    elif in_format == "csr":
        read = csr_in
    else:
        raise ValueError(f"in_format must be 'dense' or 'csr'; got {in_format!r}")
    if out_format == "dense":
        out = out_pixels * out_itemsize
    elif out_format == "csr":
        nnz_out = min(nnz * max(int(kernel_size), 1), out_pixels)
        if nnz_out_per_image is not None:
            nnz_out = min(nnz_out, max(float(nnz_out_per_image), 0.0))
        nnz_out = min(nnz_out + max(int(fill_nnz), 0), out_pixels)
        out = nnz_out * (out_itemsize + 8) + 8
    else:
        raise ValueError(f"out_format must be 'dense' or 'csr'; got {out_format!r}")
    return int(math.ceil(read + csr_in + 2 * out * max(int(outputs), 1)))


@dataclass(frozen=True)
class RowBlocks:
    """A partition of ``range(n_images)`` into uniform contiguous blocks.

    Attributes
    ----------
    n_images : int
        Images in the stack.
    block_rows : int
        Images per block (every block but possibly the last).
    chunk_rows : int
        Images per input chunk the blocks were aligned to.
    block_memory : int
        The budget used, in bytes.
    bytes_per_image : int
        The per-image estimate used, in bytes.
    """

    n_images: int
    block_rows: int
    chunk_rows: int
    block_memory: int
    bytes_per_image: int
    #: frames larger than a block: the blocks count tiles of this grid (and
    #: ``n_images``, ``block_rows``, ``bytes_per_image`` are in tiles)
    tiles: Any = None

    @property
    def n_blocks(self) -> int:
        return max(1, -(-self.n_images // self.block_rows)) if self.n_images else 0

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` for every block, in order."""
        b = self.block_rows
        return [(s, min(s + b, self.n_images)) for s in range(0, self.n_images, b)]

    @property
    def chunks(self) -> tuple[int, ...]:
        """Block lengths, as a dask ``chunks`` entry for axis 0."""
        return tuple(stop - start for start, stop in self.bounds)

    @property
    def aligned(self) -> bool:
        """Whether every block boundary is also an input chunk boundary."""
        return self.block_rows % self.chunk_rows == 0 or self.chunk_rows % self.block_rows == 0

    @property
    def estimated_block_bytes(self) -> int:
        return self.block_rows * self.bytes_per_image

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.bounds)

    def __len__(self) -> int:
        return self.n_blocks


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (``limit >= 1``)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
    return best


#: How far above the rows wanted for ``min_blocks`` a block may be rounded up
#: to whole input chunks, where chunks need not be kept whole (CSR inputs).
_ALIGN_SLACK = 0.1


def _split_rows(chunk_rows: int, limit: int) -> int:
    """Rows per block when blocks must be smaller than a chunk: a divisor of
    the chunk size near ``limit`` (so blocks still tile chunks), else ``limit``."""
    div = _largest_divisor_at_most(chunk_rows, limit)
    return div if div >= _MIN_DIVISOR_FILL * limit else limit


def plan_row_blocks(
    n_images: int,
    chunk_rows: int,
    bytes_per_image: int,
    block_memory: Any = None,
    *,
    min_blocks: int = 1,
    strict_chunks: bool = True,
) -> RowBlocks:
    """Choose uniform row blocks for a stack.

    Parameters
    ----------
    n_images : int
        Number of images in the stack (may be 0).
    chunk_rows : int
        Images per input chunk along the image axis (1 for an unchunked
        in-memory input is fine; values above ``n_images`` are clipped).
    bytes_per_image : int
        Peak memory one image adds to a block task (see :func:`image_bytes`).
    block_memory : int or str, optional
        Memory budget per block: bytes, or a string like ``'64MiB'``.
        Default 64 MiB.
    min_blocks : int, default 1
        Make blocks small enough for at least this many blocks.
    strict_chunks : bool, default True
        Never split an input chunk just to reach ``min_blocks`` (right for
        dense stores, where a split chunk is decompressed by several tasks).
        ``False`` allows it (CSR stores read row ranges cheaply).

    Raises
    ------
    ValueError
        When ``block_memory`` is smaller than one image needs; the message
        names the value and the minimum.
    """
    budget = parse_block_memory(block_memory)
    n_images = int(n_images)
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0; got {n_images}")
    bytes_per_image = max(1, int(bytes_per_image))
    chunk_rows = max(1, min(int(chunk_rows), max(n_images, 1)))
    if budget < bytes_per_image:
        from dask.utils import format_bytes

        raise ValueError(
            f"block_memory={budget} bytes ({format_bytes(budget)}) is too small for one image: "
            f"each image needs about {bytes_per_image} bytes ({format_bytes(bytes_per_image)}) "
            f"for its input, output and buffers; use block_memory >= {bytes_per_image}"
        )
    if n_images == 0:
        return RowBlocks(0, 1, chunk_rows, budget, bytes_per_image)
    fit = min(budget // bytes_per_image, n_images)  # >= 1
    if fit >= chunk_rows:
        rows = (fit // chunk_rows) * chunk_rows
    else:
        # One chunk is over budget: split it into equal parts when a divisor
        # of the chunk size is close enough to the budget, else straddle.
        rows = _split_rows(chunk_rows, fit)
    if min_blocks > 1:
        want = -(-n_images // int(min_blocks))  # rows per block for min_blocks blocks
        if want < rows:
            aligned = max(chunk_rows, -(-want // chunk_rows) * chunk_rows)
            if not strict_chunks and aligned > want * (1 + _ALIGN_SLACK):
                # rounding up to whole chunks would leave the last block
                # short (2000 images in chunks of 881: 1762 + 238), and one
                # thread with most of the work; a CSR row range is cheap to
                # read, so cut where the threads get equal shares
                rows = want if want >= chunk_rows else _split_rows(chunk_rows, want)
            elif want >= chunk_rows:
                rows = aligned
            elif rows > chunk_rows:
                rows = chunk_rows
    rows = max(1, min(rows, n_images))
    return RowBlocks(n_images, rows, chunk_rows, budget, bytes_per_image)


__all__ = ["DEFAULT_BLOCK_MEMORY", "RowBlocks", "image_bytes", "parse_block_memory", "plan_row_blocks"]
