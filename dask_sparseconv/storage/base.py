"""What the pipeline needs of an on-disk format: the input and output
interfaces (:class:`StackInput`, :class:`StackOutput`) and the parts every
output shares (:class:`OutputBase`).

The pipeline only ever talks to these; which format it has is decided once,
by the registry in :mod:`dask_sparseconv.storage` (``FORMATS``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.sparse

from . import progress
from .location import Location


@runtime_checkable
class StackInput(Protocol):
    """A read-only, picklable image stack (dense array or CSR group)."""

    format: ClassVar[str]
    n_images: int
    frame_shape: tuple[int, int]
    dtype: np.dtype
    chunk_rows: int
    nnz: int | None  # known without reading values (CSR), else None

    @property
    def location(self) -> str: ...

    @property
    def store_location(self) -> Location: ...

    def read_block(self, start: int, stop: int) -> scipy.sparse.csr_matrix: ...

    def read_dense_block(self, start: int, stop: int) -> np.ndarray: ...

    def check_indices(self) -> None: ...

    def describe(self, sample_chunks: int = 4) -> dict: ...


@runtime_checkable
class StackOutput(Protocol):
    """A writer of row blocks, with done markers and a completion flag."""

    format: ClassVar[str]
    n_images: int
    out_shape: tuple[int, int]
    dtype: np.dtype
    block_bounds: list[tuple[int, int]]

    @property
    def location(self) -> str: ...

    def write_block(self, i: int, start: int, stop: int, result: Any, *, record: dict | None = None) -> int: ...

    def verify_block(self, i: int) -> dict | None: ...

    def done_blocks(self) -> set[int]: ...

    def finish(self, stats: Sequence[Any], resumed: bool) -> None: ...


class InputBase:
    """Where an input stack is, shared by every input (``self._loc`` is set by the format's constructor)."""

    _loc: Location

    @property
    def store_location(self) -> Location:
        """Where the stack is (for fingerprints and overlap checks)."""
        return self._loc

    @property
    def location(self) -> str:
        return self._loc.description


class OutputBase:
    """Location, layout, block checks, markers and pickling shared by every output.

    Picklable: dask tasks carry an output by value (location and layout) and
    reopen its node on first use in each process.
    """

    format: ClassVar[str]
    #: what the graph's last task does, in its key
    finish_label: ClassVar[str] = "finish"
    #: whether block ``i`` needs what block ``i - 1`` left (CSR: its carry);
    #: chained outputs are written by :mod:`dask_sparseconv.pipeline.csr_chain`
    chained: ClassVar[bool] = False
    #: layout keys a resumed output must match besides the common ones
    RESUME_LAYOUT: ClassVar[dict] = {}

    def __init__(self, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
                 block_bounds: Sequence[tuple[int, int]]):
        self._loc = loc
        self.n_images = n_images
        self.out_shape = tuple(out_shape)
        self.dtype = np.dtype(dtype)
        self.block_bounds = list(block_bounds)
        self._node: Any = None
        #: (target, token) of the run whose graph writes this output: every
        #: write checks that the run still holds the target's lock (see
        #: :func:`~dask_sparseconv.storage.job_lock.check_held`); None: unlocked
        self.fence: tuple[Location, str] | None = None

    #: attributes that are per-process caches (dropped when pickled)
    _CACHE_KEYS: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_node"] = None
        for k in self._CACHE_KEYS:
            state.pop(k, None)
        return state

    @property
    def location(self) -> str:
        return self._loc.description

    @property
    def store_location(self) -> Location:
        return self._loc

    def _open_node(self) -> Any:
        raise NotImplementedError

    @property
    def node(self) -> Any:
        if self._node is None:
            self._node = self._open_node()
        return self._node

    def attach(self, node: Any) -> None:
        """Use an already opened node (the creator or a resume has one)."""
        self._node = node

    def check_fence(self, doing: str) -> None:
        """Raise :class:`~dask_sparseconv.storage.job_lock.LockLostError`
        when the run writing this output has lost the target's lock."""
        if self.fence is not None:
            from .job_lock import check_held

            check_held(self.fence[0], self.fence[1], doing)

    def _check_block(self, i: int, start: int, stop: int) -> None:
        if not 0 <= int(i) < len(self.block_bounds):
            raise ValueError(f"block index {i} is out of range: the output {self._loc} has {len(self.block_bounds)} blocks")
        if (int(start), int(stop)) != self.block_bounds[int(i)]:
            raise ValueError(f"block {i} covers rows {self.block_bounds[int(i)]}; got start={start}, stop={stop}")

    def done_blocks(self) -> set[int]:
        """Blocks whose data and marker are written."""
        return {i for i in progress.done_blocks(self.markers_in(self.node)) if i < len(self.block_bounds)}

    @staticmethod
    def markers_in(node: Any) -> Any:
        """Where an opened output of this format keeps its block markers
        (its own node; an OME-Zarr image group: its level array). Callers
        that only hold the node (``info``, the CLI's resume check) ask this
        through :func:`dask_sparseconv.storage.written_blocks`."""
        return node

    @property
    def complete(self) -> bool:
        return bool(progress.is_complete(self.node))

    # -- the graph's last task (formats override) ------------------------------
    def finish(self, stats: Sequence[Any], resumed: bool) -> None:
        """The graph's last write: every block is in, set the completion flag."""
        self.finalize(block_nnz=[s.nnz_out for s in stats])

    def finalize(self, *args: Any, **kwargs: Any) -> None:
        """Complete the output (each format says from what: dense, the blocks' nnz; CSR, per-image counts)."""
        raise NotImplementedError


def io_context(exc: OSError, doing: str) -> OSError:
    """``exc`` again (same class and errno) with what was being done when it
    happened: an ``[Errno 28] No space left on device`` alone does not say
    which store filled up."""
    text = exc.strerror or str(exc) or type(exc).__name__
    name = f": {exc.filename!r}" if exc.filename else ""
    try:
        return type(exc)(exc.errno, f"{text}{name} while {doing}") if exc.errno else type(exc)(f"{text} while {doing}")
    except Exception:  # an OSError subclass with another constructor
        return OSError(exc.errno, f"{text}{name} while {doing}")
