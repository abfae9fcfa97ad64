"""Torch engines: ``precomputed``, ``lazy`` and ``gather_scatter`` on a torch device.

This is the only module of the package that imports torch; the registry
imports it only when a torch engine is built.

All three engines follow :mod:`dask_sparseconv.engine.base`. Per call, the
input CSR goes to the device in one transfer (``indptr``, ``indices``,
``data``), the work happens there, and the result comes back in one
transfer (three arrays for CSR; for dense results one transfer per
accumulator chunk, see ``max_buffer_bytes``). Zero-dropping, and sorting
where needed, happen on the device before the copy back.

Coordinates are those of :mod:`dask_sparseconv.geometry`: input pixel
``(r, c)`` and kernel tap ``(i, j)`` land on output pixel
``(r + i - top, c + j - left)`` when that is inside the output window. Only
nonzero kernel taps take part, so explicit zeros and zero taps never create
output entries.

Thread safety: per-call state lives in per-call tensors. Shared state is the
kernel taps (built in ``__init__``, read-only) and the Toeplitz matrices of
:class:`PrecomputedTorch` (built once per mode under a lock, read-only
afterwards). torch operators are safe to call concurrently on shared
read-only tensors.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import scipy.sparse
import torch

from ..geometry import geometry
from .base import INT32_MAX, Engine, dense_out, empty_csr, index_dtype


def _silence_csr_beta_warning() -> None:
    """torch warns once per process (TORCH_WARN_ONCE) that sparse CSR tensors
    are "beta". The layout is used here only to construct, multiply and read
    back, which has been stable for many releases, so the warning is noise:
    trigger it once at import with warnings ignored, and it never shows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.sparse_csr_tensor(
            torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), size=(1, 1),
            check_invariants=False,
        )


_silence_csr_beta_warning()

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

#: Bytes of scratch per expanded (input nonzero x kernel tap) entry in the
#: lazy engine and in the Toeplitz build: int64 row, column and linear index,
#: a value, a mask byte, plus headroom for temporaries.
_BYTES_PER_EXPANDED = 48


def _torch_dtype(dtype) -> torch.dtype:
    try:
        return _TORCH_DTYPES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"torch engines compute in float32 or float64; got dtype {np.dtype(dtype)}") from None


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _kernel_taps(kernel: np.ndarray):
    """Row, column and value of every nonzero tap, in row-major order."""
    ki, kj = np.nonzero(kernel)
    return ki.astype(np.int64), kj.astype(np.int64), kernel[ki, kj]


def _valid_count(n_in: int, n_out: int, shift: int) -> int:
    """How many ``r`` in ``[0, n_in)`` have ``0 <= r + shift < n_out``."""
    return max(0, min(n_in, n_out - shift) - max(0, -shift))


def estimate_toeplitz_bytes(frame_shape, kernel, dtype, mode: str | None = None) -> int:
    """Bytes of the Toeplitz matrix :class:`PrecomputedTorch` builds for a frame.

    The matrix has one row per input pixel and at most one entry per nonzero
    kernel tap in each row: ``H * W * nnz(kernel)`` entries (exact for
    ``mode='full'``; with ``mode=None`` this bound is used for every mode),
    each a value of ``dtype`` plus a column index, plus the row pointer.
    With ``mode='same'``/``'valid'`` the entries that fall outside the output
    window are left out, giving the exact size. Indices are int32 when the
    entry count and the matrix dimensions fit, else int64. Nothing is
    allocated: callers use it to decide before building (GPU fallback).

    Parameters
    ----------
    frame_shape : tuple of int
        ``(H, W)`` of the input images.
    kernel : array_like
        The 2-D kernel; only its nonzero taps count (after casting to ``dtype``).
    dtype : numpy dtype
        Value type of the matrix (float32 or float64).

    Returns
    -------
    int
        Estimated bytes on the device. Building needs this much plus bounded
        scratch (at most ``max_buffer_bytes``).
    """
    H, W = int(frame_shape[0]), int(frame_shape[1])
    k = np.asarray(kernel)
    if k.ndim != 2:
        raise ValueError(f"kernel must be 2-D; got shape {k.shape}")
    dt = np.dtype(dtype)
    ki, kj = np.nonzero(k.astype(dt, copy=False))
    pixels = H * W
    if mode is None:
        kh, kw = k.shape
        out_pixels = (H + kh - 1) * (W + kw - 1)  # 'full' is the widest output
        entries = pixels * len(ki)
    else:
        geo = geometry((H, W), k.shape, mode)
        out_pixels = geo.out_pixels
        Ho, Wo = geo.out_shape
        entries = sum(
            _valid_count(H, Ho, int(i) - geo.top) * _valid_count(W, Wo, int(j) - geo.left) for i, j in zip(ki, kj)
        )
    idx = index_dtype(pixels, out_pixels, entries).itemsize
    return int(entries * (dt.itemsize + idx) + (pixels + 1) * idx)


