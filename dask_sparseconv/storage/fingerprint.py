"""Content fingerprints of input stores: what makes resume trust content, not a path.

A resumed run keeps the blocks an earlier run wrote, so it must know that the
input those blocks were computed from is still the input it reads now. A
path proves nothing: an upstream step that re-exports a stack to the same
place (same shape, chunks and codecs) changes every value and no setting.
So a job records, when it starts, a fingerprint of every key under its input
node, and a resume recomputes it and refuses on any difference.

What a fingerprint covers
-------------------------
Every key below the input node (a dense array, or a CSR group with its
``data``/``indices``/``indptr`` arrays), in two parts:

* **metadata documents** (``zarr.json``, ``.zarray``, ``.zattrs``,
  ``.zgroup``, ``.zmetadata``): their full content (SHA-256);
* **chunk keys**, grouped by the array they belong to: the number of keys,
  their total size, and a CRC-32C digest over every key's name, size and
  content digest. The content digest is the store's own checksum when its
  listing gives one for every key (an S3 ``ETag``, a GCS ``md5Hash`` or
  ``crc32c``: nothing is read), else a CRC-32C of the key's bytes as stored
  (compressed: nothing is decoded; ~4 GB/s with the hardware instruction).

Inputs whose stored bytes exceed :data:`PARALLEL_BYTES` are read by dask
tasks on the active scheduler (each a share of the keys, balanced by size),
so a cluster reads a large input in parallel, close to the data; smaller ones
are read in this process by a few threads.

The record is small (one entry per array, not per chunk) and lives in the
output's provenance under ``source_fingerprint``.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import google_crc32c

from .location import Location

__all__ = ["Fingerprint", "InputChangedError", "fingerprint", "check_unchanged"]

METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})

#: Stored bytes above which the keys are read by dask tasks on the active
#: scheduler instead of threads in this process.
PARALLEL_BYTES = 256 << 20

#: Keys per read batch / threads in this process.
_BATCH_KEYS = 64
_THREADS = 8

#: Names under which listings of fsspec object stores give a content checksum.
_STORE_CHECKSUMS = ("ETag", "etag", "md5Hash", "crc32c")


class InputChangedError(ValueError):
    """The input of an incomplete output is not the input it was computed from."""


@dataclass(frozen=True)
class Fingerprint:
    """A content fingerprint of one input node (see the module docs).

    Attributes
    ----------
    method : {'crc32c', 'store-checksum'}
        How chunk contents were identified: read and hashed, or the store's own
        per-object checksums from its listing.
    metadata : str
        SHA-256 over the metadata documents' names and contents.
    arrays : dict
        ``{array path relative to the node: {"keys", "bytes", "digest"}}``.
    seconds : float
        Time it took (not part of the comparison).
    """

    method: str
    metadata: str
    arrays: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "metadata": self.metadata, "arrays": self.arrays,
                "seconds": round(self.seconds, 4)}

    @classmethod
    def from_dict(cls, d: Any) -> "Fingerprint | None":
        if not isinstance(d, dict) or not isinstance(d.get("arrays"), dict) or "metadata" not in d:
            return None
        return cls(str(d.get("method")), str(d["metadata"]), {str(k): dict(v) for k, v in d["arrays"].items()},
                   float(d.get("seconds", 0.0)))

    def differences(self, other: "Fingerprint") -> list[str]:
        """What differs between ``self`` (before) and ``other`` (now), in words."""
        out = []
        if self.metadata != other.metadata:
            out.append("its metadata (zarr.json/.zarray/.zattrs: shape, chunks, codecs or attributes)")
        for name in sorted(set(self.arrays) | set(other.arrays)):
            a, b = self.arrays.get(name), other.arrays.get(name)
            label = f"array {name!r}" if name else "the array"
            if a is None or b is None:
                out.append(f"{label} ({'added' if a is None else 'removed'})")
            elif a != b:
                if self.method != other.method:
                    how = f"it was identified by {self.method} before and by {other.method} now"
                elif (a.get("keys"), a.get("bytes")) != (b.get("keys"), b.get("bytes")):
                    how = (f"{a.get('keys')} chunk keys / {a.get('bytes')} bytes before, "
                           f"{b.get('keys')} / {b.get('bytes')} now")
                else:
                    how = f"same {b.get('keys')} chunk keys and {b.get('bytes')} bytes, different content"
                out.append(f"the chunks of {label} ({how})")
        return out


# -- listing --------------------------------------------------------------------------
def _fsspec_fs(loc: Location):
    """``(filesystem, absolute path of the node)`` for local and URL locations."""
    import fsspec.core

    if loc.kind == "local":
        import fsspec

        base = os.path.join(loc.root, loc.path) if loc.path else loc.root
        return fsspec.filesystem("file"), base
    fs, root = fsspec.core.url_to_fs(loc.root, **(loc.storage_options or {}))
    return fs, (root.rstrip("/") + "/" + loc.path if loc.path else root)


def _store_checksum(info: dict) -> str | None:
    for name in _STORE_CHECKSUMS:
        value = info.get(name)
        if value:
            return f"{name}:{str(value).strip(chr(34))}"
    return None


def _list(loc: Location) -> tuple[list[tuple[str, int, str | None]], str]:
    """``([(key relative to the node, size, store checksum or None)], base)``:
    ``base`` is the node's path (local, URL) or key prefix (zarr store objects)."""
    if loc.kind in ("local", "url"):
        fs, base = _fsspec_fs(loc)
        found = fs.find(base, detail=True)
        if not found and fs.isfile(base):  # not a store directory; nothing to list
            found = {}
        base_s = base.rstrip("/")
        rows = []
        for path, info in found.items():
            rel = path[len(base_s):].lstrip("/") if path.startswith(base_s) else path
            if info.get("type", "file") != "file":
                continue
            rows.append((rel, int(info.get("size") or 0), _store_checksum(info)))
        return sorted(rows), base_s
    from ._zarr_compat import sync  # zarr store objects: the store's own async API

    store = loc.store
    prefix = (loc.path + "/") if loc.path else ""

    async def _keys() -> list[tuple[str, int, None]]:
        keys = [k async for k in store.list_prefix(prefix)]
        return [(k[len(prefix):], int(await store.getsize(k)), None) for k in keys]

    return sorted(sync(_keys())), prefix


