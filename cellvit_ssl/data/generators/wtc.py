"""WTC-11-like cell cycle: 3-channel single-cell crops from packed hiPSC colonies.

Every crop is one OME-TIFF ``(3, 64, 64)`` (nucleus, membrane, protein) centred on a cell
inside a colony: neighbours fill the crop and the membrane stain outlines all of them. The
label is the cell-cycle stage of the centre cell, seen mostly in the nucleus and the
membrane:

- ``g1``: a small nucleus with chromatin texture and nucleoli; a small cell;
- ``g2``: a larger nucleus and cell;
- ``prophase``: a round nucleus of condensed chromatin threads;
- ``metaphase``: a rounded, larger cell with the chromosomes in one plate (a bar);
- ``anaphase``: an elongated cell with two chromatin bands moving apart;
- ``telophase``: two daughters with small dense nuclei, the membrane pinched between them.

As in the Allen collection, each cell line (``batch``) tags one structure in the protein
channel (``tubulin``, ``lamin``, ``sec61`` or ``tom20``); how it looks depends on the line
and, in mitosis, on the stage. Scoring by leave-one-line-out asks for stage features that
hold whatever structure the protein channel shows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from cellvit_ssl.data.generators import GeneratedSet, balanced_labels, write_single_cells
from cellvit_ssl.data.generators._render import (
    acquire,
    blob,
    grid,
    network,
    puncta,
    radial_filaments,
    random_acquisition,
    ring,
    smooth_noise,
)

CHANNELS = ("nucleus", "membrane", "protein")
CLASSES = ("g1", "g2", "prophase", "metaphase", "anaphase", "telophase")
LINES = ("tubulin", "lamin", "sec61", "tom20")
SIZE = 64
MITOTIC = ("metaphase", "anaphase")
COLUMNS = ("path", "channels", "label", "label_id", "batch", "cell_line", "split", "cell_id")


def _bar(shape_yy: np.ndarray, shape_xx: np.ndarray, centre, angle: float, length: float, width: float) -> np.ndarray:
    """A soft rod (a metaphase plate) of ``length`` x ``width`` px."""
    dy, dx = shape_yy - centre[0], shape_xx - centre[1]
    along = dy * np.cos(angle) + dx * np.sin(angle)
    across = -dy * np.sin(angle) + dx * np.cos(angle)
    return np.exp(-(np.clip(np.abs(along) - length / 2, 0, None) ** 2) / 2 - (across / width) ** 2).astype(np.float32)


def _colony(rng: np.random.Generator, stage: str) -> tuple[np.ndarray, list, float, float]:
    """Label image of the centre cell (label 1, or 1 and 2 for telophase daughters) and neighbours.

    Cells are weighted Voronoi regions inside their blobs, so they pack like an epithelium.
    Returns the labels, the shapes of the centre cell(s), its radius and orientation.
    """
    yy, xx = grid(SIZE)
    c0 = (SIZE / 2 + rng.normal(0, 1.5), SIZE / 2 + rng.normal(0, 1.5))
    angle = rng.uniform(0, np.pi)
    r = rng.uniform(11, 14) * {"g1": 1.0, "g2": 1.2, "prophase": 1.2, "metaphase": 1.3, "anaphase": 1.3,
                               "telophase": 1.0}[stage]
    centres: list[tuple[tuple[float, float], float, float]] = []  # (centre, radius, elongation)
    if stage == "telophase":
        d = r * rng.uniform(0.75, 0.95)
        for sgn in (-1, 1):
            centres.append(((c0[0] + sgn * d * np.cos(angle), c0[1] + sgn * d * np.sin(angle)), r * 0.8, 0.9))
    elif stage == "anaphase":
        centres.append((c0, r, 0.7))
    else:
        centres.append((c0, r, 1.0 if stage in ("metaphase", "prophase") else rng.uniform(0.7, 1.0)))
    n_main = len(centres)
    for a in np.linspace(0, 2 * np.pi, int(rng.integers(5, 8)), endpoint=False) + rng.uniform(0, 1):
        rn = rng.uniform(10, 15)
        dist = r * 1.05 + rn * rng.uniform(0.85, 1.05) + (r * 0.8 if stage == "telophase" else 0)
        centres.append(((c0[0] + dist * np.sin(a), c0[1] + dist * np.cos(a)), rn, rng.uniform(0.7, 1.0)))
    shapes = [blob(rng, SIZE, c, rad, elongation=e, irregularity=0.12,
                   angle=angle if k < n_main else None) for k, (c, rad, e) in enumerate(centres)]
    rho = np.stack([s.rho for s in shapes])
    labels = rho.argmin(0) + 1
    labels[rho.min(0) >= 1.15] = 0  # gaps in the colony
    return labels, shapes[:n_main], r, angle


def _nucleus(rng: np.random.Generator, stage: str, main: list, r: float, angle: float, inside: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus stain of the centre cell and the mask where its chromatin sits."""
    yy, xx = grid(SIZE)
    c = main[0].centre if len(main) == 1 else ((main[0].centre[0] + main[1].centre[0]) / 2,
                                               (main[0].centre[1] + main[1].centre[1]) / 2)
    tex = smooth_noise(rng, SIZE, rng.uniform(1.2, 2.0))
    if stage in ("g1", "g2"):
        nr = r * rng.uniform(0.55, 0.65)
        nuc = blob(rng, SIZE, c, nr, elongation=rng.uniform(0.75, 1.0), irregularity=0.08, angle=angle).mask
        nucleoli = puncta(rng, nuc, int(rng.integers(1, 4)), 1.3, (0.8, 1.0))
        img = nuc * (0.5 + 0.5 * tex) * (1 - 0.6 * np.clip(nucleoli / max(nucleoli.max(), 1e-6), 0, 1))
    elif stage == "prophase":
        nuc = blob(rng, SIZE, c, r * rng.uniform(0.6, 0.7), elongation=0.95, irregularity=0.05).mask
        threads = network(rng, SIZE, rng.uniform(0.9, 1.3), sharpness=5)
        img = nuc * (0.25 + 1.2 * threads)
    elif stage == "metaphase":
        img = 1.3 * _bar(yy, xx, c, angle + np.pi / 2, r * rng.uniform(1.0, 1.4), r * rng.uniform(0.16, 0.24))
        img *= 0.7 + 0.6 * smooth_noise(rng, SIZE, 0.8)
        nuc = img > 0.2
    elif stage == "anaphase":
        sep = r * rng.uniform(0.35, 0.6)
        img = np.zeros((SIZE, SIZE), np.float32)
        for sgn in (-1, 1):
            cc = (c[0] + sgn * sep * np.cos(angle), c[1] + sgn * sep * np.sin(angle))
            img += 1.3 * _bar(yy, xx, cc, angle + np.pi / 2, r * rng.uniform(0.8, 1.1), r * 0.15)
        nuc = img > 0.2
    else:  # telophase: two small dense daughter nuclei
        img = np.zeros((SIZE, SIZE), np.float32)
        nuc = np.zeros((SIZE, SIZE), bool)
        for m in main:
            d = blob(rng, SIZE, m.centre, m.radius * rng.uniform(0.4, 0.5), elongation=0.8, irregularity=0.1).mask
            img += d * (1.0 + 0.4 * tex)
            nuc |= d
    return (img * inside).astype(np.float32), nuc & inside


