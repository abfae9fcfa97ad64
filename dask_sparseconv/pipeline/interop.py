"""The containers :func:`~dask_sparseconv.convolve` takes and gives back
besides numpy, dask and ``scipy.sparse`` matrices.

* ``xarray.DataArray``: its last two dims are the frame, every dim before
  them counts images; the result is a DataArray with the same dims, the
  image dims' coords kept and the spatial coords following the mode.
* pydata/sparse ``COO`` (``(n, H, W)``, or ``(n, H*W)`` with
  ``frame_shape``), alone or as the chunks of a dask array: converted to CSR
  block by block; a CSR result comes back as COO of the input's layout.
* ``scipy.sparse`` arrays (``csr_array``, ``coo_array``, ...), alone or as
  dask chunks: a CSR result comes back as ``csr_array`` chunks.

:func:`adapt` turns such an ``x`` into what the pipeline computes on and a
function that dresses the result the way ``x`` was dressed. Neither xarray
nor sparse is imported unless ``x`` is one of theirs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse

Rewrap = Callable[[Any, Any], Any]  # (result, Geometry) -> what the user gets


def _from_module(x: Any, module: str, name: str) -> bool:
    return any(c.__module__.split(".")[0] == module and c.__name__ == name for c in type(x).__mro__)


def _is_coo(x: Any) -> bool:
    return _from_module(x, "sparse", "COO")


def _is_sparse_array(x: Any) -> bool:
    """A scipy.sparse *array* (``csr_array`` ...), not a matrix."""
    return scipy.sparse.issparse(x) and not isinstance(x, scipy.sparse.spmatrix)


Adapted = tuple[Any, "Rewrap | None", "tuple[int, int] | None"]


def adapt(x: Any, frame_shape: tuple[int, int] | None, output_format: str | None) -> Adapted:
    """``(x for the pipeline, rewrap or None, frame shape)``: ``x`` as a numpy,
    dask or CSR stack, the function that dresses the result like ``x`` was,
    and ``(H, W)`` when the adapted ``x`` is ``(n, H*W)`` (else the caller's
    ``frame_shape``)."""
    if _from_module(x, "xarray", "DataArray"):
        return _adapt_xarray(x, frame_shape, output_format)
    if _is_coo(x):
        return _adapt_coo(x, frame_shape)
    if _is_sparse_array(x):
        return scipy.sparse.csr_matrix(x), _to_csr_array, frame_shape
    meta = getattr(x, "_meta", None)
    if meta is not None and _is_coo(meta):
        return _adapt_dask_coo(x, frame_shape)
    if meta is not None and _is_sparse_array(meta):
        rows = x.map_blocks(scipy.sparse.csr_matrix, dtype=x.dtype,
                            meta=scipy.sparse.csr_matrix((0, x.shape[1]), dtype=x.dtype))
        return rows, _to_csr_array, frame_shape
    return x, None, frame_shape


# -- scipy.sparse arrays -------------------------------------------------------------------
def _to_csr_array(y: Any, geo: Any) -> Any:
    if not scipy.sparse.issparse(getattr(y, "_meta", None)):
        return y  # dense asked for: a numpy-backed dask array
    return y.map_blocks(scipy.sparse.csr_array, dtype=y.dtype, meta=scipy.sparse.csr_array((0, y.shape[1]), dtype=y.dtype))


# -- pydata/sparse ------------------------------------------------------------------------------
def _coo_rows(block: Any) -> scipy.sparse.csr_matrix:
    return block.reshape((block.shape[0], -1)).tocsr()


def _adapt_coo(x: Any, frame_shape: tuple[int, int] | None) -> Adapted:
    if x.ndim not in (2, 3):
        raise ValueError(f"a sparse.COO x must be (n_images, H, W), or (n_images, H*W) with frame_shape; got shape {x.shape}")
    fs = (int(x.shape[1]), int(x.shape[2])) if x.ndim == 3 else frame_shape
    return _coo_rows(x), _coo_back(x.ndim), fs


def _adapt_dask_coo(x: Any, frame_shape: tuple[int, int] | None) -> Adapted:
    if x.ndim not in (2, 3):
        raise ValueError(f"a dask array of sparse.COO must be (n_images, H, W), or (n_images, H*W) with frame_shape; "
                         f"got shape {x.shape}")
    fs = (int(x.shape[1]), int(x.shape[2])) if x.ndim == 3 else frame_shape
    if x.ndim == 3:
        x = x.rechunk({1: -1, 2: -1})
        pixels = int(x.shape[1] * x.shape[2])
        rows = x.map_blocks(_coo_rows, chunks=(x.chunks[0], (pixels,)), drop_axis=2, dtype=x.dtype,
                            meta=scipy.sparse.csr_matrix((0, pixels), dtype=x.dtype))
    else:
        x = x.rechunk({1: -1})
        rows = x.map_blocks(_coo_rows, dtype=x.dtype, meta=scipy.sparse.csr_matrix((0, x.shape[1]), dtype=x.dtype))
    return rows, _coo_back(x.ndim), fs


def _coo_back(ndim: int) -> Rewrap:
    def rewrap(y: Any, geo: Any) -> Any:
        import sparse

        if not scipy.sparse.issparse(getattr(y, "_meta", None)):
            return y  # dense asked for
        dt = y.dtype
        coo = y.map_blocks(sparse.COO.from_scipy_sparse, dtype=dt, meta=sparse.COO.from_numpy(np.zeros((0, y.shape[1]), dt)))
        if ndim == 2:
            return coo
        Ho, Wo = geo.out_shape
        return coo.map_blocks(lambda b: b.reshape((b.shape[0], Ho, Wo)), chunks=(coo.chunks[0], (Ho,), (Wo,)),
                              new_axis=2, dtype=dt, meta=sparse.COO.from_numpy(np.zeros((0, Ho, Wo), dt)))

    return rewrap


# -- xarray --------------------------------------------------------------------------------------
def _adapt_xarray(x: Any, frame_shape: tuple[int, int] | None, output_format: str | None) -> Adapted:
    if frame_shape is not None:
        raise ValueError("frame_shape= does not apply to an xarray.DataArray: its last two dims are the frame")
    if x.ndim < 2:
        raise ValueError(f"an xarray.DataArray x needs at least 2 dims (..., y, x); got dims {x.dims}")
    if output_format == "csr":
        raise ValueError("output_format='csr' is not available for an xarray.DataArray x (a DataArray holds dense or "
                         "pydata/sparse data): leave output_format out, or pass x.data to get CSR")
    lead = tuple(int(v) for v in x.shape[:-2])
    n = int(np.prod(lead))
    data = x.data
    stack = data.reshape((n,) + tuple(int(v) for v in x.shape[-2:]))
    inner, inner_rewrap, inner_fs = adapt(stack, None, output_format)

    def rewrap(y: Any, geo: Any) -> Any:
        import xarray as xr

        if inner_rewrap is not None:
            y = inner_rewrap(y, geo)
        bank = y.ndim == 4
        Ho, Wo = geo.out_shape
        y = y.reshape(lead + ((y.shape[1],) if bank else ()) + (Ho, Wo))
        dims = tuple(x.dims[:-2]) + (("kernel",) if bank else ()) + tuple(x.dims[-2:])
        coords = {}
        for name, c in x.coords.items():
            if set(c.dims) <= set(x.dims[:-2]):
                coords[name] = c
        for axis, dim in ((0, x.dims[-2]), (1, x.dims[-1])):
            if dim in x.coords and x.coords[dim].dims == (dim,):
                values = _spatial_coords(np.asarray(x.coords[dim].values), geo, axis)
                if values is not None:
                    coords[dim] = (dim, values, x.coords[dim].attrs)
        return xr.DataArray(y, dims=dims, coords=coords, name=x.name, attrs=dict(x.attrs))

    return inner, rewrap, inner_fs


def _spatial_coords(values: np.ndarray, geo: Any, axis: int) -> np.ndarray | None:
    """The output's coordinate along one spatial dim: output pixel ``o`` is
    input pixel ``o + offset`` (``offset`` = the mode's window start minus
    ``same``'s), so ``valid`` takes a slice of the input's coords and
    ``full`` extends them, which needs even spacing (else None: dropped)."""
    k = geo.kernel_shape[axis]
    start = (geo.top, geo.left)[axis] - (k - 1) // 2
    size = geo.out_shape[axis]
    if 0 <= start and start + size <= values.size:
        return values[start:start + size]
    if values.size >= 2 and np.issubdtype(values.dtype, np.number):
        step = np.diff(values.astype(np.float64))
        if np.allclose(step, step[0]):
            return values[0] + (np.arange(size) + start) * step[0]
    return None
