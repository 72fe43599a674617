"""The Embedding inspector dock widget: load a model, run it on the image, link map and image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from cellvit_ssl.errors import CellVitSSLError, DataError
from napari_plugin._llvm import keep_triton_out_if_llvm_loaded
from napari_plugin.analysis import PREDICTION_COLUMN, Analysis, analyse, feature_overlay, ids_of_class
from napari_plugin.channel_map import LEAVE_OUT, UNMAPPED, resolve_mapping, suggest_mapping
from napari_plugin.compute import cosine_similarity_to, fov_region, keep_labels, label_at, paint_values
from napari_plugin.plot import MapPlot

TILES = "(tiles, no segmentation)"
DEFAULT_POOLING = "(model default)"
EMBEDDING_SUFFIXES = (".h5ad", ".zarr")
SELECTION_LAYER = "selection"
OVERLAY_LAYER = "PCA-RGB features"
SIMILARITY_LAYER = "cosine similarity"
TILES_LAYER = "tiles"
MAX_CHANNELS_PER_LAYER = 16


class InspectorWidget(QWidget):
    """Embedding inspector.

    Pick a checkpoint (or a precomputed ``.h5ad`` / ``.zarr`` embeddings file), map image
    layers to the model's channels, pick a Labels layer (or a tile size) and Run. The map
    appears below; lasso / click in it selects cells in the image, Shift-click on a cell in the
    image selects it in the map, a plain click on a cell shows the cosine similarity of every
    other cell to it. A classifier file (``classifier.pt`` from ``python -m cellvit_ssl.finetune``)
    works like a checkpoint and adds its predictions: the map is coloured by the predicted
    class, and *select class* selects the cells of one class.

    Args:
        napari_viewer: The viewer (injected by napari).
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        keep_triton_out_if_llvm_loaded()  # before anything imports torch's stack (see napari_plugin._llvm)
        self.viewer = napari_viewer
        self.encoder = None
        self.embeddings_path: Path | None = None
        self.result: Analysis | None = None
        self.labels_layer = None
        self.worker = None
        self.channel_boxes: dict[str, QComboBox] = {}
        self._channel_key = None
        self.selected_ids = np.zeros(0, np.int64)
        self._image_for_overlay: tuple[np.ndarray, list[str]] | None = None
        self._pending = (None, None)  # labels layer and image of the run in flight

        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("checkpoint.pt / teacher.pt, or embeddings .h5ad / .zarr")
        self.path_edit.editingFinished.connect(lambda: self.load_source(self.path_edit.text()))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        source_row = QHBoxLayout()
        source_row.addWidget(self.path_edit, 1)
        source_row.addWidget(browse)

        self.labels_box = QComboBox()
        self.labels_box.currentTextChanged.connect(self._on_labels_choice)
        self.tile_size = QSpinBox()
        self.tile_size.setRange(8, 4096)
        self.tile_size.setValue(64)
        self.tile_size.setSuffix(" px")
        self.pooling_box = QComboBox()
        self.pooling_box.setToolTip("How channels combine into one embedding: the model's default, all channel "
                                    "blocks, their mean, or one channel's block (e.g. protein for localisation)")
        self.channel_group = QGroupBox("Model channel ← image layer")
        self.channel_form = QFormLayout(self.channel_group)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.overlay_button = QPushButton("Overlay this view")
        self.overlay_button.setToolTip("PCA-RGB of the patch features of the visible part of the image")
        self.overlay_button.clicked.connect(self.update_overlay)
        self.export_button = QPushButton("Export selection…")
        self.export_button.clicked.connect(self._export_dialog)
        buttons = QHBoxLayout()
        for b in (self.run_button, self.cancel_button, self.overlay_button, self.export_button):
            buttons.addWidget(b)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("Pick a checkpoint or an embeddings file.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.plot = MapPlot()
        self.plot.selection_changed.connect(self._on_plot_selection)
        self.class_box = QComboBox()
        self.class_box.setToolTip("Select the cells the classifier assigns to this class")
        self.class_box.textActivated.connect(self.select_class)
        self.class_row = QWidget()
        class_layout = QHBoxLayout(self.class_row)
        class_layout.setContentsMargins(0, 0, 0, 0)
        class_layout.addWidget(QLabel("select class"))
        class_layout.addWidget(self.class_box, 1)
        self.class_row.setVisible(False)

        form = QFormLayout()
        form.addRow("model / embeddings", source_row)
        form.addRow("cells", self.labels_box)
        form.addRow("tile size", self.tile_size)
        form.addRow("embedding", self.pooling_box)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.channel_group)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.class_row)
        layout.addWidget(self.plot, 1)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.destroyed.connect(_disconnector(self.viewer, self._refresh_layers, self._on_mouse))
        self._refresh_layers()

    # ----------------------------------------------------------------- inputs
    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Checkpoint or embeddings", "",
                                              "cellvit_ssl files (*.pt *.pth *.h5ad *.zarr);;All files (*)")
        if path:
            self.path_edit.setText(path)
            self.load_source(path)

    def load_source(self, path: str) -> bool:
        """Load a checkpoint or classifier (or remember an embeddings file); False and a message on failure."""
        from cellvit_ssl import load_classifier, load_encoder
        from cellvit_ssl.checkpoint import CLASSIFIER_FORMAT, ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint

        path = path.strip()
        if not path:
            return False
        self.path_edit.setText(path)
        self.encoder, self.embeddings_path = None, None
        self._channel_key = None
        self.channel_boxes = {}
        p = Path(path).expanduser()
        try:
            if p.suffix in EMBEDDING_SUFFIXES:
                if not p.exists():
                    raise DataError(f"embeddings file {str(p)!r} does not exist")
                self.embeddings_path = p
                self._say(f"Embeddings file {p.name}: pick its Labels layer and Run.")
            else:
                payload = load_checkpoint(p, expect=(TRAINING_FORMAT, ENCODER_FORMAT, CLASSIFIER_FORMAT))
                if payload["format"] == CLASSIFIER_FORMAT:
                    self.encoder = load_classifier(p, payload=payload)
                    self._say(f"Classifier {p.name} ({self.encoder.mode}): classes {self.encoder.classes}; "
                              f"channels {self.encoder.channels}.")
                else:
                    self.encoder = load_encoder(p, payload=payload)
                    self._say(f"Model {p.name}: channels {self.encoder.channels}, embedding width "
                              f"{self.encoder.output_dim}.")
        except CellVitSSLError as exc:
            self._say(str(exc), error=True)
            self._rebuild_channels()
            return False
        self._rebuild_channels()
        return True

    def image_sources(self) -> dict[str, tuple]:
        """Channel sources in the viewer: ``{name: (layer, channel index or None)}``."""
        from napari.layers import Image

        sources = {}
        for layer in self.viewer.layers:
            if not isinstance(layer, Image) or layer.rgb:
                continue
            shape = layer.data[0].shape if layer.multiscale else layer.data.shape
            if len(shape) == 2:
                sources[layer.name] = (layer, None)
            elif len(shape) == 3 and shape[0] <= MAX_CHANNELS_PER_LAYER:
                names = layer.metadata.get("channel_names") or []
                for i in range(shape[0]):
                    label = f" {names[i]}" if len(names) == shape[0] else ""
                    sources[f"{layer.name} [{i}]{label}"] = (layer, i)
        for name in (OVERLAY_LAYER, SIMILARITY_LAYER):
            sources.pop(name, None)
        return sources

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Labels

        for layer in self.viewer.layers:  # a renamed layer may now name a channel (connecting twice is a no-op)
            layer.events.name.connect(self._refresh_layers)
        current = self.labels_box.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if isinstance(layer, Labels) and layer.name not in (SELECTION_LAYER, TILES_LAYER)]
        self.labels_box.blockSignals(True)
        self.labels_box.clear()
        self.labels_box.addItems([*names, TILES])
        self.labels_box.setCurrentText(current if current in names or current == TILES else
                                       (names[0] if names else TILES))
        self.labels_box.blockSignals(False)
        self._on_labels_choice(self.labels_box.currentText())
        self._rebuild_channels()

    def _on_labels_choice(self, text: str) -> None:
        self.tile_size.setEnabled(text == TILES)

    def _rebuild_channels(self) -> None:
        """Rebuild the channel table for the loaded model; choices still valid are kept."""
        sources = list(self.image_sources())
        key = (tuple(self.encoder.channels) if self.encoder else None, tuple(sources))
        if key == self._channel_key:
            return
        self._channel_key = key
        previous = self.mapping()
        while self.channel_form.rowCount():
            self.channel_form.removeRow(0)
        self.channel_boxes = {}
        self.channel_group.setVisible(self.encoder is not None)
        self._rebuild_pooling()
        if self.encoder is None:
            return
        for channel, choice in suggest_mapping(self.encoder.channels, sources).items():
            kept = previous.get(channel)
            box = QComboBox()
            box.addItems([UNMAPPED, LEAVE_OUT, *sources])
            box.setCurrentText(kept if kept in (LEAVE_OUT, *sources) else choice)
            self.channel_form.addRow(channel, box)
            self.channel_boxes[channel] = box

    def _rebuild_pooling(self) -> None:
        """Pooling choices of the loaded model: per-channel blocks exist for all variants but ``fixed``."""
        self.pooling_box.clear()
        self.pooling_box.addItem(DEFAULT_POOLING)
        if self.encoder is not None and self.encoder.config.model.variant != "fixed":
            self.pooling_box.addItems(["concat", "mean", *self.encoder.channels])
        self.pooling_box.setEnabled(self.pooling_box.count() > 1)

    def pooling(self) -> str | None:
        """The chosen pooling (None: the model's default)."""
        text = self.pooling_box.currentText()
        return None if text in ("", DEFAULT_POOLING) else text

    def mapping(self) -> dict[str, str]:
        """The current model channel → source choices."""
        return {c: box.currentText() for c, box in self.channel_boxes.items()}

    def _image_name(self, labels_layer) -> str:
        """The name of the image file the cells come from (to pick its rows from an embeddings file)."""
        from napari.layers import Image

        candidates = [labels_layer.source.path]
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                candidates += [layer.source.path, layer.metadata.get("source_path")]
        path = next((c for c in candidates if c), labels_layer.name)
        return Path(str(path)).name.split(".")[0]

    def _gather_image(self) -> tuple[np.ndarray, list[str], str]:
        sources = self.image_sources()
        names, channels = resolve_mapping(self.encoder.channels, self.mapping(), list(sources))
        planes = []
        for name in names:
            layer, index = sources[name]
            data = layer.data[0] if layer.multiscale else layer.data
            planes.append(np.asarray(data if index is None else data[index]))
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            raise DataError(f"the mapped image layers differ in size: {dict(zip(names, [p.shape for p in planes]))}")
        return np.stack(planes), channels, sources[names[0]][0].name

    # ----------------------------------------------------------------- running
    def run(self) -> bool:
        """Check the inputs and start the analysis in a worker thread; False (and a message) if refused."""
        from napari.qt.threading import thread_worker

        if self.worker is not None:
            self._say("A run is in progress; cancel it first.", error=True)
            return False
        if self.encoder is None and self.embeddings_path is None:
            if self.path_edit.text().strip() and not self.load_source(self.path_edit.text()):
                return False
            if self.encoder is None and self.embeddings_path is None:
                self._say("Pick a checkpoint (.pt) or an embeddings file (.h5ad / .zarr) first.", error=True)
                return False
        labels_name = self.labels_box.currentText()
        labels_layer = None if labels_name in ("", TILES) else self.viewer.layers[labels_name]
        try:
            image, channels, image_name, region = None, [], None, None
            if self.encoder is not None:
                image, channels, image_name = self._gather_image()
                region = self._visible_region(image.shape[-2:])
            elif labels_layer is None:
                raise DataError("precomputed embeddings need a Labels layer to place the cells in the image")
            labels = None if labels_layer is None else np.asarray(labels_layer.data)
            if labels is not None and labels.ndim != 2:
                raise DataError(f"Labels layer {labels_name!r} is {labels.ndim}-D; the inspector needs a 2-D "
                                "segmentation")
            if self.encoder is None:
                image_name = self._image_name(labels_layer)
        except CellVitSSLError as exc:
            self._say(str(exc), error=True)
            return False
        existing = None if labels_layer is None else labels_layer.features
        encoder, tile = self.encoder, (None if labels_layer is not None else self.tile_size.value())
        pooling = self.pooling()
        precomputed = self.embeddings_path

        @thread_worker(progress=False)
        def work():
            try:
                result = yield from analyse(encoder, image, channels, labels=labels, tile_size=tile,
                                            precomputed=precomputed, image_name=image_name, existing=existing,
                                            pooling=pooling)
                overlay = None if encoder is None else feature_overlay(encoder, image, channels, region)
            except CellVitSSLError as exc:  # a user mistake: a message, not napari's traceback pop-up
                return None, None, str(exc)  # (a returned exception would be re-raised by the worker)
            return result, overlay, None

        self._pending = (labels_layer, (image, channels) if image is not None else None)
        self.worker = work()
        self.worker.yielded.connect(lambda p: self.progress.setValue(int(round(100 * p))))
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.aborted.connect(lambda: self._say("Cancelled; the viewer is unchanged."))
        self.worker.finished.connect(self._on_finished)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self._say("Running…")
        self.worker.start()
        return True

    def cancel(self) -> None:
        """Stop the running analysis at its next chunk."""
        if self.worker is not None:
            self.worker.quit()

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, CellVitSSLError):
            self._say(str(exc), error=True)
        else:
            self._say(f"Unexpected error ({type(exc).__name__}): {exc}", error=True)

    def _on_done(self, value) -> None:
        result, overlay, error = value
        if error is not None:
            self._say(error, error=True)
            return
        self.result = result
        self.labels_layer, self._image_for_overlay = self._pending
        for stale in (SELECTION_LAYER, SIMILARITY_LAYER):
            if stale in self.viewer.layers:
                self.viewer.layers.remove(stale)
        if result.tiled:
            self.labels_layer = self._set_layer(TILES_LAYER, result.labels, "labels", opacity=0.2)
        self.labels_layer.features = result.features
        if overlay is not None:
            self._show_overlay(*overlay)
        self.selected_ids = np.zeros(0, np.int64)
        colour = PREDICTION_COLUMN if result.classes else "KMEANS_CLUSTER_ID"
        self.plot.set_data(result.coords, result.features, result.method, colour=colour)
        self.class_box.clear()
        self.class_box.addItems(result.classes or [])
        self.class_row.setVisible(bool(result.classes))
        kind = "tiles" if result.tiled else "cells"
        self._say(f"{len(result.label_ids)} {kind} embedded ({result.embeddings.shape[1]}-D); map: {result.method}; "
                  f"features written to layer {self.labels_layer.name!r}. Lasso in the map, Shift-click cells in "
                  "the image, click a cell for its similarity.")

    def _visible_region(self, shape) -> tuple[int, int, int, int]:
        layer = next((layer for layer, _ in self.image_sources().values()), None)
        corners = getattr(layer, "corner_pixels", None)
        if corners is not None and not np.any(np.asarray(corners)[1, -2:] > 0):
            corners = None
        return fov_region(corners, tuple(shape), self.encoder.input_size if self.encoder else 32)

    def update_overlay(self) -> bool:
        """Recompute the PCA-RGB overlay for the part of the image now in view."""
        if self.encoder is None or self._image_for_overlay is None:
            self._say("Run with a checkpoint first; the overlay needs the model's patch features.", error=True)
            return False
        image, channels = self._image_for_overlay
        try:
            self._show_overlay(*feature_overlay(self.encoder, image, channels, self._visible_region(image.shape[-2:])))
        except CellVitSSLError as exc:
            self._say(str(exc), error=True)
            return False
        return True

    def _show_overlay(self, rgb, scale, translate) -> None:
        layer = self._set_layer(OVERLAY_LAYER, rgb, "image", rgb=True, opacity=0.5)
        layer.scale, layer.translate = scale, translate

    # ----------------------------------------------------------------- linking
    def _on_plot_selection(self, rows: np.ndarray) -> None:
        if self.result is None:
            return
        self._select(self.result.label_ids[np.asarray(rows, np.int64)], from_plot=True)

    def select_cells(self, ids) -> None:
        """Select cells by label id, as a Shift-click in the image does: highlight layer and map."""
        self._select(np.asarray(list(ids), np.int64), from_plot=False)

    def _select(self, ids: np.ndarray, from_plot: bool) -> None:
        self.selected_ids = np.unique(ids)
        highlight = keep_labels(self.result.labels, self.selected_ids)
        from napari.utils.colormaps import DirectLabelColormap

        layer = self._set_layer(SELECTION_LAYER, highlight, "labels", opacity=1.0)
        layer.colormap = DirectLabelColormap(color_dict={None: "yellow", 0: "transparent"})
        layer.contour = 2
        if not from_plot:
            self.plot.select_rows(self.result.rows_of(self.selected_ids), emit=False)
        self._say(f"{len(self.selected_ids)} selected: {self.selected_ids[:20].tolist()}"
                  f"{' …' if len(self.selected_ids) > 20 else ''}")
        self.viewer.layers.selection.active = self.labels_layer

    def select_class(self, name: str) -> bool:
        """Select the cells (or tiles) the loaded classifier assigns to class ``name``, in image and map."""
        if self.result is None or not self.result.classes:
            self._say("Run with a classifier first; its predictions pick the cells of a class.", error=True)
            return False
        try:
            ids = ids_of_class(self.result.features, name)
        except CellVitSSLError as exc:
            self._say(str(exc), error=True)
            return False
        self.select_cells(ids)
        self._say(f"{len(ids)} predicted {name}: {ids[:20].tolist()}{' …' if len(ids) > 20 else ''}")
        return True

    def show_similarity(self, label_id: int) -> bool:
        """Add/refresh the similarity layer: cosine similarity of every cell to ``label_id``."""
        if self.result is None:
            return False
        rows = self.result.rows_of([label_id])
        if rows.size == 0:
            return False
        sims = cosine_similarity_to(self.result.embeddings, int(rows[0]))
        image = paint_values(self.result.labels, self.result.label_ids, sims)
        layer = self._set_layer(SIMILARITY_LAYER, image, "image", colormap="inferno", opacity=0.7,
                                blending="translucent")
        layer.contrast_limits = (float(np.nanmin(sims)), float(np.nanmax(sims)) + 1e-6)
        layer.metadata["reference_label"] = int(label_id)
        layer.metadata["similarity"] = dict(zip(self.result.label_ids.tolist(), sims.tolist()))
        self.result.features["similarity"] = sims
        self.labels_layer.features = self.result.features
        self.plot.set_table(self.result.features)
        self.viewer.layers.selection.active = self.labels_layer
        self._say(f"Cosine similarity to {'tile' if self.result.tiled else 'cell'} {label_id}: "
                  f"min {sims.min():.2f}, max over others "
                  f"{np.delete(sims, rows[0]).max(initial=-1):.2f}.")
        return True

    def _on_mouse(self, viewer, event):
        if self.result is None:
            return
        active = viewer.layers.selection.active
        if active is not None and getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return
        yield
        if event.type == "mouse_move":
            return  # a drag pans the view; only a click picks a cell
        label_id = label_at(self.result.labels, self.labels_layer.world_to_data(event.position))
        if label_id == 0:
            return
        if "Shift" in event.modifiers:
            self.select_cells(np.setxor1d(self.selected_ids, [label_id]))
        else:
            self.show_similarity(label_id)

    # ----------------------------------------------------------------- export
    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export selection", "selection.csv",
                                              "CSV (*.csv);;AnnData (*.h5ad)")
        if path:
            self.export(path)

    def export(self, path: str | Path) -> bool:
        """Write the selected cells' features (CSV) or embeddings (AnnData .h5ad) to ``path``."""
        from napari_plugin.export import export_selection

        if self.result is None:
            self._say("Nothing to export yet: run the inspector first.", error=True)
            return False
        try:
            written = export_selection(self.result.features, self.selected_ids, path)
        except CellVitSSLError as exc:
            self._say(str(exc), error=True)
            return False
        self._say(f"Wrote {len(self.selected_ids)} rows to {written}.")
        return True

    # ----------------------------------------------------------------- helpers
    def _set_layer(self, name: str, data, kind: str, **kwargs):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            return layer
        return getattr(self.viewer, f"add_{kind}")(data, name=name, **kwargs)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #e06060;" if error else "")


def _disconnector(viewer, refresh, on_mouse):
    """A callback for ``destroyed`` that unhooks a closed widget from the viewer it watched."""

    def disconnect(*_):
        viewer.layers.events.inserted.disconnect(refresh)
        viewer.layers.events.removed.disconnect(refresh)
        for layer in viewer.layers:
            layer.events.name.disconnect(refresh)
        if on_mouse in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(on_mouse)

    return disconnect
