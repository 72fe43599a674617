"""Curation benchmark: acceptance on a synthetic screen, and scale on 1,000,000 feature rows.

    python -m benchmarks.curation acceptance [--workdir DIR] [--json benchmarks/results/curation_acceptance.json]
    python -m benchmarks.curation scale --rows 1000000 --dim 384 [--backends sklearn faiss] [--threads 2]

``acceptance`` renders a synthetic screen: 4-channel cell crops (nucleus, microtubules, ER,
protein) of five conditions with a 20:1 imbalance (one "control" condition, four rare ones
that differ in morphology), written as an OME-TIFF mosaic with one index row per crop box.
It then injects near-duplicates: exact copies (the same row again), re-imaged copies (the
same clean cell with new photon noise), flips (left-right or up-down) and 1-px shifts (the
crop box moved by one pixel). The index handed to ``python -m cellvit_ssl.curate`` has no
label or injection column, so curation never sees them; they are joined back to score it:

- duplicates removed: of every group (a cell and its injected copies), all copies but one
  dropped, over all injected copies (goal ≥ 95 %);
- distinct rows removed: rows without copies dropped, plus groups dropped entirely, over the
  number of distinct cells (goal ≤ 1 %);
- largest / smallest class among the rows selected by balanced sampling (goal ≤ 3:1), beside
  a random sample of the same size and balanced sampling over a single flat k-means level.

``scale`` writes 1,000,000 × 384 float32 features (a Gaussian mixture of unequal clusters
with 1 % near-duplicates) as an ``embed``-style ``.h5ad`` with its index, then curates it once
per backend in a fresh process, recording wall time and peak resident memory (ru_maxrss).

Both print a table and write JSON under ``benchmarks/results/``. Pre-training on a curated
index against the uncurated one is :mod:`benchmarks.curation_pretrain`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import format_table, versions, write_json

CLASSES = ("control", "elongated", "small", "binucleate", "punctate")
CHANNELS = ("nucleus", "microtubules", "er", "protein")
FIELD, CROP = 160, 48  # field side; crop side around each cell centre
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- synthetic screen
def _ellipse(yy, xx, cy, cx, a, b, angle):
    dy, dx = yy - cy, xx - cx
    u = (dy * np.cos(angle) + dx * np.sin(angle)) / a
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) / b
    return np.sqrt(u**2 + v**2)


def _add_cell(rng: np.random.Generator, img: np.ndarray, kind: str, cy: float, cx: float) -> None:
    """Paint one cell of condition ``kind`` (random size, pose, texture) into ``img`` ``(4, H, W)``."""
    from scipy import ndimage

    size = img.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    s = rng.uniform(0.85, 1.15)
    a, b = {"control": (14, 12), "elongated": (21, 8), "small": (8, 7), "binucleate": (17, 13),
            "punctate": (14, 12)}[kind]
    r_cell = _ellipse(yy, xx, cy, cx, a * s, b * s, angle)
    body = r_cell < 1
    along = (np.cos(angle), np.sin(angle))  # the major axis, as (dy, dx)
    if kind == "binucleate":
        nuclei = [(cy + 7 * s * along[0], cx + 7 * s * along[1], 5 * s),
                  (cy - 7 * s * along[0], cx - 7 * s * along[1], 5 * s)]
    elif kind == "elongated":
        nuclei = [(cy - 6 * s * along[0], cx - 6 * s * along[1], 5 * s)]
    else:
        nuclei = [(cy, cx, {"small": 5.0, "control": 6.0, "punctate": 6.0}[kind] * s)]
    r_nuc = np.min([np.hypot(yy - y, xx - x) / r for y, x, r in nuclei], axis=0)
    nucleus = body & (r_nuc < 1)
    cyto = body & ~nucleus
    texture = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), rng.uniform(1.0, 2.0))
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
    img[0][nucleus] += rng.uniform(0.6, 1.0) * (0.5 + texture[nucleus])
    theta = np.arctan2(yy - cy, xx - cx)
    fibres = np.cos(int(rng.integers(8, 14)) * theta + rng.uniform(0, 2 * np.pi)) ** 6
    img[1][body] += rng.uniform(0.3, 0.5) * (0.3 + fibres[body]) * (1.1 - r_cell[body])
    img[2][cyto] += rng.uniform(0.3, 0.6) * np.exp(-1.2 * (r_nuc[cyto] - 1)) * (0.4 + 0.6 * texture[cyto])
    if kind == "small":
        img[3][nucleus] += rng.uniform(0.8, 1.2)
    elif kind == "punctate":
        ys, xs = np.nonzero(cyto)
        pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(10, 20))), replace=False)
        dots = np.zeros((size, size), np.float32)
        dots[ys[pick], xs[pick]] = rng.uniform(4, 8, size=len(pick))
        img[3] += ndimage.gaussian_filter(dots, 0.8)
    else:
        img[3][cyto] += rng.uniform(0.3, 0.5) * (0.4 + 0.9 * texture[cyto])
    img[3] += 0.05 * body


def render_field(rng: np.random.Generator, kind: str, size: int = FIELD, cells: int = 9
                 ) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A noise-free ``(4, size, size)`` field of one condition and its cell centres.

    Cells sit at least ``CROP / 2 + 2`` px from the border (their crops stay inside the field,
    even shifted by a pixel), close enough for neighbours to show in each other's crops, over
    an uneven background.
    """
    from scipy import ndimage

    img = np.zeros((4, size, size), np.float32)
    margin = CROP / 2 + 2
    centres: list[tuple[float, float]] = []
    for _ in range(cells * 40):
        if len(centres) == cells:
            break
        c = rng.uniform(margin, size - margin, size=2)
        if all(np.hypot(*(c - np.array(o))) > 20 for o in centres):
            centres.append((float(c[0]), float(c[1])))
    for cy, cx in centres:
        _add_cell(rng, img, kind, cy, cx)
    haze = ndimage.gaussian_filter(rng.random((4, size, size)).astype(np.float32), (0, 6, 6))
    img += 0.03 * (haze - haze.mean()) / haze.std()  # uneven background: debris, out-of-focus light
    return ndimage.gaussian_filter(np.clip(img, 0, None), sigma=(0, 0.7, 0.7)), centres