class _TorchEngine(Engine):
    """Shared plumbing: device, taps on the device, transfers, CSR assembly."""

    backend = "torch"

    def __init__(self, frame_shape, kernel, dtype, *, device=None, n_threads=1, max_buffer_bytes=256 * 1024**2):
        super().__init__(frame_shape, kernel, dtype, device=device, n_threads=n_threads, max_buffer_bytes=max_buffer_bytes)
        self.torch_device = _resolve_device(device)
        self.device = str(self.torch_device)
        self.torch_dtype = _torch_dtype(self.dtype)
        #: Device memory is host memory (CPU): dense results are accumulated
        #: straight into the caller's array and sorting is left to scipy.
        #: Tests switch it off to run the accelerator code paths on CPU.
        self._shares_host_memory = self.torch_device.type == "cpu"
        ki, kj, kv = _kernel_taps(self.kernel)
        self.n_taps = len(kv)
        self._tap_i = ki
        self._tap_j = kj
        self._tap_v = kv
        # Read-only device copies used by the vectorised engines.
        self._ki = torch.as_tensor(ki, device=self.torch_device)
        self._kj = torch.as_tensor(kj, device=self.torch_device)
        self._kv = torch.as_tensor(np.ascontiguousarray(kv), dtype=self.torch_dtype, device=self.torch_device)

    # -- transfers -------------------------------------------------------
    def _put(self, arr: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Host array to the device (zero-copy on CPU when possible)."""
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
            arr = arr.copy()
        t = torch.from_numpy(np.ascontiguousarray(arr))
        # Move first, then widen on the device: int32 indices cross the bus at half size.
        return t.to(device=self.torch_device).to(dtype=dtype or t.dtype)

    @staticmethod
    def _get(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    def _input(self, x: scipy.sparse.csr_matrix):
        """Input nonzeros on the device: (image index, row, column, value), int64 coordinates."""
        indptr = self._put(x.indptr, torch.int64)
        cols = self._put(x.indices, torch.int64)
        vals = self._put(x.data, self.torch_dtype)
        counts = indptr[1:] - indptr[:-1]
        img = torch.repeat_interleave(torch.arange(x.shape[0], device=self.torch_device), counts, output_size=cols.numel())
        W = self.frame_shape[1]
        return img, torch.div(cols, W, rounding_mode="floor"), torch.remainder(cols, W), vals

    def _csr_from_device(self, row_counts: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape, sorted_: bool):
        """Assemble the canonical host CSR of ``shape`` from per-row counts and
        row-grouped column indices and values on the device.

        Exact zeros are dropped here (on the device); rows whose columns are not
        sorted (``sorted_=False``) are sorted. One transfer per array.
        """
        n, n_cols = int(shape[0]), int(shape[1])
        keep = vals != 0
        if not bool(keep.all()):
            rows = torch.repeat_interleave(torch.arange(n, device=vals.device), row_counts, output_size=vals.numel())
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            row_counts = torch.bincount(rows, minlength=n)
        nnz = int(vals.numel())
        if nnz == 0:
            return empty_csr(n, n_cols, self.dtype)
        if not sorted_ and not self._shares_host_memory:
            # Sort on the accelerator; on CPU scipy's per-row sort below is cheaper.
            rows = torch.repeat_interleave(torch.arange(n, device=vals.device), row_counts, output_size=nnz)
            order = torch.argsort(rows * n_cols + cols)
            cols, vals = cols[order], vals[order]
            sorted_ = True
        idx = index_dtype(n, n_cols, nnz)
        tidx = torch.int32 if idx == np.int32 else torch.int64
        indptr = torch.zeros(n + 1, dtype=tidx, device=vals.device)
        indptr[1:] = torch.cumsum(row_counts, 0)
        out = scipy.sparse.csr_matrix(
            (self._get(vals), self._get(cols.to(tidx)), self._get(indptr)), shape=(n, n_cols), copy=False
        )
        if sorted_:
            out.has_sorted_indices = True
        else:
            out.sort_indices()
        out.has_canonical_format = True
        return out

    # -- chunking --------------------------------------------------------
    def _dense_chunk_rows(self, out_pixels: int) -> int:
        """Images per dense accumulator chunk within ``max_buffer_bytes`` (at least one)."""
        return max(1, self.max_buffer_bytes // max(1, out_pixels * self.dtype.itemsize))

    def _expanded_chunks(self, indptr: np.ndarray, n_images: int, per_image_cap: int | None = None):
        """Contiguous image ranges whose expanded entries (nnz x taps) fit the budget."""
        budget = max(1, self.max_buffer_bytes // (_BYTES_PER_EXPANDED * max(1, self.n_taps)))
        cap = per_image_cap or n_images
        ranges = []
        a = 0
        while a < n_images:
            # largest b with indptr[b] - indptr[a] <= budget, at least a + 1
            b = int(np.searchsorted(indptr, indptr[a] + budget, side="right")) - 1
            b = min(max(b, a + 1), a + cap, n_images)
            ranges.append((a, b))
            a = b
        return ranges

    @staticmethod
    def _scatter_into(res: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """Write sparse results (no duplicate positions) into the zeroed dense ``res``."""
        res.reshape(res.shape[0], -1)[rows, cols] = vals
        return res

    def _trivial(self, x) -> bool:
        return x.shape[0] == 0 or x.nnz == 0 or self.n_taps == 0

    def nbytes(self) -> int:
        return int(self.kernel.nbytes + sum(t.numel() * t.element_size() for t in (self._ki, self._kj, self._kv)))


class PrecomputedTorch(_TorchEngine):
    """Sparse Toeplitz matrix on the device; one sparse x sparse product per call.

    The matrix for a mode has shape ``(H*W, H_out*W_out)``: row ``p`` holds
    the output pixels that input pixel ``p`` reaches, weighted by the kernel
    taps, so a batch ``X`` (``(n, H*W)`` CSR) convolves to ``X @ M``. It is
    built directly on the device, once per mode on first use (or by
    :meth:`prepare`), under a lock, and kept. Its size is about
    :func:`estimate_toeplitz_bytes`.
    """

    method = "precomputed"

    #: Largest Toeplitz matrix (bytes) the engine agrees to build for one mode
    #: (same limit as the CPU precomputed engines).
    max_toeplitz_bytes: int = 4 * 1024**3

    def __init__(self, frame_shape, kernel, dtype, *, device=None, n_threads=1, max_buffer_bytes=256 * 1024**2):
        super().__init__(frame_shape, kernel, dtype, device=device, n_threads=n_threads, max_buffer_bytes=max_buffer_bytes)
        self._matrices: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def estimated_bytes(self, mode: str | None = None) -> int:
        """:func:`estimate_toeplitz_bytes` for this engine's frame, kernel and dtype."""
        return estimate_toeplitz_bytes(self.frame_shape, self.kernel, self.dtype, mode)

    def prepare(self, mode: str) -> torch.Tensor:
        """Build (once) and return the Toeplitz matrix for ``mode`` on the device."""
        mat = self._matrices.get(mode)
        if mat is None:
            with self._lock:
                mat = self._matrices.get(mode)
                if mat is None:
                    size = self.estimated_bytes(mode)
                    if size > self.max_toeplitz_bytes:
                        raise ValueError(
                            f"method='precomputed' would need a {size / 1024**3:.1f} GiB Toeplitz matrix on "
                            f"{self.device} for frame_shape={self.frame_shape}, kernel shape={self.kernel.shape}, "
                            f"mode={mode!r} (limit {self.max_toeplitz_bytes / 1024**3:.1f} GiB); use "
                            f"method='gather_scatter' for frames this large"
                        )
                    mat = self._build(mode)
                    self._matrices[mode] = mat
        return mat

    #: Same name as the CPU precomputed engines' accessor.
    toeplitz = prepare

    def _build(self, mode: str) -> torch.Tensor:
        geo = self.geometry(mode)
        H, W = self.frame_shape
        Ho, Wo = geo.out_shape
        dev = self.torch_device
        di = self._ki - geo.top  # row shift of each tap
        dj = self._kj - geo.left
        shift = di * Wo + dj  # linear shift of each tap in the output
        entries_max = H * W * self.n_taps
        idx = torch.int32 if index_dtype(H * W, geo.out_pixels, entries_max) == np.int32 else torch.int64
        # Build a band of frame rows at a time so scratch stays bounded.
        budget = max(1, min(self.max_buffer_bytes, 64 * 1024**2) // (_BYTES_PER_EXPANDED * max(1, self.n_taps) * W))
        counts, cols, vals = [], [], []
        c = torch.arange(W, device=dev)
        col_ok = (c[:, None] + dj[None, :] >= 0) & (c[:, None] + dj[None, :] < Wo)  # (W, taps)
        for r0 in range(0, H, budget):
            r1 = min(H, r0 + budget)
            r = torch.arange(r0, r1, device=dev)
            row_ok = (r[:, None] + di[None, :] >= 0) & (r[:, None] + di[None, :] < Ho)  # (rows, taps)
            ok = row_ok[:, None, :] & col_ok[None, :, :]  # (rows, W, taps)
            base = r[:, None] * Wo + c[None, :]  # output index of (r, c) before the shift
            target = base[:, :, None] + shift[None, None, :]
            # Row-major (pixel, tap) order with taps in row-major kernel order
            # gives increasing output indices within each matrix row.
            cols.append(target[ok].to(idx))
            vals.append(self._kv.expand(ok.shape)[ok])
            counts.append(ok.sum(dim=2).reshape(-1))
        crow = torch.zeros(H * W + 1, dtype=idx, device=dev)
        crow[1:] = torch.cumsum(torch.cat(counts), 0).to(idx)
        return torch.sparse_csr_tensor(
            crow, torch.cat(cols), torch.cat(vals), size=(H * W, geo.out_pixels), check_invariants=False
        )

    def _product(self, x: scipy.sparse.csr_matrix, mat: torch.Tensor) -> torch.Tensor:
        """``x @ mat`` on the device as a sparse CSR tensor."""
        idx = mat.crow_indices().dtype
        if idx == torch.int32 and max(x.shape[0], x.nnz) > INT32_MAX:
            mat = torch.sparse_csr_tensor(
                mat.crow_indices().long(), mat.col_indices().long(), mat.values(), size=mat.shape, check_invariants=False
            )
            idx = torch.int64
        X = torch.sparse_csr_tensor(
            self._put(x.indptr, idx),
            self._put(x.indices, idx),
            self._put(x.data, self.torch_dtype),
            size=x.shape,
            check_invariants=False,
        )
        return X @ mat

    def to_csr(self, x, mode):
        geo = self.geometry(mode)
        if self._trivial(x):
            return empty_csr(x.shape[0], geo.out_pixels, self.dtype)
        Y = self._product(x, self.prepare(mode))
        crow = Y.crow_indices()
        return self._csr_from_device(crow[1:] - crow[:-1], Y.col_indices(), Y.values(), Y.shape, sorted_=False)

    def to_dense(self, x, mode, out=None):
        """The sparse product, scattered into the dense result on the host: no
        dense scratch of the output's size on the device."""
        geo = self.geometry(mode)
        n = x.shape[0]
        res = dense_out(n, geo, self.dtype, out)
        if self._trivial(x):
            return res
        Y = self._product(x, self.prepare(mode))
        crow = Y.crow_indices()
        rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1], output_size=Y.values().numel())
        return self._scatter_into(res, self._get(rows), self._get(Y.col_indices()), self._get(Y.values()))

    def nbytes(self) -> int:
        total = super().nbytes()
        for m in list(self._matrices.values()):
            for t in (m.crow_indices(), m.col_indices(), m.values()):
                total += t.numel() * t.element_size()
        return int(total)


