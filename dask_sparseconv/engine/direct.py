"""Direct scatter engine (numba): the default CPU engine.

Every input pixel ``(r, c)`` with value ``v`` adds ``v * k[i, j]`` to output
pixel ``(r + i - top, c + j - left)`` for every *nonzero* tap ``(i, j)`` of
the kernel (see :mod:`dask_sparseconv.geometry`). Work is
``O(nnz * K)`` scatter operations plus the extraction of the result, with
``K`` the number of nonzero taps.

How one image is done (``to_csr``), in one pass, no counting pass:

1. Its output rows are known in O(1) from its first and last stored pixel
   (indices are sorted). When the whole output frame fits the scratch budget
   every range of images owns one frame-sized scratch buffer, allocated once
   per call and kept zero between images.
2. The pixels are scattered into the buffer; pixels whose every tap lands in
   the frame (the interior) use precomputed flat offsets without bounds
   checks, the others check each tap. The columns touched are tracked on the
   way, which gives the image's output bounding box.
3. The bounding box is scanned row by row, writing ``(index, value)`` for
   every nonzero value (branch-free) and zeroing the buffer as it goes, so
   it is clean for the next image at no extra cost. Values come out sorted.
4. When the bounding box is much larger than ``nnz * K`` (a few blobs far
   apart in a big frame) scanning it would dominate, so the image takes the
   coordinate-list path instead: ``(out index, value)`` pairs, a stable sort,
   duplicates summed in input order, exact zeros dropped. When the frame does
   not fit the budget (huge frames) a bounding-box-sized buffer is used when
   the box is small enough, and the coordinate-list path otherwise.

Each range of images writes straight into one shared output array at an
offset given by per-image upper bounds ``min(nnz_i * K, output rows_i *
W_out)`` (computed in O(n)); ranges are then joined. Untouched slack is
never written, so it costs address space, not memory.

Parallelism: the kernels are serial ``nogil`` functions over an image range;
:mod:`dask_sparseconv.engine.threads` runs ranges on plain threads. Small
batches run serially in the calling thread (see ``SERIAL_WORK``).

No ``fastmath``: NaN and inf propagate like in ``scipy.signal.convolve2d``
through the nonzero taps, and a NaN result is stored (NaN != 0).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import scipy.sparse

from .base import INT32_MAX, Engine, dense_out, empty_csr, index_dtype
from .threads import run_ranges, split_ranges

#: Below this estimated number of elementary operations (scatter updates plus
#: scanned output slots) a call runs in the calling thread: handing ranges to
#: the pool costs more than it saves. Measured, see docs/engine.md.
SERIAL_WORK = 200_000

#: An image whose output bounding box exceeds ``BBOX_RATIO * nnz * K +
#: BBOX_SLACK`` slots takes the coordinate-list path instead of a scan.
BBOX_RATIO = 8
BBOX_SLACK = 4096

_JIT = dict(nogil=True, cache=True)


# ---------------------------------------------------------------------------
# numba kernels (serial, nogil; parallelism is in engine/threads.py)
# ---------------------------------------------------------------------------


@numba.njit(**_JIT)
def _out_rows(indices, a, e, W_in, H_out, top, imin, imax):
    """Output rows [R0, R1] (inclusive) touched by image pixels indices[a:e] (a < e)."""
    rfirst = np.int64(indices[a]) // W_in
    rlast = np.int64(indices[e - 1]) // W_in
    R0 = max(rfirst + imin - top, 0)
    R1 = min(rlast + imax - top, H_out - 1)
    return R0, R1


@numba.njit(**_JIT)
def _upper_bounds(indptr, indices, W_in, K, H_out, W_out, top, imin, imax, ub_cum):
    """ub_cum[b+1] - ub_cum[b] = an upper bound of image b's output nnz.

    Returns the estimated work of the batch (scatter updates + scanned slots).
    """
    n = indptr.size - 1
    ub_cum[0] = 0
    work = np.int64(0)
    for b in range(n):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        ub = np.int64(0)
        if e > a and K > 0:
            R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
            if R1 >= R0:
                ops = (e - a) * K
                ub = min(ops, (R1 - R0 + 1) * W_out)
                work += ops + ub
        ub_cum[b + 1] = ub_cum[b] + ub
    return work


@numba.njit(**_JIT)
def _scatter(indices, data, a, e, W_in, ti, tj, tv, d, top, left, imin, imax, jmin, jmax, wr0, wc0, wh, ww, buf):
    """Add image pixels indices[a:e] times the taps into the window buffer.

    The window is output rows [wr0, wr0 + wh) and columns [wc0, wc0 + ww),
    stored row-major with width ``ww``; it must contain every in-frame
    output pixel the image touches. ``d`` holds the taps' flat offsets for
    width ``ww``. Returns the min and max input column seen.
    """
    K = tv.size
    # input pixels whose every tap lands inside the window
    rlo = top + wr0 - imin
    rhi = wh - 1 + top + wr0 - imax
    clo = left + wc0 - jmin
    chi = ww - 1 + left + wc0 - jmax
    cmin = W_in
    cmax = np.int64(-1)
    for jj in range(a, e):
        p = np.int64(indices[jj])
        v = data[jj]
        r = p // W_in
        c = p - r * W_in
        if c < cmin:
            cmin = c
        if c > cmax:
            cmax = c
        if rlo <= r and r <= rhi and clo <= c and c <= chi:
            base = (r - top - wr0) * ww + (c - left - wc0)
            for k in range(K):
                q = np.uint64(base + d[k])
                buf[q] += v * tv[k]
        else:
            for k in range(K):
                R = r + ti[k] - top - wr0
                C = c + tj[k] - left - wc0
                if 0 <= R and R < wh and 0 <= C and C < ww:
                    buf[np.uint64(R * ww + C)] += v * tv[k]
    return cmin, cmax


@numba.njit(**_JIT)
def _extract(buf, wr0, wc0, ww, R0, R1, C0, C1, W_out, out_idx, out_val, pos):
    """Write the nonzeros of output box [R0..R1] x [C0..C1] (row-major, so
    sorted) at out_*[pos:], zeroing the buffer; returns the new pos.

    Branch-free: every slot is written and ``pos`` advances on nonzero only,
    so the caller keeps one spare slot after the last possible value.
    """
    for R in range(R0, R1 + 1):
        rowb = (R - wr0) * ww - wc0
        ob = R * W_out
        for C in range(C0, C1 + 1):
            q = np.uint64(rowb + C)
            v = buf[q]
            buf[q] = 0
            out_idx[pos] = ob + C
            out_val[pos] = v
            pos += v != 0
    return pos


@numba.njit(**_JIT)
def _coo_image(indices, data, a, e, W_in, ti, tj, tv, top, left, H_out, W_out, out_idx, out_val, pos):
    """Coordinate-list path for one image: pairs, stable sort, sum duplicates,
    drop exact zeros. Returns the new pos."""
    K = tv.size
    m = (e - a) * K
    keys = np.empty(m, dtype=np.int64)
    vals = np.empty(m, dtype=tv.dtype)
    cnt = 0
    for jj in range(a, e):
        p = np.int64(indices[jj])
        v = data[jj]
        r = p // W_in
        c = p - r * W_in
        for k in range(K):
            R = r + ti[k] - top
            C = c + tj[k] - left
            if 0 <= R and R < H_out and 0 <= C and C < W_out:
                keys[cnt] = R * W_out + C
                vals[cnt] = v * tv[k]
                cnt += 1
    # stable: duplicates are summed in the same order as the buffer path
    order = np.argsort(keys[:cnt], kind="mergesort")
    i = 0
    while i < cnt:
        o = order[i]
        key = keys[o]
        s = vals[o]
        i += 1
        while i < cnt and keys[order[i]] == key:
            s += vals[order[i]]
            i += 1
        if s != 0:
            out_idx[pos] = key
            out_val[pos] = s
            pos += 1
    return pos


@numba.njit(**_JIT)
def _csr_range(
    start, stop, indptr, indices, data, W_in, ti, tj, tv, top, left, imin, imax, jmin, jmax,
    H_out, W_out, full, cap, out_idx, out_val, pos, counts,
):
    """Convolve images [start, stop) into out_*[pos:]; counts[b] = nnz of image b.

    ``full``: use one frame-sized scratch buffer; otherwise a bounding-box
    buffer of at most ``cap`` slots. Returns the number of values written.
    """
    K = tv.size
    pos0 = pos
    if full:
        buf = np.zeros(H_out * W_out, dtype=tv.dtype)
    else:
        buf = np.zeros(0, dtype=tv.dtype)
    dfull = ti * W_out + tj
    for b in range(start, stop):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        begin = pos
        if e > a and K > 0:
            R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
            ops = (e - a) * K
            limit = BBOX_RATIO * ops + BBOX_SLACK
            if R1 < R0:
                pass  # every tap lands outside the output window
            elif full and (R1 - R0 + 1) * W_out <= limit:
                cmin, cmax = _scatter(indices, data, a, e, W_in, ti, tj, tv, dfull, top, left,
                                      imin, imax, jmin, jmax, 0, 0, H_out, W_out, buf)
                C0 = max(cmin + jmin - left, 0)
                C1 = min(cmax + jmax - left, W_out - 1)
                pos = _extract(buf, 0, 0, W_out, R0, R1, C0, C1, W_out, out_idx, out_val, pos)
            else:
                # bounding box first: a pass over the columns
                cmin = W_in
                cmax = np.int64(-1)
                for jj in range(a, e):
                    p = np.int64(indices[jj])
                    c = p - (p // W_in) * W_in
                    cmin = min(cmin, c)
                    cmax = max(cmax, c)
                C0 = max(cmin + jmin - left, 0)
                C1 = min(cmax + jmax - left, W_out - 1)
                if C1 >= C0:
                    h = R1 - R0 + 1
                    w = C1 - C0 + 1
                    area = h * w
                    if area <= limit and (full or area <= cap):
                        if full:
                            _scatter(indices, data, a, e, W_in, ti, tj, tv, dfull, top, left,
                                     imin, imax, jmin, jmax, 0, 0, H_out, W_out, buf)
                            pos = _extract(buf, 0, 0, W_out, R0, R1, C0, C1, W_out, out_idx, out_val, pos)
                        else:
                            if buf.size < area:
                                buf = np.zeros(max(area, 2 * buf.size), dtype=tv.dtype)
                            _scatter(indices, data, a, e, W_in, ti, tj, tv, ti * w + tj, top, left,
                                     imin, imax, jmin, jmax, R0, C0, h, w, buf)
                            pos = _extract(buf, R0, C0, w, R0, R1, C0, C1, W_out, out_idx, out_val, pos)
                    else:
                        pos = _coo_image(indices, data, a, e, W_in, ti, tj, tv, top, left,
                                         H_out, W_out, out_idx, out_val, pos)
        counts[b] = pos - begin
    return pos - pos0


@numba.njit(**_JIT)
def _dense_range(start, stop, indptr, indices, data, W_in, ti, tj, tv, top, left, imin, imax, jmin, jmax,
                 H_out, W_out, out):
    """Scatter images [start, stop) straight into out[b] (zeroed, flat frames)."""
    d = ti * W_out + tj
    if tv.size == 0:
        return
    for b in range(start, stop):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        if e > a:
            _scatter(indices, data, a, e, W_in, ti, tj, tv, d, top, left,
                     imin, imax, jmin, jmax, 0, 0, H_out, W_out, out[b])


# ---------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------


class _Plan:
    """Everything that depends on (kernel, mode) only; built once per mode."""

    __slots__ = ("geo", "ti", "tj", "tv", "K", "imin", "imax", "jmin", "jmax", "args")

    def __init__(self, kernel: np.ndarray, geo):
        self.geo = geo
        ti, tj = np.nonzero(kernel)
        self.ti = ti.astype(np.int64)
        self.tj = tj.astype(np.int64)
        self.tv = np.ascontiguousarray(kernel[ti, tj])
        self.K = int(self.tv.size)
        self.imin = int(ti.min()) if self.K else 0
        self.imax = int(ti.max()) if self.K else 0
        self.jmin = int(tj.min()) if self.K else 0
        self.jmax = int(tj.max()) if self.K else 0
        H_out, W_out = geo.out_shape
        # the arguments every kernel takes after (indptr, indices, data)
        self.args = (
            np.int64(geo.frame_shape[1]), self.ti, self.tj, self.tv, np.int64(geo.top), np.int64(geo.left),
            np.int64(self.imin), np.int64(self.imax), np.int64(self.jmin), np.int64(self.jmax),
            np.int64(H_out), np.int64(W_out),
        )


class DirectNumba(Engine):
    """Direct scatter of each image's pixels through the kernel's nonzero taps.

    Thread-safe: calls share only read-only plans; scratch is per call.
    """

    method = "direct"
    backend = "numba"
    #: per-instance override of :data:`SERIAL_WORK` (tests force threading with 0)
    serial_work: int | None = None

    def __init__(self, frame_shape, kernel, dtype, **kwargs):
        super().__init__(frame_shape, kernel, dtype, **kwargs)
        self._plans: dict[str, _Plan] = {}
        self._plans_lock = threading.Lock()

    def _plan(self, mode: str) -> _Plan:
        plan = self._plans.get(mode)
        if plan is None:
            with self._plans_lock:
                plan = self._plans.get(mode)
                if plan is None:
                    plan = _Plan(self.kernel, self.geometry(mode))
                    self._plans[mode] = plan
        return plan

    def _ranges(self, weights, n: int, work: int) -> list[tuple[int, int]]:
        threshold = SERIAL_WORK if self.serial_work is None else self.serial_work
        if self.n_threads == 1 or n < 2 or work < threshold:
            return [(0, n)]
        return split_ranges(weights, n, self.n_threads)

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        plan = self._plan(mode)
        geo = plan.geo
        n = x.shape[0]
        out_pixels = geo.out_pixels
        if n == 0 or plan.K == 0 or x.nnz == 0:
            return empty_csr(n, out_pixels, self.dtype)
        indptr, indices, data = x.indptr, x.indices, x.data
        W_in, ti, tj, tv, top, left, imin, imax, jmin, jmax, H_out, W_out = plan.args
        ub_cum = np.empty(n + 1, dtype=np.int64)
        work = _upper_bounds(indptr, indices, W_in, np.int64(plan.K), H_out, W_out, top, imin, imax, ub_cum)
        ranges = self._ranges(ub_cum, n, work)
        itemsize = self.dtype.itemsize
        full = out_pixels * itemsize * len(ranges) <= self.max_buffer_bytes
        cap = np.int64(max(1, self.max_buffer_bytes // (itemsize * len(ranges))))
        # index values fit the dtype of (n, out_pixels); indptr also needs nnz
        idx_dt = index_dtype(n, out_pixels)
        # one spare slot per image keeps ranges apart (branch-free extraction)
        total = int(ub_cum[-1]) + n + 1
        out_idx = np.empty(total, dtype=idx_dt)
        out_val = np.empty(total, dtype=self.dtype)
        counts = np.empty(n, dtype=np.int64)

        def run(a: int, b: int) -> int:
            base = int(ub_cum[a]) + a
            return _csr_range(
                np.int64(a), np.int64(b), indptr, indices, data, W_in, ti, tj, tv, top, left, imin, imax, jmin, jmax,
                H_out, W_out, full, cap, out_idx, out_val, np.int64(base), counts,
            )

        written = run_ranges(run, ranges)
        nnz = int(sum(written))
        if len(ranges) == 1:
            indices_out, data_out = out_idx[:nnz], out_val[:nnz]
            if nnz < total // 2 and total * (idx_dt.itemsize + itemsize) > (1 << 20):
                indices_out, data_out = indices_out.copy(), data_out.copy()  # release the slack
        else:
            starts = [int(ub_cum[a]) + a for a, _ in ranges]
            indices_out = np.concatenate([out_idx[s : s + w] for s, w in zip(starts, written)])
            data_out = np.concatenate([out_val[s : s + w] for s, w in zip(starts, written)])
        final_dt = index_dtype(n, out_pixels, nnz)
        if final_dt != idx_dt:  # more than 2**31 values in a batch of small frames
            indices_out = indices_out.astype(final_dt)
        indptr_out = np.empty(n + 1, dtype=final_dt)
        indptr_out[0] = 0
        np.cumsum(counts, out=indptr_out[1:])
        res = scipy.sparse.csr_matrix((data_out, indices_out, indptr_out), shape=(n, out_pixels), copy=False)
        res.has_sorted_indices = True
        res.has_canonical_format = True
        return res

    def to_dense(self, x: scipy.sparse.csr_matrix, mode: str, out: np.ndarray | None = None) -> np.ndarray:
        plan = self._plan(mode)
        geo = plan.geo
        n = x.shape[0]
        res = dense_out(n, geo, self.dtype, out)
        if n == 0 or plan.K == 0 or x.nnz == 0:
            return res
        flat = res.reshape(n, geo.out_pixels)
        work = x.nnz * plan.K
        weights = x.indptr if self.n_threads > 1 else None
        ranges = self._ranges(weights, n, work)

        def run(a: int, b: int) -> None:
            _dense_range(np.int64(a), np.int64(b), x.indptr, x.indices, x.data, *plan.args, flat)

        run_ranges(run, ranges)
        return res

    def nbytes(self) -> int:
        return self.kernel.nbytes + sum(p.ti.nbytes + p.tj.nbytes + p.tv.nbytes for p in self._plans.values())


__all__ = ["DirectNumba", "INT32_MAX"]