def _protein(rng: np.random.Generator, line: str, stage: str, cell: np.ndarray, nuc: np.ndarray, main: list,
             r: float, angle: float) -> np.ndarray:
    """The tagged structure of this line in the centre cell."""
    yy, xx = grid(SIZE)
    cyto = cell & ~nuc
    c = main[0]
    if line == "tubulin":
        if stage in MITOTIC or stage == "prophase":  # spindle: filaments from two poles
            poles = [(c.centre[0] + sgn * r * 0.7 * np.cos(angle), c.centre[1] + sgn * r * 0.7 * np.sin(angle))
                     for sgn in (-1, 1)]
            if stage == "prophase":
                poles = [(c.centre[0] + r * 0.5 * np.sin(a), c.centre[1] + r * 0.5 * np.cos(a))
                         for a in rng.uniform(0, 2 * np.pi, 2)]
            p = sum(radial_filaments(rng, c, pole, 18, width=0.7, curl=0.1) for pole in poles)
            p = p * cell + sum(puncta(rng, cell & (np.hypot(yy - q[0], xx - q[1]) < 2.5), 1, 1.0) for q in poles)
        elif stage == "telophase":  # midbody between the daughters
            mid = ((main[0].centre[0] + main[1].centre[0]) / 2, (main[0].centre[1] + main[1].centre[1]) / 2)
            p = 0.4 * cell + 2.0 * _bar(yy, xx, mid, angle, r * 0.5, 1.2)
        else:
            p = cell * (radial_filaments(rng, c, c.centre, int(rng.integers(20, 35)), width=0.7) + 0.1)
    elif line == "lamin":
        if stage in MITOTIC:
            p = 0.4 * cell * (0.8 + 0.4 * smooth_noise(rng, SIZE, 3.0))
        else:  # the nuclear rim (of each daughter in telophase)
            lab, n = ndimage.label(nuc)
            p = np.zeros((SIZE, SIZE), np.float32)
            for k in range(1, n + 1):
                part = lab == k
                p += part & ~ndimage.binary_erosion(part, iterations=2)
            p = ndimage.gaussian_filter(p.astype(np.float32), 0.7) * 1.5
    elif line == "sec61":
        er = network(rng, SIZE, rng.uniform(1.1, 1.6), sharpness=6)
        p = cyto * er * (0.6 if stage in MITOTIC else 1.0) + (0.3 * cyto if stage in MITOTIC else 0)
    else:  # tom20: mitochondria, fragmented in mitosis
        if stage in MITOTIC or stage == "telophase":
            p = puncta(rng, cyto, int(rng.integers(25, 45)), 0.8)
        else:
            p = cyto * network(rng, SIZE, 1.2, sharpness=8) * (smooth_noise(rng, SIZE, 2.0) > 0.4) * 1.5
    return (np.exp(rng.uniform(np.log(0.3), 0)) * p).astype(np.float32)