class LazyTorch(_TorchEngine):
    """COO broadcasting: every input nonzero times every kernel tap, then coalesce.

    Nothing is precomputed. Images are processed in contiguous groups whose
    expanded entry count (input nonzeros x taps) fits ``max_buffer_bytes``.
    """

    method = "lazy"

    def _expand(self, img, r, c, v, geo, first: int):
        """Output (image, linear pixel, value) of every in-window contribution."""
        Ho, Wo = geo.out_shape
        orow = r[:, None] + (self._ki - geo.top)[None, :]
        ocol = c[:, None] + (self._kj - geo.left)[None, :]
        ok = (orow >= 0) & (orow < Ho) & (ocol >= 0) & (ocol < Wo)
        b = (img - first)[:, None].expand(ok.shape)[ok]
        o = (orow * Wo + ocol)[ok]
        val = (v[:, None] * self._kv[None, :])[ok]
        return b, o, val

    def to_csr(self, x, mode):
        geo = self.geometry(mode)
        n = x.shape[0]
        if self._trivial(x):
            return empty_csr(n, geo.out_pixels, self.dtype)
        img, r, c, v = self._input(x)
        counts, cols, vals = [], [], []
        for a, b in self._expanded_chunks(x.indptr, n):
            s, e = int(x.indptr[a]), int(x.indptr[b])
            bi, o, val = self._expand(img[s:e], r[s:e], c[s:e], v[s:e], geo, a)
            # One linear key per (image, pixel): coalescing a 1-D COO tensor
            # sorts and sums duplicates faster than the 2-D equivalent.
            coo = torch.sparse_coo_tensor(
                (bi * geo.out_pixels + o)[None, :], val, size=((b - a) * geo.out_pixels,), check_invariants=False
            ).coalesce()
            key = coo.indices()[0]
            counts.append(torch.bincount(torch.div(key, geo.out_pixels, rounding_mode="floor"), minlength=b - a))
            cols.append(torch.remainder(key, geo.out_pixels))
            vals.append(coo.values())
        return self._csr_from_device(torch.cat(counts), torch.cat(cols), torch.cat(vals), (n, geo.out_pixels), sorted_=True)

    def to_dense(self, x, mode, out=None):
        geo = self.geometry(mode)
        n = x.shape[0]
        res = dense_out(n, geo, self.dtype, out)
        if self._trivial(x):
            return res
        on_cpu = self._shares_host_memory
        if not on_cpu and geo.out_pixels * self.dtype.itemsize > self.max_buffer_bytes:
            # One image's dense output exceeds the scratch budget: go through CSR.
            y = self.to_csr(x, mode)
            rows = np.repeat(np.arange(n), np.diff(y.indptr))
            return self._scatter_into(res, rows, y.indices, y.data)
        img, r, c, v = self._input(x)
        flat = res.reshape(n, geo.out_pixels)
        cap = None if on_cpu else self._dense_chunk_rows(geo.out_pixels)
        for a, b in self._expanded_chunks(x.indptr, n, cap):
            s, e = int(x.indptr[a]), int(x.indptr[b])
            if s == e:
                continue
            bi, o, val = self._expand(img[s:e], r[s:e], c[s:e], v[s:e], geo, a)
            lin = bi * geo.out_pixels + o
            if on_cpu:  # accumulate straight into the caller's array
                torch.from_numpy(flat[a:b].reshape(-1)).index_add_(0, lin, val)
            else:
                acc = torch.zeros((b - a) * geo.out_pixels, dtype=self.torch_dtype, device=self.torch_device)
                acc.index_add_(0, lin, val)
                flat[a:b] = self._get(acc).reshape(b - a, geo.out_pixels)
        return res


