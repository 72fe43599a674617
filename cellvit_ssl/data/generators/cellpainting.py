"""Cell-Painting-like treatments: 5-channel fields, several cells each, plates with batch effects.

Each field is one OME-TIFF ``(5, 160, 160)`` (nucleus, rna, er, agp, mito) holding about
eight cells of one well; the index has one row per cell with its nucleus centroid
(``cells`` mode). Every well gets one treatment, and every treatment changes several
channels at once, each cell responding with its own strength:

- ``control``: spread cells, actin stress fibres and cortex, a compact Golgi, tubular
  mitochondria, a perinuclear ER network, two to four nucleoli;
- ``tubulin_destabiliser``: cells round up, chromatin condenses, stress fibres vanish and
  the Golgi scatters into puncta (nucleus, agp);
- ``actin_disruptor``: actin collapses into aggregates, cells turn ragged, many are
  binucleate (agp, nucleus);
- ``mito_uncoupler``: mitochondria fragment and cluster around the nucleus, the ER loses
  its fine network (mito, er);
- ``er_stress``: the ER swells into bright sheets, stress granules appear in the RNA stain
  and nucleoli shrink (er, rna);
- ``dna_damage``: cells and nuclei enlarge, micronuclei appear, nucleoli merge and the
  mitochondria hyperfuse (nucleus, rna, mito).

Three plates (``batch``, also ``plate``) differ in per-channel gain, background, an
illumination gradient and focus; every field adds its own small variation. A third of the
fields of every well are held out (``split`` = ``test``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellvit_ssl.data.generators import INDEX_NAME, GeneratedSet, write_index, write_ome_tiff
from cellvit_ssl.data.generators._render import (
    Acquisition,
    acquire,
    blob,
    grid,
    illumination_field,
    network,
    puncta,
    ring,
    smooth_noise,
)

CHANNELS = ("nucleus", "rna", "er", "agp", "mito")
CLASSES = ("control", "tubulin_destabiliser", "actin_disruptor", "mito_uncoupler", "er_stress", "dna_damage")
FIELD = 160
N_PLATES = 3
FIELDS_PER_WELL = 3
COLUMNS = ("path", "channels", "centroid_y", "centroid_x", "label", "label_id", "batch", "plate", "well", "field",
           "split", "cell_id")


def _place(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """Cell centres in a field, at least ~1.6 radii apart."""
    centres: list[tuple[float, float]] = []
    for _ in range(n * 60):
        if len(centres) == n:
            break
        c = rng.uniform(radius * 0.8, FIELD - radius * 0.8, 2)
        if all(np.hypot(c[0] - o[0], c[1] - o[1]) > 1.6 * radius for o in centres):
            centres.append((float(c[0]), float(c[1])))
    return centres


def _cell(rng: np.random.Generator, label: str, centre: tuple[float, float], s: float, free: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Dye image ``(5, FIELD, FIELD)`` of one cell of strength ``s`` on the ``free`` pixels.

    Returns the dye, the cell's mask and its nucleus centre.
    """
    radius, elong, irregular = rng.uniform(15, 21), rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.3)
    if label == "tubulin_destabiliser":
        radius, elong, irregular = radius * (1 - 0.25 * s), 1 - (1 - elong) * (1 - s), irregular * (1 - 0.7 * s)
    elif label == "actin_disruptor":
        irregular = irregular + 0.5 * s
    elif label == "dna_damage":
        radius = radius * (1 + 0.25 * s)
    body = blob(rng, FIELD, centre, radius, elongation=elong, irregularity=irregular)
    inside = body.mask & free
    n_r = radius * rng.uniform(0.38, 0.48) * (1 + 0.3 * s * (label == "dna_damage")) * (
        1 - 0.2 * s * (label == "tubulin_destabiliser"))
    a = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(0, 0.3) * radius
    nuc_c = (centre[0] + off * np.sin(a), centre[1] + off * np.cos(a))
    nuclei = [blob(rng, FIELD, nuc_c, n_r, elongation=rng.uniform(0.7, 1.0), irregularity=0.08)]
    if label == "actin_disruptor" and rng.random() < 0.7 * s:  # binucleate
        step = (0.8 * n_r * np.sin(a + 1.6), 0.8 * n_r * np.cos(a + 1.6))
        nuclei = [blob(rng, FIELD, (nuc_c[0] + d * step[0], nuc_c[1] + d * step[1]), n_r * 0.8,
                       elongation=rng.uniform(0.7, 1.0), irregularity=0.08) for d in (-1, 1)]
    nucleus = np.zeros_like(inside)
    for n in nuclei:
        nucleus |= n.mask
    nucleus &= inside
    cyto = inside & ~nucleus
    yy, xx = grid(FIELD)
    dist_nuc = np.hypot(yy - nuc_c[0], xx - nuc_c[1]) / max(radius, 1)
    dye = np.zeros((5, FIELD, FIELD), np.float32)

    # nucleus: chromatin; condensed (clumpy, bright) when mitotically arrested; micronuclei after damage
    fine = smooth_noise(rng, FIELD, 0.8)
    chrom = smooth_noise(rng, FIELD, 1.8)
    texture = (1 - s) * chrom + s * fine if label == "tubulin_destabiliser" else chrom
    condensed = label == "tubulin_destabiliser"
    gain = 1 + 0.8 * s if condensed else 1.0
    dye[0] = nucleus * rng.uniform(0.6, 0.9) * gain * (0.5 + 0.7 * texture ** (1 + 3 * s * condensed))
    if label == "dna_damage":
        dye[0] += cyto * np.clip(puncta(rng, cyto & (dist_nuc < 0.9), int(1 + 4 * s), 1.2), 0, 1)

    # rna: nucleoli + cytoplasmic RNA; stress granules; nucleoli shrink / merge
    n_nucleoli = {"dna_damage": 1, "er_stress": int(rng.integers(2, 6))}.get(label, int(rng.integers(2, 5)))
    sigma = {"dna_damage": 1.4 + 1.0 * s, "er_stress": 1.2 - 0.5 * s}.get(label, 1.3)
    nucleoli = puncta(rng, nucleus & (nuclei[0].rho < 0.6), n_nucleoli, sigma, (0.8, 1.2))
    dye[1] = np.clip(nucleoli, 0, 1.5) + 0.25 * cyto * (0.6 + 0.6 * chrom) + 0.1 * nucleus
    if label == "er_stress":
        dye[1] += s * np.clip(puncta(rng, cyto, int(rng.integers(8, 20)), 0.9), 0, 1.2)

    # er: perinuclear network; swollen sheets under ER stress, coarse under uncoupling
    er_sigma = 1.4 + {"er_stress": 1.6 * s, "mito_uncoupler": 0.8 * s}.get(label, 0.0)
    sharp = 6 - {"er_stress": 4.5 * s, "mito_uncoupler": 3.0 * s}.get(label, 0.0)
    er = network(rng, FIELD, er_sigma, sharpness=sharp)
    dye[2] = cyto * er * np.exp(-1.5 * dist_nuc) * (1.2 + (0.8 * s if label == "er_stress" else 0)) \
        + 0.3 * cyto * np.exp(-2.5 * dist_nuc)

    # agp: cortical actin + stress fibres along the long axis + a compact Golgi
    cortex = ring(body, 0.85, 1.02) * inside
    ang = rng.uniform(0, np.pi)
    stripes = np.cos((yy * np.cos(ang) - xx * np.sin(ang)) * rng.uniform(0.9, 1.4) + rng.uniform(0, 6.3)) ** 12
    fibres = 1.5 * stripes * smooth_noise(rng, FIELD, 4.0) * cyto
    golgi_c = (nuc_c[0] + 1.1 * n_r * np.sin(a + np.pi), nuc_c[1] + 1.1 * n_r * np.cos(a + np.pi))
    g_w = np.exp(-((yy - golgi_c[0]) ** 2 + (xx - golgi_c[1]) ** 2) / (2 * (0.22 * radius) ** 2))
    golgi = puncta(rng, cyto, int(rng.integers(8, 16)), 1.0, weights=g_w + 1e-5)
    scattered = puncta(rng, cyto, int(rng.integers(10, 20)), 0.9)
    aggregates = puncta(rng, inside, int(rng.integers(6, 14)), 1.3, (1.0, 1.6))
    if label == "tubulin_destabiliser":
        dye[3] = (1 + 0.5 * s) * cortex + (1 - s) * (0.7 * fibres + golgi) + s * scattered
    elif label == "actin_disruptor":
        dye[3] = (1 - 0.7 * s) * (cortex + 0.7 * fibres) + s * aggregates + golgi
    else:
        dye[3] = cortex + 0.7 * fibres + golgi
    dye[3] += 0.05 * inside

    # mito: tubular network; fragmented and perinuclear when uncoupled; hyperfused after damage
    tub = network(rng, FIELD, 1.2 + (0.8 * s if label == "dna_damage" else 0), sharpness=8)
    segments = smooth_noise(rng, FIELD, 2.0) > 0.45 - (0.25 * s if label == "dna_damage" else 0)
    mito = tub * segments * np.exp(-0.8 * dist_nuc)
    if label == "mito_uncoupler":
        dots = puncta(rng, cyto, int(rng.integers(25, 50)), 0.9, weights=np.exp(-3.0 * dist_nuc))
        mito = (1 - s) * mito + s * 1.3 * dots
    dye[4] = cyto * 2.5 * mito

    return dye * inside, inside, nuc_c


