"""The contract every engine (one method on one backend) implements.

An engine is built once per (frame shape, kernel, dtype, device) and called
many times. It receives input that the :class:`~dask_sparseconv.Convolver`
has already normalised:

* ``x`` is a ``scipy.sparse.csr_matrix`` of shape ``(n_images, H*W)`` in
  canonical form (sorted indices, no duplicates), ``x.data`` already of the
  engine's ``dtype``, indices int32 or int64 (never copied just to widen them);
* ``mode`` is one of ``'full'``, ``'same'``, ``'valid'`` and fits the frame.

and must return

* from :meth:`Engine.to_csr`: a ``scipy.sparse.csr_matrix`` of shape
  ``(n_images, H_out*W_out)``, canonical (sorted, no duplicates), exact zeros
  dropped, data of ``dtype``, index arrays int32 when
  ``max(n_images, H_out*W_out, nnz)`` fits in int32 and int64 otherwise;
* from :meth:`Engine.to_dense`: a C-contiguous ``(n_images, H_out, W_out)``
  ndarray of ``dtype`` (written into ``out`` when given), without building
  CSR first.

Engines must be safe to call from several threads at once.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from ..geometry import Geometry, geometry

INT32_MAX = np.iinfo(np.int32).max


def index_dtype(*bounds: int) -> np.dtype:
    """int32 when every bound fits in int32, else int64 (scipy's rule)."""
    return np.dtype(np.int32) if max(bounds, default=0) <= INT32_MAX else np.dtype(np.int64)


def empty_csr(n_rows: int, n_cols: int, dtype) -> scipy.sparse.csr_matrix:
    """An all-zero CSR matrix with index dtype chosen by :func:`index_dtype`."""
    idx = index_dtype(n_rows, n_cols)
    return scipy.sparse.csr_matrix(
        (np.empty(0, dtype=dtype), np.empty(0, dtype=idx), np.zeros(n_rows + 1, dtype=idx)),
        shape=(n_rows, n_cols),
        copy=False,
    )


def _probe_csr_fields() -> int | None:
    """``maxprint`` of a csr_matrix built by scipy's constructor, if its
    instance attributes are the five :func:`canonical_csr` sets (else None:
    use the constructor)."""
    m = scipy.sparse.csr_matrix((np.ones(1), np.zeros(1, np.int32), np.array([0, 1], np.int32)), shape=(1, 1))
    return m.maxprint if set(vars(m)) == {"_shape", "data", "indices", "indptr", "maxprint"} else None


_CSR_MAXPRINT = _probe_csr_fields()


def canonical_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> scipy.sparse.csr_matrix:
    """A ``csr_matrix`` over arrays an engine built itself (sorted, no
    duplicates, no zeros, matching index dtypes), flagged canonical.

    scipy's constructor re-checks what the engine guarantees, a visible share
    of a call on a small batch (figures: docs/benchmarks.md, "Figures behind the code"). The instance is filled with the
    same attributes the constructor sets; when scipy's set differs (checked
    once at import, and by the test suite), the constructor is used.
    """
    if _CSR_MAXPRINT is None or indices.dtype != indptr.dtype:
        res = scipy.sparse.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    else:
        res = scipy.sparse.csr_matrix.__new__(scipy.sparse.csr_matrix)
        res.__dict__.update(_shape=(int(shape[0]), int(shape[1])), data=data, indices=indices, indptr=indptr,
                            maxprint=_CSR_MAXPRINT)
    res.has_sorted_indices = True
    res.has_canonical_format = True
    return res


def dense_out(n_images: int, geo: Geometry, dtype, out: np.ndarray | None) -> np.ndarray:
    """Validate a caller-supplied dense output buffer, or allocate a zeroed one."""
    shape = (n_images,) + geo.out_shape
    if out is None:
        return np.zeros(shape, dtype=dtype)
    if out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous array of shape {shape} and dtype {np.dtype(dtype)}; "
            f"got shape {out.shape}, dtype {out.dtype}"
        )
    out.fill(0)
    return out


class Engine:
    """Base class: stores the problem definition; subclasses do the work.

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)`` of every input image.
    kernel : ndarray
        2-D kernel, already validated; cast to ``dtype`` here when it is of
        another dtype, else kept as it is (engines never write it).
    dtype : numpy.dtype
        float32 or float64: data type of computation and output.
    device : str, optional
        Torch device (torch engines only).
    n_threads : int
        Threads an engine may use for one call (CPU engines).
    max_buffer_bytes : int
        Bound on scratch memory for engines with a dense accumulator.
    """

    method: str = ""
    backend: str = ""

    def __init__(self, frame_shape, kernel, dtype, *, device=None, n_threads=1, max_buffer_bytes=256 * 1024**2):
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = dtype = np.dtype(dtype)
        # as it is when already right (the convolver's checked copy): a numpy
        # call less per construction, which a cold grid search pays (#15)
        self.kernel = kernel if type(kernel) is np.ndarray and kernel.dtype == dtype and kernel.flags.c_contiguous \
            else np.ascontiguousarray(kernel, dtype=dtype)
        self.device = device
        self.n_threads = max(1, int(n_threads))
        self.max_buffer_bytes = int(max_buffer_bytes)

    def geometry(self, mode: str) -> Geometry:
        return geometry(self.frame_shape, self.kernel.shape, mode)

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        raise NotImplementedError

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Memory held by the engine between calls (Toeplitz matrices etc.)."""
        return self.kernel.nbytes