def render_crop(rng: np.random.Generator, stage: int, line: int) -> np.ndarray:
    """One acquired crop ``(3, SIZE, SIZE)`` uint16 of a cell in ``stage`` from cell line ``line``."""
    name = CLASSES[stage]
    labels, main, r, angle = _colony(rng, name)
    centre_cell = np.isin(labels, [1, 2] if name == "telophase" else [1])
    dye = np.zeros((3, SIZE, SIZE), np.float32)
    nuc_img, nuc = _nucleus(rng, name, main, r, angle, centre_cell)
    dye[0] = nuc_img
    # neighbours: interphase nuclei of their own
    yy, xx = grid(SIZE)
    first = 3 if name == "telophase" else 2
    for k in range(first, int(labels.max()) + 1):
        cell = labels == k
        if cell.sum() < 20:
            continue
        cy, cx = (float(v.mean()) for v in np.nonzero(cell))
        n_mask = blob(rng, SIZE, (cy, cx), np.sqrt(cell.sum() / np.pi) * 0.6, elongation=0.85, irregularity=0.08).mask
        dye[0] += n_mask * cell * (0.5 + 0.5 * smooth_noise(rng, SIZE, 1.6))
        dye[2] += _protein(rng, LINES[line], "g1", cell, n_mask & cell, [blob(rng, SIZE, (cy, cx), 12.0)], 12.0,
                           0.0) * 0.8
    # membrane: every cell's outline, thicker where a mitotic cell has rounded up
    edges = np.zeros((SIZE, SIZE), bool)
    for axis in (0, 1):
        diff = np.diff(labels, axis=axis) != 0
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, 1)
        edges |= np.pad(diff, pad)
    membrane = ndimage.gaussian_filter(edges.astype(np.float32), 0.6) * 1.8
    if name in MITOTIC:
        membrane += 0.8 * ring(main[0], 0.85, 1.05) * centre_cell
    dye[1] = membrane * (labels > 0) * (0.7 + 0.6 * smooth_noise(rng, SIZE, 3.0)) + 0.05 * (labels > 0)
    dye[2] += _protein(rng, LINES[line], name, centre_cell, nuc, main, r, angle)
    acq = random_acquisition(rng, len(CHANNELS), background=(0.01, 0.05), photons=(100, 500))
    return acquire(rng, dye, acq)


def generate(out_dir: str | Path, *, seed: int = 0, n_cells: int | None = None) -> GeneratedSet:
    """Write ``n_cells`` single-cell crops (default 960, a third held out) and their index.

    Args:
        out_dir: Folder for ``images/`` and ``index.csv`` (created).
        seed: Random seed; the output is a function of ``(seed, n_cells)``.
        n_cells: Number of crops, split 2:1 into ``train`` / ``test``; stages and lines balanced.
    """
    n = 960 if n_cells is None else int(n_cells)
    rng = np.random.default_rng([seed, 11])
    stages = balanced_labels(rng, n, len(CLASSES))

    def render(i: int, stage: int) -> tuple[np.ndarray, dict]:
        line = i % len(LINES)
        return render_crop(rng, stage, line), {"batch": LINES[line], "cell_line": LINES[line]}

    return write_single_cells(out_dir, "wtc", CHANNELS, CLASSES, COLUMNS, stages, render)
