"""CSR stacks in anndata's on-disk ``csr_matrix`` encoding (plus ``frame_shape``).

* :mod:`.input`: reading (:class:`CSRInput`) and :func:`write_csr_stack`;
* :mod:`.output`: the pipeline's writer (:class:`CSROutput`), which puts
  each value at its final offset once (a carry chain; see that module).
"""

from .input import (
    CSR_ATTRS,
    DEFAULT_CHUNK_NNZ,
    DEFAULT_INDPTR_CHUNK,
    CSRInput,
    csr_chunk_rows,
    is_csr_group,
    write_csr_stack,
)
from .output import CSR_LAYOUT, Carry, CSROutput

__all__ = ["CSRInput", "CSROutput", "Carry", "write_csr_stack", "is_csr_group", "csr_chunk_rows", "CSR_ATTRS",
           "CSR_LAYOUT", "DEFAULT_CHUNK_NNZ", "DEFAULT_INDPTR_CHUNK"]
