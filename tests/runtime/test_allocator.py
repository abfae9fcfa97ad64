"""The local workers' memory limit read without dask, for the fork server's
early launch (:func:`dask_sparseconv.runtime.allocator.worker_memory_limit`
with ``guess=True``): the same bytes as dask's ``parse_bytes`` for the sizes
a workflow holds, and a ValueError (no guess) for what is not a size."""

from __future__ import annotations

import pytest
from dask.utils import parse_bytes

from dask_sparseconv.runtime.allocator import worker_memory_limit

SIZES = ["2GiB", "2 GiB", "1.5GB", "512MB", "512mb", "100", "4 kib", "1e9", "3.5MiB", "1TB", "10 B", "8G", "64Mi",
         "0.5 TiB", " 2GiB "]


@pytest.mark.parametrize("text", SIZES)
def test_guess_reads_a_size_as_dask_does(text):
    assert worker_memory_limit(text, guess=True) == worker_memory_limit(text) == parse_bytes(text)


@pytest.mark.parametrize("text", ["two GiB", "2 parsecs", "GiB", "-1GB", ""])
def test_guess_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        worker_memory_limit(text, guess=True)


def test_no_limit_and_auto_need_no_guess():
    assert worker_memory_limit(None, guess=True) is None and worker_memory_limit(0, guess=True) is None
    assert worker_memory_limit("auto", 2, guess=True) == worker_memory_limit("auto", 2) > 0
