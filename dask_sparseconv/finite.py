"""A compiled finiteness check for small float arrays (kernels).

:func:`dask_sparseconv.validation.check_kernel` uses it when asked
(``compiled=True``: a convolver on numba's engines, which load compiled code
next anyway): numpy's ``isfinite`` and a reduce are two calls into numpy,
and in the cold state a grid search builds its convolvers in (one per point,
each after a large call) they cost ~40 us of a ~170 us construction; this
loop costs ~15 us (docs/benchmarks.md, issue #15). Checks elsewhere (a job's
planning on the client) stay on numpy: a process's first compiled function
costs it ~0.3 s of numba's start-up.
"""

from __future__ import annotations

import math

import numba


@numba.njit(cache=True, nogil=True)
def all_finite(a) -> bool:
    """Whether every value of the 2-D float32/float64 array ``a`` is finite."""
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if not math.isfinite(a[i, j]):
                return False
    return True
