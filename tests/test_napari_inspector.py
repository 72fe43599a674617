"""The napari inspector end to end: a tiny checkpoint trained here, the sample data, a headless viewer.

Qt runs under Xvfb (pytest-xvfb). Viewer tests are few on purpose: each costs a few seconds.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_OVERRIDES

from cellvit_ssl import load_encoder
from cellvit_ssl.config import load_config
from cellvit_ssl.errors import DataError
from cellvit_ssl.train import run
from napari_plugin import sample
from napari_plugin.analysis import PREDICTION_COLUMN, analyse, embed_tiles_chunked, ids_of_class, read_precomputed
from napari_plugin.compute import umap_available

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

MANIFEST = Path(__file__).resolve().parents[1] / "napari_plugin" / "napari.yaml"
ARTIFACT = Path(__file__).resolve().parents[1] / "artifacts" / "napari_inspector.png"
CHANNELS = ["nucleus", "microtubules", "er", "protein"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspector")
    cfg = load_config(None, TINY_OVERRIDES + [f"data.demo.cache_dir={tmp / 'demo'}",
                                              f"train.output_dir={tmp / 'run'}"])
    return run(cfg)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample, "CACHE_DIR", tmp_path_factory.mktemp("sample"))
        yield sample.CACHE_DIR


def _finish(run_gen):
    while True:
        try:
            next(run_gen)
        except StopIteration as stop:
            return stop.value


def _click(viewer, position, modifiers=()):
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils._test_utils import MouseEvent
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    for kind, fire in (("mouse_press", mouse_press_callbacks), ("mouse_release", mouse_release_callbacks)):
        fire(viewer, ReadOnlyWrapper(MouseEvent(type=kind, position=position, modifiers=list(modifiers))))


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)


def test_manifest_validates_and_imports():
    npe2 = shutil.which("npe2") or str(Path(sys.executable).with_name("npe2"))
    root = str(MANIFEST.parents[1])  # this checkout's package, whichever copy is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([npe2, "validate", "--imports", str(MANIFEST)], capture_output=True, text=True,
                         cwd=root, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout


def test_analysis_on_tiles_and_precomputed_embeddings(checkpoint, sample_dir, tmp_path):
    import anndata

    enc = load_encoder(checkpoint, device="cpu")
    (image, _, _), (labels, _, _) = sample.demo_sample()
    tiles = _finish(analyse(enc, image, CHANNELS, tile_size=64))
    assert tiles.tiled and tiles.labels.max() == 16 and tiles.label_ids.tolist() == list(range(1, 17))
    np.testing.assert_allclose(tiles.embeddings[5], enc.embed(image[:, 64:128, 64:128], CHANNELS)[0], atol=1e-5)
    # 100-px tiles: 3 x 3, cut at the border; strips of rows give the tiles of the whole field
    strips = _finish(embed_tiles_chunked(enc, image, CHANNELS, 100, chunk=3))
    whole, _ = enc.embed_tiles(image, CHANNELS, tile_size=100)
    assert strips[1].tolist() == list(range(1, 10)) and (strips[2] > 0).all()
    np.testing.assert_allclose(strips[0], whole, atol=1e-5)
    # the protein block alone (a localisation question): one channel's width, that channel's block
    protein = _finish(analyse(enc, image, CHANNELS, tile_size=64, pooling="protein"))
    d = enc.channel_dim
    assert protein.embeddings.shape == (16, d)
    np.testing.assert_allclose(protein.embeddings, tiles.embeddings[:, 3 * d :], atol=1e-5)

    # an embeddings file written by the embed CLI is read back cell by cell
    from cellvit_ssl.embed import main as embed_main
    from cellvit_ssl.embed_io import read_embeddings

    field = sample_dir / "images" / "field_000.ome.tif"  # the same field as the sample's OME-Zarr
    out = tmp_path / "cells.h5ad"
    mask = str(field).replace(".ome.tif", "_labels.tif")
    assert embed_main([str(checkpoint), "--images", str(field), "--labels", mask,
                       "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    written = read_embeddings(out)
    cells = _finish(analyse(None, None, [], labels=labels, precomputed=out, image_name="field_000"))
    ids = np.unique(labels)[1:]
    assert cells.label_ids.tolist() == ids.tolist() == written.obs["cell_label"].tolist()
    np.testing.assert_allclose(cells.embeddings, written.X)
    assert cells.features[cells.embedding_columns].shape == written.X.shape

    # a file holding several images: the rows of the named one are used
    obs = pd.DataFrame({"path": ["a/field_000.ome.zarr"] * len(ids) + ["a/field_001.ome.zarr"],
                        "cell_id": [*ids.tolist(), 1]})
    both = tmp_path / "both.h5ad"
    anndata.AnnData(X=np.vstack([written.X, np.zeros((1, written.X.shape[1]), np.float32)]), obs=obs).write_h5ad(both)
    x, got = read_precomputed(both, labels, image_name="field_000")
    assert got.tolist() == ids.tolist() and np.allclose(x, written.X)
    with pytest.raises(DataError, match="none is named like"):
        read_precomputed(both, labels, image_name="field_009")


def test_inspector_runs_on_sample_and_links_map_and_image(make_napari_viewer, qtbot, checkpoint, sample_dir,
                                                         tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.open_sample("cellvit-ssl", "demo")
    assert [layer.name for layer in viewer.layers] == [*CHANNELS, "cells"]
    _, widget = viewer.window.add_plugin_dock_widget("cellvit-ssl", "Embedding inspector")
    assert widget.load_source(str(checkpoint))
    assert widget.mapping() == {c: c for c in CHANNELS}  # pre-filled by name
    assert widget.labels_box.currentText() == "cells"

    assert widget.run()
    _wait(qtbot, widget)
    result = widget.result
    assert result is not None, widget.status.text()
    cells = viewer.layers["cells"]
    ids = np.unique(cells.data)
    ids = ids[ids > 0]
    assert result.label_ids.tolist() == ids.tolist()
    assert f"{len(ids)} cells embedded" in widget.status.text()

    # features table: one row per cell with embeddings, map coordinates and cluster ids
    features = cells.features
    assert features["index"].tolist() == ids.tolist()
    method = result.method  # UMAP when umap-learn is installed, PCA otherwise
    assert method == ("UMAP" if umap_available() else "PCA")
    assert {f"{method}_0", f"{method}_1", "KMEANS_CLUSTER_ID"} <= set(features.columns)
    assert len(result.embedding_columns) == load_encoder(checkpoint).output_dim
    np.testing.assert_allclose(features[[f"{method}_0", f"{method}_1"]].to_numpy(), widget.plot.coords)
    assert features["KMEANS_CLUSTER_ID"].nunique() > 1

    # PCA-RGB overlay of the patch features, placed over the image
    overlay = viewer.layers["PCA-RGB features"]
    assert overlay.rgb and overlay.data.ndim == 3 and overlay.data.shape[-1] == 3
    (y0, x0), (y1, x1) = overlay.extent.world[:, -2:]
    assert -1 <= y0 and -1 <= x0 and y1 <= cells.data.shape[0] + 8 and x1 <= cells.data.shape[1] + 8
    assert y1 - y0 > 100 and overlay.data.std() > 0.05

    # zoomed in, the overlay is recomputed for the visible part only
    viewer.camera.center = (64, 64)
    viewer.camera.zoom *= 4

    def visible():
        return np.asarray(viewer.layers["nucleus"].corner_pixels)[:, -2:]

    qtbot.waitUntil(lambda: (np.diff(visible(), axis=0) < 150).all(), timeout=10_000)
    visible = visible()
    assert widget.update_overlay()
    (zy0, zx0), (zy1, zx1) = overlay.extent.world[:, -2:]
    assert zy1 - zy0 < 0.7 * (y1 - y0) and zx1 - zx0 < 0.7 * (x1 - x0)
    assert visible[0, 0] - 8 <= zy0 and zy1 <= visible[1, 0] + 8
    assert visible[0, 1] - 8 <= zx0 and zx1 <= visible[1, 1] + 8
    viewer.reset_view()

    # plot → image: a selection in the map highlights exactly those cells
    rows = np.array([0, 2, 5])
    widget.plot.select_rows(rows)
    highlight = viewer.layers["selection"].data
    assert set(np.unique(highlight)) == {0, *ids[rows].tolist()}
    assert np.array_equal(highlight > 0, np.isin(cells.data, ids[rows]))
    # ... and a lasso around part of the map selects the points inside it
    coords = widget.plot.coords
    lo, hi = coords.min(0), np.median(coords, 0)
    widget.plot._on_lasso([(lo[0] - 1, lo[1] - 1), (hi[0], lo[1] - 1), (hi[0], hi[1]), (lo[0] - 1, hi[1])])
    inside = ids[(coords[:, 0] <= hi[0]) & (coords[:, 1] <= hi[1])]
    assert set(np.unique(viewer.layers["selection"].data)) - {0} == set(inside.tolist())

    # image → plot: Shift-click a cell adds it to the selection shown in the map
    target = next(i for i in ids[::-1] if i not in inside)
    ys, xs = np.nonzero(cells.data == target)
    _click(viewer, (float(ys[len(ys) // 2]), float(xs[len(xs) // 2])), modifiers=("Shift",))
    expected = sorted([*inside.tolist(), int(target)])
    assert ids[widget.plot.selected].tolist() == expected
    assert set(np.unique(viewer.layers["selection"].data)) - {0} == set(expected)

    # click a cell: cosine similarity of every cell, one value per cell
    ref = ids[1]
    ys, xs = np.nonzero(cells.data == ref)
    _click(viewer, (float(ys[0]), float(xs[0])))
    sim = viewer.layers["cosine similarity"].data
    emb = features[result.embedding_columns].to_numpy()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for i, cell in enumerate(ids):
        values = np.unique(sim[cells.data == cell])
        assert values.size == 1
        assert values[0] == pytest.approx(unit[i] @ unit[1], abs=1e-5)
    assert np.isnan(sim[cells.data == 0]).all()
    assert sim[cells.data == ref][0] == pytest.approx(1.0)

    # export of the selection
    assert widget.export(tmp_path / "sel.csv")
    assert pd.read_csv(tmp_path / "sel.csv")["index"].tolist() == expected

    viewer.layers["cosine similarity"].visible = False  # the picture shows image, overlay, selection, map
    viewer.reset_view()
    qtbot.waitUntil(lambda: (np.diff(np.asarray(viewer.layers["nucleus"].corner_pixels), axis=0) > 200).all(),
                    timeout=10_000)
    assert widget.update_overlay()
    ARTIFACT.parent.mkdir(exist_ok=True)
    viewer.screenshot(str(ARTIFACT), canvas_only=False)
    print(f"screenshot: {ARTIFACT}")
    assert ARTIFACT.stat().st_size > 10_000


def test_inspector_messages_leave_the_viewer_unchanged(make_napari_viewer, qtbot, checkpoint, sample_dir,
                                                       tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("cellvit-ssl", "demo")
    _, widget = viewer.window.add_plugin_dock_widget("cellvit-ssl", "Embedding inspector")
    before = [layer.name for layer in viewer.layers]

    assert widget.load_source(str(checkpoint))  # the embedding choices of a bag-of-channels model
    choices = [widget.pooling_box.itemText(i) for i in range(widget.pooling_box.count())]
    assert choices == ["(model default)", "concat", "mean", *CHANNELS] and widget.pooling() is None
    widget.pooling_box.setCurrentText("protein")
    assert widget.pooling() == "protein"

    assert not widget.load_source(str(tmp_path / "missing.pt"))
    assert "missing.pt" in widget.status.text()
    assert not widget.run()  # nothing loaded: a message, not a traceback

    # a mistake found in the worker (an embeddings file without label ids) is a message too
    import anndata

    bad = tmp_path / "bad.h5ad"
    anndata.AnnData(X=np.zeros((3, 4), np.float32), obs=pd.DataFrame({"path": ["a"] * 3})).write_h5ad(bad)
    assert widget.load_source(str(bad)) and widget.run()
    _wait(qtbot, widget)
    assert "no column with the cells' label ids" in widget.status.text() and widget.result is None
    assert [layer.name for layer in viewer.layers] == before

    for i, name in enumerate(CHANNELS):
        viewer.layers[name].name = f"ch{i}"
    assert widget.load_source(str(checkpoint))
    assert not widget.run()
    assert "channel mismatch" in widget.status.text()
    assert [layer.name for layer in viewer.layers] == [f"ch{i}" for i in range(4)] + ["cells"]
    assert viewer.layers["cells"].features.empty and widget.worker is None

    for i, name in enumerate(CHANNELS[:3]):
        viewer.layers[f"ch{i}"].name = name
    widget.load_source(str(checkpoint))
    assert not widget.run()
    assert "lacks the model channels ['protein']" in widget.status.text()
    assert len(viewer.layers) == len(before)

    # cancelling a run leaves the viewer as it was
    widget.channel_boxes["protein"].setCurrentText("ch3")
    widget.labels_box.setCurrentText("(tiles, no segmentation)")
    widget.tile_size.setValue(8)
    assert widget.run()
    widget.worker.yielded.connect(lambda _: widget.cancel())
    _wait(qtbot, widget)
    assert "Cancelled" in widget.status.text() and widget.result is None
    assert len(viewer.layers) == len(before)

    # a precomputed embeddings file (rows of two images) runs without a model
    cells = viewer.layers["cells"]
    ids = np.unique(cells.data)[1:]
    x = np.random.default_rng(0).normal(size=(len(ids) + 1, 6)).astype(np.float32)
    obs = pd.DataFrame({"path": ["images/field_000.ome.zarr"] * len(ids) + ["images/field_001.ome.zarr"],
                        "cell_id": [*ids.tolist(), 1]})
    good = tmp_path / "good.h5ad"
    anndata.AnnData(X=x, obs=obs).write_h5ad(good)
    assert widget.load_source(str(good)) and not widget.run()  # tiles are still picked
    assert "need a Labels layer" in widget.status.text()
    widget.labels_box.setCurrentText("cells")
    assert widget.run()
    _wait(qtbot, widget)
    assert widget.result is not None, widget.status.text()
    assert cells.features["index"].tolist() == ids.tolist()
    np.testing.assert_allclose(cells.features[widget.result.embedding_columns].to_numpy(), x[:-1])
    assert len(viewer.layers) == len(before)  # no overlay without a model


def test_inspector_shows_a_classifiers_predictions_and_selects_a_class(make_napari_viewer, qtbot, checkpoint,
                                                                      sample_dir, tmp_path):
    from cellvit_ssl import load_classifier
    from cellvit_ssl.finetune import main as finetune

    viewer = make_napari_viewer()
    viewer.open_sample("cellvit-ssl", "demo")
    out = tmp_path / "ft"
    assert finetune([str(checkpoint), "--index", str(sample_dir / "index_ome-zarr.csv"), "--out", str(out),
                     "train.epochs=2", "data.batch_size=4", "data.num_workers=0", "train.device=cpu", "--no-progress",
                     "finetune.val_fraction=0", "finetune.mode=lora", "finetune.lora.rank=2"]) == 0
    _, widget = viewer.window.add_plugin_dock_widget("cellvit-ssl", "Embedding inspector")
    assert widget.load_source(str(out / "classifier.pt")), widget.status.text()
    assert "Classifier classifier.pt (lora)" in widget.status.text()
    assert widget.mapping() == {c: c for c in CHANNELS}
    assert widget.run()
    _wait(qtbot, widget)
    assert widget.result is not None, widget.status.text()

    cells = viewer.layers["cells"]
    image = np.stack([np.asarray(viewer.layers[c].data) for c in CHANNELS])
    clf = load_classifier(out / "classifier.pt", device="cpu")
    expected, ids = clf.predict_cells(image, cells.data, CHANNELS, allow_missing=True)
    features = cells.features
    assert features["index"].tolist() == ids.tolist()
    assert isinstance(features[PREDICTION_COLUMN].dtype, pd.CategoricalDtype)
    assert features[PREDICTION_COLUMN].astype(str).tolist() == expected.labels.tolist()
    np.testing.assert_allclose(features[[f"prob_{c}" for c in clf.classes]].to_numpy(), expected.probabilities,
                               atol=1e-5)
    assert widget.plot.colour_by.currentText() == PREDICTION_COLUMN  # the map is coloured by class
    assert not widget.class_row.isHidden()
    assert [widget.class_box.itemText(i) for i in range(widget.class_box.count())] == clf.classes

    name = str(expected.labels[0])
    assert widget.select_class(name)
    chosen = ids[expected.labels == name]
    assert chosen.size and ids_of_class(features, name).tolist() == chosen.tolist()
    assert set(np.unique(viewer.layers["selection"].data)) - {0} == set(chosen.tolist())
    assert ids[widget.plot.selected].tolist() == sorted(chosen.tolist())
    assert f"{chosen.size} predicted {name}" in widget.status.text()


def test_map_plot_density_view_lasso_and_colour_columns(qtbot):
    from napari_plugin.plot import DENSITY_THRESHOLD, MapPlot

    rng = np.random.default_rng(0)
    coords = rng.normal(size=(DENSITY_THRESHOLD + 500, 2)).astype(np.float32)
    n = len(coords)
    table = pd.DataFrame({"index": np.arange(n), "KMEANS_CLUSTER_ID": pd.Categorical(rng.integers(0, 3, n)),
                          "mean_er": rng.random(n), "path": ["a"] * n, "embedding_0": 0.0})
    plot = MapPlot()
    qtbot.addWidget(plot)
    plot.set_data(coords, table, "PCA", colour="mean_er")
    assert plot.density.isChecked()  # many points: density image, not a scatter
    assert [plot.colour_by.itemText(i) for i in range(plot.colour_by.count())] == [
        "(none)", "KMEANS_CLUSTER_ID", "mean_er"]
    square = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    with qtbot.waitSignal(plot.selection_changed) as signal:
        plot._on_lasso(square)
    inside = np.flatnonzero((np.abs(coords) < 0.5).all(axis=1))
    assert signal.args[0].tolist() == inside.tolist() and plot.info.text() == f"{len(inside)} selected"
    plot.set_data(coords[:50], table.iloc[:50], "PCA")
    assert not plot.density.isChecked()
    with qtbot.waitSignal(plot.selection_changed) as signal:
        plot._on_lasso([tuple(coords[7] + 1e-4)])  # a click selects the nearest point
    assert signal.args[0].tolist() == [7]
    qtbot.wait(50)  # let the canvas's queued redraw run before the widget is deleted
