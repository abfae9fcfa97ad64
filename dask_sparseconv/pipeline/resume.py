"""Resuming an interrupted job: what an existing target is, and the block
plan of the run being continued. (Which written blocks are kept is decided
by each block task: ``verify_block`` of the output.)"""

from __future__ import annotations

from ..row_blocks import RowBlocks


def check_target(tgt_loc, overwrite: bool, resume: bool) -> dict | None:
    """Refuse a target that exists without ``overwrite`` (with ``resume``:
    unless it is an incomplete output of this package). Returns the
    provenance of the incomplete output to resume, or None."""
    if overwrite or not tgt_loc.exists():
        return None
    prov = target_provenance(tgt_loc)
    if prov is None:
        raise FileExistsError(f"target {tgt_loc} already exists (not an output of dask_sparseconv); "
                              "pass overwrite=True to replace it")
    if prov.get("complete"):
        raise FileExistsError(f"target {tgt_loc} already exists and is complete (written {prov.get('completed', '?')}); "
                              "it is left as it is: pass overwrite=True to replace it")
    if not resume:
        raise FileExistsError(f"target {tgt_loc} already exists and holds an incomplete run; pass resume=True to "
                              "continue it or overwrite=True to start over")
    return prov


def target_provenance(tgt_loc) -> dict | None:
    """The dask_sparseconv attribute of an existing target, or None."""
    from ..storage import progress

    try:
        return progress.provenance(tgt_loc.open(mode="r"))
    except Exception:  # not a zarr store, unreadable metadata
        return None


def resume_blocks(blocks: RowBlocks, prov: dict) -> RowBlocks:
    """The block plan of the run being resumed, when it still fits the memory
    budget and the input chunks (so a cluster of another size can resume);
    else ``blocks`` (and the resume check then reports the block size)."""
    import dataclasses

    rows = prov.get("block_rows")
    if blocks.tiles is not None:
        blocks = _resume_tiles(blocks, prov)
        if blocks.tiles is None:
            return blocks
        images = blocks.tiles.n_images
    else:
        images = blocks.n_images
    if not isinstance(rows, int) or rows < 1 or prov.get("n_images") != images:
        return blocks
    if rows * blocks.bytes_per_image > blocks.block_memory:
        return blocks
    candidate = dataclasses.replace(blocks, block_rows=rows)
    return candidate if candidate.aligned or not blocks.aligned else blocks


def _resume_tiles(blocks: RowBlocks, prov: dict) -> RowBlocks:
    """A tiled plan with the stored run's bands when they still fit the
    budget (the plan cuts a few huge frames finer for more threads, so a
    cluster of another size would otherwise plan other tiles)."""
    import dataclasses

    stored = prov.get("tiles")
    grid = blocks.tiles
    if not isinstance(stored, dict) or not isinstance(stored.get("band_rows"), int):
        return blocks
    band = int(stored["band_rows"])
    if band == grid.band_rows or not 1 <= band <= grid.band_limit:
        return blocks
    new = dataclasses.replace(grid, band_rows=band)
    return dataclasses.replace(blocks, tiles=new, n_images=new.n_tiles,
                               block_rows=min(blocks.block_rows, new.n_tiles))
