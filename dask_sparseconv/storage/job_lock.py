"""One run per target: a lock object beside the output.

Two runs of one job at once (a user starts it in two terminals, a batch
scheduler retries a submission that is still running) would both write every
block and race each other's final writes and completion flag. A run
therefore takes a lock on its target before it writes anything, and a second
run is refused at once with who holds it.

Where the lock is
-----------------
``<target>.lock`` beside the target (a local path or an fsspec URL: for
``out.zarr`` that is ``out.zarr.lock``; for a node inside a store, a key
beside the node). It is outside the output on purpose: replacing an output
(``overwrite=True``, ``--restart``) deletes the output's keys, and must not
delete the lock that protects it. For zarr store objects (an in-process
``MemoryStore``, say) the lock is the key ``<node>.lock`` in that store, or
``.dask_sparseconv.lock`` for a node at the store's root.

How it is taken
---------------
The lock is created with an if-absent condition: ``O_CREAT | O_EXCL`` on a
local file system; ``open(mode='xb')`` through fsspec, which object stores
implement with a conditional write (s3fs: ``If-None-Match: *``); zarr's
``set_if_not_exists`` for store objects. A filesystem whose fsspec driver
cannot create exclusively gets a best effort instead: check, write, and read
back our own token.

Its content is JSON: host, pid, the process's start time, user, start time,
last renewal and a random token. While a run computes (``convolve_zarr``
with ``compute=True``, or ``dask-sparseconv run``) a thread renews it every
:data:`RENEW_SECONDS`.

Stale locks
-----------
A lock is stale, and is taken over with a warning, when

* it was written on this host and its process is gone (or the pid now
  belongs to a process started later), or
* it was written on another host and was last renewed more than
  :data:`STALE_SECONDS` ago (the holder's heartbeat stopped), or
* it cannot be read as a lock of this package.

A lock held by this very process (a graph built with ``compute=False`` and
never computed) is taken over silently.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from .location import Location

__all__ = ["JobLock", "LockLostError", "TargetLockedError", "check_held", "lock_location", "read_lock"]

#: Seconds between renewals of a held lock.
RENEW_SECONDS = 30.0
#: A lock from another host not renewed for this long is stale.
STALE_SECONDS = 600.0
#: Name of the lock of a node at a store object's root.
ROOT_LOCK_KEY = ".dask_sparseconv.lock"


class TargetLockedError(RuntimeError):
    """Another run holds the target's lock."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class LockStaleWarning(UserWarning):
    """A stale lock (its run gone) was taken over."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no such process, or psutil missing
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dataclass(frozen=True)
class _Backend:
    """Create-if-absent, read, overwrite and delete of one small object."""

    kind: str  # 'local' | 'fsspec' | 'store'
    path: str
    fs: Any = None
    store: Any = None

    def create(self, payload: bytes) -> bool:
        """Write ``payload`` if nothing is there; False if something is."""
        if self.kind == "local":
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.kind == "fsspec":
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(payload)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError, TypeError):
                # no exclusive create in this driver: best effort (documented)
                if self.fs.exists(self.path):
                    return False
                self.fs.pipe_file(self.path, payload)
                return self.read() == payload
        from ._zarr_compat import buffer, sync

        buf = buffer(payload)
        sync(self.store.set_if_not_exists(self.path, buf))
        return self.read() == payload

    def read(self) -> bytes | None:
        try:
            if self.kind == "local":
                with open(self.path, "rb") as f:
                    return f.read()
            if self.kind == "fsspec":
                return bytes(self.fs.cat_file(self.path))
        except (FileNotFoundError, IsADirectoryError):
            return None
        from ._zarr_compat import prototype, sync

        buf = sync(self.store.get(self.path, prototype=prototype()))
        return None if buf is None else buf.to_bytes()

    def overwrite(self, payload: bytes) -> None:
        if self.kind == "local":
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, self.path)
        elif self.kind == "fsspec":
            self.fs.pipe_file(self.path, payload)
        else:
            from ._zarr_compat import buffer, sync

            sync(self.store.set(self.path, buffer(payload)))

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.kind == "local":
                os.unlink(self.path)
            elif self.kind == "fsspec":
                self.fs.rm_file(self.path)
            else:
                from ._zarr_compat import sync

                sync(self.store.delete(self.path))

    def __str__(self) -> str:
        return self.path if self.kind != "store" else f"key {self.path!r} of {type(self.store).__name__}"


def lock_location(target: Location) -> _Backend:
    """Where the lock of ``target`` lives (see the module docs)."""
    if target.kind == "local":
        node = os.path.join(target.root, target.path) if target.path else target.root
        return _Backend("local", node.rstrip(os.sep) + ".lock")
    if target.kind == "url":
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(target.root, **(target.storage_options or {}))
        node = root.rstrip("/") + ("/" + target.path if target.path else "")
        return _Backend("fsspec", node + ".lock", fs=fs)
    key = (target.path + ".lock") if target.path else ROOT_LOCK_KEY
    return _Backend("store", key, store=target.store)


def read_lock(target: Location) -> dict | None:
    """The lock record of ``target`` (a dict), or None when it is not locked."""
    raw = lock_location(target).read()
    if raw is None:
        return None
    try:
        rec = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}
    return rec if isinstance(rec, dict) else {"unreadable": True}


class LockLostError(RuntimeError):
    """A run's task was about to write, but the run no longer holds the target's lock."""


def check_held(target: Location, token: str, doing: str) -> None:
    """Raise :class:`LockLostError` unless the lock of ``target`` still carries ``token``.

    Block tasks of a run on a cluster the run does not own keep running when
    the run stops (dask cannot stop a running task), and so may still be
    writing once the run released the lock. Another run may then have taken
    the target over, to start it anew with another kernel or input, and an
    old task's write would put the old values into the new output, under a
    record that verifies. So each write checks first that its run still holds
    the lock; what is left between that check and the write is the time of
    one read, not the length of a block.
    """
    held = read_lock(target)
    if held is not None and held.get("token") == token:
        return
    why = ("the run released it (it was stopped)" if held is None
           else f"another run holds it now ({describe_holder(held)})")
    raise LockLostError(f"not {doing}: this run no longer holds the lock of {target}: {why}")


def describe_holder(rec: dict) -> str:
    """``host H, pid P, started T`` for messages."""
    if rec.get("unreadable"):
        return "an unreadable lock record"
    started = _iso(float(rec["started"])) if isinstance(rec.get("started"), (int, float)) else "?"
    return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, user {rec.get('user', '?')}, started {started}"


def stale_reason(rec: dict, now: float | None = None) -> str | None:
    """Why the lock ``rec`` is stale, or None while its run may be alive."""
    now = _now() if now is None else now
    if rec.get("unreadable") or not isinstance(rec.get("pid"), int):
        return "its record cannot be read"
    if rec.get("host") == socket.gethostname():
        pid = int(rec["pid"])
        if not _pid_alive(pid):
            return f"its process {pid} is gone"
        started = _process_start(pid)
        if started is not None and isinstance(rec.get("pid_started"), (int, float)) \
                and abs(started - float(rec["pid_started"])) > 1.0:
            return f"pid {pid} now belongs to another process"
        return None
    renewed = rec.get("renewed", rec.get("started"))
    if isinstance(renewed, (int, float)) and now - float(renewed) > STALE_SECONDS:
        return f"it was last renewed {now - float(renewed):.0f} s ago (more than {STALE_SECONDS:.0f} s)"
    return None


class JobLock:
    """The lock of one target, held by this process.

    Use :meth:`acquire` (or the context manager form, which also renews the
    lock while the block runs and releases it at the end)::

        with JobLock.acquire(loc) as lock:
            ...  # write the output

    Raises :class:`TargetLockedError` when another live run holds it.
    """

    def __init__(self, target: Location, backend: _Backend, record: dict):
        self.target = target
        self.backend = backend
        self.record = record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = False

    @property
    def token(self) -> str:
        return str(self.record["token"])

    @classmethod
    def acquire(cls, target: Location, *, what: str | None = None) -> "JobLock":
        backend = lock_location(target)
        now = _now()
        pid = os.getpid()
        record = {
            "package": "dask-sparseconv",
            "target": str(target),
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_start(pid),
            "user": _user(),
            "started": now,
            "renewed": now,
            "token": uuid.uuid4().hex,
        }
        if what:
            record["command"] = what
        payload = json.dumps(record).encode()
        for _ in range(3):
            if backend.create(payload):
                return cls(target, backend, record)
            held = read_lock(target)
            if held is None:  # released between our try and our read
                continue
            mine = held.get("host") == record["host"] and held.get("pid") == pid
            reason = None if mine else stale_reason(held, now)
            if not mine and reason is None:
                raise TargetLockedError(
                    f"target {target} is being written by another run ({describe_holder(held)}; lock {backend}): "
                    "wait for that run to finish; if it is gone, delete the lock and run again", held)
            if not mine:
                warnings.warn(f"taking over the stale lock {backend} of {target} ({describe_holder(held)}): {reason}",
                              LockStaleWarning, stacklevel=2)
            # take it over only if it is still the record we judged
            if read_lock(target) == held:
                backend.delete()
        raise TargetLockedError(f"could not take the lock {backend} of {target}: other runs keep taking it")

    # -- holding ----------------------------------------------------------------
    def renew(self) -> bool:
        """Refresh the renewal time; False (and nothing written) if the lock is no longer ours."""
        held = read_lock(self.target)
        if not held or held.get("token") != self.token:
            return False
        self.record = {**self.record, "renewed": _now()}
        self.backend.overwrite(json.dumps(self.record).encode())
        return True

    def start_renewing(self, every: float = RENEW_SECONDS) -> None:
        if self._thread is not None:
            return

        def _loop() -> None:
            while not self._stop.wait(every):
                try:
                    if not self.renew():
                        return
                except Exception:  # a passing store error: try again next time
                    continue

        self._thread = threading.Thread(target=_loop, name="dask-sparseconv-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.released:
            return
        self.released = True
        held = read_lock(self.target)
        if held is not None and held.get("token") == self.token:
            self.backend.delete()

    def __enter__(self) -> "JobLock":
        self.start_renewing()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __getstate__(self):  # travels in a graph (compute=False) to be released by its last task
        return {"target": self.target, "backend": self.backend, "record": self.record}

    def __setstate__(self, state):
        self.__init__(state["target"], state["backend"], state["record"])


def release_token(target: Location, token: str) -> None:
    """Delete ``target``'s lock if it still carries ``token`` (the last task of a graph)."""
    held = read_lock(target)
    if held is not None and held.get("token") == token:
        lock_location(target).delete()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "?"
