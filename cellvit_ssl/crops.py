"""Cell-centred crops from a field of view and its segmentation mask.

Crops are fixed-size squares around each cell's centroid, zero-padded where they run past the
image border, read region by region so lazy (Zarr, dask) images are never read whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cellvit_ssl.errors import DataError


@dataclass(frozen=True)
class CropBox:
    """A square crop: top-left corner (may be negative: zero padding) and side length."""

    y0: int
    x0: int
    size: int


def box_around(centre: tuple[float, float], size: int) -> CropBox:
    """The ``size``-px square centred on ``centre`` (y, x), as the training dataset cuts it."""
    return CropBox(int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2, int(size))


def read_box(image, box: CropBox) -> np.ndarray:
    """Read the square ``box`` from a ``(C, H, W)`` or ``(H, W)`` array-like (see :func:`read_region`)."""
    return read_region(image, box.y0, box.x0, box.size, box.size)


def read_region(image, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Read ``h × w`` pixels at ``(y0, x0)`` from a ``(..., H, W)`` array-like, zero-padded outside.

    Only the part inside the image is read (``image[..., ys:ye, xs:xe]``), so Zarr / dask
    arrays load just the chunks the region touches.

    Raises:
        DataError: If the region lies entirely outside the image.
    """
    height, width = image.shape[-2:]
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, height), min(x0 + w, width)
    if ye <= ys or xe <= xs:
        raise DataError(f"crop (y0={y0}, x0={x0}, h={h}, w={w}) lies outside the {height}x{width} image")
    part = np.asarray(image[..., ys:ye, xs:xe])
    out = np.zeros(part.shape[:-2] + (h, w), dtype=part.dtype)
    out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = part
    return out


def cell_table(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label ids (> 0, ascending) of a segmentation mask and their centroids ``(n, 2)`` (y, x).

    Raises:
        DataError: If the mask is not 2-D or not of an integer type.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"the label mask must be 2-D (H, W), got shape {tuple(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"the label mask must hold integer label ids, got dtype {labels.dtype}")
    ids = np.unique(labels)
    ids = ids[ids > 0].astype(np.int64)
    if ids.size == 0:
        return ids, np.zeros((0, 2), np.float64)
    centres = np.asarray(ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, ids), np.float64)
    return ids, centres.reshape(-1, 2)
