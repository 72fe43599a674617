"""The inspector's pure computation and channel mapping, without a viewer or Qt."""

import numpy as np
import pandas as pd
import pytest

from cellvit_ssl.errors import DataError
from napari_plugin.analysis import PREDICTION_COLUMN, build_features, ids_of_class, prediction_columns
from napari_plugin.channel_map import LEAVE_OUT, UNMAPPED, resolve_mapping, source_channel, suggest_mapping
from napari_plugin.compute import (
    cosine_similarity_to,
    density_grid,
    fov_region,
    keep_labels,
    label_at,
    nearest_point,
    paint_values,
    pca_rgb,
    points_in_polygon,
    reduce_to_2d,
    tile_label_image,
    umap_available,
)
from napari_plugin.export import export_selection

MODEL = ["nucleus", "microtubules", "er", "protein"]


def test_pca_map_keeps_the_geometry_of_planar_embeddings():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(50, 2)) * [5.0, 1.0]
    basis, _ = np.linalg.qr(rng.normal(size=(12, 2)))
    x = plane @ basis.T + 3.0
    coords, method = reduce_to_2d(x, "pca")
    assert method == "PCA" and coords.shape == (50, 2)
    d_in = np.linalg.norm(x[:, None] - x[None], axis=-1)
    d_map = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.testing.assert_allclose(d_map, d_in, atol=1e-3)
    if not umap_available():
        assert reduce_to_2d(x, "auto")[1] == "PCA"
        with pytest.raises(DataError, match="umap-learn"):
            reduce_to_2d(x, "umap")


def test_cosine_similarity_matches_the_formula():
    x = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    sims = cosine_similarity_to(x, 3)
    expected = [float(a @ x[3] / np.linalg.norm(a) / np.linalg.norm(x[3])) for a in x]
    np.testing.assert_allclose(sims, expected, atol=1e-6)
    assert sims[3] == pytest.approx(1.0)


def test_pca_rgb_separates_two_kinds_of_patches():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=16), rng.normal(size=16)
    feats = np.empty((16, 6, 8), np.float32)
    feats[:, :, :4] = a[:, None, None]
    feats[:, :, 4:] = b[:, None, None]
    feats += 0.01 * rng.normal(size=feats.shape)
    rgb = pca_rgb(feats)
    assert rgb.shape == (6, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0]  # the first component carries the only structure; the others are noise
    assert abs(first[:, :4].mean() - first[:, 4:].mean()) > 0.9
    assert first[:, :4].std() < 0.05 and first[:, 4:].std() < 0.05


def test_label_images_values_highlight_and_picking():
    labels = np.zeros((6, 6), np.int32)
    labels[:3, :3], labels[3:, 3:], labels[:2, 4:] = 4, 9, 2
    img = paint_values(labels, np.array([2, 4, 9]), np.array([0.1, 0.5, -0.3]))
    assert np.all(img[labels == 4] == np.float32(0.5)) and np.all(img[labels == 9] == np.float32(-0.3))
    assert np.isnan(img[labels == 0]).all()
    kept = keep_labels(labels, [9, 2])
    assert set(np.unique(kept)) == {0, 2, 9} and np.array_equal(kept[labels == 9], labels[labels == 9])
    assert label_at(labels, (1.2, 0.6)) == 4 and label_at(labels, (10, 10)) == 0
    assert label_at(labels, (0, 4.4, 4.4)) == 9  # leading (non-spatial) coordinates are ignored


def test_plot_picking_helpers():
    pts = np.array([[0, 0], [1, 1], [2, 0], [5, 5]], np.float32)
    square = np.array([[-0.5, -0.5], [2.5, -0.5], [2.5, 1.5], [-0.5, 1.5]])
    assert points_in_polygon(pts, square).tolist() == [True, True, True, False]
    assert nearest_point(pts, (4.8, 5.1), 0.5) == 3 and nearest_point(pts, (3.5, 3.5), 0.5) is None
    counts, extent = density_grid(pts, bins=8)
    assert counts.sum() == 4 and extent[0] < 0 < 5 < extent[1]
    means, _ = density_grid(pts, bins=2, values=np.array([1.0, 3.0, 5.0, 7.0]))
    assert np.nanmax(means) == 7.0 and np.nanmin(means) == 3.0  # bin of points 0-2 holds their mean


