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

__all__ = ["sample_rois", "sample_raster", "sample_stack", "write_sample_stack", "ensure_sample", "SAMPLE_CHUNK_ROWS"]

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


def sample_raster(
    frame_shape: tuple[int, int] = (100_000, 100_000),
    nnz: int = 10_000_000,
    *,
    mean_cluster: int = 400,
    seed: int = 0,
    dtype: Any = np.float32,
) -> scipy.sparse.csr_matrix:
    """One huge, mostly empty frame shaped like a population raster.

    Nonzeros come in clusters ("settlements") around uniformly placed
    centres: cluster sizes are heavy-tailed (Pareto, shape 1.5, so a few
    cities hold many pixels and most villages a handful), each cluster's
    pixels spread around its centre with a standard deviation of
    ``sqrt(size) / 1.5`` pixels (dense cores that thin out), and values are
    lognormal counts. The frame is the workload of tiles
    (:mod:`dask_sparseconv.tiles`): far larger than a block, sparse overall,
    dense in places.

    Parameters
    ----------
    frame_shape : (int, int)
        ``(H, W)``; the default is 100,000 x 100,000 (10 gigapixels).
    nnz : int
        Nonzeros, exactly (must be at most a quarter of the pixels).
    mean_cluster : int
        Mean pixels per cluster.
    seed : int
        Random seed; the same arguments always give the same frame.
    dtype : float dtype

    Returns
    -------
    scipy.sparse.csr_matrix
        Canonical CSR ``(1, H*W)`` with int64 indices.
    """
    H, W = int(frame_shape[0]), int(frame_shape[1])
    nnz = int(nnz)
    if H < 1 or W < 1 or nnz < 0 or nnz > H * W // 4:
        raise ValueError(f"frame_shape must be positive and nnz in [0, H*W/4]; got {frame_shape}, nnz={nnz}")
    rng = np.random.default_rng(seed)
    flat = np.zeros(0, dtype=np.int64)
    while flat.size < nnz:
        want = nnz - flat.size
        n_cl = max(1, want // max(1, int(mean_cluster)))
        sizes = rng.pareto(1.5, n_cl) + 1.0
        # 1.4 x as many draws as pixels wanted: draws landing on one pixel merge
        sizes = np.maximum(1, np.round(sizes / sizes.sum() * want * 1.4)).astype(np.int64)
        cy, cx = rng.uniform(0, H, n_cl), rng.uniform(0, W, n_cl)
        spread = np.sqrt(sizes) / 1.5
        owner = np.repeat(np.arange(n_cl), sizes)
        y = np.clip(np.round(cy[owner] + rng.standard_normal(owner.size) * spread[owner]), 0, H - 1).astype(np.int64)
        x = np.clip(np.round(cx[owner] + rng.standard_normal(owner.size) * spread[owner]), 0, W - 1).astype(np.int64)
        del owner
        flat = np.union1d(flat, y * W + x)
    if flat.size > nnz:
        flat = np.sort(rng.choice(flat, nnz, replace=False))
    values = rng.lognormal(0.0, 1.0, flat.size).astype(dtype)
    return scipy.sparse.csr_matrix((values, flat, np.array([0, flat.size], dtype=np.int64)), shape=(1, H * W))


def sample_stack(kind: str, n_images: int, frame_shape: tuple[int, int], *, max_rois: int = 3,
                 radius: float = 8.0, nnz: int = 1_000_000, mean_cluster: int = 400,
                 seed: int = 0) -> scipy.sparse.csr_matrix:
    """A sample stack as CSR ``(n, H*W)``: ROI footprints (``kind='rois'``,
    :func:`sample_rois`) or raster frames (``kind='raster'``, one
    :func:`sample_raster` per frame, seeds ``seed``, ``seed + 1``, ...)."""
    if kind == "rois":
        return sample_rois(n_images, frame_shape, max_rois=max_rois, radius=radius, seed=seed)
    if kind == "raster":
        frames = [sample_raster(frame_shape, nnz, mean_cluster=mean_cluster, seed=seed + i) for i in range(n_images)]
        return scipy.sparse.csr_matrix(scipy.sparse.vstack(frames, format="csr")) if frames else \
            scipy.sparse.csr_matrix((0, int(frame_shape[0]) * int(frame_shape[1])), dtype=np.float32)
    raise ValueError(f"kind must be 'rois' or 'raster'; got {kind!r}")


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
    kind: str = "rois",
    nnz: int = 1_000_000,
    mean_cluster: int = 400,
) -> str:
    """Generate a sample stack (:func:`sample_stack`: ROI footprints by
    default, or ``kind='raster'`` frames) and write it as a zarr stack at ``path``.

    ``format='dense'`` writes a ``(n, H, W)`` float32 array;
    ``format='csr'`` writes an anndata-style ``csr_matrix`` group (rasters:
    CSR only). Both go through :mod:`dask_sparseconv.storage`, so the result
    opens with :func:`dask_sparseconv.open_stack`. Returns the path.
    """
    from . import storage

    if format not in ("dense", "csr"):
        raise ValueError(f"format must be 'dense' or 'csr'; got {format!r}")
    if kind == "raster" and format != "csr":
        raise ValueError("a raster sample is written as format='csr' (its frames are far larger than a block)")
    H, W = int(frame_shape[0]), int(frame_shape[1])
    csr = sample_stack(kind, n_images, (H, W), max_rois=max_rois, radius=radius, nnz=nnz, mean_cluster=mean_cluster,
                       seed=seed)
    params = {"max_rois": int(max_rois), "radius": float(radius)} if kind == "rois" else \
        {"nnz": int(nnz), "mean_cluster": int(mean_cluster)}
    attrs = {"sample": {"kind": kind, "n_images": int(n_images), "frame_shape": [H, W], **params, "seed": int(seed)}}
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
        kind=spec.kind,
        nnz=spec.nnz,
        mean_cluster=spec.mean_cluster,
    )
    return True
