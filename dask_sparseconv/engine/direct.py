"""Direct scatter engine (numba): the default CPU engine.

Every input pixel ``(r, c)`` with value ``v`` adds ``v * k[i, j]`` to output
pixel ``(r + i - top, c + j - left)`` for every *nonzero* tap ``(i, j)`` of
the kernel (see :mod:`dask_sparseconv.geometry`). Work is
``O(nnz * K)`` scatter operations plus the extraction of the result, with
``K`` the number of nonzero taps.

How one image is done (``to_csr``), in one pass, no counting pass:

1. Its output rows are known in O(1) from its first and last stored pixel
   (indices are sorted). When the output frame fits the scratch budget,
   every range of images owns one frame-sized buffer (and a bit map of it),
   allocated once per call and kept zero between images.
2. Pixels are walked row by row (one division by ``W`` per input row); a
   pixel whose every tap lands in the frame uses flat tap offsets without
   bounds checks, the others check each tap.
3. Extraction, chosen per image:

   * dense output (``nnz*K >= rows*W_out``): scan of the bounding box,
     branch-free, zeroing the buffer as it goes;
   * sparse output: each touched slot also sets a bit (one word operation
     per kernel row); extraction visits the set bits only;
   * a few pixels far apart (box much larger than ``nnz*K``): a coordinate
     list, i.e. ``(out index, value)`` pairs, stable sort, duplicates summed
     in input order.

   Frames over the budget (huge frames) use a bounding-box buffer, cut into
   bands of output rows when the box itself is over the budget, or the
   coordinate list. Every path sums a slot's contributions in pixel order,
   so results do not depend on the path or the thread split. Values come
   out sorted; exact zeros are dropped.

Each range of images writes straight into one shared output array at an
offset given by per-image upper bounds ``min(nnz_i * K, rows_i * W_out)``
(O(n); tightened to bounding boxes when they add up to a lot). Untouched
slack is never written, so it costs address space, not memory. Ranges pair
up: the even one runs backward and ends flush against the odd one, so the
usual two-range call needs no compaction copy.

Parallelism: the kernels are serial ``nogil`` functions over an image range;
:mod:`dask_sparseconv.engine.threads` runs ranges on plain threads. Small
batches run serially in the calling thread (see ``SERIAL_WORK``).

No ``fastmath``: NaN and inf propagate like in ``scipy.signal.convolve2d``
through the nonzero taps, and a NaN result is stored (NaN != 0).
"""

from __future__ import annotations

import threading
import weakref

import numba
import numpy as np
import scipy.sparse

try:  # LLVM's cttz: one instruction (tzcnt) per set bit
    from numba.cpython.unsafe.numbers import trailing_zeros
except ImportError:  # pragma: no cover - numba moved its intrinsic

    @numba.njit(nogil=True, cache=True)
    def trailing_zeros(word):
        n = np.uint64(0)
        while (word & np.uint64(1)) == 0:
            word >>= np.uint64(1)
            n += np.uint64(1)
        return n


from .base import Engine, canonical_csr, dense_out, empty_csr, index_dtype
from .threads import run_ranges, split_ranges

#: Below this estimated number of elementary operations (see
#: ``_upper_bounds``) a call runs in the calling thread: a threaded call pays
#: a fixed cost before the first range starts (range split, pool hand-off)
#: and after, plus a staging copy in the backward range, which a call this
#: small does not win back (figures: docs/benchmarks.md, "Figures behind the code"). See docs/engine.md:
#: raised from 500k when calls after an idle spell (a notebook, the
#: one-process rotation) were measured: 50x100x100 with a 9x9 kernel
#: (0.82M) took 1.19/2.73 ms threaded (warm/after idle) against 0.93/2.14
#: ms serially.
SERIAL_WORK = 1_000_000

#: Sparse images use the bit map while its words over their output rows
#: number at most ``BBOX_RATIO * nnz * K + BBOX_SLACK``; past that their
#: bounding box is checked, and a box of more slots than that takes the
#: coordinate list (when ``nnz * K`` fits the budget).
BBOX_RATIO = 8
BBOX_SLACK = 4096

#: An image with ``nnz * K * DENSE_OPS >= (output rows it touches) * W_out``
#: is extracted by a plain scan of its bounding box; sparser ones through a
#: bit map of touched slots (cost proportional to what was touched). Since the
#: scan became branch-free it wins from about a third (~28 % of the slots
#: touched): at 1, 50 x 100x100 with a 9 x 9 kernel took 0.55 ms, at 3 0.41
#: ms (benchmarks/bench_extract_path.py; table in docs/engine.md).
DENSE_OPS = 3

#: Output frames larger than this (bytes) are done in bands of rows of
#: ``BAND_BYTES`` when an image touches about every cache line of the rows
#: it reaches (``nnz * K * BAND_OPS >= rows * W_out``): scattered and scanned
#: across a whole 8 MiB frame, the two threads' frames and bit maps left the
#: caches and a second thread bought nothing (50 x 1024 x 1024, 5 x 5,
#: d=0.01: 47-60 ms on 2 threads, 41-43 ms on 1; in bands of 512 KiB 25-29 ms);
#: figures in docs/engine.md, "Large frames in bands".
BAND_FRAME_BYTES = 4 * 1024**2
BAND_BYTES = 512 * 1024
BAND_OPS = 8

#: Pixels add a kernel's taps run by run (adjacent columns of a row,
#: contiguous updates that vectorise) when its runs average at least this
#: many taps, else tap by tap. A loop over interior pixels alone measured
#: runs of 5 at ~1.5x the tap loop's time, 9 even, 15 at 0.8x, 31 at 0.6x;
#: engine-level figures in docs/engine.md.
RUN_MIN = 9