def _acquire(rng: np.random.Generator, clean: np.ndarray) -> np.ndarray:
    """Photon noise of one acquisition of a clean field."""
    return np.clip(rng.poisson(clean * 300 + 20), 0, 65535).astype(np.uint16)


def make_screen(folder: str | Path, counts: tuple[int, ...] = (2000, 100, 100, 100, 100), copies: int = 400,
                seed: int = 0) -> tuple[Path, pd.DataFrame]:
    """Render the synthetic screen with injected near-duplicates into ``folder``.

    Every field holds cells of one condition; fields are tiles of one tiled OME-TIFF mosaic
    and each index row is a cell centre (crops of :data:`CROP` px around it).

    Args:
        folder: Output folder (``screen.ome.tif`` and ``index.csv``).
        counts: Distinct cells per condition (:data:`CLASSES` order).
        copies: Injected copies, a quarter of each kind (exact, reimaged, flip, shift), of
            cells drawn at random. A re-imaged copy is a second acquisition of the cell's
            field (new photon noise); a flip comes from the field flipped left-right or
            up-down; a shift moves the crop centre by one pixel.
        seed: Generator seed.

    Returns:
        ``(index path, truth)``: the index holds only ``path``, ``channels``, the centre and
        ``plate``; ``truth`` adds ``label``, ``injected`` (kind or empty) and ``cell`` (the
        distinct cell a row shows), row for row.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean, fields, cells = [], [], []  # cells: (field, y, x, label)
    for label, count in enumerate(counts):
        made = 0
        while made < count:
            image, centres = render_field(rng, CLASSES[label])
            centres = centres[: count - made]
            clean.append(image)
            fields.append(_acquire(rng, image))
            cells += [(len(fields) - 1, y, x, label) for y, x in centres]
            made += len(centres)
    rows = [{"field": f, "y": y, "x": x, "cell": i, "injected": ""} for i, (f, y, x, _) in enumerate(cells)]
    kinds = np.array(["exact", "reimaged", "flip", "shift"])[np.arange(copies) % 4]
    for kind, cell in zip(kinds, rng.integers(0, len(cells), size=copies)):
        f, y, x, _ = cells[cell]
        if kind == "reimaged":
            fields.append(_acquire(rng, clean[f]))
            f = len(fields) - 1
        elif kind == "flip":
            # the centre mirrored so that the crop box is exactly the mirrored box (no shift)
            if rng.random() < 0.5:
                fields.append(np.ascontiguousarray(fields[f][:, :, ::-1]))
                y, x = round(y), FIELD - round(x)
            else:
                fields.append(np.ascontiguousarray(fields[f][:, ::-1]))
                y, x = FIELD - round(y), round(x)
            f = len(fields) - 1
        elif kind == "shift":
            dy, dx = [(1, 0), (-1, 0), (0, 1), (0, -1)][int(rng.integers(4))]
            y, x = y + dy, x + dx
        rows.append({"field": f, "y": y, "x": x, "cell": int(cell), "injected": kind})
    per_row = 16
    grid_rows = -(-len(fields) // per_row)
    mosaic = np.zeros((4, grid_rows * FIELD, per_row * FIELD), np.uint16)
    for i, field in enumerate(fields):
        gy, gx = divmod(i, per_row)
        mosaic[:, gy * FIELD : (gy + 1) * FIELD, gx * FIELD : (gx + 1) * FIELD] = field
    tifffile.imwrite(folder / "screen.ome.tif", mosaic, ome=True, tile=(128, 128),  # tiles: fast crop reads
                     metadata={"axes": "CYX", "Channel": {"Name": list(CHANNELS)}})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)  # copies anywhere
    gy, gx = np.divmod(table["field"].to_numpy(), per_row)
    index = pd.DataFrame({"path": "screen.ome.tif", "channels": ";".join(CHANNELS),
                          "centroid_y": np.round(gy * FIELD + table["y"].to_numpy(), 2),
                          "centroid_x": np.round(gx * FIELD + table["x"].to_numpy(), 2),
                          "plate": np.array(["P1", "P2", "P3", "P4"])[rng.integers(0, 4, len(table))]})
    path = folder / "index.csv"
    index.to_csv(path, index=False)
    labels = np.array([c[3] for c in cells])
    truth = index.assign(label=np.array(CLASSES)[labels[table["cell"]]], injected=table["injected"].to_numpy(),
                         cell=table["cell"].to_numpy())
    return path, truth


def score(truth: pd.DataFrame, curated_all: pd.DataFrame) -> dict:
    """Duplicate / distinct removal rates and class balance of a curation of the screen."""
    dropped = (curated_all["dropped_by"].fillna("") == "duplicate").to_numpy()
    cells = truth["cell"].to_numpy()
    group_size = np.bincount(cells)
    kept_per_cell = np.bincount(cells, weights=~dropped, minlength=len(group_size)).astype(int)
    shown = group_size > 0
    grouped = shown & (group_size > 1)
    copies = int((group_size[grouped] - 1).sum())
    removed = int((group_size[grouped] - np.maximum(kept_per_cell[grouped], 1)).sum())
    lost = int((shown & (kept_per_cell == 0)).sum())
    by_kind = {}
    for kind in ("exact", "reimaged", "flip", "shift"):
        rows = np.flatnonzero(truth["injected"].to_numpy() == kind)
        # a copy counts as caught when it, or every other member of its group but one, was dropped
        caught = [dropped[r] or (kept_per_cell[cells[r]] <= 1) for r in rows]
        by_kind[kind] = {"injected": len(rows), "caught": int(np.sum(caught))}
    selected = curated_all["selected_by"].fillna("").to_numpy() == "balanced"
    return {"injected_copies": copies, "copies_removed": removed, "copies_removed_pct": 100 * removed / copies,
            "distinct_cells": int(shown.sum()), "distinct_removed": lost,
            "distinct_removed_pct": 100 * lost / int(shown.sum()), "by_kind": by_kind,
            "balanced": _class_counts(truth["label"].to_numpy()[selected])}


def _class_counts(labels: np.ndarray) -> dict:
    counts = {c: int((labels == c).sum()) for c in CLASSES}
    present = [v for v in counts.values()]
    return {"counts": counts, "ratio": max(present) / max(min(present), 1) if present else None}


def _curate(index: Path, features: str, out: Path, target: int, levels: list[int], threshold: float, backend: str,
            seed: int, extra: tuple[str, ...] = ()):
    from cellvit_ssl.curate import load_curate_config, output_paths, run

    cfg = load_curate_config(None, [f"data.index={index}", f"curate.features={features}", f"curate.out={out}",
                                    f"curate.target_size={target}", f"curate.clusters={levels}",
                                    f"curate.dedup.threshold={threshold}", f"curate.backend={backend}",
                                    "curate.progress=false", "curate.overwrite=true", "curate.keep_cache=true",
                                    f"curate.seed={seed}", *extra])
    paths = output_paths(out)  # a benchmark always recomputes: no finished output, no cached stages
    paths["summary"].unlink(missing_ok=True)
    shutil.rmtree(paths["partial"], ignore_errors=True)
    t = time.perf_counter()
    result = run(cfg)
    return result, time.perf_counter() - t


def _baselines(result, labels: np.ndarray, target: int, backend: str, seed: int, poses: np.ndarray | None) -> dict:
    """Class counts of a random sample and of balanced sampling over one flat k-means level (same rows)."""
    from cellvit_ssl.curate_search import make_search
    from cellvit_ssl.curate_select import FeatureMatrix, balanced_sample, hierarchical_kmeans

    all_rows = pd.read_csv(result.files["all_rows"])
    kept = np.flatnonzero(all_rows["dropped_by"].fillna("").to_numpy() != "duplicate")
    random_pick = np.random.default_rng(seed).choice(kept, size=target, replace=False)
    feats = FeatureMatrix(np.load(Path(f"{result.out}.partial") / "features.npy", mmap_mode="r"), poses)
    flat_k = result.summary["levels"][0]["clusters"]
    flat = hierarchical_kmeans(feats, kept, [flat_k], make_search(backend), seed=seed)
    return {"random": _class_counts(labels[random_pick]),
            f"flat k-means [{flat_k}]": _class_counts(labels[kept[balanced_sample(flat, target, seed)]])}


def acceptance(workdir: str | Path, target: int = 500, clusters: list[list[int]] | None = None,
               backend: str = "auto", threshold: float = 0.95, seed: int = 0) -> dict:
    """Curate the synthetic screen from raw pixels, and a class-structured embedding, and score both."""
    from cellvit_ssl.curate_features import dihedral_poses

    workdir = Path(workdir)
    index, truth = make_screen(workdir / "screen", seed=seed)
    labels = truth["label"].to_numpy()
    pixels = []
    for levels in clusters or [[]]:
        out = workdir / f"pixels_{'-'.join(map(str, levels)) or 'auto'}.csv"
        result, seconds = _curate(index, "pixels", out, target, levels, threshold, backend, seed,
                                  ("data.sample_size=48",))
        scored = score(truth, pd.read_csv(result.files["all_rows"]))
        scored.update(clusters=[lv["clusters"] for lv in result.summary["levels"]], seconds=seconds,
                      nearest_similarity_quantiles=result.summary["dedup"]["nearest_similarity_quantiles"])
        pixels.append(scored)
    pixel_baselines = _baselines(result, labels, target, backend, seed, dihedral_poses(len(CHANNELS), 16))
    emb_index, emb_file, emb_labels = embedding_screen(workdir / "embedded", seed=seed)
    embedded = []
    for levels in clusters or [[]]:
        out = workdir / f"embedded_{'-'.join(map(str, levels)) or 'auto'}.csv"
        result, seconds = _curate(emb_index, str(emb_file), out, target, levels, threshold, backend, seed)
        all_rows = pd.read_csv(result.files["all_rows"])
        picked = all_rows["selected_by"].fillna("").to_numpy() == "balanced"
        embedded.append({"clusters": [lv["clusters"] for lv in result.summary["levels"]], "seconds": seconds,
                         "duplicates_removed": result.summary["rows"]["duplicates"],
                         "balanced": _class_counts(emb_labels[picked])})
    return {"benchmark": "curation_acceptance", "target_size": target, "dedup_threshold": threshold,
            "backend": result.summary["backend"], "index": str(index),
            "pixels": {"features": "raw pixels: 16x16 thumbnails, blur 2 px, compared in 8 poses",
                       "input_classes": _class_counts(labels[truth["injected"].to_numpy() == ""]),
                       "runs": pixels, "baselines": pixel_baselines},
            "embedded": {"features": "64-d Gaussian mixture: a centre per class, 8 sub-clusters each",
                         "input_classes": _class_counts(emb_labels), "runs": embedded,
                         "baselines": _baselines(result, emb_labels, target, backend, seed, None)}}


def embedding_screen(folder: str | Path, counts: tuple[int, ...] = (2000, 100, 100, 100, 100), dim: int = 64,
                     seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """Embeddings in which the conditions are separable, written like an ``embed`` output.

    Every condition is a cloud around its own centre made of 8 sub-clusters (so that the big
    condition is not one tight blob); row ``i`` of the ``.h5ad`` is row ``i`` of the index.

    Returns:
        ``(index path, embeddings path, label of each row)``.
    """
    import anndata

    from cellvit_ssl.embed_io import table_sha256

    rng = np.random.default_rng(seed + 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(len(counts)), counts)
    centres = 2.0 * rng.normal(size=(len(counts), dim))
    subs = centres[:, None] + rng.normal(size=(len(counts), 8, dim))
    x = subs[labels, rng.integers(0, 8, len(labels))] + rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    x, labels = x[order].astype(np.float32), labels[order]
    index = pd.DataFrame({"path": [f"field{i // 9:04d}.ome.tif" for i in range(len(labels))],
                          "centroid_y": np.round(rng.uniform(0, 1000, len(labels)), 2),
                          "centroid_x": np.round(rng.uniform(0, 1000, len(labels)), 2)})
    path = folder / "index.csv"
    index.to_csv(path, index=False)
    obs = index.copy()
    obs.index = obs.index.astype(str)
    h5 = folder / "embeddings.h5ad"
    anndata.AnnData(X=x, obs=obs, uns={"embed": {"fingerprint": json.dumps({"index_sha256": table_sha256(index)})}}
                    ).write_h5ad(h5)
    return path, h5, np.array(CLASSES)[labels]


# ----------------------------------------------------------------------------- scale
def write_features(folder: str | Path, rows: int, dim: int, seed: int = 0, block: int = 100_000) -> tuple[Path, Path]:
    """An ``embed``-style ``.h5ad`` of ``rows`` × ``dim`` float32 features and its index CSV, written block by block.

    Features are a mixture of 2,000 Gaussian clusters of Zipf-distributed sizes; 1 % of the
    rows are near-copies (similarity ≈ 0.999) of earlier rows.
    """
    import h5py
    from anndata.io import write_elem

    from cellvit_ssl.embed_io import table_sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = pd.DataFrame({"path": [f"plate{i % 20:02d}/field{i // 1000:05d}.ome.tif" for i in range(rows)],
                          "centroid_y": np.round(rng.uniform(0, 2048, rows), 2),
                          "centroid_x": np.round(rng.uniform(0, 2048, rows), 2)})
    index_path = folder / "index.csv"
    index.to_csv(index_path, index=False)
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, 2001)
    assignment = rng.choice(2000, size=rows, p=weights / weights.sum())
    h5 = folder / "features.h5ad"
    with h5py.File(h5, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        x = f.create_dataset("X", shape=(rows, dim), dtype="float32")
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            part = centres[assignment[start:stop]] + 0.7 * rng.normal(size=(stop - start, dim)).astype(np.float32)
            copy = rng.random(stop - start) < 0.01
            copy[0] = False
            if copy.any():
                src = np.maximum(np.flatnonzero(copy) - 1, 0)
                part[copy] = part[src] + 0.01 * rng.normal(size=(int(copy.sum()), dim)).astype(np.float32)
            x[start:stop] = part
        obs = index.copy()
        obs.index = obs.index.astype(str)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[str(i) for i in range(dim)]))
        write_elem(f, "uns", {"embed": {"fingerprint": json.dumps({"index_sha256": table_sha256(index)})}})
    return index_path, h5


def _scale_worker(index: str, features: str, out: str, backend: str, threads: int, target: int) -> dict:
    """One curation in this process; returns wall time, peak memory and counts (run by ``scale``)."""
    from cellvit_ssl.curate import load_curate_config, run

    cfg = load_curate_config(None, [f"data.index={index}", f"curate.features={features}", f"curate.out={out}",
                                    f"curate.target_size={target}", f"curate.backend={backend}",
                                    f"curate.threads={threads}", "curate.overwrite=true", "curate.progress=false"])
    t = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"backend": backend, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20,  # ru_maxrss is in KiB on Linux
            "rows": result.summary["rows"], "seconds": result.summary["seconds"],
            "clusters": [lv["clusters"] for lv in result.summary["levels"]]}


def scale(workdir: str | Path, rows: int, dim: int, backends: list[str], threads: int = 2) -> dict:
    """Write the features once, then curate them once per backend in a fresh process."""
    workdir = Path(workdir)
    t = time.perf_counter()
    index, features = write_features(workdir, rows, dim)
    made = time.perf_counter() - t
    results = []
    for backend in backends:
        load_before = os.getloadavg()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "benchmarks.curation", "_worker", str(index), str(features),
               str(workdir / f"curated_{backend}.csv"), backend, str(threads), str(rows // 5)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load_before"] = load_before
        result["load_after"] = os.getloadavg()
        results.append(result)
    return {"benchmark": "curation_scale", "rows": rows, "dim": dim, "threads": threads, "target_size": rows // 5,
            "features_file_gib": features.stat().st_size / 2**30, "write_features_s": made, "runs": results}


# ----------------------------------------------------------------------------- main
def _print_acceptance(result: dict) -> None:
    for part in ("pixels", "embedded"):
        section = result[part]
        rows = []
        for r in section["runs"]:
            rows.append({"clusters": str(r["clusters"]), "copies": r.get("copies_removed_pct"),
                         "distinct": r.get("distinct_removed_pct"), "ratio": r["balanced"]["ratio"],
                         "counts": "/".join(str(v) for v in r["balanced"]["counts"].values())})
        for name, b in section["baselines"].items():
            counts = "/".join(str(v) for v in b["counts"].values())
            rows.append({"clusters": name, "ratio": b["ratio"], "counts": counts})
        print(f"{part}: {section['features']}; input per class "
              + "/".join(str(v) for v in section["input_classes"]["counts"].values()))
        print(format_table(rows, [("clusters", "k-means levels", "s"), ("copies", "copies removed %", ".1f"),
                                  ("distinct", "distinct removed %", ".2f"), ("ratio", "largest/smallest", ".2f"),
                                  ("counts", "selected " + "/".join(CLASSES), "s")]))
        if part == "pixels":
            print("copies caught per kind:", {k: f"{v['caught']}/{v['injected']}"
                                              for k, v in section["runs"][0]["by_kind"].items()})


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        print(json.dumps(_scale_worker(*argv[1:5], int(argv[5]), int(argv[6]))))
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("acceptance")
    acc.add_argument("--workdir", default="/tmp/cellvit_curation_acceptance")
    acc.add_argument("--target", type=int, default=500)
    acc.add_argument("--threshold", type=float, default=0.95)
    acc.add_argument("--clusters", nargs="*", default=["auto"], help="level lists such as 100,20,5 (auto: the default)")
    acc.add_argument("--backend", default="auto")
    acc.add_argument("--json", default=str(RESULTS / "curation_acceptance.json"))
    sc = sub.add_parser("scale")
    sc.add_argument("--workdir", default="/tmp/cellvit_curation_scale")
    sc.add_argument("--rows", type=int, default=1_000_000)
    sc.add_argument("--dim", type=int, default=384)
    sc.add_argument("--backends", nargs="+", default=["sklearn", "faiss"])
    sc.add_argument("--threads", type=int, default=2)
    sc.add_argument("--json", default=str(RESULTS / "curation_scale.json"))
    args = parser.parse_args(argv)
    env = {"versions": versions(), "cpu_count": os.cpu_count(), "load_at_start": os.getloadavg()}
    if args.what == "acceptance":
        levels = [[] if c == "auto" else [int(v) for v in c.split(",")] for c in args.clusters]
        result = acceptance(args.workdir, args.target, levels, args.backend, args.threshold)
        _print_acceptance(result)
    else:
        result = scale(args.workdir, args.rows, args.dim, args.backends, args.threads)
        print(format_table(result["runs"], [("backend", "backend", "s"), ("wall_s", "wall s", ".1f"),
                                            ("cpu_s", "CPU s", ".1f"), ("peak_rss_gib", "peak RSS GiB", ".2f")]))
        for r in result["runs"]:
            print(r["backend"], "stages (s):", {k: round(v, 1) for k, v in r["seconds"].items()}, "rows:", r["rows"],
                  "load before/after:", r["load_before"], r["load_after"])
    result["env"] = {**env, "load_at_end": os.getloadavg()}
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
