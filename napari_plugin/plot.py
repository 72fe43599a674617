"""The embedding map: a matplotlib scatter (or density image) in a Qt widget with lasso selection."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.widgets import LassoSelector
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from napari_plugin.compute import density_grid, nearest_point, points_in_polygon

#: From this many points on, the map opens as a density image instead of a scatter.
DENSITY_THRESHOLD = 10_000
#: At most this many selected points are drawn as rings in the scatter view (a random subset).
MAX_SELECTION_MARKERS = 5_000
DENSITY_BINS = 200
NO_COLOUR = "(none)"


class MapPlot(QWidget):
    """2-D map of the embeddings; lasso or click selects points, ``selection_changed`` says which.

    Signals:
        selection_changed(np.ndarray): row positions selected in the plot by the user (or by
            :meth:`select_rows` with ``emit=True``).
    """

    selection_changed = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.coords = np.zeros((0, 2), np.float32)
        self.table = pd.DataFrame()
        self.selected = np.zeros(0, np.int64)
        self.method = ""
        self.figure = Figure(figsize=(4, 4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax = self.figure.add_subplot(111)
        self.colour_by = QComboBox()
        self.colour_by.addItem(NO_COLOUR)
        self.colour_by.currentTextChanged.connect(lambda _: self.redraw())
        self.density = QCheckBox("density")
        self.density.setToolTip("Show point density (or the mean of the colour column) instead of every point")
        self.density.toggled.connect(lambda _: self.redraw())
        self.info = QLabel("")
        controls = QHBoxLayout()
        controls.addWidget(QLabel("colour by"))
        controls.addWidget(self.colour_by, 1)
        controls.addWidget(self.density)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(controls)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.info)
        self.lasso = LassoSelector(self.ax, self._on_lasso, useblit=False)
        self._draw_empty()

    def set_data(self, coords: np.ndarray, table: pd.DataFrame, method: str, colour: str | None = None) -> None:
        """Show new map coordinates; ``table`` (row-aligned) supplies the colour-by columns."""
        self.coords = np.asarray(coords, np.float32)
        self.method = method
        self.selected = np.zeros(0, np.int64)
        self.set_table(table, colour)
        self.density.blockSignals(True)
        self.density.setChecked(len(self.coords) >= DENSITY_THRESHOLD)
        self.density.blockSignals(False)
        self.redraw()

    def set_table(self, table: pd.DataFrame, colour: str | None = None) -> None:
        """Refresh the colour-by choices from a row-aligned table (keeps the current choice)."""
        self.table = table.reset_index(drop=True)
        current = colour or self.colour_by.currentText()
        columns = [c for c in self.table.columns if _colourable(self.table[c]) and not c.startswith("embedding_")
                   and c not in ("index", "label")]
        self.colour_by.blockSignals(True)
        self.colour_by.clear()
        self.colour_by.addItems([NO_COLOUR, *columns])
        if current in columns:
            self.colour_by.setCurrentText(current)
        self.colour_by.blockSignals(False)
        self.redraw()

    def select_rows(self, rows: np.ndarray, emit: bool = True) -> None:
        """Highlight rows; with ``emit`` also tell the viewer (as a user selection would)."""
        self.selected = np.unique(np.asarray(rows, np.int64))
        self._draw_selection()
        self.canvas.draw_idle()
        if emit:
            self.selection_changed.emit(self.selected)

    def _on_lasso(self, vertices) -> None:
        vertices = np.asarray(vertices)
        if len(self.coords) == 0:
            return
        span = np.ptp(self.coords, axis=0).max() or 1.0
        if len(vertices) < 3 or np.ptp(vertices, axis=0).max() < 0.01 * span:  # a click
            hit = nearest_point(self.coords, vertices[-1], 0.03 * span)
            rows = np.array([] if hit is None else [hit], np.int64)
        else:
            rows = np.flatnonzero(points_in_polygon(self.coords, vertices))
        self.select_rows(rows)

    def _values(self) -> np.ndarray | None:
        name = self.colour_by.currentText()
        if name == NO_COLOUR or name not in self.table.columns:
            return None
        column = self.table[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            return column.cat.codes.to_numpy(np.float32)
        return pd.to_numeric(column, errors="coerce").to_numpy(np.float32)

    def redraw(self) -> None:
        """Redraw points (or density) and the selection."""
        self.ax.clear()
        if len(self.coords) == 0:
            self._draw_empty()
            return
        values = self._values()
        categorical = (self.colour_by.currentText() in self.table.columns
                       and isinstance(self.table[self.colour_by.currentText()].dtype, pd.CategoricalDtype))
        cmap = "tab10" if categorical else "viridis"
        if self.density.isChecked():
            grid, extent = density_grid(self.coords, bins=DENSITY_BINS, values=values)
            self._extent = extent
            if values is None:
                grid = np.log1p(grid)
            self.ax.imshow(grid, origin="lower", extent=extent, aspect="auto", cmap="magma" if values is None else cmap,
                           interpolation="nearest")
        else:
            size = float(np.clip(3000 / max(len(self.coords), 1), 1, 30))
            self.ax.scatter(self.coords[:, 0], self.coords[:, 1], s=size, c="0.4" if values is None else values,
                            cmap=None if values is None else cmap, linewidths=0)
        self.ax.set_xlabel(f"{self.method} 1")
        self.ax.set_ylabel(f"{self.method} 2")
        self.ax.set_title(f"{len(self.coords)} objects", fontsize=9)
        self._selection_artist = None
        self._draw_selection()
        self.canvas.draw_idle()

    def _draw_selection(self) -> None:
        artist = getattr(self, "_selection_artist", None)
        if artist is not None:
            artist.remove()
        self._selection_artist = None
        if len(self.selected) and len(self.coords):
            pts = self.coords[self.selected]
            if self.density.isChecked():  # the bins holding selected points, in red over the density
                extent = self._extent
                grid, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=DENSITY_BINS,
                                            range=[extent[2:], extent[:2]])
                shown = np.ma.masked_equal(grid > 0, False)
                self._selection_artist = self.ax.imshow(shown, origin="lower", extent=extent, aspect="auto",
                                                        cmap="autumn", alpha=0.6, interpolation="nearest")
            else:
                if len(pts) > MAX_SELECTION_MARKERS:
                    pts = pts[np.random.default_rng(0).choice(len(pts), MAX_SELECTION_MARKERS, replace=False)]
                self._selection_artist = self.ax.scatter(pts[:, 0], pts[:, 1], s=40, facecolors="none",
                                                         edgecolors="red", linewidths=1.2)
        self.info.setText(f"{len(self.selected)} selected" if len(self.coords) else "")

    def _draw_empty(self) -> None:
        self.ax.text(0.5, 0.5, "Run the inspector to see the map", ha="center", va="center",
                     transform=self.ax.transAxes, fontsize=9, color="0.4")
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self._selection_artist = None
        self.canvas.draw_idle()


def _colourable(column: pd.Series) -> bool:
    return isinstance(column.dtype, pd.CategoricalDtype) or pd.api.types.is_numeric_dtype(column)