def test_field_of_view_and_tiles():
    assert fov_region(None, (100, 80), 32) == (0, 0, 100, 80)
    assert fov_region(np.array([[0, 10, 20], [0, 59, 69]]), (100, 80), 32) == (10, 20, 50, 50)
    assert fov_region(np.array([[40, 40], [45, 45]]), (100, 80), 32) == (27, 27, 32, 32)
    assert fov_region(np.array([[-50, -50], [500, 500]]), (100, 80), 32) == (0, 0, 100, 80)
    tiles = tile_label_image((70, 50), 16)
    assert tiles.shape == (70, 50) and tiles.max() == 5 * 4 and tiles.min() == 1  # border tiles are cut, not dropped
    assert tiles[0, 0] == 1 and tiles[0, 16] == 2 and tiles[16, 0] == 5 and tiles[69, 49] == 20
    assert np.bincount(tiles.ravel())[1:].tolist() == [256] * 3 + [32] + ([256] * 3 + [32]) * 3 + [96] * 3 + [12]
    assert (tile_label_image((70, 50), 99) == 1).all()
    with pytest.raises(DataError, match="tile size 0"):
        tile_label_image((70, 50), 0)


def test_channel_names_are_matched_by_name_and_alias():
    assert source_channel("DAPI") == "nucleus" and source_channel("field_000 [Hoechst]") == "nucleus"
    assert source_channel("ER-stain") == "er" and source_channel("brightness") is None
    sources = ["Tubulin", "dapi", "GFP target", "something"]
    mapping = suggest_mapping(MODEL, sources)
    assert mapping == {"nucleus": "dapi", "microtubules": "Tubulin", "er": UNMAPPED, "protein": "GFP target"}
    with pytest.raises(DataError, match=r"lacks the model channels \['er'\]"):
        resolve_mapping(MODEL, mapping, sources)
    names, channels = resolve_mapping(MODEL, {**mapping, "er": LEAVE_OUT}, sources)
    assert names == ["dapi", "Tubulin", "GFP target"] and channels == ["nucleus", "microtubules", "protein"]
    with pytest.raises(DataError, match="channel mismatch"):
        resolve_mapping(MODEL, suggest_mapping(MODEL, ["a", "b"]), ["a", "b"])
    with pytest.raises(DataError, match="more than one"):
        resolve_mapping(MODEL, {c: "dapi" for c in MODEL}, sources)


def test_export_selection_csv_and_anndata(tmp_path):
    import anndata

    table = pd.DataFrame({"index": [3, 5, 8], "label": [3, 5, 8], "PCA_0": [0.1, 0.2, 0.3],
                          "embedding_0": [1.0, 2.0, 3.0], "embedding_1": [4.0, 5.0, 6.0]})
    csv = export_selection(table, [8, 3], tmp_path / "sel.csv")
    assert pd.read_csv(csv)["index"].tolist() == [3, 8]
    adata = anndata.read_h5ad(export_selection(table, [5], tmp_path / "sel.h5ad"))
    assert adata.shape == (1, 2) and adata.X.tolist() == [[2.0, 5.0]] and adata.obs["PCA_0"].tolist() == [0.2]
    with pytest.raises(DataError, match="nothing is selected"):
        export_selection(table, [], tmp_path / "x.csv")
    with pytest.raises(DataError, match=r"\.csv or \.h5ad"):
        export_selection(table, [3], tmp_path / "x.xlsx")


