"""HPA-like protein localisation: 4-channel single-cell crops, the label is where the protein sits.

Every crop is one OME-TIFF ``(4, 64, 64)`` (nucleus, microtubules, er, protein) centred on a
cell, often with a neighbour cut by the border (stained for the same protein, as in an HPA
well). The three reference channels vary from cell to cell (shape, size, texture, filament
count) but say nothing about the class; the protein channel's pattern is the class:

nuclear, nucleoli, cytosol, er, golgi, mitochondria, vesicles, plasma_membrane.

``nucleoli`` sit where the nucleus stain has its dark holes and ``er`` follows the ER
channel's own network, so some classes are clearer with the reference channels in view.
Expression varies tenfold over a nonspecific background; three imaging sessions
(``batch``) differ in gain, background and photon budget, and every image gets its own draw
around its session's settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellvit_ssl.data.generators import GeneratedSet, balanced_labels, write_single_cells
from cellvit_ssl.data.generators._render import (
    Shape,
    acquire,
    blob,
    network,
    puncta,
    radial_filaments,
    random_acquisition,
    ring,
    smooth_noise,
)

CHANNELS = ("nucleus", "microtubules", "er", "protein")
CLASSES = ("nuclear", "nucleoli", "cytosol", "er", "golgi", "mitochondria", "vesicles", "plasma_membrane")
SIZE = 64
#: Per-session imaging: (gain range, background range, photons range).
SESSIONS = (((0.5, 1.0), (0.01, 0.04), (150, 400)),
            ((0.8, 1.6), (0.03, 0.08), (300, 800)),
            ((0.6, 1.2), (0.02, 0.12), (100, 300)))
COLUMNS = ("path", "channels", "label", "label_id", "batch", "split", "cell_id")


def _cell(rng: np.random.Generator, label: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Dye image ``(4, SIZE, SIZE)`` of one cell."""
    body = blob(rng, SIZE, centre, radius, elongation=rng.uniform(0.55, 1.0), irregularity=rng.uniform(0.05, 0.3))
    n_r = radius * rng.uniform(0.45, 0.62)
    off = rng.uniform(0, radius - n_r * 1.2) * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    nuc = blob(rng, SIZE, (centre[0] + off[0], centre[1] + off[1]), n_r, elongation=rng.uniform(0.65, 1.0),
               irregularity=0.1)
    inside, nucleus = body.mask, nuc.mask & body.mask
    cyto = inside & ~nucleus
    out = np.zeros((4, SIZE, SIZE), np.float32)

    # nucleus: chromatin texture with dark nucleoli (DAPI is excluded from them)
    nucleoli_sites = nucleus & (nuc.rho < 0.6)
    n_nucleoli = int(rng.integers(1, 4))
    nucleoli = puncta(rng, nucleoli_sites, n_nucleoli, sigma=rng.uniform(1.0, 1.8), brightness=(0.8, 1.0))
    nucleoli = np.clip(nucleoli / max(float(nucleoli.max()), 1e-6), 0, 1) * nucleus
    chrom = smooth_noise(rng, SIZE, rng.uniform(0.8, 2.0))
    out[0] = nucleus * rng.uniform(0.6, 1.0) * (0.6 + 0.5 * chrom) * (1 - 0.7 * nucleoli)

    # microtubules: filaments from a centrosome next to the nucleus, plus a diffuse pool
    a = rng.uniform(0, 2 * np.pi)
    mtoc = (nuc.centre[0] + 1.1 * n_r * np.sin(a), nuc.centre[1] + 1.1 * n_r * np.cos(a))
    fil = radial_filaments(rng, body, mtoc, int(rng.integers(25, 45)), width=rng.uniform(0.6, 1.0))
    out[1] = inside * (rng.uniform(0.4, 0.8) * fil + 0.08)

    # ER: a reticular network dense at the nuclear envelope, thinning towards the rim
    er_net = network(rng, SIZE, rng.uniform(1.2, 2.2), sharpness=rng.uniform(4, 8))
    envelope = ring(nuc, 0.85, 1.15)
    decay = np.exp(-rng.uniform(1.0, 2.5) * np.clip(nuc.rho - 1.0, 0, None))
    out[2] = cyto * er_net * decay * rng.uniform(0.7, 1.0) + 0.25 * envelope * inside

    out[3] = _protein(rng, label, body, nuc, nucleus, cyto, nucleoli, out[2], mtoc)
    return out


