"""Reading and writing image stacks in zarr stores.

Public entry points (the contract in docs/design.md; details in docs/storage.md):

* :func:`open_input` -- a read-only, picklable input (dense array or CSR group).
* :func:`create_output` -- a writer for a dense array or a CSR group, with
  per-block done markers, CSR values written once at their final offsets
  and a completion flag.
* :func:`open_stack` -- a lazy dask array over a stack.
* :func:`describe_stack` -- a summary dict (for ``dask-sparseconv info``).
* :func:`write_dense_stack`, :func:`write_csr_stack` -- write inputs
  (sample data, tests, benchmarks).
* :func:`same_or_inside`, :func:`stores_overlap` -- location overlap checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.errors import NodeNotFoundError

from ..validation import _short, check_choice, check_positive_int
from . import progress
from .bank_group import BankGroup, bank_members
from .base import OutputBase, StackInput, StackOutput
from .csr_store import Carry, CSRInput, CSROutput, write_csr_stack
from .dense_store import (
    DenseInput,
    DenseOutput,
    check_block_bounds,
    check_numeric_dtype,
    dense_to_csr,
    resolve_compressors,
    tile_units,
    write_dense_stack,
)
from .location import Location, resolve_location, same_or_inside, stores_overlap
from .ome_zarr import OmeZarrInput, OmeZarrOutput

__all__ = [
    "FORMATS",
    "StorageFormat",
    "StackInput",
    "StackOutput",
    "OutputBase",
    "is_input",
    "written_blocks",
    "check_target_writable",
    "open_input",
    "create_output",
    "open_stack",
    "open_bank",
    "describe_stack",
    "BankGroup",
    "write_dense_stack",
    "write_csr_stack",
    "same_or_inside",
    "stores_overlap",
    "resolve_location",
    "Location",
    "DenseInput",
    "OmeZarrInput",
    "CSRInput",
    "DenseOutput",
    "CSROutput",
    "Carry",
    "dense_to_csr",
]

InputStack = DenseInput | CSRInput


@dataclass(frozen=True)
class StorageFormat:
    """One on-disk encoding: how to recognise it, read it and write it."""

    name: str
    input: Any  # a StackInput class: .detect(node), (loc, node) constructor, .describe(), .to_dask()
    output: Any  # a StackOutput class: .create(...), .reopen(...)
    description: str


#: The on-disk formats, by the name ``output_format=`` / ``output.format`` takes.
FORMATS: dict[str, StorageFormat] = {
    "dense": StorageFormat("dense", DenseInput, DenseOutput, "a 3-D zarr array (n_images, H, W)"),
    "csr": StorageFormat("csr", CSRInput, CSROutput,
                         "an anndata csr_matrix group (n_images, H*W) with a frame_shape attribute"),
    "ome-zarr": StorageFormat("ome-zarr", OmeZarrInput, OmeZarrOutput,
                              "an OME-Zarr (NGFF 0.5) image group: the input's image axes, then H, W"),
}


def written_blocks(node: Any) -> set[int]:
    """Blocks whose markers are set in an opened output of this package,
    wherever its format keeps them (``OutputBase.markers_in``)."""
    fmt = FORMATS.get(str((progress.provenance(node) or {}).get("format")))
    return progress.done_blocks(fmt.output.markers_in(node) if fmt is not None else node)


def is_input(obj: Any) -> bool:
    """Whether ``obj`` is an opened input stack of one of the :data:`FORMATS`."""
    return isinstance(obj, tuple(f.input for f in FORMATS.values()))


def _list_members(node: zarr.Group, limit: int = 12) -> list[str]:
    try:
        names = sorted(k for k in node.keys() if not k.startswith("_"))
    except Exception:
        return []
    return names[:limit] + (["..."] if len(names) > limit else [])


def _open_node(source: Any, array: str | None, storage_options: dict | None, name: str = "source"):
    """Resolve and open (read-only) the node at ``source``/``array``; return ``(loc, node)``."""
    loc = resolve_location(source, array, storage_options, name=name)
    root = Location(loc.kind, loc.root, "", loc.storage_options, loc.store)
    if loc.kind != "object" and not root.exists():
        raise FileNotFoundError(f"{name} {str(root)!r} does not exist")
    try:
        node = loc.open(mode="r")
    except (NodeNotFoundError, FileNotFoundError, KeyError) as exc:
        if loc.path:
            try:
                parent = root.open(mode="r")
            except Exception:
                parent = None
            if parent is not None:
                hint = f"; nodes at its root: {_list_members(parent)}" if isinstance(parent, zarr.Group) else ""
                raise FileNotFoundError(f"array={loc.path!r} was not found in {name} {str(root)!r}{hint}") from None
        raise ValueError(f"{name} {str(loc)!r} is not a zarr store (no zarr.json, .zarray or .zgroup there): {exc}") from None
    except Exception as exc:
        raise ValueError(f"{name} {str(loc)!r} could not be opened as a zarr store ({type(exc).__name__}: {exc})") from None
    return loc, node


def _input_from_node(loc: Location, node: Any, name: str = "source", level: int | None = None,
                     spatial_axes: Any = None) -> InputStack:
    # first, as the one format that takes level= and spatial_axes= (the loop
    # below would find it too, without them)
    if OmeZarrInput.detect(node):
        return OmeZarrInput(loc, node, level, spatial_axes)
    if level is not None:
        raise ValueError(f"level={level!r} picks a pyramid level of an OME-Zarr image; {name} {str(loc)!r} is not one "
                         "(no multiscales metadata): leave level out")
    if spatial_axes is not None:
        raise ValueError(f"spatial_axes={spatial_axes!r} names axes of an OME-Zarr image; {name} {str(loc)!r} is not "
                         "one (no multiscales metadata): leave spatial_axes out")
    for fmt in FORMATS.values():
        if fmt.input.detect(node):
            return fmt.input(loc, node)
    enc = node.attrs.get("encoding-type")
    what = f"an anndata '{enc}' group" if enc else "a zarr group"
    raise ValueError(
        f"{name} {str(loc)!r} is {what}, neither a csr_matrix encoding (attribute encoding-type: csr_matrix) "
        f"nor a 3-D array; pass array='<path inside the store>' to pick one (members: {_list_members(node)})"
    )


def open_input(source: Any, array: str | None = None, storage_options: dict | None = None,
               allow_incomplete: bool = False, level: int | None = None, spatial_axes: Any = None) -> InputStack:
    """Open an input stack read-only.

    Parameters
    ----------
    source : str, os.PathLike, zarr.Array, zarr.Group or zarr store
        Local path, fsspec URL (``memory://``, ``s3://``...) or zarr object.
    array : str, optional
        Path of the stack inside the store.
    storage_options : dict, optional
        fsspec options (URLs only), e.g. ``{"anon": True}``.
    allow_incomplete : bool
        Read an output of this package whose run did not finish (refused by
        default, like :func:`open_stack`).
    level : int, optional
        For an OME-Zarr (NGFF 0.4/0.5) image group: the pyramid level to read
        (default 0, full resolution). Its last two axes are the frame; every
        other axis (t, c, z, ...) counts images, in C order.
    spatial_axes : pair of str, optional
        For an OME-Zarr image: the two axes that form the frame, rows first
        (default: its last two, ``y, x``), e.g. ``("z", "x")`` to convolve
        x-z sections; every other axis counts images, in array order.

    Returns
    -------
    DenseInput, OmeZarrInput or CSRInput
        ``format``, ``n_images``, ``frame_shape``, ``dtype``, ``chunk_rows``,
        ``nnz``, ``location``, ``read_block``, ``read_dense_block``,
        ``bytes_per_image_dense``.

    Raises
    ------
    FileNotFoundError
        Nothing at ``source``, or no ``array`` inside it.
    ValueError
        Not a zarr store, a group that is no csr_matrix encoding, a non-3-D
        array, an inconsistent CSR encoding.
    TypeError
        Unsupported ``source`` type or dtype.
    """
    loc, node = _open_node(source, array, storage_options)
    _refuse_incomplete(loc, node, allow_incomplete)
    return _input_from_node(loc, node, level=level, spatial_axes=spatial_axes)


#: fsspec protocols whose first path component is a bucket or container,
#: which writing a key does not create (s3fs, gcsfs, adlfs, ossfs)
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def check_target_writable(loc: Location, target: Any) -> None:
    if loc.kind == "url":
        _check_bucket(loc, target)
        return
    if loc.kind == "object":
        if loc.store.read_only:
            raise PermissionError(f"target {str(loc)!r} is a read-only zarr store; open it with mode='a' or 'w' to write to it")
        return
    if loc.kind == "local":
        root = str(loc.root)
        probe = root if not loc.path else os.path.join(root, loc.path)
        while not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if os.path.exists(probe) and not os.path.isdir(probe):
            raise NotADirectoryError(f"target {target!r} cannot be created: {probe!r} is a file, not a directory")
        if not os.access(probe, os.W_OK):
            raise PermissionError(f"target {target!r} is not writable: no write permission on {probe!r}")


def _check_bucket(loc: Location, target: Any) -> None:
    """An object-store target's bucket must exist: without this check the
    first write fails on a worker, after the job started (S3: NoSuchBucket)."""
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(str(loc.root), **(loc.storage_options or {}))
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & _BUCKET_PROTOCOLS:
        return
    bucket = path.strip("/").split("/", 1)[0]
    if bucket and not fs.exists(bucket):
        raise FileNotFoundError(f"target {target!r} cannot be created: the bucket {bucket!r} does not exist, or these "
                                "credentials cannot see it (create it first; check storage_options)")


def create_output(target: Any, fmt: str, n_images: int, out_shape: Sequence[int], dtype: Any,
                  block_bounds: Sequence[tuple[int, int]], storage_options: dict | None = None,
                  overwrite: bool = False, attrs: dict | None = None, chunk_rows: int | None = None,
                  compressor: Any = "default", *, array: str | None = None, resume: bool = False,
                  chunk_nnz: int | None = None) -> DenseOutput | CSROutput:
    """Create an output stack for row-block writes.

    Parameters
    ----------
    target : str, os.PathLike, zarr.Group or zarr store
        Where to write (path, URL, zarr object). ``array=`` names a path inside.
    fmt : {'dense', 'csr'}
    n_images : int
    out_shape : (H_out, W_out)
    dtype : numeric or bool dtype of the output values
    block_bounds : sequence of (start, stop)
        The pipeline's row blocks: contiguous, covering ``[0, n_images)``, all
        of one size except a smaller last one. ``write_block(i, ...)`` must
        use block ``i``'s bounds.
    storage_options : dict, optional
        fsspec options for URL targets.
    overwrite : bool
        Replace whatever is at ``target``. Without it an existing target is
        an error (unless ``resume``).
    attrs : dict, optional
        Provenance (source, kernel, mode, method, backend, ...) stored in the
        ``dask_sparseconv`` attribute with ``complete: false``.
    chunk_rows : int, optional
        dense: images per chunk; must divide the block size (default: the
        block size). csr: rows per ``indptr`` chunk.
    compressor : 'default', None, 'zstd', 'lz4', 'blosc-zstd' or zarr codec(s)
        'default' is zstd level 1 (see docs/storage.md for measurements).
    array : str, optional (keyword)
        Path inside the target store.
    resume : bool (keyword)
        If an output of this package with the same format, shape, dtype and
        blocks is already at ``target``, reopen it instead of failing; its
        :meth:`done_blocks` tell which blocks to skip. Provenance keys given
        in ``attrs`` must match the stored ones.
    chunk_nnz : int, optional (keyword)
        csr: elements per ``data``/``indices`` chunk (default 2**18, 1 MiB of float32).

    Returns
    -------
    DenseOutput or CSROutput
    """
    fmt = check_choice("fmt", fmt, tuple(FORMATS))
    n_images = check_positive_int(n_images, "n_images")
    try:
        out_shape = tuple(int(v) for v in out_shape)
    except Exception:
        raise TypeError(f"out_shape must be (H_out, W_out), two positive integers; got {_short(out_shape)}") from None
    # (K, H_out, W_out): a kernel bank's dense output, one (n, K, H_out, W_out) array
    if not (len(out_shape) == 2 or (len(out_shape) == 3 and fmt == "dense")) or min(out_shape) < 1:
        raise ValueError(f"out_shape must be (H_out, W_out), two positive integers; got {_short(out_shape)}")
    dtype = check_numeric_dtype(dtype, "dtype")
    # a tiled job's blocks count tiles (attrs["tiles"]: dask_sparseconv.tiles)
    bounds = check_block_bounds(block_bounds, n_images * tile_units(attrs if isinstance(attrs, dict) else None))
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows", allow_none=True)
    chunk_nnz = check_positive_int(chunk_nnz, "chunk_nnz", allow_none=True)
    if attrs is not None and not isinstance(attrs, dict):
        raise TypeError(f"attrs must be a dict or None; got {_short(attrs)}")
    resolve_compressors(compressor)  # validate early
    loc = resolve_location(target, array, storage_options, name="target")
    check_target_writable(loc, target)
    exists = loc.exists()
    if exists and resume and not overwrite:
        return _reopen_for_resume(loc, target, fmt, n_images, out_shape, dtype, bounds, attrs)
    if exists and not overwrite:
        raise ValueError(
            f"target {str(loc)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
            + (", or resume=True to continue an incomplete run" if not resume else "")
        )
    try:
        return FORMATS[fmt].output.create(loc, n_images, out_shape, dtype, bounds, chunk_rows=chunk_rows,
                                          chunk_nnz=chunk_nnz, compressor=compressor, attrs=attrs, overwrite=overwrite)
    except (PermissionError, OSError) as exc:
        raise PermissionError(f"target {str(loc)!r} is not writable ({type(exc).__name__}: {exc})") from exc


def _reopen_for_resume(loc, target, fmt, n_images, out_shape, dtype, bounds, attrs):
    try:
        node = loc.open(mode="r+")
    except Exception as exc:
        raise ValueError(f"target {str(loc)!r} exists but is not a zarr output of dask_sparseconv ({exc}); "
                         "pass overwrite=True to replace it") from None
    prov = progress.provenance(node)
    if prov is None:
        raise ValueError(f"target {str(loc)!r} exists but was not written by dask_sparseconv; pass overwrite=True to replace it")
    want = {
        "format": fmt,
        "n_images": n_images,
        "frame_shape": list(out_shape),
        "dtype": str(np.dtype(dtype)),
        "block_rows": bounds[0][1] - bounds[0][0],
        "n_blocks": len(bounds),
    }
    want.update(FORMATS[fmt].output.RESUME_LAYOUT)
    want.update(progress.jsonable(dict(attrs or {})))
    diff = {k: (prov.get(k), v) for k, v in want.items() if prov.get(k) != v}
    if diff:
        text = ", ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume {str(loc)!r}: it was written with different settings ({text}); "
                         "pass overwrite=True to start over")
    return FORMATS[fmt].output.reopen(loc, node, prov, n_images, out_shape, dtype, bounds)


def _refuse_incomplete(loc: Location, node: Any, allow_incomplete: bool) -> None:
    if progress.is_complete(node) is False and not allow_incomplete:
        raise ValueError(
            f"output {str(loc)!r} is incomplete (its dask_sparseconv attribute says complete: false): the run that wrote it "
            "did not finish. Run the same command again to resume it, or pass allow_incomplete=True to read it anyway"
        )


def open_stack(source: Any, array: str | None = None, storage_options: dict | None = None,
               allow_incomplete: bool = False, rows_per_chunk: int | None = None):
    """A lazy dask array over a stack.

    Dense stores give an ``(n, H, W)`` array chunked like the zarr array.
    CSR stores give an ``(n, H*W)`` array whose chunks are
    ``scipy.sparse.csr_matrix`` row blocks (``.compute()`` concatenates them
    into one ``csr_matrix``; ``.blocks[i]`` selects one block). Their row
    count is ``rows_per_chunk`` (default: the input's ``chunk_rows``).

    Outputs of this package that are not complete are refused unless
    ``allow_incomplete=True``; stores written by others open as they are.
    """
    loc, node = _open_node(source, array, storage_options)
    _refuse_incomplete(loc, node, allow_incomplete)
    members = bank_members(node)
    if members is not None:
        raise ValueError(f"{str(loc)!r} is the output of a kernel bank in CSR, one group per kernel ({members}): "
                         f"open one with array={members[0]!r}, or all with dask_sparseconv.open_bank()")
    if isinstance(node, zarr.Array) and node.ndim == 4 and kernel_records(node):
        import dask.array as da

        return da.from_zarr(node)  # a dense bank's (n, K, H_out, W_out)
    return _input_from_node(loc, node).to_dask(rows_per_chunk)


def kernel_records(node: Any) -> list[dict] | None:
    """A kernel bank output's per-kernel provenance (name, digest, ...), or None."""
    prov = progress.provenance(node)
    kernels = prov.get("kernels") if prov else None
    return kernels if isinstance(kernels, list) else None


def open_bank(source: Any, storage_options: dict | None = None, allow_incomplete: bool = False) -> dict:
    """The outputs of a kernel-bank job, one lazy dask array per kernel.

    Parameters
    ----------
    source : str, os.PathLike or zarr store
        The target of a :func:`~dask_sparseconv.convolve_zarr` run with a
        kernel of shape ``(K, kH, kW)``.
    storage_options : dict, optional
        fsspec options for URLs.
    allow_incomplete : bool, default False
        Read an output whose run did not finish.

    Returns
    -------
    dict
        Kernel name -> dask array: ``(n, H_out, W_out)`` for a dense bank
        (slices of its ``(n, K, H_out, W_out)`` array), ``(n, H_out*W_out)``
        with ``scipy.sparse`` chunks for a CSR bank (its member groups).
    """
    loc, node = _open_node(source, None, storage_options)
    _refuse_incomplete(loc, node, allow_incomplete)
    records = kernel_records(node)
    if records is None:
        raise ValueError(f"{str(loc)!r} is not the output of a kernel bank (no per-kernel provenance); "
                         "open it with open_stack()")
    names = [str(r.get("name")) for r in records]
    if isinstance(node, zarr.Array):
        import dask.array as da

        arr = da.from_zarr(node)
        return {name: arr[:, k] for k, name in enumerate(names)}
    return {name: open_stack(source, array=name, storage_options=storage_options, allow_incomplete=allow_incomplete)
            for name in names}


def _describe_bank(loc: Location, node: Any, prov: dict, records: list[dict]) -> dict:
    """:func:`describe_stack` of a kernel bank's output (dense 4-D array or CSR parent group)."""
    names = [str(r.get("name")) for r in records]
    shape = [int(v) for v in (prov.get("frame_shape") or [])][-2:]
    n = int(prov.get("n_images", 0))
    K = len(names)
    info: dict[str, Any] = {
        "location": str(loc), "format": prov.get("format"), "n_images": n, "frame_shape": shape,
        "dtype": prov.get("dtype"), "provenance": prov, "complete": bool(prov.get("complete")),
        "kernels": names, "shape": [n, K, *shape] if prov.get("format") == "dense" else [K, n, int(np.prod(shape))],
        "nnz": prov.get("nnz") if prov.get("complete") else None, "nnz_exact": prov.get("nnz") is not None,
        "n_blocks": int(prov.get("n_blocks", 0)),
    }
    info["density"] = None if info["nnz"] is None else int(info["nnz"]) / max(1, n * K * int(np.prod(shape)))
    if isinstance(node, zarr.Array):
        info["done_blocks"] = len({i for i in written_blocks(node) if i < info["n_blocks"]})
        info["chunks"] = list(node.chunks)
    else:  # a block is written when every member wrote it
        done = None
        for name in names:
            try:
                mine = set(written_blocks(node[name]))
            except KeyError:
                mine = set()
            done = mine if done is None else done & mine
        info["done_blocks"] = len({i for i in (done or set()) if i < info["n_blocks"]})
    return info


def describe_stack(source: Any, array: str | None = None, storage_options: dict | None = None,
                   sample_chunks: int = 4) -> dict:
    """Summary of a stack for ``dask-sparseconv info``.

    Keys: location, format, shape, dtype, frame_shape, n_images, chunks,
    codec, nnz, density, nnz_exact, zarr_format, provenance, complete.
    An incomplete output of this package gives its layout, provenance,
    ``n_blocks`` and ``done_blocks`` (the count written so far) instead.
    For dense stores nnz/density are estimated from up to ``sample_chunks``
    evenly spaced row chunks (``nnz_exact`` False unless all were read).
    """
    loc, node = _open_node(source, array, storage_options)
    prov = progress.provenance(node)
    records = kernel_records(node)
    if prov is not None and records is not None:
        return _describe_bank(loc, node, prov, records)
    if prov is not None and not prov.get("complete"):
        # an interrupted run: report its layout and progress (a CSR output's
        # data/indices are longer than nnz until the run finishes)
        n_blocks = int(prov.get("n_blocks", 0))
        done = len({i for i in written_blocks(node) if i < n_blocks})
        shape = [prov.get("n_images"), *(prov.get("frame_shape") or [])]
        return {
            "location": str(loc), "format": prov.get("format"), "n_images": prov.get("n_images"),
            "frame_shape": prov.get("frame_shape"), "dtype": prov.get("dtype"),
            "shape": shape if prov.get("format") == "dense"
            else [prov.get("n_images"), int(np.prod(prov.get("frame_shape") or [0]))],
            "provenance": prov, "complete": False, "n_blocks": n_blocks, "done_blocks": done,
            "nnz": None, "density": None, "nnz_exact": False,
        }
    src = _input_from_node(loc, node)
    info: dict[str, Any] = {
        "location": str(loc),
        "format": src.format,
        "n_images": src.n_images,
        "frame_shape": list(src.frame_shape),
        "dtype": str(src.dtype),
        "provenance": progress.provenance(node),
        "complete": progress.is_complete(node),
    }
    info.update(src.describe(sample_chunks))
    return info
