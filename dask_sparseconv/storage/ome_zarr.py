"""OME-Zarr (NGFF 0.4 and 0.5) image groups as inputs, and NGFF 0.5 outputs.

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

import math
from typing import Any

import numpy as np
import zarr

from .dense_store import DenseInput, DenseOutput, image_runs
from .location import Location

__all__ = ["OmeZarrInput", "OmeZarrOutput", "ngff_multiscales"]


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


def _transforms(dataset: dict, ndim: int) -> tuple[list[float], list[float]]:
    """A level's scale and translation (identity where its metadata has none)."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for t in dataset.get("coordinateTransformations") or []:
        if t.get("type") == "scale" and len(t.get("scale") or []) == ndim:
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation" and len(t.get("translation") or []) == ndim:
            translation = [float(v) for v in t["translation"]]
    return scale, translation


class _AxesView:
    """A zarr array read with its axes in another order (``perm[v]``: the
    array axis at view position ``v``): what ``spatial_axes`` naming axes
    other than the last two needs. Indexing reads the array and transposes
    the result; other attributes (codecs, metadata) are the array's."""

    def __init__(self, arr: zarr.Array, perm: tuple[int, ...]):
        self._arr, self._perm = arr, tuple(perm)
        self.shape = tuple(int(arr.shape[p]) for p in perm)
        self.chunks = tuple(int(arr.chunks[p]) for p in perm)
        shards = getattr(arr, "shards", None)
        self.shards = tuple(int(shards[p]) for p in perm) if shards else None
        self.ndim = arr.ndim

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickle asks for __setstate__ etc. before _arr exists: not the array's
            raise AttributeError(name)
        return getattr(self._arr, name)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        array_key: list[Any] = [slice(None)] * self.ndim
        for v, k in enumerate(key):
            array_key[self._perm[v]] = k
        out = np.asarray(self._arr[tuple(array_key)])
        kept = [self._perm[v] for v, k in enumerate(key) if not isinstance(k, (int, np.integer))]
        # out's axes are the kept array axes in array order; put them in view order
        return out.transpose(np.argsort(np.argsort(kept))) if kept else out


class OmeZarrInput(DenseInput):
    """One level of an OME-Zarr image, read as a dense stack of 2-D frames.

    Build it with :func:`dask_sparseconv.storage.open_input` (``level=``);
    ``ngff`` describes the image: version, axes (name, type, unit), the
    level read and every level's path and shape.
    """

    def __init__(self, loc: Location, group: zarr.Group, level: int | None = None,
                 spatial_axes: Any = None):
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
        names = [str(a.get("name")) for a in axes]
        if spatial_axes is None:
            frame = [a for a in axes[-2:] if a.get("type") not in (None, "space")]
            if frame:
                raise ValueError(f"OME-Zarr image {loc}: its last two axes ({names[-2]}, {names[-1]}) must be spatial "
                                 "(type 'space'), as NGFF requires; they are the frames convolved")
            rows, cols = arr.ndim - 2, arr.ndim - 1
        else:
            if isinstance(spatial_axes, str) or not hasattr(spatial_axes, "__len__") or len(spatial_axes) != 2 \
                    or len({str(a) for a in spatial_axes}) != 2 or not all(str(a) in names for a in spatial_axes):
                raise ValueError(f"spatial_axes must name two different axes of the OME-Zarr image {loc} (its axes: "
                                 f"{', '.join(names)}), rows first; got {spatial_axes!r}")
            rows, cols = (names.index(str(a)) for a in spatial_axes)
        lead = [i for i in range(arr.ndim) if i not in (rows, cols)]
        perm = tuple(lead + [rows, cols])
        view = arr if perm == tuple(range(arr.ndim)) else _AxesView(arr, perm)
        super().__init__(loc, view, frame_axes=arr.ndim - 2)
        self._perm, self._level_array = perm, arr
        scale, translation = _transforms(datasets[level], arr.ndim)
        self.ngff: dict[str, Any] = {
            "version": version,
            "axes": axes,  # as stored
            "frame_axes": [names[i] for i in lead],
            "spatial_axes": [names[rows], names[cols]],
            "level": level,
            "levels": levels,
            "name": ms.get("name"),
            # in the order images and frames are read: the image axes, then the frame's rows and columns
            "read_axes": [axes[i] for i in perm],
            "scale": [scale[i] for i in perm],
            "translation": [translation[i] for i in perm],
        }

    def to_dask(self, rows_per_chunk: int | None = None):
        import dask.array as da

        arr = da.from_zarr(self._level_array).transpose(self._perm)
        return arr.reshape((self.n_images,) + self.frame_shape)

    @property
    def location(self) -> str:
        level = self.ngff["level"]
        rows, cols = self.ngff["spatial_axes"]
        return f"{self._loc.description} (OME-Zarr level {level}: {self.ngff['levels'][level]['path']}, frames {rows} x {cols})"

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


