"""OME-Zarr (NGFF 0.4 and 0.5) image groups as inputs.

An NGFF image is a zarr group whose attributes hold ``multiscales``
metadata (0.4: ``attrs["multiscales"]``; 0.5: ``attrs["ome"]["multiscales"]``):
the image's axes (``t, c, z, y, x`` or a subset, with types ``time``,
``channel``, ``space`` or custom ones) and its pyramid of levels, one zarr
array each, level 0 the full resolution. :class:`OmeZarrInput` reads one
level in place (no copy): the last two axes, which NGFF requires to be
spatial, are the frame, and every axis before them counts images in C
order (``t`` slowest, then ``c``, then ``z``).

It is a :class:`~dask_sparseconv.storage.dense_store.DenseInput`: the
pipeline reads it like any dense stack. Its store location (fingerprints,
overlap checks, plans) is the image group, so a change to any level or to
the image's metadata counts as a changed input; its ``location`` text (the
provenance's ``source``) names the level read, so a resume with another
level is another job.
"""

from __future__ import annotations

from typing import Any

import zarr

from .dense_store import DenseInput
from .location import Location

__all__ = ["OmeZarrInput", "ngff_multiscales"]


def ngff_multiscales(node: Any) -> tuple[str, dict] | None:
    """``(version, first multiscales entry)`` of an NGFF image group, else ``None``."""
    if not isinstance(node, zarr.Group):
        return None
    attrs = node.attrs.asdict()
    ome = attrs.get("ome")
    if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list) and ome["multiscales"]:
        return str(ome.get("version", "0.5")), ome["multiscales"][0]
    ms = attrs.get("multiscales")
    if isinstance(ms, list) and ms and isinstance(ms[0], dict):
        return str(ms[0].get("version", "0.4")), ms[0]
    return None


def _axes(ms: dict, ndim: int, where: str) -> list[dict]:
    raw = ms.get("axes")
    if raw is None:  # NGFF 0.1/0.2: always t, c, z, y, x
        raw = ["t", "c", "z", "y", "x"][-ndim:]
    axes = [{"name": a} if isinstance(a, str) else dict(a) for a in raw]
    if len(axes) != ndim:
        raise ValueError(f"OME-Zarr image {where}: its multiscales metadata names {len(axes)} axes "
                         f"({', '.join(str(a.get('name')) for a in axes)}) for a {ndim}-D array")
    return axes


class OmeZarrInput(DenseInput):
    """One level of an OME-Zarr image, read as a dense stack of 2-D frames.

    Build it with :func:`dask_sparseconv.storage.open_input` (``level=``);
    ``ngff`` describes the image: version, axes (name, type, unit), the
    level read and every level's path and shape.
    """

    def __init__(self, loc: Location, group: zarr.Group, level: int | None = None):
        found = ngff_multiscales(group)
        if found is None:
            raise ValueError(f"source {loc} is not an OME-Zarr image group (no multiscales metadata)")
        version, ms = found
        datasets = ms.get("datasets") or []
        if not datasets:
            raise ValueError(f"OME-Zarr image {loc} lists no datasets (pyramid levels) in its multiscales metadata")
        level = 0 if level is None else level
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(datasets):
            raise ValueError(f"level must be an integer from 0 to {len(datasets) - 1} for the OME-Zarr image {loc} "
                             f"({len(datasets)} level{'s' if len(datasets) != 1 else ''}); got {level!r}")
        levels = []
        for d in datasets:
            path = str(d.get("path"))
            try:
                node = group[path]
            except KeyError:
                raise ValueError(f"OME-Zarr image {loc}: level {path!r} named in its metadata is missing") from None
            levels.append({"path": path, "shape": list(node.shape)})
        arr = group[levels[level]["path"]]
        if not isinstance(arr, zarr.Array) or arr.ndim < 2:
            raise ValueError(f"OME-Zarr image {loc}: level {levels[level]['path']!r} is not an array of 2 or more axes")
        axes = _axes(ms, arr.ndim, str(loc))
        frame = [a for a in axes[-2:] if a.get("type") not in (None, "space")]
        if frame:
            raise ValueError(f"OME-Zarr image {loc}: its last two axes ({axes[-2].get('name')}, {axes[-1].get('name')}) "
                             "must be spatial (type 'space'), as NGFF requires; they are the frames convolved")
        super().__init__(loc, arr, frame_axes=arr.ndim - 2)
        self.ngff: dict[str, Any] = {
            "version": version,
            "axes": axes,
            "frame_axes": [a.get("name") for a in axes[:-2]],
            "level": level,
            "levels": levels,
            "name": ms.get("name"),
        }

    @property
    def location(self) -> str:
        return f"{self._loc.description} (OME-Zarr level {self.ngff['level']}: {self.ngff['levels'][self.ngff['level']]['path']})"

    @staticmethod
    def detect(node: Any) -> bool:
        return ngff_multiscales(node) is not None

    def describe(self, sample_chunks: int = 4) -> dict:
        info = super().describe(sample_chunks)
        info["ngff"] = self.ngff
        return info

    def __repr__(self) -> str:
        axes = ",".join(str(a.get("name")) for a in self.ngff["axes"])
        return f"OmeZarrInput({self._loc}, axes={axes}, level={self.ngff['level']}, shape={tuple(self._arr.shape)})"
