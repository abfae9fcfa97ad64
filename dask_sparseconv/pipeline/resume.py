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
    if not isinstance(rows, int) or rows < 1 or prov.get("n_images") != blocks.n_images:
        return blocks
    if rows * blocks.bytes_per_image > blocks.block_memory:
        return blocks
    candidate = dataclasses.replace(blocks, block_rows=rows)
    return candidate if candidate.aligned or not blocks.aligned else blocks