# -- reading ----------------------------------------------------------------------------
def _read_keys(loc: Location, base: str, keys: list[str]) -> dict[str, bytes]:
    """The stored bytes of ``keys`` (relative to ``base``); a missing key reads as empty."""
    if not keys:
        return {}
    if loc.kind == "local":
        out = {}
        for k in keys:
            with open(os.path.join(base, k), "rb") as f:
                out[k] = f.read()
        return out
    if loc.kind == "url":
        fs, _ = _fsspec_fs(loc)
        blobs = fs.cat([f"{base}/{k}" for k in keys])  # concurrent on async filesystems
        return {k: bytes(blobs[f"{base}/{k}"]) for k in keys}
    from ._zarr_compat import prototype, sync

    async def _get() -> dict[str, bytes]:
        res = {}
        for k in keys:
            buf = await loc.store.get(base + k, prototype=prototype())
            res[k] = b"" if buf is None else buf.to_bytes()
        return res

    return sync(_get())


def _read_digests(loc: Location, base: str, keys: list[str]) -> list[str]:
    """CRC-32C (hex) of each key's stored bytes. Runs in this process or in a
    dask task (``loc`` and ``base`` are picklable)."""
    blobs = _read_keys(loc, base, keys)
    return [f"{google_crc32c.value(blobs[k]):08x}" for k in keys]


def _batches(rows: list[tuple[str, int]], n_parts: int) -> list[list[str]]:
    """Split keys into ``n_parts`` shares of about equal bytes, each in key order."""
    shares: list[list[str]] = [[] for _ in range(max(1, n_parts))]
    load = [0] * len(shares)
    for key, size in sorted(rows, key=lambda r: -r[1]):
        j = min(range(len(shares)), key=load.__getitem__)
        shares[j].append(key)
        load[j] += size + 4096  # a key costs a request besides its bytes
    return [sorted(s) for s in shares if s]


