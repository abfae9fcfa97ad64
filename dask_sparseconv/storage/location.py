"""Where a stack lives: a local path, an fsspec URL, or a zarr object.

Everything else in :mod:`dask_sparseconv.storage` goes through
:func:`resolve_location`, so a store is named the same way for reading,
writing, the overlap check and provenance. A :class:`Location` is small and
picklable: it is shipped inside dask tasks and reopened there (opening a zarr
node costs one metadata read).

Sources accepted
----------------
* ``str`` or :class:`os.PathLike`: a local path (``~`` expanded; ``file://``
  URLs are local paths too) or an fsspec URL (``memory://...``,
  ``s3://bucket/key``, ``gs://...``); ``storage_options`` go to fsspec and
  are only valid with URLs.
* a :class:`zarr.Array` or :class:`zarr.Group`: used as is (its store and
  path). ``array=`` then names a node inside a group.
* a :class:`zarr.abc.store.Store` (e.g. :class:`zarr.storage.MemoryStore`).

``array`` is a path inside the store (``"images/raw"``), for stacks that are
not at the store's root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import zarr
from zarr.abc.store import Store

from ..validation import _short

__all__ = ["Location", "resolve_location", "same_or_inside", "stores_overlap"]


def _clean_inner(path: str | None, name: str = "array") -> str:
    if path is None:
        return ""
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a string path inside the store (e.g. 'images/raw') or None; got {_short(path)}")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"{name} must be a path inside the store without '..'; got {path!r}")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _proto(fs) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


@dataclass(frozen=True, eq=False)
class Location:
    """A zarr node's address: a store plus a path inside it.

    Attributes
    ----------
    kind : {'local', 'url', 'object'}
    root : str or None
        Absolute local path (``'local'``) or fsspec URL (``'url'``) of the store.
    path : str
        Path of the node inside the store (``''`` for the root).
    storage_options : dict or None
        fsspec options for ``'url'``.
    store : zarr Store or None
        The store object, for ``'object'``. Pickling a location pickles the
        store: cheap for local/fsspec stores; an in-process
        :class:`~zarr.storage.MemoryStore` is copied with its contents, so
        with a distributed cluster use a URL instead.
    """

    kind: str
    root: str | None
    path: str = ""
    storage_options: dict | None = None
    store: Any = field(default=None, repr=False)

    # -- description -----------------------------------------------------
    def __str__(self) -> str:
        if self.kind == "object":
            root = getattr(self.store, "root", None) or getattr(self.store, "path", None)
            base = f"<{type(self.store).__name__} {root if root else hex(id(self.store))}>"
        else:
            base = self.root or ""
        return base + (f" [{self.path}]" if self.path else "")

    @property
    def description(self) -> str:
        """A one-line text for messages and provenance attributes."""
        return str(self)

    def child(self, sub: str) -> "Location":
        """The location of ``sub`` below this node."""
        return Location(self.kind, self.root, _join(self.path, sub), self.storage_options, self.store)

    # -- opening ---------------------------------------------------------
    def _kw(self, mode: str) -> dict[str, Any]:
        if self.kind == "object":
            store = self.store
            if mode == "r" and not store.read_only:
                store = store.with_read_only(True)
            return {"store": store}
        kw: dict[str, Any] = {"store": self.root}
        if self.kind == "url" and self.storage_options:
            kw["storage_options"] = self.storage_options
        return kw

    def open(self, mode: str = "r"):
        """Open the node (array or group) at this location with zarr ``mode``."""
        return zarr.open(path=self.path or None, mode=mode, **self._kw(mode))

    def open_array(self, mode: str = "r"):
        return zarr.open_array(path=self.path or "", mode=mode, **self._kw(mode))

    def open_group(self, mode: str = "r"):
        return zarr.open_group(path=self.path or None, mode=mode, **self._kw(mode))

    # -- identity for overlap checks ---------------------------------------
    def key(self) -> tuple[str, Any, str]:
        """``(namespace, store identity, absolute path)`` used by :func:`same_or_inside`."""
        if self.kind == "local":
            return ("file", None, _join(os.path.realpath(self.root), self.path))
        if self.kind == "url":
            import fsspec.core

            try:
                fs, p = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
            except (ImportError, ValueError):  # protocol's package (s3fs, gcsfs) not installed: compare the text
                proto, _, rest = self.root.partition("://")
                return (proto, None, _join(rest, self.path))
            proto = _proto(fs)
            if proto in ("file", "local"):
                return ("file", None, _join(os.path.realpath(p), self.path))
            return (proto, None, _join(p, self.path))
        name = type(self.store).__name__
        if name == "LocalStore":
            return ("file", None, _join(os.path.realpath(str(self.store.root)), self.path))
        if name == "FsspecStore":
            proto = _proto(self.store.fs)
            if proto in ("file", "local"):
                return ("file", None, _join(os.path.realpath(str(self.store.path)), self.path))
            return (proto, None, _join(str(self.store.path), self.path))
        # other stores (MemoryStore, ...): identity of the backing object
        backing = getattr(self.store, "_store_dict", self.store)
        return ("object", id(backing), self.path)

    def exists(self) -> bool:
        """Whether anything (a zarr node or any other key/file) is at this location."""
        if self.kind == "local":
            return os.path.exists(os.path.join(self.root, self.path) if self.path else self.root)
        if self.kind == "url":
            import fsspec.core

            fs, p = fsspec.core.url_to_fs(self.root, **(self.storage_options or {}))
            return bool(fs.exists(_join(p, self.path) if self.path else p))
        from ._zarr_compat import sync

        store = self.store

        async def _any() -> bool:
            prefix = (self.path + "/") if self.path else ""
            async for _ in store.list_prefix(prefix):
                return True
            return False

        return bool(sync(_any()))


def resolve_location(source: Any, array: str | None = None, storage_options: dict | None = None,
                     name: str = "source") -> Location:
    """Turn ``source`` (+ ``array``, a path inside it) into a :class:`Location`.

    Raises
    ------
    TypeError
        ``source`` is of an unsupported type, ``storage_options`` is not a
        dict, or ``storage_options`` is given with something other than a URL.
    ValueError
        Empty ``source`` or an ``array`` path with ``..``.
    """
    inner = _clean_inner(array)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"storage_options must be a dict or None; got {_short(storage_options)}")
    if isinstance(source, Location):
        return source.child(inner) if inner else source
    if isinstance(source, (zarr.Array, zarr.Group)):
        if storage_options:
            raise TypeError(f"storage_options are only used with a URL {name}; got a zarr object and "
                            f"storage_options={_short(storage_options)}")
        return Location("object", None, _join(source.path, inner), None, source.store)
    if isinstance(source, Store):
        if storage_options:
            raise TypeError(f"storage_options are only used with a URL {name}; got a zarr store and "
                            f"storage_options={_short(storage_options)}")
        return Location("object", None, inner, None, source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, bytes):
        source = source.decode()
    if not isinstance(source, str):
        raise TypeError(
            f"{name} must be a local path, an fsspec URL (e.g. 's3://bucket/stack.zarr'), a zarr Array/Group "
            f"or a zarr store; got {_short(source)} ({type(source).__name__})"
        )
    if not source:
        raise ValueError(f"{name} must not be an empty string")
    if source.startswith("file://"):
        source = source[len("file://"):]
    if "://" in source or "::" in source:
        root = source if source.endswith("://") else source.rstrip("/")
        return Location("url", root, inner, dict(storage_options) if storage_options else None, None)
    if storage_options:
        raise TypeError(f"storage_options are only used with a URL {name}; got local path {source!r} and "
                        f"storage_options={_short(storage_options)}")
    return Location("local", os.path.abspath(os.path.expanduser(source)), inner, None, None)


def _as_location(x: Any, storage_options: dict | None, name: str) -> Location:
    return x if isinstance(x, Location) else resolve_location(x, None, storage_options, name=name)


def same_or_inside(target: Any, source: Any, target_storage_options: dict | None = None,
                   source_storage_options: dict | None = None) -> bool:
    """Whether ``target`` is the same node as ``source`` or lies inside it.

    Both may be anything :func:`resolve_location` accepts, or a
    :class:`Location` (use one to include an ``array=`` path). Writing an
    output there would modify the input store, so the pipeline refuses it.
    """
    t = _as_location(target, target_storage_options, "target").key()
    s = _as_location(source, source_storage_options, "source").key()
    if t[0] != s[0] or t[1] != s[1]:
        return False
    tp, sp = t[2].strip("/"), s[2].strip("/")
    return tp == sp or sp == "" or tp.startswith(sp + "/")


def stores_overlap(a: Any, b: Any, a_storage_options: dict | None = None, b_storage_options: dict | None = None) -> bool:
    """Whether either location is the same as, or inside, the other (so that
    overwriting one could delete the other)."""
    return same_or_inside(a, b, a_storage_options, b_storage_options) or same_or_inside(
        b, a, b_storage_options, a_storage_options
    )