#: When the cheap per-image output bounds (rows x W_out) add up to more than
#: this many values, a pass over the pixels tightens them to the bounding
#: box, so that small blobs in large frames do not reserve (virtual) memory
#: for whole rows.
TIGHTEN_BOUNDS = 1 << 26

#: Output arrays up to this size are allocated inside the compiled serial
#: call; larger ones by numpy, which asks the kernel for transparent huge
#: pages from 4 MiB up (numba's allocator does not): page faults on
#: freshly written output cost 1.3-1.4x on 20 x 512x512 with 11x11 to
#: 15x15 kernels when every 4 KiB page faulted.
COMPILED_ALLOC_BYTES = 4 * 1024**2

#: A call's frame-sized scratch (values and bit map, zero between images and
#: after the call) is kept for the thread's next call when it is at most
#: this many bytes: allocating it per call costs its zeroing and, for
#: frames of a few hundred KiB and up, a page fault per 4 KiB page touched,
#: which the one-process rotation of docs/benchmarks.md pays on every call.
KEEP_SCRATCH_BYTES = 16 * 1024**2

#: Frame scratches (one per frame size and dtype) a thread keeps, least
#: recently used dropped first, at most this many and this many bytes.
KEEP_SCRATCH_FRAMES = 4
KEEP_SCRATCH_TOTAL = 32 * 1024**2

_JIT = dict(nogil=True, cache=True)


class _ThreadScratch:
    """One thread's zeroed frame scratches, shared by every engine the thread
    calls: ``(dtype char, frame pixels) -> (values, bit map)``, most recently
    used last. Kept per thread, not per engine: a notebook or a dask worker
    builds many convolvers, and each new one used to allocate, zero and
    fault in its own (50 x 512x512: 11.5 -> 10.4 ms for a new convolver's
    first call, docs/benchmarks.md), and to hold it for as long as it lived."""

    __slots__ = ("frames", "__weakref__")

    def __init__(self):
        self.frames: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def nbytes(self) -> int:
        return sum(buf.nbytes + bits.nbytes for buf, bits in list(self.frames.values()))


_scratch_local = threading.local()
#: every live thread's scratch, for nbytes and tests; an entry goes with its thread
_scratch_of_thread: weakref.WeakValueDictionary[int, _ThreadScratch] = weakref.WeakValueDictionary()
_scratch_lock = threading.Lock()  # a weak dictionary is not safe to iterate while another thread adds


def _thread_scratch() -> _ThreadScratch:
    try:
        return _scratch_local.scratch
    except AttributeError:
        store = _scratch_local.scratch = _ThreadScratch()
        with _scratch_lock:
            _scratch_of_thread[threading.get_ident()] = store
        return store


def _stores() -> list[_ThreadScratch]:
    with _scratch_lock:
        return list(_scratch_of_thread.values())


def scratch_buffers() -> list[tuple[np.ndarray, np.ndarray]]:
    """The frame scratches kept now by every thread of this process (zero between calls)."""
    # list() of a plain dict's values is one step under the GIL: safe while its thread moves entries
    return [bufs for store in _stores() for bufs in list(store.frames.values())]


def scratch_nbytes() -> int:
    """Memory the kept frame scratches of every thread hold."""
    return sum(store.nbytes() for store in _stores())


# ---------------------------------------------------------------------------
# numba kernels (serial, nogil; parallelism is in engine/threads.py)
# ---------------------------------------------------------------------------


# _out_rows, _scatter_bits and _extract_bits run once per image: inlined,
# their calls no longer pay reference counts on every array argument (100
# images of one pixel each: 56 -> 44 us a call; docs/engine.md)
@numba.njit(inline="always", **_JIT)
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

    Returns the estimated work of the batch: scatter updates, output slots,
    bit-map words and a constant per image.
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
                area = (R1 - R0 + 1) * W_out
                ub = min(ops, area)
                work += ops + ub + (area >> 6) + 64
        ub_cum[b + 1] = ub_cum[b] + ub
    return work