def _content_digests(loc: Location, base: str, rows: list[tuple[str, int]], scheduler_threads: int | None) -> dict:
    total = sum(size for _, size in rows)
    if total > PARALLEL_BYTES and loc.kind != "object":
        import dask

        from ..engine.threads import default_threads

        parts = _batches(rows, 4 * max(1, scheduler_threads or default_threads()))
        tasks = [dask.delayed(_read_digests, pure=False)(loc, base, part) for part in parts]
        results = dask.compute(*tasks)
        return {k: d for part, res in zip(parts, results) for k, d in zip(part, res)}
    keys = [k for k, _ in rows]
    if len(keys) <= _BATCH_KEYS:
        return dict(zip(keys, _read_digests(loc, base, keys)))
    chunks = [keys[i:i + _BATCH_KEYS] for i in range(0, len(keys), _BATCH_KEYS)]
    with ThreadPoolExecutor(min(_THREADS, len(chunks))) as pool:
        results = list(pool.map(lambda ks: _read_digests(loc, base, ks), chunks))
    return {k: d for ks, res in zip(chunks, results) for k, d in zip(ks, res)}


def _array_of(key: str, array_dirs: Iterable[str]) -> str:
    """The deepest array (or group) directory that holds ``key``."""
    best = ""
    for d in array_dirs:
        if d and (key.startswith(d + "/")) and len(d) > len(best):
            best = d
    return best


def fingerprint(loc: Location, *, scheduler_threads: int | None = None) -> Fingerprint:
    """Fingerprint every key below ``loc`` (see the module docs).

    Parameters
    ----------
    loc : Location
        The input node (as resolved by :func:`~dask_sparseconv.storage.resolve_location`).
    scheduler_threads : int, optional
        Threads of the scheduler that reads large inputs (how many shares to cut).
    """
    t0 = time.perf_counter()
    rows, base = _list(loc)
    meta_rows = [r for r in rows if r[0].rsplit("/", 1)[-1] in METADATA_NAMES]
    chunk_rows = [r for r in rows if r[0].rsplit("/", 1)[-1] not in METADATA_NAMES]
    # metadata: read in full (small), compared by content
    meta_digest = hashlib.sha256()
    meta_contents = _read_keys(loc, base, [r[0] for r in meta_rows])
    for key in sorted(meta_contents):
        meta_digest.update(key.encode() + b"\0" + meta_contents[key] + b"\0")
    use_store = bool(chunk_rows) and all(r[2] for r in chunk_rows)
    if use_store or not chunk_rows:
        digests = {k: c for k, _, c in chunk_rows}
        method = "store-checksum" if use_store else "crc32c"
    else:
        digests = _content_digests(loc, base, [(k, s) for k, s, _ in chunk_rows], scheduler_threads)
        method = "crc32c"
    array_dirs = {k.rsplit("/", 1)[0] if "/" in k else "" for k, _, _ in meta_rows}
    arrays: dict[str, dict] = {}
    crcs: dict[str, int] = {}
    for key, size, _ in chunk_rows:
        name = _array_of(key, array_dirs)
        entry = arrays.setdefault(name, {"keys": 0, "bytes": 0})
        entry["keys"] += 1
        entry["bytes"] += size
        crcs[name] = google_crc32c.extend(crcs.get(name, 0), f"{key}\0{size}\0{digests[key]}\n".encode())
    for name, entry in arrays.items():
        entry["digest"] = f"{crcs[name]:08x}"
    for d in array_dirs:  # arrays with no chunk written (all fill value) still count
        arrays.setdefault(d, {"keys": 0, "bytes": 0, "digest": "00000000"})
    return Fingerprint(method, meta_digest.hexdigest(), dict(sorted(arrays.items())), time.perf_counter() - t0)


def check_unchanged(recorded: Any, now: Fingerprint, source: str, target: str) -> None:
    """Raise :class:`InputChangedError` unless ``recorded`` (the provenance
    entry of the output being resumed) equals ``now``."""
    before = Fingerprint.from_dict(recorded)
    if before is None:
        raise InputChangedError(
            f"cannot resume {target}: it records no fingerprint of its input (written by an older version of "
            "dask-sparseconv), so its blocks cannot be proven to come from the input as it is now; "
            "pass overwrite=True (CLI: --restart) to start over")
    changes = before.differences(now)
    if changes:
        raise InputChangedError(
            f"cannot resume {target}: its input {source} changed since the run that wrote it started "
            f"({'; '.join(changes)}); the blocks written then are of data that is no longer there. "
            "Pass overwrite=True (CLI: --restart) to start over")