def _protein(rng: np.random.Generator, label: int, body: Shape, nuc: Shape, nucleus: np.ndarray, cyto: np.ndarray,
             nucleoli: np.ndarray, er: np.ndarray, mtoc: tuple[float, float]) -> np.ndarray:
    """The protein channel: its pattern is the class, its level and texture are random."""
    size = body.rho.shape[0]
    tex = smooth_noise(rng, size, rng.uniform(0.7, 1.5))
    name = CLASSES[label]
    if name == "nuclear":
        p = nucleus * (1 - 0.8 * nucleoli) * (0.5 + 0.7 * tex)
    elif name == "nucleoli":
        p = 1.5 * nucleoli + 0.08 * nucleus
    elif name == "cytosol":
        p = cyto * (0.35 + 0.3 * tex) * (1 - rng.uniform(0, 0.5) * body.rho)
    elif name == "er":
        p = 1.4 * er * (0.8 + 0.4 * tex)
    elif name == "golgi":
        yy, xx = np.mgrid[0:size, 0:size]
        side = np.exp(-(((yy - mtoc[0]) ** 2 + (xx - mtoc[1]) ** 2) / (2 * (0.25 * body.radius) ** 2)))
        p = puncta(rng, cyto, int(rng.integers(8, 25)), sigma=rng.uniform(0.8, 1.3), weights=side + 1e-4)
    elif name == "mitochondria":
        worms = network(rng, size, rng.uniform(1.0, 1.6), sharpness=8) * (smooth_noise(rng, size, 2.0) > 0.45)
        p = cyto * 1.3 * worms
    elif name == "vesicles":
        p = puncta(rng, cyto, int(rng.integers(15, 50)), sigma=rng.uniform(0.6, 1.0))
    else:  # plasma membrane
        p = ring(body, rng.uniform(0.78, 0.9), 1.02) * (0.6 + 0.6 * tex)
    expression = np.exp(rng.uniform(np.log(0.15), np.log(1.5)))
    return (expression * p + 0.04 * body.mask).astype(np.float32)


def render_crop(rng: np.random.Generator, label: int, session: int) -> np.ndarray:
    """One acquired single-cell crop ``(4, SIZE, SIZE)`` uint16."""
    radius = rng.uniform(17, 26)
    centre = (SIZE / 2 + rng.normal(0, 3), SIZE / 2 + rng.normal(0, 3))
    dye = _cell(rng, label, centre, radius)
    if rng.random() < 0.6:  # a neighbour from the same well, cut by the border
        a = rng.uniform(0, 2 * np.pi)
        r2 = rng.uniform(17, 26)
        d = radius + r2 * rng.uniform(0.9, 1.2)
        other = _cell(rng, label, (centre[0] + d * np.sin(a), centre[1] + d * np.cos(a)), r2)
        dye = np.where(dye.sum(0, keepdims=True) > 0, dye, other)
    gain, background, photons = SESSIONS[session]
    acq = random_acquisition(rng, len(CHANNELS), gain=gain, background=background, photons=photons)
    return acquire(rng, dye, acq)


def generate(out_dir: str | Path, *, seed: int = 0, n_cells: int | None = None) -> GeneratedSet:
    """Write ``n_cells`` single-cell crops (default 960, a third held out) and their index.

    Args:
        out_dir: Folder for ``images/`` and ``index.csv`` (created).
        seed: Random seed; the output is a function of ``(seed, n_cells)``.
        n_cells: Number of crops, split 2:1 into ``train`` / ``test``, classes balanced.
    """
    n = 960 if n_cells is None else int(n_cells)
    rng = np.random.default_rng([seed, 13])
    labels = balanced_labels(rng, n, len(CLASSES))

    def render(i: int, label: int) -> tuple[np.ndarray, dict]:
        session = int(rng.integers(len(SESSIONS)))
        return render_crop(rng, label, session), {"batch": f"session{session}"}

    return write_single_cells(out_dir, "hpa", CHANNELS, CLASSES, COLUMNS, labels, render)
