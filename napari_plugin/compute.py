"""Pure computation behind the inspector: maps, clusters, similarity, PCA-RGB, label images.

Nothing here imports Qt or napari, so every function is tested without a viewer.
scikit-learn, umap-learn and matplotlib are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import numpy as np

from cellvit_ssl.errors import DataError


def umap_available() -> bool:
    """True when umap-learn can be imported (the 2-D map then uses UMAP instead of PCA)."""
    return importlib.util.find_spec("umap") is not None


def reduce_to_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """Project embeddings to 2-D for the map.

    Args:
        x: ``(n, D)`` embeddings.
        method: ``"umap"``, ``"pca"`` or ``"auto"`` (UMAP when umap-learn is installed and
            there are enough points for its neighbourhood graph, else PCA).
        seed: Random state of UMAP.

    Returns:
        ``(n, 2)`` float32 coordinates and the name of the method used (``"UMAP"``/``"PCA"``).

    Raises:
        DataError: On an unknown method or when UMAP is asked for but not installed.
    """
    x = np.asarray(x, dtype=np.float32)
    if method not in ("auto", "umap", "pca"):
        raise DataError(f"map method {method!r}; expected 'auto', 'umap' or 'pca'")
    if method == "umap" and not umap_available():
        raise DataError("map method 'umap' needs umap-learn: pip install umap-learn")
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.float32), "PCA"
    use_umap = method == "umap" or (method == "auto" and umap_available() and n >= 16)
    if use_umap:
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
        return reducer.fit_transform(x).astype(np.float32), "UMAP"
    coords = np.zeros((n, 2), np.float32)
    k = min(2, n, x.shape[1])
    if n > 1 and k > 0:
        from sklearn.decomposition import PCA

        coords[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(x)
    return coords, "PCA"


def kmeans_clusters(x: np.ndarray, n_clusters: int = 8, seed: int = 0) -> np.ndarray:
    """Cluster ids (0..k-1, int32) of k-means on L2-normalised embeddings, k ≤ number of rows."""
    x = np.asarray(x, dtype=np.float32)
    k = min(n_clusters, x.shape[0])
    if k <= 1:
        return np.zeros(x.shape[0], np.int32)
    from sklearn.cluster import KMeans

    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(unit).astype(np.int32)


def cosine_similarity_to(x: np.ndarray, row: int) -> np.ndarray:
    """Cosine similarity of every row of ``x`` ``(n, D)`` to row ``row``; float32 ``(n,)``."""
    x = np.asarray(x, dtype=np.float32)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit @ unit[row]


def pca_rgb(features: np.ndarray, quantiles: tuple[float, float] = (0.01, 0.99)) -> np.ndarray:
    """First three principal components of a patch-feature grid as an RGB image.

    Each component is rescaled to [0, 1] between robust quantiles, as in the DINO papers'
    feature visualisations.

    Args:
        features: ``(D, h, w)`` patch features.
        quantiles: Lower and upper quantile mapped to 0 and 1.

    Returns:
        float32 ``(h, w, 3)`` in [0, 1].
    """
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise DataError(f"patch features must be (D, h, w), got shape {features.shape}")
    d, h, w = features.shape
    tokens = features.reshape(d, h * w).T
    tokens = tokens - tokens.mean(axis=0, keepdims=True)
    rgb = np.zeros((h * w, 3), np.float32)
    if h * w > 1:
        _, _, vt = np.linalg.svd(tokens, full_matrices=False)
        k = min(3, vt.shape[0])
        rgb[:, :k] = tokens @ vt[:k].T
    lo, hi = np.quantile(rgb, quantiles, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return np.clip((rgb - lo) / span, 0, 1).reshape(h, w, 3).astype(np.float32)


def paint_values(labels: np.ndarray, label_ids: np.ndarray, values: np.ndarray,
                 background: float = np.nan) -> np.ndarray:
    """A float image where every pixel of cell ``label_ids[i]`` holds ``values[i]``.

    Pixels of label 0 and of labels not in ``label_ids`` hold ``background``.
    """
    label_ids = np.asarray(label_ids)
    lut_size = int(max(labels.max(initial=0), label_ids.max(initial=0))) + 1
    lut = np.full(lut_size, background, np.float32)
    lut[label_ids] = values
    return lut[labels]


def keep_labels(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Copy of a label image with every label not in ``ids`` set to 0."""
    ids = np.asarray(list(ids), dtype=np.int64)
    keep = np.zeros(int(max(labels.max(initial=0), ids.max(initial=0))) + 1, bool)
    keep[ids[ids >= 0]] = True  # a lookup table: one gather instead of np.isin's sort of every pixel
    return np.where(keep[labels], labels, 0).astype(labels.dtype)


