"""Block-done markers, the completion flag and provenance attributes.

Resume and atomicity rest on three rules:

1. Every row block writes its data first and *then* its done marker. A marker
   is one store key per block (``<node>/_progress/<i>`` for a dense output
   array; chunk ``i`` of the uint8 array ``<group>/_progress`` -- chunk size
   1 -- for a CSR output group), so concurrent writers never touch the same
   key and no read-modify-write happens. A crash mid-block leaves no marker
   and the block is simply redone.
2. :func:`done_blocks` lists the marker keys (one listing call, cheap on
   object stores too).
3. The output's attribute ``dask_sparseconv`` records provenance at creation
   with ``"complete": false``; :func:`mark_complete` flips it to ``true`` as
   the very last write of a run. Readers (``open_stack``) refuse an output
   whose flag is false.

Block records (resume verification): with each block the writer stores a
small JSON record -- rows, nnz and a digest of the values it wrote
(:func:`dense_digest` for a dense output, kept as the marker's own content;
a CRC-32 of the staging bytes for a CSR output). :func:`dense_digest` and
:func:`checksum` are the one
definition used on write and on re-read, so a resumed run can re-read a
block and compare before skipping it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import zlib
from typing import Any

import numba
import numpy as np
import zarr

from ._zarr_compat import buffer, default_chunk_key, prototype, sync

ATTR = "dask_sparseconv"
PROGRESS = "_progress"

__all__ = [
    "ATTR",
    "PROGRESS",
    "package_version",
    "provenance",
    "is_complete",
    "init_provenance",
    "mark_complete",
    "mark_block_done",
    "done_blocks",
    "checksum",
    "read_block_record",
]


def package_version() -> str:
    """This package's version, as recorded in provenance."""
    import dask_sparseconv

    return dask_sparseconv.__version__


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """Make ``value`` JSON-serialisable (ndarrays -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def provenance(node: zarr.Array | zarr.Group) -> dict | None:
    """The ``dask_sparseconv`` attribute of ``node``, or ``None`` when it was
    not written by this package."""
    value = node.attrs.get(ATTR)
    return dict(value) if isinstance(value, dict) else None


def is_complete(node: zarr.Array | zarr.Group) -> bool | None:
    """``True``/``False`` for outputs of this package, ``None`` for other stores."""
    prov = provenance(node)
    if prov is None:
        return None
    return bool(prov.get("complete", False))


def new_provenance(attrs: dict | None, extra: dict) -> dict:
    """The provenance record of a new output, with ``complete: false``."""
    prov: dict[str, Any] = {"version": package_version()}
    prov.update(jsonable(dict(attrs or {})))
    prov.update(jsonable(extra))
    prov["created"] = _now()
    prov["complete"] = False
    return prov


def init_provenance(node: zarr.Array | zarr.Group, attrs: dict | None, extra: dict) -> dict:
    """Record provenance at creation, with ``complete: false``."""
    prov = new_provenance(attrs, extra)
    node.attrs[ATTR] = prov
    return prov


def mark_complete(node: zarr.Array | zarr.Group, **updates: Any) -> dict:
    """Set ``complete: true`` (plus ``updates``). Call it as the last write."""
    prov = provenance(node) or {"version": package_version()}
    prov.update(jsonable(updates))
    prov["completed"] = _now()
    prov["complete"] = True
    node.attrs[ATTR] = prov
    return prov


def _prefix(node: zarr.Array | zarr.Group) -> str:
    return (node.path + "/" if node.path else "") + PROGRESS + "/"


#: Unsigned view and sign-less mask of float32/float64 bit patterns.
_FLOAT_MASKS = {4: (np.uint32, 0x7FFFFFFF), 8: (np.uint64, 0x7FFFFFFFFFFFFFFF)}


@numba.njit(nogil=True, cache=True)
def _fletcher_nnz(words, mask):
    """(nonzero count, Fletcher-64 sum) of integer ``words`` in one pass.

    A word whose bits under ``mask`` are all zero counts as zero (``mask``
    drops the sign bit of floats, so ``-0.0`` reads as ``0.0``, as zarr
    stores it).
    """
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    nnz = 0
    zero = words.dtype.type(0)
    for i in range(words.size):
        w = words[i]
        if (w & mask) == zero:
            w = zero
        else:
            nnz += 1
        s1 += np.uint64(w)
        s2 += s1
    return nnz, s1, s2


def dense_digest(values: np.ndarray) -> tuple[int, str]:
    """``(nonzero count, digest)`` of a float block, in one pass over memory.

    The digest is a Fletcher-64 sum over the values' bit patterns (order
    sensitive, with ``-0.0`` read as ``0.0``): it detects a block that was
    truncated, overwritten or read back differently, which is what resume
    needs, at memory speed (a CRC-32 plus ``count_nonzero`` cost ~3x more on
    a 16 MiB block). Other dtypes fall back to CRC-32.
    """
    a = np.ascontiguousarray(values).reshape(-1)
    if a.dtype not in (np.float32, np.float64):
        return int(np.count_nonzero(a)), f"crc32:{checksum(a)}"
    uint, mask = _FLOAT_MASKS[a.dtype.itemsize]
    nnz, s1, s2 = _fletcher_nnz(a.view(uint), uint(mask))
    return int(nnz), f"fletcher64:{int(s1):016x}{int(s2):016x}"


@numba.njit(nogil=True, cache=True)
def _fletcher_pairs(positions, words, mask):
    """(nonzero count, Fletcher-64 sum) over ``(position, value bits)`` pairs
    in order, skipping values whose bits under ``mask`` are zero (as
    :func:`_fletcher_nnz` reads ``-0.0`` as ``0.0``)."""
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    nnz = 0
    zero = words.dtype.type(0)
    for i in range(words.size):
        w = words[i]
        if (w & mask) == zero:
            continue
        nnz += 1
        s1 += np.uint64(positions[i])
        s2 += s1
        s1 += np.uint64(w)
        s2 += s1
    return nnz, s1, s2


NONZERO_DIGEST = "nzfletcher64"


def nonzero_digest(positions: np.ndarray, values: np.ndarray) -> tuple[int, str] | None:
    """``(nonzero count, digest)`` of a block from its nonzeros alone: the
    flat positions (row-major over the whole block) and values of its
    nonzero pixels, in order. ``None`` for dtypes other than float32/64.

    It digests the same block as :func:`dense_digest` would (and
    :func:`verify_digest` recomputes it from the dense block read back), but
    costs ``O(nnz)`` instead of a pass over every pixel: a block written from
    a sparse result (the engine's CSR, scattered into zeros for the store)
    is digested from that result (figures: docs/benchmarks.md, "Figures behind the code")."""
    values = np.ascontiguousarray(values)
    if values.dtype.kind != "f" or values.dtype.itemsize not in _FLOAT_MASKS:
        return None
    uint, mask = _FLOAT_MASKS[values.dtype.itemsize]
    nnz, s1, s2 = _fletcher_pairs(np.ascontiguousarray(positions, dtype=np.int64), values.view(uint), uint(mask))
    return int(nnz), f"{NONZERO_DIGEST}:{int(s1):016x}{int(s2):016x}"


def verify_digest(values: np.ndarray, nnz: Any, digest: Any) -> bool:
    """Whether a dense block read back has the nonzero count and digest that
    its writer recorded (by :func:`dense_digest` or :func:`nonzero_digest`,
    told apart by the digest's prefix)."""
    if isinstance(digest, str) and digest.startswith(NONZERO_DIGEST + ":"):
        flat = np.ascontiguousarray(values).reshape(-1)
        uint, mask = _FLOAT_MASKS.get(flat.dtype.itemsize, (None, None)) if flat.dtype.kind == "f" else (None, None)
        if uint is None:
            return False
        positions = np.flatnonzero(flat.view(uint) & uint(mask))
        return nonzero_digest(positions, flat[positions]) == (nnz, digest)
    return dense_digest(values) == (nnz, digest)


def checksum(*arrays: np.ndarray) -> int:
    """CRC-32 over the bytes of ``arrays`` (in order), as written to the store.

    Floating-point zeros are normalised first (``-0.0`` -> ``0.0``): zarr does
    not store all-zero chunks, so a chunk of negative zeros reads back as
    positive zeros.
    """
    crc = 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.kind in "fc" and _may_hold_negative_zero(a):
            a = a + a.dtype.type(0)  # -0.0 + 0.0 == +0.0; NaN stays NaN
        crc = zlib.crc32(memoryview(a).cast("B"), crc)
    return crc


def _may_hold_negative_zero(a: np.ndarray) -> bool:
    """Whether a contiguous float/complex array may contain ``-0.0``.

    Compares the bit patterns with the sign-bit-only pattern (one pass, a
    boolean temporary): much cheaper than the normalising copy, which is then
    made only for the rare arrays that need it
    (figures: docs/benchmarks.md, "Figures behind the code"). Unusual layouts (non-native byte order, long double)
    answer True, i.e. take the copy.
    """
    flt = a if a.dtype.kind == "f" else a.view(np.dtype(f"f{a.dtype.itemsize // 2}"))
    size = flt.dtype.itemsize
    if size not in (2, 4, 8) or not flt.dtype.isnative:
        return True
    bits = flt.reshape(-1).view(np.dtype(f"u{size}"))
    return bool((bits == np.array(1 << (8 * size - 1), dtype=bits.dtype)).any())


def _csr_marker(group: zarr.Group, i: int):
    """The raw key of block ``i``'s marker under a CSR output ``group``: chunk
    ``i`` of ``_progress`` (uint8, chunk size 1, no codec, so the encoded
    chunk is the byte itself). Written and read as a key, not through the
    array: one store call and no read of the array's metadata."""
    return group.store_path / PROGRESS / default_chunk_key(int(i))


def block_marked(group: zarr.Group, i: int) -> bool:
    """Whether block ``i``'s marker under a CSR output ``group`` is set, read
    as the raw key :func:`mark_block_done` writes: opening ``_progress`` and
    indexing it read the array's metadata and went through zarr's selection
    (~2 ms a block, most of checking a kept block's record on resume)."""
    raw = sync(_csr_marker(group, i).get(prototype=prototype()))
    return raw is not None and any(raw.to_bytes())


def mark_block_done(node: zarr.Array | zarr.Group, i: int, record: dict | None = None) -> None:
    """Write block ``i``'s marker: a raw key under a dense array, one chunk
    of ``_progress`` under a CSR group. Touches no key another block uses.

    ``record`` (dense arrays): stored as the marker's content (JSON), so the
    marker and the block's checksum are written in one atomic key."""
    if isinstance(node, zarr.Group):
        sync(_csr_marker(node, i).set(buffer(b"\x01")))
    else:
        payload = b"\x01" if record is None else json.dumps(jsonable(record)).encode()
        buf = buffer(payload)
        sync((node.store_path / PROGRESS / str(int(i))).set(buf))


#: how :func:`stored_chunks` digests a chunk's stored bytes: XXH3-64 reads
#: the store's buffer in place at ~30 GB/s here, against ~6 GB/s for zlib's
#: CRC-32 (1.1 GB of dense output: 0.04 s against 0.17 s), which made the
#: check of written blocks a tenth of a resumed run. Records written before
#: (a bare CRC-32 hex) are still checked with CRC-32.
CHUNK_HASH = "xxh3"


def chunk_hash(record_chunks: dict) -> str:
    """The digest a block record's chunk list was written with (``"xxh3"``, or ``"crc32"`` for older records)."""
    for entry in record_chunks.values():
        if entry is not None:
            return CHUNK_HASH if str(entry[1]).startswith(CHUNK_HASH + ":") else "crc32"
    return CHUNK_HASH


def stored_chunks(node: zarr.Array, keys: list[str], hash: str = CHUNK_HASH) -> dict[str, list | None]:
    """``{key: [size, digest] or None}`` of chunk keys (relative to
    ``node``) as they are stored now, read raw; ``None`` for a chunk that
    is not stored (zarr skips chunks that are all fill value). What a block
    record keeps, and what resume compares with it.

    ``hash``: ``"xxh3"`` (digest ``"xxh3:<16 hex>"``) or ``"crc32"`` (a bare
    8-hex CRC-32, what records made by earlier builds hold).

    Chunks of a local store are read from their files in small pieces
    (:func:`_file_digest`); other stores' keys are read whole, concurrently,
    through the store."""
    folder = _local_folder(node)
    if folder is not None:
        return {key: _file_digest(os.path.join(folder, key), hash) for key in keys}
    import asyncio

    proto = prototype()

    async def _one(key: str):
        buf = await (node.store_path / key).get(prototype=proto)
        if buf is None:
            return None
        raw = buf.as_numpy_array()
        return [int(raw.nbytes), _digest_pieces([raw], hash)]

    async def _all():
        return await asyncio.gather(*(_one(k) for k in keys))

    return dict(zip(keys, sync(_all())))


def _digest_pieces(pieces, hash: str) -> str:
    """The record digest of bytes given in consecutive pieces."""
    if hash == "crc32":
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
        return f"{crc:08x}"
    import xxhash

    h = xxhash.xxh3_64()
    for piece in pieces:
        h.update(piece)
    return f"{CHUNK_HASH}:{h.hexdigest()}"


def _local_folder(node: zarr.Array) -> str | None:
    """The folder of ``node``'s keys when it lives in a local store, else None."""
    store = node.store
    if not isinstance(store, zarr.storage.LocalStore):
        return None
    path = node.store_path.path
    return os.path.join(str(store.root), path) if path else str(store.root)


#: Bytes per read of :func:`_file_digest`: small enough to stay in cache.
_PIECE = 256 << 10
_pieces = threading.local()


def _file_digest(path: str, hash: str) -> list | None:
    """``[size, digest]`` of a chunk file, or None when it does not exist.

    Read into one small buffer per thread rather than as one ``bytes`` of
    the whole chunk: dask workers run with distributed's
    ``MALLOC_TRIM_THRESHOLD_``, under which glibc maps every large
    allocation afresh, so each 15 MB chunk read whole cost ~8 ms of page
    faults against ~1 ms read in pieces (the records of a 75-block dense
    job: ~0.5 s of its workers' time on every write and every resume)."""
    buf = getattr(_pieces, "buf", None)
    if buf is None:
        buf = _pieces.buf = memoryview(bytearray(_PIECE))
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    size = 0

    def pieces():
        nonlocal size
        while True:
            n = os.readv(fd, [buf])
            if n <= 0:
                return
            size += n
            yield buf[:n]

    try:
        digest = _digest_pieces(pieces(), hash)
    finally:
        os.close(fd)
    return [size, digest]


def read_block_record(node: zarr.Array, i: int) -> dict | None:
    """The record stored in a dense array's marker for block ``i`` (None when
    there is no marker, or a marker without a record)."""
    buf = sync((node.store_path / PROGRESS / str(int(i))).get(prototype()))
    if buf is None:
        return None
    try:
        value = json.loads(buf.to_bytes().decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def done_blocks(node: zarr.Array | zarr.Group) -> set[int]:
    """Indices of blocks whose marker exists under ``node`` (where an output
    keeps its markers: :func:`dask_sparseconv.storage.written_blocks` asks
    its format)."""
    prefix = _prefix(node)
    store = node.store

    async def _list() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    done = set()
    for key in sync(_list()):
        last = key.rsplit("/", 1)[-1]
        if last.isdigit():
            done.add(int(last))
    return done
