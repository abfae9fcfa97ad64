"""dask-sparseconv: out-of-core sparse 2D convolution of image stacks on dask.

In memory::

    conv = dask_sparseconv.Convolver((512, 512), kernel, mode="same")
    y = conv(x_csr)                                   # (n, H*W) CSR -> CSR

Out of core::

    dask_sparseconv.convolve_zarr("in.zarr", kernel, "out.zarr")
    y = dask_sparseconv.convolve(x, kernel)           # lazy dask array
    stack = dask_sparseconv.open_stack("out.zarr")

Drop-in for sparse_convolution 0.4.2::

    from dask_sparseconv import Toeplitz_convolution2d
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .geometry import geometry

if TYPE_CHECKING:
    from .convolver import Convolver


def _installed_version() -> str:
    # read on first use: importing importlib.metadata costs ~18 ms, which
    # every command paid before it could start its local workers' server
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dask-sparseconv")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


# Everything else loads on first use: `import dask_sparseconv` (and so the
# command line, whose `run` starts its local workers' fork server before it
# imports the engine: dask_sparseconv/runtime/forkserver.py) costs numpy alone.
_LAZY = {
    "Convolver": "convolver",
    "Toeplitz_convolution2d": "compat",
    "convolve": "pipeline",
    "convolve_zarr": "pipeline",
    "open_stack": "storage",
    "open_bank": "storage",
    "describe_stack": "storage",
    "write_dense_stack": "storage",
    "write_csr_stack": "storage",
    "ConvolveSummary": "pipeline",
    "plan_job": "pipeline",
    "JobPlan": "pipeline",
    "write_sample_stack": "sample_data",
    "kernels": None,
    "cache_stats": "runtime.cache",
}


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = text = _installed_version()
        return text
    if name in _LAZY:
        mod = _LAZY[name]
        value = import_module(f".{name}", __name__) if mod is None else getattr(import_module(f".{mod}", __name__), name)
        # kept, so that later lookups skip this hook (4-5 us each: a notebook
        # building convolvers in a loop as dsc.Toeplitz_convolution2d paid it per object)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "Convolver",
    "Toeplitz_convolution2d",
    "convolve",
    "convolve_zarr",
    "ConvolveSummary",
    "plan_job",
    "JobPlan",
    "open_stack",
    "open_bank",
    "describe_stack",
    "write_dense_stack",
    "write_csr_stack",
    "write_sample_stack",
    "kernels",
    "geometry",
    "cache_stats",
    "__version__",
]
