"""How the inspector's map keeps up with many points: draw, recolour and lasso times.

    xvfb-run -a python benchmarks/bench_napari_map.py [--sizes 50000 200000] [--out bench_napari_map.json]

Draw times force a full canvas draw (``canvas.draw()``), not the deferred ``draw_idle``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _measure(app, coords: np.ndarray, table) -> dict:
    from napari_plugin.plot import MapPlot

    plot = MapPlot()
    plot.resize(500, 500)
    plot.show()
    app.processEvents()
    times = {}
    steps = {
        "set_data_and_draw_s": lambda: plot.set_data(coords, table, "PCA"),
        "recolour_and_draw_s": lambda: plot.colour_by.setCurrentText("mean_protein"),
        "lasso_select_and_draw_s": lambda: plot._on_lasso([(-3, -3), (3, -3), (3, 9), (-3, 9)]),
    }
    for name, step in steps.items():
        t = time.perf_counter()
        step()
        plot.canvas.draw()
        times[name] = time.perf_counter() - t
    row = {"points": len(coords), "density_view": plot.density.isChecked(), **times, "selected": len(plot.selected)}
    if len(coords) <= 50_000:
        plot.density.setChecked(False)
        t = time.perf_counter()
        plot.canvas.draw()
        row["scatter_redraw_s"] = time.perf_counter() - t
    plot.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--out", default="bench_napari_map.json")
    args = parser.parse_args()

    import pandas as pd
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(0)
        coords = np.concatenate([rng.normal(c, 1.0, size=(n // 4, 2)) for c in ((0, 0), (6, 0), (0, 6), (6, 6))])
        table = pd.DataFrame({"KMEANS_CLUSTER_ID": pd.Categorical(np.repeat(np.arange(4), n // 4)),
                              "mean_protein": rng.random(len(coords)).astype(np.float32)})
        rows.append(_measure(app, coords, table))
    print(f"{'points':>9} {'density':>8} {'set+draw s':>11} {'recolour s':>11} {'lasso s':>8} {'selected':>9}")
    for r in rows:
        print(f"{r['points']:>9} {r['density_view']!s:>8} {r['set_data_and_draw_s']:>11.3f} "
              f"{r['recolour_and_draw_s']:>11.3f} {r['lasso_select_and_draw_s']:>8.3f} {r['selected']:>9}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