def label_at(labels: np.ndarray, position: Sequence[float]) -> int:
    """The label under a data-coordinate position (the last two coordinates are y, x); 0 outside."""
    y, x = (int(np.floor(p + 0.5)) for p in position[-2:])
    if 0 <= y < labels.shape[-2] and 0 <= x < labels.shape[-1]:
        return int(labels[..., y, x].flat[0])
    return 0


def points_in_polygon(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``(n, 2)`` points inside the closed polygon ``vertices`` ``(m, 2)``."""
    from matplotlib.path import Path

    if len(vertices) < 3 or len(points) == 0:
        return np.zeros(len(points), bool)
    return Path(np.asarray(vertices)).contains_points(np.asarray(points))


def nearest_point(points: np.ndarray, xy: Sequence[float], max_distance: float) -> int | None:
    """Index of the point nearest ``xy`` if it is within ``max_distance``, else None."""
    if len(points) == 0:
        return None
    d = np.hypot(points[:, 0] - xy[0], points[:, 1] - xy[1])
    i = int(np.argmin(d))
    return i if d[i] <= max_distance else None


def density_grid(points: np.ndarray, bins: int = 256, values: np.ndarray | None = None
                 ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Point counts (or the mean of ``values``) on a ``bins × bins`` grid for the density view.

    Returns:
        ``(bins, bins)`` grid with rows along y (empty bins are NaN when ``values`` is given)
        and its extent ``(x0, x1, y0, y1)``.
    """
    x, y = points[:, 0], points[:, 1]
    if len(x):
        pad_x, pad_y = max(float(np.ptp(x)) * 0.02, 1e-6), max(float(np.ptp(y)) * 0.02, 1e-6)
        x0, x1, y0, y1 = float(x.min()) - pad_x, float(x.max()) + pad_x, float(y.min()) - pad_y, float(y.max()) + pad_y
    else:
        x0, x1, y0, y1 = 0.0, 1.0, 0.0, 1.0
    counts, _, _ = np.histogram2d(y, x, bins=bins, range=[[y0, y1], [x0, x1]])
    if values is not None:
        sums, _, _ = np.histogram2d(y, x, bins=bins, range=[[y0, y1], [x0, x1]], weights=values)
        with np.errstate(invalid="ignore", divide="ignore"):
            counts = np.where(counts > 0, sums / counts, np.nan)
    return counts, (x0, x1, y0, y1)


def fov_region(corners: np.ndarray | None, shape: tuple[int, int], min_size: int) -> tuple[int, int, int, int]:
    """The visible part of an image as ``(y0, x0, height, width)``, at least ``min_size`` wide.

    Args:
        corners: ``(2, ndim)`` visible data-coordinate corners (napari's ``corner_pixels``), or
            None for the whole image.
        shape: ``(H, W)`` of the image.
        min_size: Smallest height/width (e.g. one model input); clipped to the image.
    """
    height, width = shape
    if corners is None or np.asarray(corners).size == 0:
        return 0, 0, height, width
    corners = np.asarray(corners, dtype=float)[:, -2:]
    y0, x0 = np.floor(corners[0]).astype(int)
    y1, x1 = np.ceil(corners[1]).astype(int) + 1
    y0, y1 = _grow(y0, y1, min_size, height)
    x0, x1 = _grow(x0, x1, min_size, width)
    if y1 <= y0 or x1 <= x0:
        return 0, 0, height, width
    return int(y0), int(x0), int(y1 - y0), int(x1 - x0)


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    lo, hi = max(lo, 0), min(hi, limit)
    if hi - lo < size:
        mid = (lo + hi) // 2
        lo = max(0, min(mid - size // 2, limit - size))
        hi = min(limit, lo + size)
    return lo, hi


def tile_label_image(shape: tuple[int, int], tile: int) -> np.ndarray:
    """Label image of the ``tile × tile`` tiles covering an image (ids from 1, row-major).

    Tiles start at the top-left corner; those of the last row / column are cut by the image
    border (as :meth:`cellvit_ssl.Encoder.embed_tiles` pads them).
    """
    height, width = shape
    if tile <= 0:
        raise DataError(f"tile size {tile} px; expected at least 1 px")
    ny, nx = -(-height // tile), -(-width // tile)
    ids = np.arange(1, ny * nx + 1, dtype=np.int32).reshape(ny, nx)
    return np.kron(ids, np.ones((tile, tile), np.int32))[:height, :width]