#: the path of the one level an OME-Zarr output holds (full resolution)
LEVEL = "0"


def _output_axes(attrs: dict, n_images: int) -> tuple[list[dict], tuple[int, ...], list[float], list[float]]:
    """The output image's axes, the shape of its image axes, and its level's
    scale and translation before the mode's shift: the input's, when it was an
    OME-Zarr image whose image axes hold ``n_images``; else images along a
    ``t`` (time) axis with unit pixels."""
    ngff = attrs.get("source_ngff") or {}
    lead = tuple(int(v) for v in ngff.get("frame_axes_shape") or ())
    if ngff and lead and int(np.prod(lead)) == n_images:
        axes = [dict(a) for a in ngff["axes"]]
        return axes, lead, list(ngff["scale"]), list(ngff["translation"])
    axes = [{"name": "t", "type": "time"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    return axes, (int(n_images),), [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]


def _mean_pool(frames: np.ndarray, f: int) -> np.ndarray:
    """``(n, H, W)`` -> ``(n, H // f, W // f)``: the mean of each ``f x f`` block (a ragged edge is dropped)."""
    n, H, W = frames.shape
    h, w = H // f, W // f
    return frames[:, : h * f, : w * f].reshape(n, h, f, w, f).mean(axis=(2, 4), dtype=np.float64)


class OmeZarrOutput(DenseOutput):
    """A dense output written as an OME-Zarr (NGFF 0.5) image group.

    The group holds one level, the array ``0``: the input's image axes (``t,
    c, z, ...``, or ``t`` for a plain stack) then ``H_out, W_out``, chunked so
    that each chunk lies inside one row block (one image-axis run of ``g``
    images, ``g`` dividing the block and the last image axis). Its
    ``multiscales`` metadata keeps the input's axes and units; the level's
    scale is the input level's, and the translation of the two spatial axes
    moves by the mode's offset (output pixel ``o`` is input pixel ``o + s``,
    ``s`` = window start minus ``same``'s: ``-(k-1)//2`` for ``full``,
    ``k//2`` for ``valid``). Provenance is the group's ``dask_sparseconv``
    attribute; block records are under the level array, as for a dense
    output. ``attrs["ome_pyramid"] = N`` adds levels ``1..N``, each a
    ``2^j x 2^j`` mean of level 0 (scale times ``2^j``, translation moved to
    the pooled pixels' centre), written by the same block tasks.
    """

    format = "ome-zarr"

    def __init__(self, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
                 block_bounds, chunk_rows: int, lead: tuple[int, ...], pyramid: int = 0):
        super().__init__(loc, n_images, out_shape, dtype, block_bounds, chunk_rows)
        self.lead = tuple(int(v) for v in lead)
        #: downsampled levels below level 0 (level j: 2^j x 2^j mean pooling of level 0)
        self.pyramid = int(pyramid)

    def _open_node(self) -> zarr.Group:
        return self._loc.open(mode="r+")

    #: the opened level arrays (each a metadata read): per process, not pickled
    _CACHE_KEYS = ("_levels",)

    def _level(self, j: int) -> zarr.Array:
        levels = self.__dict__.setdefault("_levels", {})
        if j not in levels:
            levels[j] = self.node[str(j)]
        return levels[j]

    @property
    def level_array(self) -> zarr.Array:
        return self._level(0)

    @property
    def marker_node(self) -> zarr.Array:
        return self.level_array

    @staticmethod
    def markers_in(node: Any) -> Any:
        return node[LEVEL]  # the block records live under the level array

    @classmethod
    def create(cls, loc: Location, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds, *, chunk_rows: int | None, chunk_nnz: int | None,
               compressor: Any, attrs: dict | None, overwrite: bool) -> "OmeZarrOutput":
        from . import progress
        from .dense_store import create_kwargs, layout_attrs, resolve_compressors

        attrs = dict(attrs or {})
        axes, lead, scale, translation = _output_axes(attrs, n_images)
        Ho, Wo = (int(v) for v in out_shape)
        block_rows = int(block_bounds[0][1] - block_bounds[0][0])
        run = math.gcd(block_rows, lead[-1])
        kernel_shape = attrs.get("kernel_shape") or [1, 1]
        mode = attrs.get("mode", "same")
        for axis, k in ((-2, int(kernel_shape[-2])), (-1, int(kernel_shape[-1]))):
            start = {"full": 0, "same": (k - 1) // 2, "valid": k - 1}[mode] - (k - 1) // 2
            translation[axis] = translation[axis] + start * scale[axis]
        pyramid = int(attrs.get("ome_pyramid", 0))
        if pyramid and min(Ho, Wo) < 2 ** pyramid:
            raise ValueError(f"pyramid={pyramid} needs output frames of at least {2 ** pyramid} pixels on each side; "
                             f"they are {Ho} x {Wo}")
        datasets = []
        for j in range(pyramid + 1):
            f = 2 ** j  # level j pixel (y, x) averages level 0 pixels [f*y, f*y + f): its centre is (f - 1) / 2 further
            sc = scale[:-2] + [scale[-2] * f, scale[-1] * f]
            tr = translation[:-2] + [translation[-2] + (f - 1) / 2 * scale[-2], translation[-1] + (f - 1) / 2 * scale[-1]]
            datasets.append({"path": str(j), "coordinateTransformations": [
                {"type": "scale", "scale": sc}, {"type": "translation", "translation": tr}]})
        from . import progress as _progress

        ome = {"version": "0.5", "multiscales": [{
            "name": attrs.get("source_ngff", {}).get("name") or "dask-sparseconv output",
            "axes": axes,
            "datasets": datasets,
            # what the strict NGFF schema asks of a pyramid: how its levels were made
            "type": "mean",
            "metadata": {"description": "level j: the mean of 2^j x 2^j pixels of level 0",
                         "method": "dask_sparseconv.storage.ome_zarr._mean_pool",
                         "version": _progress.package_version()},
        }]}
        kw = create_kwargs(loc)
        kw["path"] = kw.pop("name")
        group = zarr.create_group(zarr_format=3, overwrite=overwrite, attributes={"ome": ome}, **kw)
        for j in range(pyramid + 1):
            h, w = Ho // 2 ** j, Wo // 2 ** j
            group.create_array(str(j), shape=lead + (h, w), chunks=(1,) * (len(lead) - 1) + (run, h, w), dtype=dtype,
                               compressors=resolve_compressors(compressor), fill_value=0,
                               dimension_names=[str(a.get("name")) for a in axes])
        progress.init_provenance(group, attrs, layout_attrs("ome-zarr", n_images, out_shape, dtype, block_bounds))
        out = cls(loc, n_images, (Ho, Wo), np.dtype(dtype), block_bounds, run, lead, pyramid)
        out.attach(group)
        return out

    @classmethod
    def reopen(cls, loc: Location, node: Any, prov: dict, n_images: int, out_shape: tuple[int, int], dtype: np.dtype,
               block_bounds) -> "OmeZarrOutput":
        arr = node[LEVEL]
        out = cls(loc, n_images, out_shape, dtype, block_bounds, int(arr.chunks[-3]), tuple(arr.shape[:-2]),
                  int(prov.get("ome_pyramid", 0)))
        out.attach(node)
        return out

    def _runs(self, start: int, stop: int):
        return image_runs(self.lead, start, stop)

    def _write_rows(self, start: int, stop: int, values: np.ndarray) -> None:
        # a block holds whole frames, so each level of the pyramid is made from it here
        for j in range(self.pyramid + 1):
            arr = self._level(j)
            level = values if j == 0 else _mean_pool(values, 2 ** j).astype(values.dtype, copy=False)
            for row, count, index in self._runs(start, stop):
                arr[index] = level[row - start: row - start + count]

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        arr = self.level_array
        return np.concatenate([np.asarray(arr[index]) for _, _, index in self._runs(start, stop)])

    def _chunk_keys(self, start: int, stop: int) -> list[str]:
        """Keys (relative to the group) of every level's chunks holding images ``[start, stop)``."""
        keys = []
        for level in range(self.pyramid + 1):
            arr = self._level(level)
            run = int(arr.chunks[-3])
            for _row, _count, index in self._runs(start, stop):
                s = index[-1]
                for j in range(s.start // run, (s.stop - 1) // run + 1):
                    keys.append(f"{level}/" + arr.metadata.encode_chunk_key(index[:-1] + (j, 0, 0)))
        return keys

    def __repr__(self) -> str:
        return f"OmeZarrOutput({self._loc}, shape={self.lead + tuple(self.out_shape)}, dtype={self.dtype})"
