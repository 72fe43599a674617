"""Synthetic HPA-like demo data: 4-channel fields of view with a known phenotype per cell.

Each field holds several cells. Every cell has a nucleus, radial microtubules, a perinuclear
ER cloud and a protein channel whose pattern is the cell's label (where the protein sits).
With ``DemoSpec(localisations=2)`` every cell's protein sits in two distinct places at once
(e.g. nuclear and punctate), a multi-label set whose ``label`` column lists both, ``;``-separated.
Images are written as OME-Zarr (NGFF 0.5, Zarr v3, with a ``labels`` segmentation) and as
OME-TIFF (plus a ``*_labels.tif`` mask), with an index CSV of one row per cell. Everything
is deterministic from the seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellvit_ssl.channels import PRESETS
from cellvit_ssl.errors import DataError
from cellvit_ssl.io import atomic_write_text, atomic_write_with, describe_os_error

#: Phenotype classes: where the protein sits in the cell.
PHENOTYPES: tuple[str, ...] = ("nuclear", "cytoplasmic", "punctate", "membrane", "mitochondrial")
CHANNELS: tuple[str, ...] = PRESETS["demo"]
#: Bumped whenever the generator's output changes, so that cached demo data is regenerated.
GENERATOR_VERSION = 2
INDEX_COLUMNS = ("path", "channels", "cell_id", "centroid_y", "centroid_x", "label", "label_id",
                 "image_id", "split")


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; the whole data set is a function of these fields."""

    n_images: int = 8
    image_size: int = 192
    cells_per_image: int = 12
    seed: int = 0
    localisations: int = 1  # distinct phenotypes per cell (2: a multi-label set)


def _place_cells(rng: np.random.Generator, size: int, n: int, radius: float) -> list[tuple[float, float]]:
    centres: list[tuple[float, float]] = []
    for _ in range(n * 50):
        if len(centres) == n:
            break
        c = rng.uniform(radius, size - radius, size=2)
        if all(np.hypot(*(c - np.array(o))) > 1.9 * radius for o in centres):
            centres.append((float(c[0]), float(c[1])))
    return centres


def _protein(rng: np.random.Generator, phenotype: int, body: np.ndarray, nucleus: np.ndarray,
             r_cell: np.ndarray) -> np.ndarray:
    """The protein channel of one cell: where it sits is the phenotype; how is random."""
    size = body.shape[0]
    cyto = body & ~nucleus
    protein = np.zeros((size, size), np.float32)
    texture = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), rng.uniform(0.8, 2.0))
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
    if phenotype == 0:  # nuclear, with a speckled texture of varying strength
        protein[nucleus] = 0.5 + rng.uniform(0.2, 0.8) * texture[nucleus]
    elif phenotype == 1:  # cytoplasmic, diffuse, fading towards the rim or not
        fade = rng.uniform(0.0, 0.6)
        protein[cyto] = 0.45 * (1 - fade * r_cell[cyto]) * (0.7 + 0.6 * texture[cyto])
    elif phenotype == 2:  # punctate: a varying number of dots of varying size
        ys, xs = np.nonzero(cyto)
        if len(ys):
            pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(8, 35))), replace=False)
            protein[ys[pick], xs[pick]] = rng.uniform(3.0, 8.0, size=len(pick))
            protein = ndimage.gaussian_filter(protein, rng.uniform(0.6, 1.2))
    elif phenotype == 3:  # membrane: a rim of varying thickness, unevenly stained
        protein[body & (r_cell > rng.uniform(0.72, 0.88))] = 1.0
        protein *= 0.6 + 0.8 * texture
    else:  # mitochondrial: a network of worms of varying density and thickness
        worms = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), rng.uniform(0.8, 1.4))
        if cyto.any():
            protein[cyto] = 1.2 * (worms[cyto] > np.quantile(worms[cyto], rng.uniform(0.65, 0.85)))
    return protein


