"""Workflow files: one YAML document describing one convolution job.

The file is read with ``yaml.safe_load`` only (plain mappings, lists,
strings and numbers; no Python objects are ever constructed) and checked
against the pydantic models of :mod:`.schema`; :mod:`.load` reports every
problem at once, each with its key path (``kernel.gaussian.sigma``), as one
:class:`WorkflowError`. ``dask-sparseconv schema`` prints the JSON schema.

Schema (see ``docs/workflow_reference.md`` for every key)::

    description: free text                # optional
    input:
      path: data/rois.zarr                # relative paths: against the workflow's folder
      array: null                         # array/group inside the store
      storage_options: {}                 # fsspec options for URLs
      sample: null                        # or {n_images: 200, ...}: generate a sample stack when path is missing
    kernel: {gaussian: {sigma: 1.5}}      # exactly one of gaussian / box / disk / file / values
    mode: same                            # full | same | valid
    method: auto                          # auto | direct | precomputed | lazy | gather_scatter
    backend: auto                         # auto | numba | numpy | torch
    dtype: null                           # null | float32 | float64
    output:
      path: out/blurred.zarr
      format: null                        # dense | csr; null: the input's
      overwrite: false
      storage_options: {}
      compressor: default                 # default | none
    cluster:
      address: null                       # tcp://host:8786 or tls://host:8786 for a running scheduler
      n_workers: null                     # local cluster only; null: sized to this machine
      threads_per_worker: 1
      memory_limit: auto
      dashboard_address: ":8787"
      timeout: 10s                        # connecting to a scheduler
      security: null                      # {ca_file, cert_file, key_file} for tls://
      route: any                          # any | gpu | cpu: which workers run the blocks (docs/gpu.md)
    block:
      memory: 64MiB                       # input+output bytes one row block may hold
"""

from .load import WorkflowError, load_workflow, parse_workflow
from .schema import (
    BlockSpec,
    ClusterSpec,
    InputSpec,
    KernelSpec,
    OutputSpec,
    SampleSpec,
    SecuritySpec,
    Workflow,
    is_url,
    json_schema,
    parse_bytes,
    parse_seconds,
)


def format_bytes(n: int | float) -> str:
    """Bytes -> ``'64.00 MiB'`` (:func:`dask.utils.format_bytes`)."""
    from dask.utils import format_bytes as _format_bytes

    return _format_bytes(int(n))


__all__ = [
    "WorkflowError",
    "Workflow",
    "InputSpec",
    "SampleSpec",
    "KernelSpec",
    "OutputSpec",
    "ClusterSpec",
    "SecuritySpec",
    "BlockSpec",
    "load_workflow",
    "parse_workflow",
    "parse_bytes",
    "parse_seconds",
    "format_bytes",
    "is_url",
    "json_schema",
]
