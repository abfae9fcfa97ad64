"""Row-block planning: chunk alignment, memory budget, uniform blocks, errors."""

import numpy as np
import pytest
import scipy.signal
import scipy.sparse

from dask_sparseconv.row_blocks import (
    DEFAULT_BLOCK_MEMORY,
    image_bytes,
    parse_block_memory,
    plan_row_blocks,
)

MiB = 1024**2


def _check_partition(blocks):
    bounds = blocks.bounds
    assert bounds[0][0] == 0 and bounds[-1][1] == blocks.n_images
    for (a, b), (c, _) in zip(bounds[:-1], bounds[1:]):
        assert b == c and b - a == blocks.block_rows
    assert 0 < bounds[-1][1] - bounds[-1][0] <= blocks.block_rows
    assert sum(blocks.chunks) == blocks.n_images
    assert len(blocks) == blocks.n_blocks == len(bounds)


@pytest.mark.parametrize(
    "value, expected",
    [(None, DEFAULT_BLOCK_MEMORY), (1000, 1000), ("64MiB", 64 * MiB), ("200 MB", 200_000_000), ("1.5GiB", int(1.5 * 1024**3)),
     (2.0**20, MiB)],
)
def test_parse_block_memory(value, expected):
    assert parse_block_memory(value) == expected


@pytest.mark.parametrize("value", ["lots", "-5MiB", 0, -1, "0B"])
def test_parse_block_memory_rejects_bad_values(value):
    with pytest.raises(ValueError, match="block_memory"):
        parse_block_memory(value)


@pytest.mark.parametrize("value", [True, [64], 1.5])
def test_parse_block_memory_rejects_bad_types(value):
    with pytest.raises(TypeError, match="block_memory"):
        parse_block_memory(value)


def test_blocks_are_whole_input_chunks_when_budget_allows():
    # 1 MiB per image, 64 MiB budget, chunks of 10 images -> 60-image blocks
    b = plan_row_blocks(1000, 10, MiB, "64MiB")
    assert b.block_rows == 60 and b.aligned
    _check_partition(b)
    assert all(start % 10 == 0 for start, _ in b.bounds)
    assert b.estimated_block_bytes <= 64 * MiB


def test_block_size_follows_budget():
    small = plan_row_blocks(1000, 1, MiB, 8 * MiB)
    large = plan_row_blocks(1000, 1, MiB, 128 * MiB)
    assert small.block_rows == 8 and large.block_rows == 128
    _check_partition(small)
    _check_partition(large)


def test_input_chunk_over_budget_is_split_evenly():
    # chunk of 100 images, 64 fit: split each chunk in 2 (divisor 50)
    b = plan_row_blocks(1000, 100, MiB, 64 * MiB)
    assert b.block_rows == 50 and b.aligned
    assert all(start % 50 == 0 for start, _ in b.bounds)
    _check_partition(b)


def test_chunk_without_a_useful_divisor_straddles():
    # 97 is prime: no divisor near the 16 that fit, so blocks use the budget size
    b = plan_row_blocks(500, 97, MiB, 16 * MiB)
    assert b.block_rows == 16 and not b.aligned
    _check_partition(b)


def test_last_block_is_the_remainder():
    b = plan_row_blocks(103, 10, MiB, 20 * MiB)
    assert b.block_rows == 20 and b.chunks == (20, 20, 20, 20, 20, 3)
    _check_partition(b)


def test_min_blocks_for_parallelism():
    b = plan_row_blocks(2000, 10, 1000, "64MiB", min_blocks=8)
    assert b.n_blocks >= 8 and b.block_rows % 10 == 0
    _check_partition(b)
    # a dense store's single chunk is not split for parallelism ...
    assert plan_row_blocks(2000, 2000, 1000, "64MiB", min_blocks=8).n_blocks == 1
    # ... a CSR store's may be
    loose = plan_row_blocks(2000, 2000, 1000, "64MiB", min_blocks=8, strict_chunks=False)
    assert loose.n_blocks == 8 and 2000 % loose.block_rows == 0
    # also when a chunk was already over budget (CSR chunk of 199 rows, 178 fit)
    split = plan_row_blocks(200, 199, 375_000, "64MiB", min_blocks=8, strict_chunks=False)
    assert split.block_rows == 25 and split.n_blocks == 8


def test_stack_smaller_than_one_block():
    b = plan_row_blocks(3, 100, 10, "64MiB")
    assert b.bounds == [(0, 3)]


def test_empty_stack():
    b = plan_row_blocks(0, 10, 10, None)
    assert b.bounds == [] and b.n_blocks == 0 and b.chunks == ()


def test_budget_too_small_for_one_image_names_value_and_minimum():
    with pytest.raises(ValueError) as info:
        plan_row_blocks(10, 1, 5000, 4096)
    msg = str(info.value)
    assert "block_memory" in msg and "4096" in msg and "5000" in msg


