"""The parent group of a CSR kernel bank's output.

A CSR bank job (a kernel of shape ``(K, kH, kW)``) writes one anndata
``csr_matrix`` group per kernel, named by the kernel's name, under one
parent group::

    out.zarr/             attrs: dask_sparseconv {... kernels: [{name, kernel_sha, ...}], complete}
        gauss_1/          an ordinary CSR output (anndata csr_matrix + frame_shape, its own provenance)
        gauss_2/
        ...

The parent's completion flag is written last, after every member's. A
dense bank is one ``(n, K, H_out, W_out)`` array instead
(:class:`~dask_sparseconv.storage.DenseOutput`), which needs no parent.
"""

from __future__ import annotations

from typing import Any, Sequence

import zarr

from . import progress
from .dense_store import create_kwargs
from .location import Location


class BankGroup:
    """The parent group of a CSR bank output: its provenance and completion
    flag. Picklable like the outputs (location and names; the group is
    reopened in each process)."""

    format = "csr"

    def __init__(self, loc: Location, names: Sequence[str]):
        self._loc = loc
        self.names = list(names)
        self._node: Any = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_node"] = None
        return state

    @property
    def location(self) -> str:
        return self._loc.description

    @property
    def node(self) -> zarr.Group:
        if self._node is None:
            self._node = self._loc.open_group(mode="r+")
        return self._node

    @classmethod
    def create(cls, loc: Location, names: Sequence[str], attrs: dict, layout: dict, *, overwrite: bool) -> "BankGroup":
        """A new, empty parent group marked incomplete."""
        kw = create_kwargs(loc)
        kw["path"] = kw.pop("name")
        g = zarr.create_group(zarr_format=3, overwrite=overwrite,
                              attributes={progress.ATTR: progress.new_provenance(attrs, layout)}, **kw)
        out = cls(loc, names)
        out._node = g
        return out

    @classmethod
    def reopen(cls, loc: Location, names: Sequence[str]) -> "BankGroup":
        return cls(loc, names)

    def finish(self, nnz_per_kernel: Sequence[int]) -> None:
        """The job's last write: every member is complete."""
        progress.mark_complete(self.node, nnz=int(sum(nnz_per_kernel)),
                               nnz_per_kernel=[int(n) for n in nnz_per_kernel])


def bank_members(node: Any) -> list[str] | None:
    """The member names of a CSR bank output's parent group, or None when
    ``node`` is not one."""
    prov = progress.provenance(node)
    if not prov or not isinstance(prov.get("kernels"), list) or not isinstance(node, zarr.Group):
        return None
    return [str(k.get("name")) for k in prov["kernels"] if isinstance(k, dict)]


__all__ = ["BankGroup", "bank_members"]
