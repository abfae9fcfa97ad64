"""A small synthetic stack to try the package on: ROI footprints.

Each frame holds 0 to ``max_rois`` soft disks ("cell masks", as a
segmentation of a calcium-imaging movie produces): value ~1 inside the
radius, falling linearly to 0 over one pixel either side of the edge, times a
random amplitude. Frames are mostly zero (about 0.1 % nonzero at the defaults),
which is the case the package is built for.

The quickstart workflow generates this stack on first run (``input.sample``),
so ``dask-sparseconv run workflows/quickstart.yaml`` works on a fresh
machine with nothing prepared.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import scipy.sparse

__all__ = ["sample_rois", "write_sample_stack", "ensure_sample", "SAMPLE_CHUNK_ROWS"]

#: Images per chunk of the written sample (dense) stack.
SAMPLE_CHUNK_ROWS = 16


def _soft_disk(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets ``(dy, dx)`` and values of one soft disk centred at 0."""
    half = int(math.ceil(radius + 1))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    dist = np.sqrt(yy * yy + xx * xx)
    val = np.clip((radius + 1.0 - dist) / 2.0, 0.0, 1.0)
    keep = val > 0
    return yy[keep], xx[keep], val[keep]


def sample_rois(
    n_images: int = 200,
    frame_shape: tuple[int, int] = (512, 512),
    *,
    max_rois: int = 3,
    radius: float = 8.0,
    seed: int = 0,
    dtype: Any = np.float32,
) -> scipy.sparse.csr_matrix:
    """Generate ROI footprints as a CSR matrix ``(n_images, H*W)``.

    Parameters
    ----------
    n_images : int
        Frames in the stack.
    frame_shape : (int, int)
        ``(H, W)`` of each frame.
    max_rois : int
        Each frame holds a uniformly random number of disks in
        ``0..max_rois``.
    radius : float
        Mean disk radius in pixels; each disk's radius varies by +-25 %.
    seed : int
        Random seed; the same arguments always give the same stack.
    dtype : float dtype
        Value dtype (default float32).

    Returns
    -------
    scipy.sparse.csr_matrix
        Canonical CSR; disks that overlap add up.
    """
    H, W = int(frame_shape[0]), int(frame_shape[1])
    if n_images < 0 or H < 1 or W < 1:
        raise ValueError(f"n_images must be >= 0 and frame_shape positive; got {n_images}, {frame_shape}")
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i in range(int(n_images)):
        for _ in range(int(rng.integers(0, max_rois + 1))):
            r = float(radius) * rng.uniform(0.75, 1.25)
            dy, dx, v = _soft_disk(r)
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            y = np.round(cy).astype(int) + dy
            x = np.round(cx).astype(int) + dx
            inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
            rows.append(np.full(int(inside.sum()), i, dtype=np.int64))
            cols.append(y[inside] * W + x[inside])
            vals.append(v[inside] * rng.uniform(0.5, 1.5))
    if rows:
        r_, c_, v_ = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    else:
        r_ = c_ = np.zeros(0, dtype=np.int64)
        v_ = np.zeros(0)
    m = scipy.sparse.coo_matrix((v_.astype(dtype), (r_, c_)), shape=(int(n_images), H * W)).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return scipy.sparse.csr_matrix(m)


def write_sample_stack(
    path: str | os.PathLike,
    n_images: int = 200,
    frame_shape: tuple[int, int] = (512, 512),
    *,
    max_rois: int = 3,
    radius: float = 8.0,
    seed: int = 0,
    format: str = "dense",
    overwrite: bool = False,
) -> str:
    """Generate :func:`sample_rois` and write it as a zarr stack at ``path``.

    ``format='dense'`` writes a ``(n, H, W)`` float32 array;
    ``format='csr'`` writes an anndata-style ``csr_matrix`` group. Both go
    through :mod:`dask_sparseconv.storage`, so the result opens with
    :func:`dask_sparseconv.open_stack`. Returns the path.
    """
    from . import storage

    if format not in ("dense", "csr"):
        raise ValueError(f"format must be 'dense' or 'csr'; got {format!r}")
    H, W = int(frame_shape[0]), int(frame_shape[1])
    csr = sample_rois(n_images, (H, W), max_rois=max_rois, radius=radius, seed=seed)
    attrs = {
        "sample": {
            "kind": "rois",
            "n_images": int(n_images),
            "frame_shape": [H, W],
            "max_rois": int(max_rois),
            "radius": float(radius),
            "seed": int(seed),
        }
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if format == "csr":
        node = storage.write_csr_stack(path, csr, (H, W), overwrite=overwrite)
    else:
        # Held dense once (200 x 512 x 512 float32 = 200 MiB at the defaults).
        dense = csr.toarray().reshape(csr.shape[0], H, W)
        node = storage.write_dense_stack(path, dense, chunks=SAMPLE_CHUNK_ROWS, overwrite=overwrite)
        del dense
    if node is not None and hasattr(node, "attrs"):
        node.attrs.update(attrs)
    return path


def ensure_sample(path: str, spec: Any) -> bool:
    """Write the sample described by ``spec`` (a workflow ``SampleSpec``) at
    ``path`` unless something is already there. Returns True when written."""
    if os.path.exists(path):
        return False
    write_sample_stack(
        path,
        spec.n_images,
        spec.frame_shape,
        max_rois=spec.max_rois,
        radius=spec.radius,
        seed=spec.seed,
        format=spec.format,
    )
    return True