def _plate_acquisition(rng: np.random.Generator) -> dict:
    return {"gain": np.exp(rng.uniform(np.log(0.5), np.log(2.0), len(CHANNELS))),
            "background": rng.uniform(0.005, 0.04, len(CHANNELS)),
            "illumination": rng.uniform(0.2, 0.6),
            "illumination_seed": int(rng.integers(1 << 30)),
            "blur": rng.uniform(0.6, 1.5),
            "photons": float(np.exp(rng.uniform(np.log(150), np.log(600))))}


def render_field(rng: np.random.Generator, label: int, plate: dict, n_cells: int) -> tuple[np.ndarray, list[dict]]:
    """One acquired field ``(5, FIELD, FIELD)`` uint16 and its cells' centroids."""
    free = np.ones((FIELD, FIELD), bool)
    dye = np.zeros((5, FIELD, FIELD), np.float32)
    cells = []
    for centre in _place(rng, n_cells, 18.0):
        s = rng.uniform(0.6, 1.0) if label else 0.0
        cell, mask, nuc_c = _cell(rng, CLASSES[label], centre, s, free)
        if mask.sum() < 150:  # squeezed out by its neighbours
            continue
        dye += cell
        free &= ~mask
        cells.append({"centroid_y": round(nuc_c[0] + rng.normal(0, 1.0), 2),
                      "centroid_x": round(nuc_c[1] + rng.normal(0, 1.0), 2)})
    illum = illumination_field(np.random.default_rng(plate["illumination_seed"]), FIELD, plate["illumination"])
    jitter = np.exp(rng.normal(0, 0.1, len(CHANNELS)))
    acq = Acquisition(gain=(plate["gain"] * jitter).astype(np.float32),
                      background=plate["background"].astype(np.float32),
                      illumination=illum, photons=plate["photons"] * float(np.exp(rng.normal(0, 0.2))),
                      read_noise=float(rng.uniform(1, 5)), blur=plate["blur"] + float(rng.uniform(-0.1, 0.1)))
    return acquire(rng, dye, acq), cells


