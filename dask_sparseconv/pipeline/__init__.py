"""Out-of-core convolution of image stacks as one lazy dask graph.

* :func:`convolve` (:mod:`.lazy`) returns a lazy dask array: dense
  ``(n, H_out, W_out)``, or ``(n, H_out*W_out)`` with ``scipy.sparse.csr_matrix``
  chunks for CSR output. Nothing is read until it is computed.
* :func:`convolve_zarr` (:mod:`.zarr_job`) convolves a zarr stack into a new
  zarr stack: :func:`plan_job` (:mod:`.plan`) cuts it into row blocks, one
  graph (:mod:`.graph`) runs a block task per block (:func:`.tasks.run_block`:
  read -> convolve -> write; CSR outputs: compute, carry and write per block,
  :mod:`.csr_chain`), then a last task that sets the completion flag.

Where things run: the kernel is one graph key every block depends on, so it
travels to each worker once per graph; the source and target handles are
small picklable objects. The :class:`~dask_sparseconv.Convolver` is built on
the worker by the per-process cache (:mod:`dask_sparseconv.runtime.cache`),
never pickled from the client. See docs/design.md.
"""

from .lazy import convolve
from .plan import JobPlan, plan_job
from .summary import ConvolveSummary
from .zarr_job import convolve_zarr

__all__ = ["ConvolveSummary", "JobPlan", "convolve", "convolve_zarr", "plan_job"]
