"""A napari reader (npe2 manifest: ``dask_sparseconv/napari.yaml``) for
the stacks this package reads and writes.

Drop an output of ``convolve_zarr`` / ``dask-sparseconv run`` (or any
dense ``(n, H, W)`` zarr array or anndata ``csr_matrix`` group with
``frame_shape``) on napari, or ``napari out.zarr``: it opens as one image
layer of ``n`` frames. Nothing is read until napari shows a frame: a dense
stack is a lazy dask array; a CSR stack is :class:`CSRFrames`, which reads
and densifies only the frames asked for, so a 100,000-frame CSR output
opens at once. The output's provenance (source, kernel, mode, ...) is the
layer's ``metadata["dask_sparseconv"]``.

napari itself is not imported here: install it with
``pip install 'dask-sparseconv[napari]'``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

__all__ = ["get_reader", "read_stack", "CSRFrames"]


class CSRFrames:
    """A CSR stack seen as a read-only ``(n, H, W)`` array, decoded frame by frame.

    What napari needs of an array: ``shape``, ``dtype``, ``ndim`` and
    ``__getitem__`` returning numpy; indexing reads only the rows (images)
    the key selects.
    """

    def __init__(self, src: Any):
        self._src = src
        self.shape = (int(src.n_images),) + tuple(int(v) for v in src.frame_shape)
        self.dtype = np.dtype(src.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        rows = np.arange(self.shape[0])[first]
        H, W = self.shape[1:]
        picked = np.atleast_1d(rows)
        out = np.zeros((picked.size, H, W), dtype=self.dtype)
        for j, i in enumerate(picked):
            out[j] = self._src.read_block(int(i), int(i) + 1).toarray().reshape(H, W)
        if np.ndim(rows) == 0:
            return out[0][rest] if rest else out[0]
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[:]
        return full.astype(dtype) if dtype is not None else full

    def __repr__(self) -> str:
        return f"CSRFrames({self._src.location}, shape={self.shape}, dtype={self.dtype})"


def _open(path: str) -> tuple[Any, dict | None] | None:
    """The input stack at ``path`` and its provenance, or None when this package cannot read it."""
    from .storage import open_input, progress, resolve_location

    try:
        src = open_input(path)
    except Exception:  # not a stack this package reads: let napari try its other readers
        return None
    try:
        prov = progress.provenance(resolve_location(path, None, None).open(mode="r"))
    except Exception:
        prov = None
    return src, prov


def read_stack(path: str | os.PathLike) -> list[tuple[Any, dict, str]]:
    """napari layer data for the stack at ``path``: ``[(data, metadata, 'image')]``."""
    path = os.fspath(path)
    opened = _open(path)
    if opened is None:
        raise ValueError(f"{path} is not a stack dask-sparseconv reads (a dense (n, H, W) zarr array, an anndata "
                         "csr_matrix group with frame_shape, or an OME-Zarr image)")
    src, prov = opened
    data = CSRFrames(src) if src.format == "csr" else src.to_dask()
    name = os.path.basename(path.rstrip("/\\")) or path
    meta: dict[str, Any] = {"name": name, "metadata": {"dask_sparseconv": prov or {}, "format": src.format}}
    return [(data, meta, "image")]


def get_reader(path: str | list[str]) -> Callable[[Any], list] | None:
    """npe2 reader hook: a reader for one path this package can open, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if not os.path.isdir(path) and "://" not in path:
        return None  # zarr stores are folders (or URLs)
    if _open(path) is None:
        return None
    return lambda p: read_stack(p[0] if isinstance(p, list) else p)