def generate(out_dir: str | Path, *, seed: int = 0, n_cells: int | None = None) -> GeneratedSet:
    """Write plates of fields (default about 1000 cells, a third held out) and their index.

    Args:
        out_dir: Folder for ``images/`` and ``index.csv`` (created).
        seed: Random seed; the output is a function of ``(seed, n_cells)``.
        n_cells: About how many cells in all (8 per field; whole wells of
            ``FIELDS_PER_WELL`` fields, at least one well per plate and treatment).
    """
    n = 1000 if n_cells is None else int(n_cells)
    wells = max(1, round(n / (8 * FIELDS_PER_WELL * N_PLATES * len(CLASSES))))
    per_field = 8 if n_cells is None or n >= 8 * FIELDS_PER_WELL * N_PLATES * len(CLASSES) else max(
        2, round(n / (FIELDS_PER_WELL * N_PLATES * len(CLASSES))))
    out = Path(out_dir)
    rng = np.random.default_rng([seed, 5])
    rows, cell_id = [], 0
    for p in range(N_PLATES):
        plate = _plate_acquisition(rng)
        for label in range(len(CLASSES)):
            for w in range(wells):
                well = f"p{p}_{CLASSES[label]}_{w}"
                for f in range(FIELDS_PER_WELL):
                    image, cells = render_field(rng, label, plate, per_field)
                    rel = f"images/{well}_f{f}.ome.tif"
                    write_ome_tiff(out / rel, image, CHANNELS)
                    for c in cells:
                        rows.append({"path": rel, "channels": ";".join(CHANNELS), **c, "label": CLASSES[label],
                                     "label_id": label, "batch": f"plate{p}", "plate": f"plate{p}", "well": well,
                                     "field": f, "split": "test" if f == FIELDS_PER_WELL - 1 else "train",
                                     "cell_id": cell_id})
                        cell_id += 1
    index = write_index(out / INDEX_NAME, rows, COLUMNS)
    return GeneratedSet("cellpainting", index, CHANNELS, "label", "batch", CLASSES)
