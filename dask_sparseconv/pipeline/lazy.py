"""Lazy convolution: :func:`convolve` returns a dask array, one task per row block.

Keys are content tokens, so two identical calls build identical graphs and
share work on a cluster; nothing is read until the array is computed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import scipy.sparse

from ..convolver import compute_dtype
from ..kernels import kernel_digest
from ..row_blocks import RowBlocks
from ..runtime.cluster import scheduler_threads
from ..validation import check_frame_shape
from .estimates import source_estimates
from .graph import block_key, kernel_node
from .plan import LAZY_UNTILED, _blocks_for, plan_blocks, plan_matrix
from .spec import BlockSpec, check_real, check_settings
from .tasks import convolve_array_block, convolve_source_block


def _is_store_like(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike)):
        return True
    mod = type(x).__module__ or ""
    return mod.startswith("zarr")


def convolve(
    x: Any,
    kernel: Any,
    mode: str = "same",
    *,
    method: str = "auto",
    backend: str | None = "auto",
    dtype: Any = None,
    output_format: str | None = None,
    block_memory: Any = None,
    frame_shape: tuple[int, int] | None = None,
    array: str | None = None,
    storage_options: dict | None = None,
    boundary: str = "fill",
    fillvalue: float = 0.0,
    correlate: bool = False,
    level: int | None = None,
    spatial_axes: Any = None,
):
    """Convolve every image of a stack with ``kernel``, lazily.

    Semantics are those of ``scipy.signal.convolve2d(image, kernel, mode,
    boundary, fillvalue)`` (``correlate2d`` with ``correlate=True``) applied
    to each image.

    Parameters
    ----------
    x : str, os.PathLike, zarr object, dask or numpy array, scipy.sparse matrix or array, sparse.COO or xarray.DataArray
        The stack: a zarr store (path or URL, dense ``(n, H, W)`` array,
        anndata-style CSR group or OME-Zarr image; ``array`` picks a member
        of a group, ``level`` an OME-Zarr pyramid level), a dask or numpy
        array ``(n, H, W)``, or a sparse matrix / 2-D dask array
        ``(n, H*W)`` together with ``frame_shape``. Also (the result follows
        the input's container, :mod:`dask_sparseconv.pipeline.interop`): an
        ``xarray.DataArray`` whose last two dims are the frame (every dim
        before them counts images; dims, the image dims' coords and attrs
        are kept, the spatial coords follow the mode); a pydata/sparse
        ``COO`` ``(n, H, W)`` (or ``(n, H*W)`` with ``frame_shape``) or a
        dask array of them (CSR results come back as COO of the same
        layout); a ``scipy.sparse`` array such as ``csr_array``, or a dask
        array of them (CSR results come back as ``csr_array``).
    kernel : array_like
        2-D, finite kernel; or a kernel bank ``(K, kH, kW)``: each block is
        read once and convolved with every kernel.
    mode : {'same', 'full', 'valid'}
    method, backend, dtype, boundary, fillvalue, correlate
        As for :class:`~dask_sparseconv.Convolver`.
    output_format : {None, 'dense', 'csr'}
        ``'dense'``: a ``(n, H_out, W_out)`` dask array of ndarrays.
        ``'csr'``: a ``(n, H_out*W_out)`` dask array whose chunks are
        ``scipy.sparse.csr_matrix`` (computing it gives one CSR matrix).
        Default: the input's format (CSR stores and sparse matrices give CSR,
        everything else dense).
    block_memory : int or str, optional
        Memory budget of one block task (default 64 MiB).
    frame_shape : tuple of int, optional
        ``(H, W)``, required for ``(n, H*W)`` inputs.
    array, storage_options, level, spatial_axes
        Passed to the store opener for zarr inputs.

    Returns
    -------
    dask.array.Array, or a list of them
        Chunked by row block along the image axis. A kernel bank gives a
        ``(n, K, H_out, W_out)`` array for dense output, and a list of K CSR
        arrays (one per kernel, sharing their block tasks) for CSR output.
    """
    import dask.array as da

    settings = check_settings(kernel, mode, method, backend, dtype, output_format, block_memory, boundary, fillvalue,
                              correlate)
    if settings.container is not None:
        raise ValueError(f"output_format={settings.container!r} names a store format: write it with convolve_zarr; "
                         "convolve() returns dask arrays ('dense' or 'csr')")
    kernel, mode, method, backend = settings.kernel, settings.mode, settings.method, settings.backend
    op = settings.operation
    if frame_shape is not None:
        frame_shape = check_frame_shape(frame_shape)

    from .interop import adapt

    x, rewrap, frame_shape = adapt(x, frame_shape, settings.output_format)
    if rewrap is not None:  # xarray, pydata/sparse, scipy.sparse arrays: computed as the plain kind, dressed back
        y = convolve(x, kernel, mode, method=method, backend=backend, dtype=dtype, output_format=output_format,
                     block_memory=block_memory, frame_shape=frame_shape if x.ndim == 2 else None, array=array,
                     storage_options=storage_options, boundary=boundary, fillvalue=fillvalue, correlate=correlate)
        geo = settings.window(frame_shape if frame_shape is not None and x.ndim == 2
                              else (int(x.shape[1]), int(x.shape[2])))
        return [rewrap(part, geo) for part in y] if isinstance(y, list) else rewrap(y, geo)

    if _is_store_like(x):
        from ..storage import open_input

        src = open_input(x, array=array, storage_options=storage_options, level=level, spatial_axes=spatial_axes)
        fs = (int(src.frame_shape[0]), int(src.frame_shape[1]))
        if frame_shape is not None and frame_shape != fs:
            raise ValueError(f"frame_shape={frame_shape} does not match the store's frame shape {fs}")
        geo = settings.window(fs)
        out_dtype = compute_dtype(src.dtype, settings.dtype)
        fmt = settings.output_format or src.format
        nnz_per_image, expansion = source_estimates(src, settings.taps, geo, fmt)
        blocks = _blocks_for(src, settings, geo, fmt, out_dtype, scheduler_threads(), nnz_per_image, expansion,
                             lazy=True)
        spec = BlockSpec(fs, geo.out_shape, mode, method, backend, out_dtype.str, fmt, operation=op, bank=settings.bank)
        return _split_bank(_source_array(src, kernel, blocks, spec), spec)

    if array is not None or storage_options is not None or level is not None or spatial_axes is not None:
        raise ValueError("array=, level=, spatial_axes= and storage_options= apply only when x is a zarr store "
                         "(path, URL or zarr object)")

    if scipy.sparse.issparse(x):
        if x.ndim != 2:
            raise ValueError(f"a sparse x must be 2-D (n_images, H*W); got shape {x.shape}")
        if frame_shape is None:
            raise ValueError("frame_shape=(H, W) is required when x is a sparse matrix of shape (n_images, H*W)")
        H, W = frame_shape
        if x.shape[1] != H * W:
            raise ValueError(f"x must have H*W = {H * W} columns for frame_shape={frame_shape}; got shape {x.shape}")
        check_real(x.dtype)
        geo = settings.window(frame_shape)
        out_dtype = compute_dtype(x.dtype, settings.dtype)
        fmt = settings.output_format or "csr"
        csr = scipy.sparse.csr_matrix(x)
        blocks = plan_matrix(csr.shape[0], frame_shape, csr, settings, geo, x.dtype, out_dtype, fmt, scheduler_threads())
        spec = BlockSpec(frame_shape, geo.out_shape, mode, method, backend, out_dtype.str, fmt, operation=op, bank=settings.bank)
        return _split_bank(_sparse_array(csr, kernel, blocks, spec), spec)

    if isinstance(x, da.Array):
        arr = x
    elif isinstance(x, np.ndarray):
        arr = None
    elif hasattr(x, "__array__"):
        x = np.asarray(x)
        arr = None
    else:
        raise TypeError(
            "x must be a zarr store (path, URL, zarr.Array/Group), a dask or numpy array (n, H, W), "
            f"or a scipy.sparse matrix (n, H*W) with frame_shape; got {type(x).__name__}"
        )
    check_real(x.dtype)
    if x.ndim == 3:
        fs = (int(x.shape[1]), int(x.shape[2]))
        if frame_shape is not None and frame_shape != fs:
            raise ValueError(f"frame_shape={frame_shape} does not match x's frame shape {fs}")
    elif x.ndim == 2 and frame_shape is not None:
        fs = frame_shape
        if x.shape[1] != fs[0] * fs[1]:
            raise ValueError(f"x must have H*W = {fs[0] * fs[1]} columns for frame_shape={fs}; got shape {x.shape}")
    else:
        raise ValueError(
            f"x must be a stack (n_images, H, W), or (n_images, H*W) with frame_shape; got shape {x.shape}"
        )
    fs = check_frame_shape(fs)
    geo = settings.window(fs)
    out_dtype = compute_dtype(x.dtype, settings.dtype)
    in_sparse = arr is not None and scipy.sparse.issparse(getattr(arr, "_meta", None))
    fmt = settings.output_format or ("csr" if in_sparse else "dense")
    n = int(x.shape[0])
    if arr is None:
        chunk_rows = 1
        arr = da.from_array(x, chunks=(max(n, 1),) + x.shape[1:])
    else:
        chunk_rows = int(max(arr.chunks[0])) if arr.chunks[0] else 1
    blocks = plan_blocks(n_images=n, chunk_rows=chunk_rows, frame_shape=fs, out_shape=geo.out_shape, in_dtype=x.dtype,
                         out_dtype=out_dtype, in_format="csr" if in_sparse else "dense", out_format=fmt, kernel=kernel,
                         block_memory=settings.block_memory, threads=scheduler_threads(),
                         fill_nnz=settings.fill_nnz(geo) if fmt == "csr" else 0, untiled=LAZY_UNTILED)
    spec = BlockSpec(fs, geo.out_shape, mode, method, backend, out_dtype.str, fmt, operation=op, bank=settings.bank)
    arr = arr.rechunk((blocks.chunks,) + tuple((s,) for s in arr.shape[1:])) if n else arr
    return _split_bank(_map_array(arr, kernel, blocks, spec), spec)


def _meta(spec: BlockSpec):
    dt = np.dtype(spec.dtype)
    if spec.out_format == "dense":
        return np.empty((0,) * (4 if spec.bank else 3), dtype=dt)
    return scipy.sparse.csr_matrix((0, spec.out_shape[0] * spec.out_shape[1] * spec.outputs), dtype=dt)


def _out_block_shape(rows: int, spec: BlockSpec) -> tuple[int, ...]:
    """A block of the lazy array: ``(rows, H_out, W_out)`` dense (a bank:
    ``(rows, K, H_out, W_out)``), ``(rows, H_out*W_out)`` CSR (a bank: its K
    outputs side by side, ``(rows, K*H_out*W_out)``)."""
    Ho, Wo = spec.out_shape
    if spec.out_format == "dense":
        return (rows, spec.bank, Ho, Wo) if spec.bank else (rows, Ho, Wo)
    return (rows, Ho * Wo * spec.outputs)


def _split_bank(y, spec: BlockSpec):
    """What :func:`convolve` returns for a CSR bank: K lazy arrays, one per
    kernel, column slices of one array whose block tasks they share."""
    if not (spec.bank and spec.out_format == "csr"):
        return y
    P = spec.out_shape[0] * spec.out_shape[1]
    return [y[:, k * P:(k + 1) * P] for k in range(spec.bank)]


def _map_array(arr, kernel, blocks: RowBlocks, spec: BlockSpec):
    from dask.base import tokenize

    chunks = ((blocks.chunks or (0,)),) + tuple((d,) for d in _out_block_shape(0, spec)[1:])
    knode = kernel_node(kernel)
    drop: tuple[int, ...]
    new: tuple[int, ...]
    out_ndim = len(_out_block_shape(0, spec))
    if arr.ndim == 3:
        drop, new = ((), (3,) if out_ndim == 4 else ()) if spec.out_format == "dense" else ((2,), ())
    else:
        drop, new = ((), tuple(range(2, out_ndim))) if spec.out_format == "dense" else ((), ())
    return arr.map_blocks(
        convolve_array_block,
        knode,
        spec,
        chunks=chunks,
        drop_axis=drop,
        new_axis=new,
        dtype=np.dtype(spec.dtype),
        meta=_meta(spec),
        # the name fully specifies the output keys: a fixed one made two
        # convolve() calls of different arrays collide in one compute
        name=f"sparseconv-{spec.mode}-{tokenize(arr.name, spec, kernel_digest(kernel))}",
    )


def _from_tasks(delayed_blocks, blocks: RowBlocks, spec: BlockSpec):
    import dask.array as da

    meta = _meta(spec)
    if not delayed_blocks:
        if spec.out_format == "dense":
            return da.zeros(_out_block_shape(0, spec), dtype=spec.dtype)
        return da.from_array(scipy.sparse.csr_matrix(_out_block_shape(0, spec), dtype=spec.dtype), asarray=False)
    parts = [
        da.from_delayed(d, shape=_out_block_shape(stop - start, spec), dtype=np.dtype(spec.dtype), meta=meta)
        for d, (start, stop) in zip(delayed_blocks, blocks.bounds)
    ]
    return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _source_array(src, kernel, blocks: RowBlocks, spec: BlockSpec):
    from dask import delayed
    from dask.base import tokenize

    # a content token (where the stack is and what its layout says), as
    # open_stack and da.from_zarr name theirs: identical calls share work
    token = tokenize(str(src.location), src.format, src.n_images, tuple(src.frame_shape), str(src.dtype), src.nnz,
                     src.chunk_rows, spec, kernel_digest(kernel), blocks.bounds)
    knode = kernel_node(kernel)
    src_node = delayed(src, name=f"sparseconv-source-{token}", traverse=False)
    func = delayed(convolve_source_block, pure=True)
    tasks = [func(src_node, knode, start, stop, spec, dask_key_name=block_key(token, i))
             for i, (start, stop) in enumerate(blocks.bounds)]
    return _from_tasks(tasks, blocks, spec)


def _sparse_array(csr, kernel, blocks: RowBlocks, spec: BlockSpec):
    from dask import delayed
    from dask.base import tokenize

    # by content (dask hashes numpy arrays' bytes at GB/s; a sparse matrix
    # itself it tokenizes by identity): equal inputs, equal keys
    token = tokenize(csr.shape, csr.data, csr.indices, csr.indptr, spec, kernel_digest(kernel), blocks.bounds)
    knode = kernel_node(kernel)
    func = delayed(convolve_array_block, pure=True)
    tasks = []
    for i, (start, stop) in enumerate(blocks.bounds):
        part = delayed(csr[start:stop], name=f"sparseconv-input-{token}-{i}", traverse=False)
        tasks.append(func(part, knode, spec, dask_key_name=block_key(token, i)))
    return _from_tasks(tasks, blocks, spec)