def test_image_bytes_dense_and_csr():
    dense = image_bytes((512, 512), (512, 512), 4, 4)
    assert dense >= 3 * 512 * 512 * 4  # input, output, write buffers
    sparse = image_bytes((512, 512), (512, 512), 4, 4, in_format="csr", out_format="csr", nnz_per_image=262,
                         kernel_size=49)
    assert sparse < dense / 10
    # CSR output never estimated above the output pixel count
    full = image_bytes((8, 8), (8, 8), 8, 8, in_format="csr", out_format="csr", nnz_per_image=64, kernel_size=49)
    assert full == 4 * (64 * 16 + 8)  # read + CSR + output twice, each 64 entries of 16 bytes
    with pytest.raises(ValueError, match="in_format"):
        image_bytes((8, 8), (8, 8), 8, 8, in_format="coo")


def test_image_bytes_sampled_csr_output():
    worst = image_bytes((512, 512), (512, 512), 4, 4, in_format="csr", out_format="csr", nnz_per_image=300,
                        kernel_size=49)
    sampled = image_bytes((512, 512), (512, 512), 4, 4, in_format="csr", out_format="csr", nnz_per_image=300,
                          kernel_size=49, nnz_out_per_image=1200)
    assert sampled == 2 * (300 * 12 + 8) + 2 * (1200 * 12 + 8)
    assert sampled < worst / 9
    # an estimate above the worst case (or the frame) never raises it
    assert image_bytes((512, 512), (512, 512), 4, 4, in_format="csr", out_format="csr", nnz_per_image=300,
                       kernel_size=49, nnz_out_per_image=10**9) == worst


def test_sampled_expansion_of_clustered_and_scattered_pixels():
    from dask_sparseconv.geometry import geometry
    from dask_sparseconv.pipeline.estimates import _EXPANSION_SAFETY
    from dask_sparseconv.pipeline.estimates import matrix_expansion as _matrix_expansion

    k = np.ones((7, 7))
    geo = geometry((64, 64), k.shape, "same")
    disks = np.zeros((40, 64, 64))
    yy, xx = np.mgrid[:64, :64]
    disks[:, ((yy - 30) ** 2 + (xx - 30) ** 2) < 64] = 1.0  # one disk of radius 8 per frame
    blob = scipy.sparse.csr_matrix(disks.reshape(40, -1))
    exact = np.count_nonzero(scipy.signal.convolve2d(disks[0], k, "same")) / np.count_nonzero(disks[0])
    assert _matrix_expansion(blob, k, geo) == pytest.approx(_EXPANSION_SAFETY * exact)
    assert _matrix_expansion(blob, k, geo) < 49 / 5
    dots = np.zeros((40, 64, 64))
    dots[:, ::9, ::9] = 1.0  # isolated pixels: every tap lands on its own pixel
    assert _matrix_expansion(scipy.sparse.csr_matrix(dots.reshape(40, -1)), k, geo) == 49.0  # capped at the taps
    empty = scipy.sparse.csr_matrix((40, 64 * 64))
    assert _matrix_expansion(empty, k, geo) is None  # nothing to sample: the planner keeps the worst case
    late = np.zeros((40, 64, 64))
    late[20:, 10, 10] = 1.0  # the start is empty: the middle is sampled
    assert _matrix_expansion(scipy.sparse.csr_matrix(late.reshape(40, -1)), k, geo) == 49.0


def test_plan_is_consistent_with_estimate():
    per = image_bytes((256, 256), (256, 256), np.dtype("float32").itemsize, 4)
    b = plan_row_blocks(5000, 50, per, "32MiB")
    assert b.block_rows * per <= 32 * MiB
    _check_partition(b)


def test_min_blocks_gives_equal_shares_where_chunks_need_not_stay_whole():
    """2000 images in chunks of 881 for 2 threads: whole chunks would make
    blocks of 1762 and 238 (one thread doing 88 % of the job); a CSR input
    (chunks may be split) gets two blocks of 1000, a dense one (chunks kept
    whole) keeps the aligned cut, and an aligned cut close to equal shares
    stays aligned."""
    per_image = 37_379  # the 2000-frame ROI benchmark's estimate
    csr = plan_row_blocks(2000, 881, per_image, "64MiB", min_blocks=2, strict_chunks=False)
    assert csr.block_rows == 1000 and csr.n_blocks == 2
    dense = plan_row_blocks(2000, 881, per_image, "64MiB", min_blocks=2, strict_chunks=True)
    assert dense.block_rows == 1762 and dense.n_blocks == 2
    near = plan_row_blocks(2000, 500, per_image, "64MiB", min_blocks=2, strict_chunks=False)
    assert near.block_rows == 1000  # two whole chunks per block: equal shares already
    four = plan_row_blocks(2000, 881, per_image, "64MiB", min_blocks=4, strict_chunks=False)
    assert four.block_rows == 500 and four.n_blocks == 4
