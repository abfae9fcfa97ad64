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


#: Pixels one read may densify (a 8192 x 8192 window: 256 MiB of float32).
#: napari shows a plain image layer a whole frame at a time, so frames larger
#: than this are not opened as layers (a 100,000^2 raster would be 40 GB).
MAX_WINDOW_PIXELS = 64 * 1024**2


class CSRFrames:
    """A CSR stack seen as a read-only ``(n, H, W)`` array, decoded frame by frame.

    What napari needs of an array: ``shape``, ``dtype``, ``ndim`` and
    ``__getitem__`` returning numpy; indexing reads only the rows (images)
    the key selects. A key with row and column slices (``frames[i, y0:y1,
    x0:x1]``) reads only that window of each frame, so windows of frames too
    large to densify whole can be looked at; no read densifies more than
    :data:`MAX_WINDOW_PIXELS` pixels per frame.
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
        if len(key) > 3:
            raise IndexError(f"too many indices for a stack of shape {self.shape}: {key!r}")
        first, rest = key[0], key[1:]
        rows = np.arange(self.shape[0])[first]
        picked = np.atleast_1d(rows)
        (r0, r1, rsel), (c0, c1, csel) = (_window(k, n) for k, n in
                                          zip(rest + (slice(None),) * (2 - len(rest)), self.shape[1:]))
        if (r1 - r0) * (c1 - c0) > MAX_WINDOW_PIXELS:
            raise ValueError(f"reading rows {r0}-{r1 - 1} x columns {c0}-{c1 - 1} of frames of {self.shape[1]} x "
                             f"{self.shape[2]} pixels would densify {(r1 - r0) * (c1 - c0):,} pixels per frame "
                             f"(limit: {MAX_WINDOW_PIXELS:,}); index a smaller window, e.g. frames[i, y0:y1, x0:x1]")
        out = np.zeros((picked.size, r1 - r0, c1 - c0), dtype=self.dtype)
        for j, i in enumerate(picked):
            out[j] = self._src.read_frame_rows(int(i), r0, r1, c0, c1).toarray()
        out = out[:, rsel][..., csel]  # an int drops its axis; arrays pick within the window
        return out[0] if np.ndim(rows) == 0 else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[:]
        return full.astype(dtype) if dtype is not None else full

    def __repr__(self) -> str:
        return f"CSRFrames({self._src.location}, shape={self.shape}, dtype={self.dtype})"


def _window(key: Any, n: int) -> tuple[int, int, Any]:
    """``(lo, hi, sel)``: the span ``[lo, hi)`` of one frame axis that ``key``
    selects, and the index (relative to ``lo``) that picks the key's entries
    from it (an int drops the axis)."""
    if isinstance(key, (int, np.integer)):
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for a frame axis of size {n}")
        i %= n
        return i, i + 1, np.intp(0)
    picked = np.arange(n)[key]  # slices, arrays, booleans: numpy's rules and errors
    if picked.size == 0:
        return 0, 0, np.arange(0)
    lo, hi = int(picked.min()), int(picked.max()) + 1
    return lo, hi, picked - lo


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
    H, W = (int(v) for v in src.frame_shape)
    if H * W > MAX_WINDOW_PIXELS:
        raise ValueError(f"{path}: frames of {H} x {W} pixels are too large to show whole in napari (limit: "
                         f"{MAX_WINDOW_PIXELS:,} pixels per frame); look at windows instead: "
                         f"dask_sparseconv.napari_reader.CSRFrames(dask_sparseconv.storage.open_input({path!r}))"
                         "[i, y0:y1, x0:x1]")
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