@numba.njit(**_JIT)
def _tighten_bounds(indptr, indices, W_in, K, H_out, W_out, top, left, imin, imax, jmin, jmax, ub_cum):
    """Like :func:`_upper_bounds` with the bounding box's columns too (one
    pass over the pixels, one division per input row): for batches whose
    cheap bounds add up to a lot, e.g. small blobs in large frames."""
    n = indptr.size - 1
    ub_cum[0] = 0
    for b in range(n):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        ub = np.int64(0)
        if e > a and K > 0:
            R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
            cmin = W_in
            cmax = np.int64(-1)
            re = np.int64(-1)
            rs = np.int64(0)
            for jj in range(a, e):
                p = np.int64(indices[jj])
                if p >= re:
                    rs = (p // W_in) * W_in
                    re = rs + W_in
                    cmin = min(cmin, p - rs)
                cmax = max(cmax, p - rs)
            C0 = max(cmin + jmin - left, 0)
            C1 = min(cmax + jmax - left, W_out - 1)
            if R1 >= R0 and C1 >= C0:
                ub = min((e - a) * K, (R1 - R0 + 1) * (C1 - C0 + 1))
        ub_cum[b + 1] = ub_cum[b] + ub


@numba.njit(inline="always", **_JIT)  # a call would pay reference counts on five arrays, per pixel
def _add_taps(buf, base, v, tv, d, run0, runlen):
    """buf[base + d[k]] += v * tv[k] for every tap of an interior pixel.

    With runs (``run0``/``runlen``: taps of adjacent columns, start in
    ``tv`` and length) the updates of a run are contiguous, which LLVM
    vectorises: for kernels of long rows (~1.7x for 31x31). Same slots, same
    order, so the same sums, as tap by tap (``run0`` None).
    """
    if run0 is None:  # a compile-time choice: numba prunes the other branch
        for k in range(tv.size):
            buf[np.uint64(base + d[k])] += v * tv[k]
    else:
        for g in range(run0.size):
            k0 = np.uint64(run0[g])
            o = np.uint64(base + d[k0])
            for t in range(np.uint64(runlen[g])):
                buf[o + t] += v * tv[k0 + t]


@numba.njit(**_JIT)
def _scatter(indices, data, a, e, W_in, ti, tj, tv, d, run0, runlen, top, left, imin, imax, jmin, jmax, wr0, wc0, wh, ww, buf):
    """Add image pixels indices[a:e] times the taps into the window buffer.

    The window is output rows [wr0, wr0 + wh) and columns [wc0, wc0 + ww),
    stored row-major with width ``ww``; it must contain every in-frame
    output pixel the image touches. ``d`` holds the taps' flat offsets for
    width ``ww``. Pixels are walked row by row (indices are sorted), so the
    division by ``W_in`` happens once per input row. Returns the min and max
    input column seen. ``run0``/``runlen``: the taps as runs of adjacent
    columns (start in ``tv``, length), added run by run, clipped to the window
    near its edge; None: tap by tap.
    """
    K = tv.size
    # input pixels whose every tap lands inside the window
    rlo = top + wr0 - imin
    rhi = wh - 1 + top + wr0 - imax
    clo = left + wc0 - jmin
    chi = ww - 1 + left + wc0 - jmax
    cmin = W_in
    cmax = np.int64(-1)
    jj = a
    while jj < e:
        p = np.int64(indices[jj])
        r = p // W_in
        rs = r * W_in
        re = rs + W_in
        row_in = rlo <= r and r <= rhi
        rb = (r - top - wr0) * ww - left - wc0  # window offset of (r, column 0) for tap (0, 0)
        cmin = min(cmin, p - rs)
        while True:
            c = p - rs
            v = data[jj]
            if row_in and clo <= c and c <= chi:
                _add_taps(buf, rb + c, v, tv, d, run0, runlen)
            elif run0 is None:
                for k in range(K):
                    R = r + ti[k] - top - wr0
                    C = c + tj[k] - left - wc0
                    if 0 <= R and R < wh and 0 <= C and C < ww:
                        buf[np.uint64(R * ww + C)] += v * tv[k]
            else:
                # near the edge: each run clipped to the window, still contiguous
                # (with a large kernel on a small frame, half the pixels are here)
                for g in range(run0.size):
                    k0 = run0[g]
                    R = r + ti[k0] - top - wr0
                    if R < 0 or R >= wh:
                        continue
                    C0 = c + tj[k0] - left - wc0
                    t0 = max(0, -C0)
                    t1 = min(runlen[g], ww - C0)
                    o = R * ww + C0
                    for t in range(t0, t1):
                        buf[np.uint64(o + t)] += v * tv[np.uint64(k0 + t)]
            jj += 1
            if jj >= e:
                break
            p = np.int64(indices[jj])
            if p >= re:
                break
        cmax = max(cmax, c)
    return cmin, cmax


@numba.njit(inline="always", **_JIT)
def _scatter_bits(indices, data, a, e, W_in, ti, tj, tv, d, run0, runlen, sg_off, sg_mask, sg_w, top, left,
                  imin, imax, jmin, jmax, H_out, W_out, buf, bits):
    """:func:`_scatter` into the whole output frame, also setting bit ``q``
    of ``bits`` for every output index ``q`` touched.

    Interior pixels set their bits one kernel-row segment (<= 64 taps) at a
    time: ``sg_mask`` shifted to ``base + sg_off`` (one or two words), not
    tap by tap, which would chain read-modify-writes on the same word.
    """
    K = tv.size
    S = sg_off.size
    one = np.uint64(1)
    m63 = np.uint64(63)
    s6 = np.uint64(6)
    u64 = np.uint64(64)
    rlo = top - imin
    rhi = H_out - 1 + top - imax
    clo = left - jmin
    chi = W_out - 1 + left - jmax
    jj = a
    while jj < e:
        p = np.int64(indices[jj])
        r = p // W_in
        rs = r * W_in
        re = rs + W_in
        row_in = rlo <= r and r <= rhi
        rb = (r - top) * W_out - left
        while True:
            c = p - rs
            v = data[jj]
            if row_in and clo <= c and c <= chi:
                base = rb + c
                _add_taps(buf, base, v, tv, d, run0, runlen)
                for g in range(S):
                    q = np.uint64(base + sg_off[g])
                    w = q >> s6
                    sh = q & m63
                    mask = sg_mask[g]
                    bits[w] |= mask << sh
                    if sh + sg_w[g] > u64:
                        bits[w + one] |= mask >> (u64 - sh)
            else:
                for k in range(K):
                    R = r + ti[k] - top
                    C = c + tj[k] - left
                    if 0 <= R and R < H_out and 0 <= C and C < W_out:
                        q = np.uint64(R * W_out + C)
                        buf[q] += v * tv[k]
                        bits[q >> s6] |= one << (q & m63)
            jj += 1
            if jj >= e:
                break
            p = np.int64(indices[jj])
            if p >= re:
                break


@numba.njit(**_JIT)
def _extract(buf, wr0, wc0, ww, R0, R1, C0, C1, W_out, out_idx, out_val, pos):
    """Write the nonzeros of output box [R0..R1] x [C0..C1] (row-major, so
    sorted) at out_*[pos:], zeroing the buffer; returns the new pos.

    Branch-free: every slot is written and ``pos`` advances on nonzero only,
    so the caller keeps one spare slot after the last possible value.
    """
    p = np.uint64(pos)  # unsigned: no negative-index wraparound in the hot loop
    for R in range(R0, R1 + 1):
        rowb = (R - wr0) * ww - wc0
        ob = R * W_out
        for C in range(C0, C1 + 1):
            v = buf[np.uint64(rowb + C)]
            out_idx[p] = ob + C
            out_val[p] = v
            p += np.uint64(v != 0)
        # cleared row by row after reading it: a contiguous (vectorised)
        # fill instead of a third scalar store per slot (~15 % of a dense call)
        buf[rowb + C0 : rowb + C1 + 1] = 0
    return np.int64(p)


@numba.njit(inline="always", **_JIT)
def _extract_bits(buf, bits, qlo, qhi, out_idx, out_val, pos):
    """Write the nonzeros among the set bits of ``bits`` in [qlo, qhi]
    (frame buffer indices = output indices, increasing), clearing bits and
    buffer; returns the new pos. Cost: (qhi - qlo) / 64 + touched slots."""
    for w in range(qlo >> 6, (qhi >> 6) + 1):
        word = bits[w]
        if word != 0:
            bits[w] = 0
            base = w << 6
            while word != 0:
                q = base + np.int64(trailing_zeros(word))
                v = buf[q]
                buf[q] = 0
                out_idx[pos] = q
                out_val[pos] = v
                pos += v != 0
                word &= word - np.uint64(1)
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
def _csr_image(
    b, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, dfull, top, left, imin, imax, jmin, jmax,
    H_out, W_out, sg_off, sg_mask, sg_w, full, cap, dense_ops, bbox_ratio, bbox_slack, band_frame, band_slots, band_ops,
    buf, bits, out_idx, out_val, pos,
):
    """Convolve image ``b`` into out_*[pos:]; returns (new pos, scratch buffer).

    ``full``: ``buf``/``bits`` cover the whole output frame; otherwise ``buf``
    is a bounding-box buffer, regrown here up to ``cap`` slots (a box larger
    than that is done in bands of rows).
    """
    K = tv.size
    a = np.int64(indptr[b])
    e = np.int64(indptr[b + 1])
    if e == a or K == 0:
        return pos, buf
    R0, R1 = _out_rows(indices, a, e, W_in, H_out, top, imin, imax)
    if R1 < R0:
        return pos, buf  # every tap lands outside the output window
    ops = (e - a) * K
    area = (R1 - R0 + 1) * W_out  # the output rows the image can touch
    if full and H_out * W_out > band_frame and ops * band_ops >= area:
        # a large frame whose output touches (about) every cache line of its
        # rows: scattered and scanned in bands of rows that stay in cache,
        # not across the whole frame (8 MiB at 1024 x 1024)
        C0, C1 = _out_cols(indices, a, e, W_in, W_out, left, jmin, jmax)
        if C1 < C0:
            return pos, buf
        return _bands(indices, data, a, e, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax,
                      W_out, R0, R1, C0, C1, band_slots, buf, out_idx, out_val, pos), buf
    if full and ops * dense_ops >= area:
        # dense output: scatter, then scan the bounding box
        cmin, cmax = _scatter(indices, data, a, e, W_in, ti, tj, tv, dfull, run0, runlen, top, left,
                              imin, imax, jmin, jmax, 0, 0, H_out, W_out, buf)
        C0 = max(cmin + jmin - left, 0)
        C1 = min(cmax + jmax - left, W_out - 1)
        return _extract(buf, 0, 0, W_out, R0, R1, C0, C1, W_out, out_idx, out_val, pos), buf
    if full and (area >> 6) <= bbox_ratio * ops + bbox_slack:
        # sparse output: visit only the touched slots, found by bit
        _scatter_bits(indices, data, a, e, W_in, ti, tj, tv, dfull, run0, runlen, sg_off, sg_mask, sg_w, top, left,
                      imin, imax, jmin, jmax, H_out, W_out, buf, bits)
        return _extract_bits(buf, bits, R0 * W_out, (R1 + 1) * W_out - 1, out_idx, out_val, pos), buf
    # huge frame, or a few pixels far apart: bounding box first
    C0, C1 = _out_cols(indices, a, e, W_in, W_out, left, jmin, jmax)
    if C1 < C0:
        return pos, buf
    h = R1 - R0 + 1
    w = C1 - C0 + 1
    if h * w > bbox_ratio * ops + bbox_slack and ops <= max(cap, bbox_slack):
        # a few pixels far apart: sorting their (index, value) pairs is cheaper
        return _coo_image(indices, data, a, e, W_in, ti, tj, tv, top, left, H_out, W_out, out_idx, out_val, pos), buf
    # bounding-box window, in bands of output rows so it stays within cap
    hb = max(1, min(h, cap // w))
    if buf.size < hb * w:
        buf = np.zeros(max(hb * w, min(2 * buf.size, cap)), dtype=tv.dtype)
    return _bands(indices, data, a, e, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax,
                  W_out, R0, R1, C0, C1, cap, buf, out_idx, out_val, pos), buf


@numba.njit(**_JIT)
def _out_cols(indices, a, e, W_in, W_out, left, jmin, jmax):
    """The output columns image pixels ``[a, e)`` can reach: ``(C0, C1)``, empty when C1 < C0."""
    cmin = W_in
    cmax = np.int64(-1)
    for jj in range(a, e):
        p = np.int64(indices[jj])
        c = p - (p // W_in) * W_in
        cmin = min(cmin, c)
        cmax = max(cmax, c)
    return max(cmin + jmin - left, 0), min(cmax + jmax - left, W_out - 1)


@numba.njit(**_JIT)
def _bands(indices, data, a, e, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax, W_out,
           R0, R1, C0, C1, slots, buf, out_idx, out_val, pos):
    """Output window [R0..R1] x [C0..C1] of image pixels ``[a, e)``, in bands
    of rows of at most ``slots`` values (at least one row): each band is
    scattered into ``buf`` (zero, at least one band long; left zero) and
    scanned into out_*[pos:]. Returns the new pos."""
    w = C1 - C0 + 1
    hb = max(1, min(R1 - R0 + 1, slots // w))
    d = ti * w + tj
    for B0 in range(R0, R1 + 1, hb):
        B1 = min(B0 + hb, R1 + 1)  # band of output rows [B0, B1)
        # the input rows that reach the band, located by binary search
        lo = max(B0 + top - imax, 0) * W_in
        hi = (B1 + top - imin) * W_in
        aa = a + np.searchsorted(indices[a:e], lo)
        ee = a + np.searchsorted(indices[a:e], hi)
        if ee > aa:
            _scatter(indices, data, aa, ee, W_in, ti, tj, tv, d, run0, runlen, top, left,
                     imin, imax, jmin, jmax, B0, C0, B1 - B0, w, buf)
            pos = _extract(buf, B0, C0, w, B0, B1 - 1, C0, C1, W_out, out_idx, out_val, pos)
    return pos


@numba.njit(**_JIT)
def _csr_range(
    start, stop, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax,
    H_out, W_out, sg_off, sg_mask, sg_w, full, cap, dense_ops, bbox_ratio, bbox_slack, band_frame, band_slots, band_ops,
    out_idx, out_val, pos, counts, stage_size, buf, bits,
):
    """Convolve images [start, stop); counts[b] = nnz of image b. Returns the
    number of values written.

    ``buf``/``bits``: with ``full``, a zeroed frame and its bit map, left
    zeroed (every path clears what it touched); else empty arrays (the
    bounding-box buffer is grown here).

    ``stage_size == 0``: forward, written at out_*[pos:]. Otherwise backward:
    the images are done last to first through a staging area of
    ``stage_size`` slots and placed so that the range's values *end* at
    ``pos`` (exclusive), flush against the next range's.
    """
    dfull = ti * W_out + tj
    if stage_size == 0:
        pos0 = pos
        for b in range(start, stop):
            begin = pos
            pos, buf = _csr_image(b, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, dfull, top, left,
                                  imin, imax, jmin, jmax, H_out, W_out, sg_off, sg_mask, sg_w, full, cap,
                                  dense_ops, bbox_ratio, bbox_slack, band_frame, band_slots, band_ops, buf, bits,
                                  out_idx, out_val, pos)
            counts[b] = pos - begin
        return pos - pos0
    st_idx = np.empty(stage_size, dtype=out_idx.dtype)
    st_val = np.empty(stage_size, dtype=out_val.dtype)
    end = pos
    for b in range(stop - 1, start - 1, -1):
        m, buf = _csr_image(b, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, dfull, top, left, imin, imax, jmin, jmax,
                            H_out, W_out, sg_off, sg_mask, sg_w, full, cap, dense_ops, bbox_ratio, bbox_slack,
                            band_frame, band_slots, band_ops, buf, bits, st_idx, st_val, np.int64(0))  # see _csr_batch
        end -= m
        out_idx[end : end + m] = st_idx[:m]
        out_val[end : end + m] = st_val[:m]
        counts[b] = m
    return pos - end


@numba.njit(**_JIT)
def _csr_batch(
    indptr, indices, data, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax, H_out, W_out,
    sg_off, sg_mask, sg_w, full, cap, dense_ops, bbox_ratio, bbox_slack, band_frame, band_slots, band_ops, tighten,
    split_work, alloc_limit, index_like, buf, bits,
):
    """The whole serial call in one dispatch: bounds, output arrays, the
    convolution and the result's indptr (in ``index_like``'s dtype).

    Returns ``(done, indptr, indices, values, nnz, ub_cum, work)``. When the
    estimated work reaches ``split_work`` (>= 0), the bounds outgrow int32
    indices, or the output arrays would exceed ``alloc_limit`` bytes,
    nothing is convolved (``done`` is False): the caller cuts the batch into
    ranges using ``ub_cum`` and ``work`` and allocates with numpy.
    """
    n = indptr.size - 1
    K = np.int64(tv.size)
    ub_cum = np.empty(n + 1, dtype=np.int64)
    work = _upper_bounds(indptr, indices, W_in, K, H_out, W_out, top, imin, imax, ub_cum)
    if ub_cum[n] > tighten:
        _tighten_bounds(indptr, indices, W_in, K, H_out, W_out, top, left, imin, imax, jmin, jmax, ub_cum)
    total = ub_cum[n] + n + 1  # one spare slot per image (branch-free extraction)
    too_wide = index_like.itemsize == 4 and total > np.iinfo(np.int32).max
    too_big = total * (index_like.itemsize + tv.itemsize) > alloc_limit
    if (split_work >= 0 and work >= split_work) or too_wide or too_big:
        return False, index_like[:0], index_like[:0], tv[:0], 0, ub_cum, work
    out_idx = np.empty(total, dtype=index_like.dtype)
    out_val = np.empty(total, dtype=tv.dtype)
    counts = np.empty(n, dtype=np.int64)
    # np.int64(0), not 0: a literal would make numba compile _csr_range (and
    # everything under it) a second time, specialised for it, beside the
    # version the ranged path calls (~20 s of compile per variant)
    zero = np.int64(0)
    nnz = _csr_range(zero, n, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax,
                     H_out, W_out, sg_off, sg_mask, sg_w, full, cap, dense_ops, bbox_ratio, bbox_slack,
                     band_frame, band_slots, band_ops, out_idx, out_val, zero, counts, zero, buf, bits)
    indptr_out = np.empty(n + 1, dtype=index_like.dtype)
    indptr_out[0] = 0
    acc = 0
    for b in range(n):
        acc += counts[b]
        indptr_out[b + 1] = acc
    return True, indptr_out, out_idx[:nnz], out_val[:nnz], nnz, ub_cum, work


@numba.njit(**_JIT)
def _move(arr, src, dst, n):
    """arr[dst:dst+n] = arr[src:src+n] for dst <= src (overlap-safe forward copy)."""
    for i in range(n):
        arr[dst + i] = arr[src + i]


@numba.njit(**_JIT)
def _dense_range(start, stop, indptr, indices, data, W_in, ti, tj, tv, run0, runlen, top, left, imin, imax, jmin, jmax,
                 H_out, W_out, out):
    """Scatter images [start, stop) straight into out[b] (zeroed, flat frames)."""
    d = ti * W_out + tj
    if tv.size == 0:
        return
    for b in range(start, stop):
        a = np.int64(indptr[b])
        e = np.int64(indptr[b + 1])
        if e > a:
            _scatter(indices, data, a, e, W_in, ti, tj, tv, d, run0, runlen, top, left,
                     imin, imax, jmin, jmax, 0, 0, H_out, W_out, out[b])


# ---------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _segments(nz, W_out):
    """``(flat offset, tap bit mask, width)`` of each kernel row's runs of
    taps, cut into pieces of at most 64 columns (one uint64 mask each): a
    piece starts at a row's next nonzero tap and covers the 64 columns from
    there. Compiled: as a Python loop over the taps it cost ~0.3 ms for a
    31 x 31 kernel, paid by every new convolver."""
    kH, kW = nz.shape
    n = 0
    for i in range(kH):
        j = 0
        while j < kW:
            if nz[i, j]:
                n += 1
                j += 64
            else:
                j += 1
    off = np.empty(n, dtype=np.int64)
    mask = np.empty(n, dtype=np.uint64)
    width = np.empty(n, dtype=np.uint64)
    k = 0
    for i in range(kH):
        j = 0
        while j < kW:
            if nz[i, j]:
                m = np.uint64(0)
                last = j
                for c in range(j, min(j + 64, kW)):
                    if nz[i, c]:
                        m |= np.uint64(1) << np.uint64(c - j)
                        last = c
                off[k] = i * W_out + j
                mask[k] = m
                width[k] = np.uint64(last - j + 1)
                k += 1
                j += 64
            else:
                j += 1
    return off, mask, width


@numba.njit(cache=True, nogil=True)
def _plan_arrays(kernel, W_out, run_min):
    """Taps ``(ti, tj, tv)`` in row-major order, their runs of adjacent
    columns (``run0``, ``runlen``; empty unless they average ``run_min``
    taps), their row and column extent, and the row segments
    (:func:`_segments`): the whole per-mode plan in one compiled call, so
    that a new convolver pays one dispatch for it rather than a dozen numpy
    calls."""
    kH, kW = kernel.shape
    K = 0
    for i in range(kH):
        for j in range(kW):
            if kernel[i, j] != 0:
                K += 1
    ti = np.empty(K, dtype=np.int64)
    tj = np.empty(K, dtype=np.int64)
    tv = np.empty(K, dtype=kernel.dtype)
    k = 0
    jmin = kW
    jmax = -1
    for i in range(kH):
        for j in range(kW):
            if kernel[i, j] != 0:
                ti[k] = i
                tj[k] = j
                tv[k] = kernel[i, j]
                jmin = min(jmin, j)
                jmax = max(jmax, j)
                k += 1
    if K == 0:
        imin = imax = jmin = jmax = 0
    else:
        imin = ti[0]
        imax = ti[K - 1]
    sg_off, sg_mask, sg_w = _segments(kernel != 0, W_out)
    # runs of adjacent taps in a row (row-major, so consecutive in tv)
    n_runs = 0
    for k in range(K):
        if k == 0 or ti[k] != ti[k - 1] or tj[k] != tj[k - 1] + 1:
            n_runs += 1
    if K < run_min * max(n_runs, 1):  # short runs: tap by tap is faster
        n_runs = 0
    run0 = np.empty(n_runs, dtype=np.int64)
    runlen = np.empty(n_runs, dtype=np.int64)
    g = -1
    for k in range(K if n_runs else 0):
        if k == 0 or ti[k] != ti[k - 1] or tj[k] != tj[k - 1] + 1:
            g += 1
            run0[g] = k
            runlen[g] = 0
        runlen[g] += 1
    return ti, tj, tv, run0, runlen, sg_off, sg_mask, sg_w, imin, imax, jmin, jmax


#: zero-length arrays that tell :func:`_csr_batch` which index dtype to allocate
_INDEX_LIKE = {np.dtype(np.int32): np.empty(0, dtype=np.int32), np.dtype(np.int64): np.empty(0, dtype=np.int64)}

#: what a call without a frame-sized scratch passes for it (its buffer is grown per image)
_NO_SCRATCH = {np.dtype(d): (np.zeros(0, dtype=d), np.zeros(1, dtype=np.uint64)) for d in (np.float32, np.float64)}


class _Plan:
    """Everything that depends on (kernel, mode) only; built once per mode."""

    __slots__ = ("geo", "ti", "tj", "tv", "run0", "runlen", "K", "imin", "imax", "jmin", "jmax", "args",
                 "sg_off", "sg_mask", "sg_w")

    def __init__(self, kernel: np.ndarray, geo):
        self.geo = geo
        H_out, W_out = geo.out_shape
        (self.ti, self.tj, self.tv, self.run0, self.runlen, self.sg_off, self.sg_mask, self.sg_w,
         imin, imax, jmin, jmax) = _plan_arrays(kernel, W_out, RUN_MIN)
        # None (not empty arrays) when unused: the kernels are then compiled
        # without the run loop, which slowed small kernels down 2-3x
        runs = (self.run0, self.runlen) if self.run0.size else (None, None)
        self.K = int(self.tv.size)
        self.imin, self.imax, self.jmin, self.jmax = int(imin), int(imax), int(jmin), int(jmax)
        # the arguments every kernel takes after (indptr, indices, data);
        # Python ints, not np.int64: numba types both as int64, and the
        # dispatcher reads a Python int faster (a call on 1 image: 5.6 ->
        # 4.7 us for the compiled call's arguments alone, and no scalar to build)
        self.args = (
            geo.frame_shape[1], self.ti, self.tj, self.tv, *runs, geo.top, geo.left,
            self.imin, self.imax, self.jmin, self.jmax, H_out, W_out,
        )


class DirectNumba(Engine):
    """Direct scatter of each image's pixels through the kernel's nonzero taps.

    Thread-safe: calls share only read-only plans; each thread has its own scratch.
    """

    method = "direct"
    backend = "numba"
    #: per-instance override of :data:`SERIAL_WORK` (tests force threading with 0)
    serial_work: int | None = None
    #: per-image path thresholds (see the module constants); attributes so
    #: that tests and benchmarks can force a path
    dense_ops: float = DENSE_OPS
    bbox_ratio: int = BBOX_RATIO
    bbox_slack: int = BBOX_SLACK
    band_frame_bytes: int = BAND_FRAME_BYTES
    band_bytes: int = BAND_BYTES
    band_ops: int = BAND_OPS

    def __init__(self, frame_shape, kernel, dtype, **kwargs):
        super().__init__(frame_shape, kernel, dtype, **kwargs)
        self._plans: dict[str, _Plan] = {}
        self._plans_lock = threading.Lock()

    def _budget(self, out_pixels: int, n_ranges: int) -> tuple[bool, int]:
        """``(full, cap)`` for ``n_ranges`` ranges at once: whether each gets a
        frame-sized scratch within ``max_buffer_bytes``, and the slots each
        bounding-box buffer may grow to."""
        share = self.dtype.itemsize * n_ranges
        return out_pixels * share <= self.max_buffer_bytes, int(max(1, self.max_buffer_bytes // share))

    def _with_scratch(self, n_frame: int, kernel, *args):
        """``kernel(*args, buf, bits)`` with this thread's zeroed frame buffer
        and bit map for ``n_frame`` output pixels (0: none, the bounding-box
        buffer is grown per image). They are kept for the thread's next call,
        of any engine (:class:`_ThreadScratch`), when small enough, and
        dropped when the call fails, which may leave them dirty. (A plain
        method, not a context manager: this runs on every call, where a
        generator's set-up is a visible cost.)"""
        if not n_frame:
            return kernel(*args, *_NO_SCRATCH[self.dtype])
        store = _thread_scratch()
        frames = store.frames
        key = (self.dtype.char, n_frame)
        kept = frames.pop(key, None)  # put back (last: most recent) once the call succeeds
        fresh = kept is None
        if fresh:
            kept = (np.zeros(n_frame, dtype=self.dtype), np.zeros((n_frame >> 6) + 1, dtype=np.uint64))
        result = kernel(*args, *kept)  # a failed call may leave it dirty: then it is dropped
        if self._keeps(n_frame):
            frames[key] = kept
            # only a new frame size can break the bounds; the least recent goes first
            while fresh and len(frames) > 1 and (len(frames) > KEEP_SCRATCH_FRAMES
                                                 or store.nbytes() > KEEP_SCRATCH_TOTAL):
                del frames[next(iter(frames))]
        return result

    def _band_args(self) -> tuple[int, int, int]:
        """``(band_frame, band_slots, band_ops)`` of the compiled calls, in values of this dtype."""
        size = self.dtype.itemsize
        return int(self.band_frame_bytes // size), int(max(1, self.band_bytes // size)), int(self.band_ops)

    def _keeps(self, n_frame: int) -> bool:
        return n_frame * self.dtype.itemsize <= KEEP_SCRATCH_BYTES

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

    def _run_ranges(self, n_frame, ranges, ub_cum, args, counts, out_idx, out_val) -> tuple[int, int]:
        """Run ``_csr_range`` over several ranges on the pool and join their
        values; returns (nnz, offset of the first value in out_*)."""
        n_ranges = len(ranges)
        backward = [r % 2 == 0 and r + 1 < n_ranges for r in range(n_ranges)]
        index_of = {a: r for r, (a, _) in enumerate(ranges)}

        def run(a: int, b: int) -> int:
            if backward[index_of[a]]:
                pos = int(ub_cum[b]) + b  # = the next range's start
                stage = int(np.max(ub_cum[a + 1 : b + 1] - ub_cum[a:b])) + 1
            else:
                pos, stage = int(ub_cum[a]) + a, 0
            return self._with_scratch(n_frame, _csr_range, int(a), int(b), *args, int(pos), counts,
                                      int(stage))

        written = [int(w) for w in run_ranges(run, ranges)]
        # where each range's values begin; later blocks move down to join
        begins = [
            (int(ub_cum[b]) + b - w) if backward[r] else (int(ub_cum[a]) + a)
            for r, ((a, b), w) in enumerate(zip(ranges, written))
        ]
        dst = begins[0] + written[0]
        for src, w in zip(begins[1:], written[1:]):
            if w and src != dst:
                _move(out_idx, int(src), int(dst), int(w))
                _move(out_val, int(src), int(dst), int(w))
            dst += w
        return sum(written), begins[0]

    def to_csr(self, x: scipy.sparse.csr_matrix, mode: str) -> scipy.sparse.csr_matrix:
        plan = self._plan(mode)
        n = x.shape[0]
        out_pixels = plan.geo.out_pixels
        if n == 0 or plan.K == 0 or x.nnz == 0:
            return empty_csr(n, out_pixels, self.dtype)
        if self.n_threads == 1 or n < 2:
            split_work = -1  # never split
        else:
            split_work = SERIAL_WORK if self.serial_work is None else self.serial_work
        # index values fit the dtype of (n, out_pixels); indptr also needs nnz
        index_like = _INDEX_LIKE[index_dtype(n, out_pixels)]
        full, cap = self._budget(out_pixels, 1)
        if full and not self._keeps(out_pixels):
            # a frame scratch made for this call only: leave it to the ranged
            # path, so that it is not zeroed twice when the batch splits
            split_work, full = 0, False
        # One compiled call does a small batch whole: a call this size pays
        # for every Python step and dispatch around it (docs/engine.md).
        done, indptr_out, indices_out, data_out, nnz, ub_cum, work = self._with_scratch(
            out_pixels if full else 0, _csr_batch,
            x.indptr, x.indices, x.data, *plan.args, plan.sg_off, plan.sg_mask, plan.sg_w, full, cap,
            float(self.dense_ops), int(self.bbox_ratio), int(self.bbox_slack), *self._band_args(),
            TIGHTEN_BOUNDS, int(split_work), COMPILED_ALLOC_BYTES, index_like,
        )
        if done:
            return canonical_csr(data_out, indices_out, indptr_out, (n, out_pixels))
        return self._csr_in_ranges(x, plan, ub_cum, int(work))

    def _csr_in_ranges(self, x: scipy.sparse.csr_matrix, plan: _Plan, ub_cum: np.ndarray, work: int):
        """``to_csr`` for a batch cut into ranges (threads), or too large for int32 indices."""
        n = x.shape[0]
        out_pixels = plan.geo.out_pixels
        ranges = self._ranges(ub_cum, n, work)
        full, cap = self._budget(out_pixels, len(ranges))
        idx_dt = index_dtype(n, out_pixels)
        # Range r's values may fill [ub_cum[a_r] + a_r, ub_cum[b_r] + b_r]: one
        # spare slot per image keeps ranges apart (branch-free extraction).
        # Ranges pair up: the even one runs backward and ends flush against
        # the odd one, which runs forward, so with two ranges the result is
        # contiguous without moving anything.
        total = int(ub_cum[-1]) + n + 1
        out_idx = np.empty(total, dtype=idx_dt)
        out_val = np.empty(total, dtype=self.dtype)
        counts = np.empty(n, dtype=np.int64)
        args = (
            x.indptr, x.indices, x.data, *plan.args, plan.sg_off, plan.sg_mask, plan.sg_w, full, cap,
            float(self.dense_ops), int(self.bbox_ratio), int(self.bbox_slack), *self._band_args(),
            out_idx, out_val,
        )
        n_frame = out_pixels if full else 0
        if len(ranges) == 1:
            nnz = int(self._with_scratch(n_frame, _csr_range, 0, int(n), *args, 0, counts, 0))
            first = 0
        else:
            nnz, first = self._run_ranges(n_frame, ranges, ub_cum, args, counts, out_idx, out_val)
        indices_out, data_out = out_idx[first : first + nnz], out_val[first : first + nnz]
        final_dt = index_dtype(n, out_pixels, nnz)
        if final_dt != idx_dt:  # more than 2**31 values in a batch of small frames
            indices_out = indices_out.astype(final_dt)
        indptr_out = np.empty(n + 1, dtype=final_dt)
        indptr_out[0] = 0
        np.cumsum(counts, out=indptr_out[1:])
        return canonical_csr(data_out, indices_out, indptr_out, (n, out_pixels))

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
            _dense_range(int(a), int(b), x.indptr, x.indices, x.data, *plan.args, flat)

        run_ranges(run, ranges)
        return res

    def nbytes(self) -> int:
        plans = sum(p.ti.nbytes + p.tj.nbytes + p.tv.nbytes + p.run0.nbytes + p.runlen.nbytes for p in self._plans.values())
        # the frame scratch is the threads', shared by all engines: scratch_nbytes()
        return self.kernel.nbytes + plans


__all__ = ["DirectNumba"]
