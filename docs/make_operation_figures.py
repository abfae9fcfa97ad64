"""Draw the pictures of docs/operations.md: for each operation, the input
frame, the kernel and the output, side by side (one PNG per operation), and
for the separable path the input, the row pass and the output.

    python docs/make_operation_figures.py      # writes docs/images/op_*.png

The frame holds a few pixels, two of them at edges, so that the boundaries
show; the kernel is an asymmetric L, so that correlation (not flipped)
differs visibly from convolution (flipped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dask_sparseconv import Convolver, kernels
from dask_sparseconv.engine.separable import low_rank
from dask_sparseconv.preview import to_grey

OUT = Path(__file__).resolve().parent / "images"
SCALE = 4
PAD = 10
LABEL_H = 16

#: file name -> (title, Convolver keywords)
OPERATIONS = {
    "convolve": ("convolution, zero fill", {}),
    "correlate": ("correlation, zero fill", {"correlate": True}),
    "fill": ("convolution, fillvalue 0.5", {"fillvalue": 0.5}),
    "wrap": ("boundary wrap", {"boundary": "wrap"}),
    "symm": ("boundary symm (= ndimage reflect)", {"boundary": "symm"}),
    "mirror": ("boundary mirror", {"boundary": "mirror"}),
    "nearest": ("boundary nearest", {"boundary": "nearest"}),
}


def sample_frame() -> np.ndarray:
    f = np.zeros((40, 48))
    f[20, 24] = 1.0  # interior: the kernel's image, whatever the boundary
    f[3, 1] = 1.0  # near the top-left corner
    f[30:33, 47] = 1.0  # a short run on the right edge
    return f


def l_kernel() -> np.ndarray:
    k = np.zeros((9, 9))
    k[0:9, 1] = 1.0  # the L's stem
    k[8, 1:8] = 1.0  # its foot
    k[0, 1] = 2.0  # a brighter tip, to show which way it points
    return k


def tile(frame: np.ndarray) -> Image.Image:
    img = Image.fromarray(to_grey(frame), mode="L")
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def figure(title: str, frame: np.ndarray, kernel: np.ndarray, result: np.ndarray,
           labels: tuple[str, str, str] = ("input", "kernel", "output")) -> Image.Image:
    tiles = [tile(frame), tile(kernel), tile(result)]
    widths = [max(t.width, 60) for t in tiles]  # room for a label under a narrow kernel
    width = sum(widths) + PAD * (len(tiles) + 1)
    height = max(t.height for t in tiles) + 2 * LABEL_H + 2 * PAD
    canvas = Image.new("L", (width, height), color=40)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD // 2), title, fill=255)
    x = PAD
    for t, w, label in zip(tiles, widths, labels):
        draw.text((x, PAD // 2 + LABEL_H), label, fill=200)
        canvas.paste(t, (x, PAD + 2 * LABEL_H))
        x += w + PAD
    return canvas


def main() -> None:
    OUT.mkdir(exist_ok=True)
    frame, kernel = sample_frame(), l_kernel()
    for name, (title, kwargs) in OPERATIONS.items():
        result = Convolver(frame.shape, kernel, "same", **kwargs)(frame)
        path = OUT / f"op_{name}.png"
        figure(title, frame, kernel, result).save(path, optimize=True)
        print(f"wrote {path}")
    # separable: a Gaussian as a row pass, then a column pass over the row pass's runs
    blobs = blob_frame()
    gauss = kernels.gaussian(2.0)
    f = low_rank(gauss)
    rows = Convolver(blobs.shape, f.w[0][None, :], "same")(blobs)
    result = Convolver(blobs.shape, gauss, "same", method="separable")(blobs)
    path = OUT / "op_separable.png"
    figure("separable 13x13 Gaussian: row pass, then column pass", blobs, rows, result,
           ("input", "after the row pass", "output")).save(path, optimize=True)
    print(f"wrote {path}")


def blob_frame() -> np.ndarray:
    yy, xx = np.mgrid[:40, :48]
    f = ((yy - 12) ** 2 + (xx - 14) ** 2 <= 25).astype(float)  # a cell-like disk
    f[28:31, 30:40] = 1.0  # a short bar
    return f


if __name__ == "__main__":
    main()