class GatherScatterTorch(_TorchEngine):
    """Per-tap gather/scatter into a dense accumulator bounded by ``max_buffer_bytes``.

    For each nonzero kernel tap, the input nonzeros of a tile are shifted by
    the tap and added (``index_add_``) into a dense accumulator covering the
    tile. A tile is a group of whole images when one image's output fits the
    budget, else a band of output rows of one image: only bands that some
    input pixel reaches are visited, each shrunk to the rows actually reached,
    so huge sparse frames cost memory in proportion to where the data is.
    For CSR output the accumulator's nonzeros are extracted on the device.
    Out-of-tile contributions are redirected to index 0 with value 0 instead
    of being filtered, so no per-tap dynamic-shape indexing (a device sync on
    CUDA) is needed.
    """

    method = "gather_scatter"

    def _accumulate(self, acc, img, r, c, v, geo, first: int, lo: int, hi: int):
        """Add the contributions of the given nonzeros to output rows [lo, hi)
        of images ``first...`` into ``acc`` (flat, ``(images, hi - lo, W_out)``)."""
        Wo = geo.out_shape[1]
        tile_pixels = (hi - lo) * Wo
        base = (img - first) * tile_pixels + (r - lo) * Wo + c
        zero = torch.zeros((), dtype=self.torch_dtype, device=self.torch_device)
        for i, j, kv in zip(self._tap_i, self._tap_j, self._tap_v):
            di, dj = int(i) - geo.top, int(j) - geo.left
            ok = (r >= lo - di) & (r < hi - di) & (c >= -dj) & (c < Wo - dj)
            idx = torch.where(ok, base + (di * Wo + dj), 0)
            acc.index_add_(0, idx, torch.where(ok, v * float(kv), zero))

    def _tiles(self, x, geo):
        """Work units ``(a, b, lo, hi, s, e)``: images ``[a, b)``, output rows
        ``[lo, hi)``, input entries ``[s, e)``; in (image, row) order."""
        Ho, Wo = geo.out_shape
        n = x.shape[0]
        indptr = x.indptr
        row_bytes = Wo * self.dtype.itemsize
        if Ho * row_bytes <= self.max_buffer_bytes:
            step = max(1, self.max_buffer_bytes // (Ho * row_bytes))
            for a in range(0, n, step):
                b = min(n, a + step)
                s, e = int(indptr[a]), int(indptr[b])
                if s < e:
                    yield a, b, 0, Ho, s, e
            return
        band = max(1, self.max_buffer_bytes // row_bytes)
        di = np.unique(self._tap_i - geo.top)
        di_min, di_max = int(di[0]), int(di[-1])
        W = self.frame_shape[1]
        for img in range(n):
            s0, e0 = int(indptr[img]), int(indptr[img + 1])
            if s0 == e0:
                continue
            rows = np.asarray(x.indices[s0:e0]) // W  # ascending: canonical CSR
            reached = (np.unique(rows)[:, None] + di[None, :]).ravel()
            reached = reached[(reached >= 0) & (reached < Ho)]
            for bnd in np.unique(reached // band).tolist():
                o0, o1 = bnd * band, min(Ho, (bnd + 1) * band)
                s = s0 + int(np.searchsorted(rows, o0 - di_max, side="left"))
                e = s0 + int(np.searchsorted(rows, o1 - 1 - di_min, side="right"))
                lo = max(o0, int(rows[s - s0]) + di_min)
                hi = min(o1, int(rows[e - 1 - s0]) + di_max + 1)
                yield img, img + 1, lo, hi, s, e

    def to_csr(self, x, mode):
        geo = self.geometry(mode)
        n = x.shape[0]
        if self._trivial(x):
            return empty_csr(n, geo.out_pixels, self.dtype)
        Wo = geo.out_shape[1]
        img, r, c, v = self._input(x)
        row_counts = torch.zeros(n, dtype=torch.int64, device=self.torch_device)
        cols, vals = [], []
        for a, b, lo, hi, s, e in self._tiles(x, geo):
            tile_pixels = (hi - lo) * Wo
            acc = torch.zeros((b - a) * tile_pixels, dtype=self.torch_dtype, device=self.torch_device)
            self._accumulate(acc, img[s:e], r[s:e], c[s:e], v[s:e], geo, a, lo, hi)
            pos = torch.nonzero(acc).squeeze(1)  # ascending: (image, row, column) order
            local = torch.div(pos, tile_pixels, rounding_mode="floor")
            row_counts[a:b] += torch.bincount(local, minlength=b - a)
            cols.append(lo * Wo + (pos - local * tile_pixels))
            vals.append(acc[pos])
        if not vals:
            return empty_csr(n, geo.out_pixels, self.dtype)
        return self._csr_from_device(row_counts, torch.cat(cols), torch.cat(vals), (n, geo.out_pixels), sorted_=True)

    def to_dense(self, x, mode, out=None):
        geo = self.geometry(mode)
        n = x.shape[0]
        res = dense_out(n, geo, self.dtype, out)
        if self._trivial(x):
            return res
        Ho, Wo = geo.out_shape
        img, r, c, v = self._input(x)
        flat = res.reshape(n, geo.out_pixels)
        if self._shares_host_memory:
            # The caller's array is the accumulator: no scratch, no copy back.
            self._accumulate(torch.from_numpy(flat.reshape(-1)), img, r, c, v, geo, 0, 0, Ho)
            return res
        for a, b, lo, hi, s, e in self._tiles(x, geo):
            acc = torch.zeros((b - a) * (hi - lo) * Wo, dtype=self.torch_dtype, device=self.torch_device)
            self._accumulate(acc, img[s:e], r[s:e], c[s:e], v[s:e], geo, a, lo, hi)
            flat[a:b, lo * Wo : hi * Wo] = self._get(acc).reshape(b - a, (hi - lo) * Wo)
        return res


__all__ = ["PrecomputedTorch", "LazyTorch", "GatherScatterTorch", "estimate_toeplitz_bytes"]