def _render_field(rng: np.random.Generator, spec: DemoSpec) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One field of view with its label image and per-cell index rows.

    Cells vary in size, shape, orientation and expression level, and their bodies sit off
    the nucleus (the crop centre), so that raw pixels of one phenotype do not line up.
    """
    size = spec.image_size
    radius = size / (2.2 * np.sqrt(spec.cells_per_image))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((4, size, size), np.float32)
    labels = np.zeros((size, size), np.int32)
    cells = []
    for cell_id, (cy, cx) in enumerate(_place_cells(rng, size, spec.cells_per_image, radius), start=1):
        if spec.localisations == 1:
            phenotypes = [int(rng.integers(len(PHENOTYPES)))]
        else:
            phenotypes = sorted(int(k) for k in rng.choice(len(PHENOTYPES), spec.localisations, replace=False))
        angle = rng.uniform(0, np.pi)
        scale = rng.uniform(0.65, 1.0)
        ry, rx = radius * scale, radius * scale * rng.uniform(0.55, 1.0)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
        v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
        r_cell = np.sqrt(u**2 + v**2)
        body = r_cell < 1.0
        body &= labels == 0
        labels[body] = cell_id
        # The nucleus sits anywhere in the inner part of the cell.
        n_scale = rng.uniform(0.3, 0.5)
        off_r, off_a = rng.uniform(0, 0.9 - n_scale), rng.uniform(0, 2 * np.pi)
        off_u, off_v = off_r * np.cos(off_a), off_r * np.sin(off_a)
        ncy = cy + off_u * ry * np.cos(angle) - off_v * rx * np.sin(angle)
        ncx = cx + off_u * ry * np.sin(angle) + off_v * rx * np.cos(angle)
        r_nuc = np.hypot((yy - ncy) / (ry * n_scale), (xx - ncx) / (rx * n_scale))
        nucleus = body & (r_nuc < 1.0)
        cyto = body & ~nucleus
        # nucleus: bright, with chromatin texture
        chrom = ndimage.gaussian_filter(rng.random((size, size)).astype(np.float32), 1.5)
        img[0][nucleus] += rng.uniform(0.5, 0.9) + 0.8 * chrom[nucleus]
        # microtubules: radial filaments from the nucleus
        theta = np.arctan2(yy - ncy, xx - ncx)
        n_fil = int(rng.integers(10, 18))
        phase = rng.uniform(0, 2 * np.pi)
        filaments = np.cos(n_fil * theta + phase) ** 8
        img[1][body] += rng.uniform(0.2, 0.4) * filaments[body] * (1.1 - r_cell[body])
        # ER: cloud decaying away from the nucleus
        img[2][cyto] += rng.uniform(0.3, 0.6) * np.exp(-1.5 * (r_nuc[cyto] - 1.0)) * (0.6 + 0.4 * chrom[cyto])
        # protein: the phenotype(s), each at an expression level, over a nonspecific background
        protein = 0.06 * body
        for phenotype in phenotypes:
            expression = np.exp(rng.uniform(np.log(0.25), 0.0))
            protein = protein + expression * _protein(rng, phenotype, body, nucleus, r_cell)
        img[3] += protein * body
        # The index centre is the nucleus (as for nucleus-seeded crops), slightly off.
        jy, jx = rng.normal(0, 0.1 * radius, size=2)
        cells.append({"cell_id": cell_id, "centroid_y": round(float(ncy + jy), 2),
                      "centroid_x": round(float(ncx + jx), 2),
                      "label": ";".join(PHENOTYPES[k] for k in phenotypes),
                      "label_id": phenotypes[0] if len(phenotypes) == 1 else ";".join(map(str, phenotypes))})
    img = ndimage.gaussian_filter(img, sigma=(0, 0.8, 0.8))
    img = rng.poisson(np.clip(img, 0, None) * 400 + 20).astype(np.float32)  # photon noise
    return np.clip(img, 0, 65535).astype(np.uint16), labels, cells


def _write_ome_zarr(path: Path, image: np.ndarray, labels: np.ndarray) -> None:
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image, write_labels

    fmt = FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    omero = {"channels": [{"label": c, "color": col, "window": {"start": 0, "end": int(image[i].max()),
                                                              "min": 0, "max": 65535}}
                          for i, (c, col) in enumerate(zip(CHANNELS, ("0000FF", "FF0000", "FFFF00", "00FF00")))]}
    write_image(image, root, axes="cyx", scale_factors=[2], fmt=fmt, omero=omero,
                storage_options={"chunks": (1, 64, 64)})
    write_labels(labels, root, name="cells", axes="yx", scale_factors=[2], fmt=fmt)


def _write_ome_tiff(path: Path, image: np.ndarray, labels: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, image, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(CHANNELS)}})
    tifffile.imwrite(path.with_name(path.name.replace(".ome.tif", "_labels.tif")), labels)


def _write_demo(out: Path, spec: DemoSpec, stamp: dict) -> None:
    """Render and write the demo fields, both indexes and the ``spec.json`` stamp (last: marks it complete)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    rows: dict[str, list[dict]] = {"ome-zarr": [], "ome-tiff": []}
    for i in range(spec.n_images):
        image, labels, cells = _render_field(rng, spec)
        stem = f"images/field_{i:03d}"
        _write_ome_zarr(out / f"{stem}.ome.zarr", image, labels)
        _write_ome_tiff(out / f"{stem}.ome.tif", image, labels)
        split = "test" if i % 4 == 3 else "train"
        for kind, suffix in (("ome-zarr", ".ome.zarr"), ("ome-tiff", ".ome.tif")):
            rows[kind] += [{"path": stem + suffix, "channels": ";".join(CHANNELS), "image_id": i,
                            "split": split, **c} for c in cells]
    for kind, kind_rows in rows.items():
        table = pd.DataFrame(kind_rows, columns=list(INDEX_COLUMNS))
        atomic_write_with(out / f"index_{kind}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
    atomic_write_text(out / "spec.json", json.dumps(stamp))  # last: a killed generation is redone next time


def generate_demo(out_dir: str | Path, spec: DemoSpec = DemoSpec(), fmt: str = "ome-zarr") -> Path:
    """Generate the demo data set (both formats) into ``out_dir`` unless it is already there.

    Args:
        out_dir: Cache folder. A ``spec.json`` there records what was generated; a folder
            made from another spec or generator version is regenerated.
        spec: Size and seed.
        fmt: Which format the returned index points at: ``"ome-zarr"`` or ``"ome-tiff"``.

    Returns:
        Path of the index CSV (``index_ome-zarr.csv`` or ``index_ome-tiff.csv``), one row per
        cell, with paths relative to ``out_dir``.
    """
    if fmt not in ("ome-zarr", "ome-tiff"):
        raise ValueError(f"demo format {fmt!r}; expected 'ome-zarr' or 'ome-tiff'")
    out = Path(out_dir).expanduser()
    marker = out / "spec.json"
    index_path = out / f"index_{fmt}.csv"
    if not 1 <= spec.localisations <= len(PHENOTYPES):
        raise ValueError(f"demo localisations={spec.localisations}; expected 1 to {len(PHENOTYPES)}")
    stamp = {**asdict(spec), "generator_version": GENERATOR_VERSION}
    if spec.localisations == 1:  # folders generated before the option existed stay valid
        stamp.pop("localisations")
    if marker.is_file() and json.loads(marker.read_text()) == stamp and index_path.is_file():
        return index_path
    try:
        _write_demo(out, spec, stamp)
    except OSError as exc:
        raise DataError(f"data.demo.cache_dir={str(out)!r}: the demo data cannot be written there: "
                        f"{describe_os_error(exc, out / 'images')}; set data.demo.cache_dir to a writable folder") \
            from exc
    return index_path
