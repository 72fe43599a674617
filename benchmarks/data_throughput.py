"""Data-loading throughput: samples/s from OME-Zarr and OME-TIFF for several DataLoader workers.

Writes a few synthetic 4-channel fields of view in both formats (OME-Zarr: 256-px chunks,
2-level pyramid; OME-TIFF: 256-px tiles), an index of random cell centroids, and times two
pipelines through a ``torch.utils.data.DataLoader``:

- ``crop+norm``: open (cached per worker) + read a cell-centred crop + per-channel percentile
  normalisation -> float32 (C, H, W);
- ``dino-views``: the same plus the multichannel DINO multi-crop (2 global + N local views).

The first batch of each run (worker start-up, file opening) is excluded from the timing.
Prints a table and writes JSON. Defaults are small so that it finishes in about a minute on
a laptop CPU; raise ``--size`` / ``--samples`` for numbers closer to real training.

    python benchmarks/data_throughput.py --workers 1,2,N --out benchmarks/results/data_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
import zarr
from scipy import ndimage
from torch.utils.data import DataLoader

from cellvit_ssl.config import load_config
from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.transforms import MultichannelDINOTransform

NAMES = ["nucleus", "microtubules", "er", "protein"]


def make_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, cell-like 4-channel uint16 field (blurred blobs + noise)."""
    small = rng.random((4, size // 8, size // 8)).astype(np.float32)
    field = ndimage.zoom(ndimage.gaussian_filter(small, (0, 1.5, 1.5)), (1, 8, 8), order=1)
    field = np.clip((field - 0.45) * 4, 0, None) * 3000 + rng.normal(200, 20, field.shape)
    return np.clip(field, 0, 65535).astype(np.uint16)


def write_data(folder: Path, n_images: int, size: int, n_rows: int, seed: int = 0) -> dict[str, Path]:
    """Write the fields as OME-Zarr and OME-TIFF plus one index per format; returns the indexes."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    rng = np.random.default_rng(seed)
    omero = {"channels": [{"label": n, "color": "FFFFFF", "window": {"start": 0, "end": 4000, "min": 0,
                                                                     "max": 65535}} for n in NAMES]}
    for i in range(n_images):
        image = make_field(rng, size)
        root = zarr.open_group(str(folder / f"f{i}.ome.zarr"), mode="w", zarr_format=3)
        write_image(image, root, axes="cyx", fmt=FormatV05(), scale_factors=[2], omero=omero,
                    storage_options={"chunks": (1, 256, 256)})
        tifffile.imwrite(folder / f"f{i}.ome.tif", image, ome=True, tile=(256, 256),
                         metadata={"axes": "CYX", "Channel": {"Name": NAMES}})
    cy, cx = rng.uniform(0, size, (2, n_rows))
    image_ids = rng.integers(0, n_images, n_rows)
    indexes = {}
    for fmt, suffix in (("ome-zarr", ".ome.zarr"), ("ome-tiff", ".ome.tif")):
        table = pd.DataFrame({"path": [f"f{i}{suffix}" for i in image_ids], "centroid_y": cy, "centroid_x": cx})
        indexes[fmt] = folder / f"index_{fmt}.csv"
        table.to_csv(indexes[fmt], index=False)
    return indexes


def time_loader(dataset: IndexDataset, workers: int, batch_size: int) -> tuple[float, int]:
    """Samples/s over all batches after the first, and the number of samples timed."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up and file opening
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += len(batch["index"])
    seconds = time.perf_counter() - t0
    return n / max(seconds, 1e-9), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="fields of view per format")
    parser.add_argument("--size", type=int, default=1024, help="field side in px")
    parser.add_argument("--samples", type=int, default=320, help="samples per timed run (incl. the warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=128, help="cell crop side in px (data.sample_size)")
    parser.add_argument("--workers", default="1,2,N", help="comma-separated worker counts; N = CPU count")
    parser.add_argument("--global-size", type=int, default=112, help="global view side (224 in configs/hpa.yaml)")
    parser.add_argument("--local-size", type=int, default=48, help="local view side (96 in configs/hpa.yaml)")
    parser.add_argument("--local-views", type=int, default=6)
    parser.add_argument("--data-dir", help="where to write the synthetic data (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    workers = sorted({cpus if w.strip().upper() == "N" else int(w) for w in args.workers.split(",")})
    torch.set_num_threads(1)

    tmp = tempfile.TemporaryDirectory() if args.data_dir is None else None
    folder = Path(args.data_dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    indexes = write_data(folder, args.images, args.size, args.samples)
    print(f"wrote {args.images} fields of 4x{args.size}x{args.size} uint16 per format in "
          f"{time.perf_counter() - t0:.1f} s ({folder})")
    views = load_config(None, [f"views.global_crop_size={args.global_size}",
                               f"views.local_crop_size={args.local_size}",
                               f"views.n_local_views={args.local_views}", "model.patch_size=16"]).views
    pipelines = {"crop+norm": None, "dino-views": MultichannelDINOTransform(views)}
    results = []
    header = f"{'format':<9} {'pipeline':<11} {'workers':>7} {'samples/s':>10} {'ms/sample':>10}"
    print(header)
    print("-" * len(header))
    for fmt, index in indexes.items():
        for name, transform in pipelines.items():
            for w in workers:
                ds = IndexDataset(index, NAMES, sample_size=args.crop, transform=transform)
                rate, n = time_loader(ds, w, args.batch_size)
                results.append({"format": fmt, "pipeline": name, "workers": w, "samples_per_s": round(rate, 1),
                                "ms_per_sample": round(1000 / rate, 2), "samples_timed": n})
                print(f"{fmt:<9} {name:<11} {w:>7} {rate:>10.1f} {1000 / rate:>10.2f}", flush=True)
    report = {
        "benchmark": "data_throughput",
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}, "workers": workers},
        "machine": {"cpu_count": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "zarr": zarr.__version__, "tifffile": tifffile.__version__},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