def test_features_table_rows_follow_labels_and_keep_other_columns():
    labels = np.zeros((4, 4), np.int32)
    labels[:2, :2], labels[2:, 2:] = 5, 2
    image = np.stack([labels * 1.0, np.ones((4, 4))])
    existing = pd.DataFrame({"index": [2, 5], "area": [4, 4], "PCA_0": [9.0, 9.0]})
    table = build_features(np.array([2, 5]), np.eye(2, 3, dtype=np.float32), np.array([[0.0, 1.0], [2.0, 3.0]]),
                           "PCA", np.array([1, 0]), image, ["nucleus", "er"], labels, existing)
    assert table["index"].tolist() == [2, 5] and table["area"].tolist() == [4, 4]
    assert table["PCA_0"].tolist() == [0.0, 2.0]  # ours replace stale map columns
    assert table["mean_nucleus"].tolist() == [2.0, 5.0] and table["mean_er"].tolist() == [1.0, 1.0]
    assert table[["embedding_0", "embedding_1", "embedding_2"]].to_numpy().tolist() == [[1, 0, 0], [0, 1, 0]]
    assert table["KMEANS_CLUSTER_ID"].tolist() == [1, 0]


def test_triton_is_kept_out_only_when_llvm_is_already_loaded(tmp_path, monkeypatch):
    import sys

    from napari_plugin._llvm import keep_triton_out_if_llvm_loaded

    monkeypatch.setitem(sys.modules, "triton", None)  # so that teardown restores the real state
    monkeypatch.delitem(sys.modules, "triton")
    plain = tmp_path / "plain_maps"
    plain.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
    assert not keep_triton_out_if_llvm_loaded(plain) and "triton" not in sys.modules
    gl = tmp_path / "gl_maps"
    gl.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert keep_triton_out_if_llvm_loaded(gl)
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert not keep_triton_out_if_llvm_loaded(gl)  # already decided


class _Classifier:
    """The two methods of :class:`cellvit_ssl.Classifier` the inspector calls, on fixed probabilities."""

    def __init__(self, multi_label: bool) -> None:
        from cellvit_ssl.classifier import Predictions

        self.classes = ["nuclear", "punctate", "membrane"]
        self.multi_label = multi_label
        self._predictions = Predictions

    def probabilities(self, embeddings):
        return np.asarray(embeddings, np.float32)

    def predictions(self, probabilities):
        chosen = probabilities >= 0.5 if self.multi_label else np.eye(3, dtype=bool)[probabilities.argmax(1)]
        return self._predictions(self.classes, probabilities, chosen, self.multi_label)


@pytest.mark.parametrize("multi_label", [False, True])
def test_classifier_predictions_become_feature_columns_and_select_a_class(multi_label):
    probs = np.array([[0.7, 0.6, 0.1], [0.2, 0.3, 0.9], [0.1, 0.8, 0.2]], np.float32)
    columns = prediction_columns(_Classifier(multi_label), probs)
    ids = np.array([4, 7, 9])
    coords = np.zeros((3, 2), np.float32)
    table = build_features(ids, np.zeros((3, 2), np.float32), coords, "PCA", np.zeros(3, int), None, [],
                           np.zeros((2, 2), int), predictions=columns)
    assert isinstance(table[PREDICTION_COLUMN].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(table[["prob_nuclear", "prob_punctate", "prob_membrane"]].to_numpy(), probs)
    if multi_label:
        assert table[PREDICTION_COLUMN].astype(str).tolist() == ["nuclear;punctate", "membrane", "punctate"]
        assert ids_of_class(table, "punctate").tolist() == [4, 9]
    else:
        assert table[PREDICTION_COLUMN].astype(str).tolist() == ["nuclear", "membrane", "punctate"]
        assert ids_of_class(table, "punctate").tolist() == [9]
    with pytest.raises(DataError, match="no predictions of class 'golgi'"):
        ids_of_class(table, "golgi")
    # a second run replaces the predictions of the first instead of keeping them as "other" columns
    again = build_features(ids, np.zeros((3, 2), np.float32), coords, "PCA", np.zeros(3, int), None, [],
                           np.zeros((2, 2), int), existing=table.assign(mine=1))
    assert PREDICTION_COLUMN not in again.columns and "prob_nuclear" not in again.columns and "mine" in again
