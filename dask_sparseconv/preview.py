"""Preview a workflow: a few input frames beside their convolution, as a PNG.

The images are convolved in this process with a
:class:`~dask_sparseconv.Convolver` (no cluster, nothing written but the
PNG) and drawn with Pillow into a grid, one row per image: input on the left,
output on the right. Each frame is scaled on its own to 0-255 grey (its
minimum black, its maximum white; an all-zero frame stays black).

Layout (``P`` = 8 px padding, ``L`` = 14 px label height or 0 without
labels, ``s`` = scale)::

    cell   = (max(H, H_out) * s, max(W, W_out) * s)
    width  = 2 * cell_w + 3 * P
    height = n_images * (L + cell_h + P) + P
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

PAD = 8
LABEL_H = 14
BACKGROUND = 40
LABEL_GREY = 230

__all__ = ["to_grey", "preview_size", "compose_grid", "render_preview"]


def to_grey(frame: np.ndarray) -> np.ndarray:
    """Scale ``frame`` to uint8 0-255 by its own min and max."""
    f = np.asarray(frame, dtype=np.float64)
    finite = np.isfinite(f)
    if not finite.any():
        return np.zeros(f.shape, dtype=np.uint8)
    lo, hi = float(f[finite].min()), float(f[finite].max())
    lo = min(lo, 0.0)  # keep zero black for non-negative frames
    if hi <= lo:
        return np.zeros(f.shape, dtype=np.uint8)
    g = (np.where(finite, f, lo) - lo) / (hi - lo) * 255.0
    return np.clip(np.rint(g), 0, 255).astype(np.uint8)


def preview_size(n_images: int, frame_shape, out_shape, scale: int = 1, labels: bool = True) -> tuple[int, int]:
    """``(width, height)`` in pixels of the preview PNG."""
    cell_h = max(frame_shape[0], out_shape[0]) * scale
    cell_w = max(frame_shape[1], out_shape[1]) * scale
    lh = LABEL_H if labels else 0
    return 2 * cell_w + 3 * PAD, n_images * (lh + cell_h + PAD) + PAD


def compose_grid(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    titles: Sequence[tuple[str, str]] | None = None,
    scale: int = 1,
):
    """Draw ``(input, output)`` frame pairs into one ``PIL.Image`` (mode ``L``)."""
    from PIL import Image, ImageDraw

    if not pairs:
        raise ValueError("nothing to preview: no images given")
    scale = int(scale)
    frame_shape = tuple(max(p[0].shape[i] for p in pairs) for i in (0, 1))
    out_shape = tuple(max(p[1].shape[i] for p in pairs) for i in (0, 1))
    labels = titles is not None
    width, height = preview_size(len(pairs), frame_shape, out_shape, scale, labels)
    cell_h = max(frame_shape[0], out_shape[0]) * scale
    cell_w = max(frame_shape[1], out_shape[1]) * scale
    lh = LABEL_H if labels else 0
    canvas = Image.new("L", (width, height), color=BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (a, b) in enumerate(pairs):
        top = PAD + row * (lh + cell_h + PAD)
        for col, frame in enumerate((a, b)):
            left = PAD + col * (cell_w + PAD)
            tile = Image.fromarray(to_grey(frame), mode="L")
            if scale != 1:
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            x = left + (cell_w - tile.width) // 2
            y = top + lh + (cell_h - tile.height) // 2
            canvas.paste(tile, (x, y))
            if labels:
                draw.text((left, top + 1), titles[row][col], fill=LABEL_GREY)
    return canvas


def render_preview(src: Any, wf: Any, images: Sequence[int], scale: int = 1, labels: bool = True):
    """Convolve ``images`` of the opened input ``src`` as workflow ``wf`` says
    and return the preview ``PIL.Image``."""
    import scipy.sparse

    from .convolver import Convolver

    frame_shape = tuple(int(v) for v in src.frame_shape)
    conv = Convolver(frame_shape, wf.kernel.array, mode=wf.mode, method=wf.method, backend=wf.backend,
                     dtype=wf.dtype, n_threads=1, boundary=wf.boundary, fillvalue=wf.fillvalue,
                     correlate=wf.correlate)
    names = getattr(wf.kernel, "names", None)
    pairs, titles = [], []
    for i in images:
        frame = np.asarray(src.read_dense_block(int(i), int(i) + 1))[0]
        res = conv(scipy.sparse.csr_matrix(frame.reshape(1, -1)), out="dense", batched=True)
        if names:  # a kernel bank: one row per kernel, the input beside each
            for name, r in zip(names, res):
                pairs.append((frame, np.asarray(r).reshape(conv.out_shape)))
                titles.append((f"image {i}: input", f"image {i}: kernel {name}, {wf.mode}"))
            continue
        pairs.append((frame, np.asarray(res).reshape(conv.out_shape)))
        titles.append((f"image {i}: input", f"image {i}: {wf.kernel.kind}, {wf.mode}"))
    return compose_grid(pairs, titles if labels else None, scale=scale)
