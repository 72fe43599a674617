"""``python -m cellvit_ssl.embed``: embed an index or a list of images into AnnData / Zarr.

Examples:
    python -m cellvit_ssl.embed runs/demo/teacher.pt --index index.csv --out cells.h5ad
    python -m cellvit_ssl.embed teacher.pt --images a.ome.zarr b.ome.tif --out fields.zarr
    python -m cellvit_ssl.embed teacher.pt --images a.ome.tif --labels a_labels.tif --out cells.h5ad

The output holds ``X`` (one embedding per row), ``obs`` (the index columns plus the crop box
``crop_y0, crop_x0, crop_h, crop_w``) and ``uns`` (``model``: checkpoint path, hash,
architecture, channels; ``config``: the run config as JSON; ``embed``: the settings of this
run). Finished chunks are kept in ``OUT.partial/`` until the end, so an interrupted run
continues where it stopped when the same command is given again, and a finished output is
never recomputed or appended to.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cellvit_ssl.config import config_to_dict
from cellvit_ssl.crops import cell_table
from cellvit_ssl.data.dataset import read_index
from cellvit_ssl.embed import Encoder, load_encoder
from cellvit_ssl.embed_io import (
    ResumableWriter,
    RowReader,
    featurize_rows,
    file_sha256,
    read_labels,
    table_sha256,
)
from cellvit_ssl.errors import CellVitSSLError, DataError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m cellvit_ssl.embed``."""
    p = argparse.ArgumentParser(prog="python -m cellvit_ssl.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="teacher.pt export or training checkpoint.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", help="CSV / parquet index: one row per image or cell (column 'path' required)")
    src.add_argument("--images", nargs="+", help="image files / OME-Zarr folders, one row per image")
    p.add_argument("--labels", nargs="+", help="a segmentation mask per --images entry: one row per cell")
    p.add_argument("--channels", help="';'-separated channel names for images that do not name them")
    p.add_argument("--root", help="base folder of relative index paths (default: the index's folder)")
    p.add_argument("--out", required=True, help="OUT.h5ad (AnnData) or OUT.zarr (AnnData Zarr store)")
    p.add_argument("--crop-size", type=int, help="side of centroid crops (default: the run's data.sample_size)")
    p.add_argument("--mask-background", action="store_true",
                   help="zero pixels outside the cell (needs masks: --labels, or labels_path + cell_label)")
    p.add_argument("--allow-missing", action="store_true", help="embed images that lack some model channels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-rows", type=int, default=512, help="rows per saved chunk (the unit of resuming)")
    p.add_argument("--workers", type=int, default=0, help="processes reading crops (0: read in the main process)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made from other inputs")
    p.add_argument("--no-progress", action="store_true")
    return p


def images_table(images: list[str], labels: list[str] | None, channels: str | None) -> pd.DataFrame:
    """Index rows for ``--images``: one per image, or one per labelled cell with ``--labels``.

    Raises:
        DataError: If the number of masks differs from the number of images.
    """
    extra = {"channels": channels} if channels else {}
    if not labels:
        return pd.DataFrame([{"path": str(Path(i).resolve()), **extra} for i in images])
    if len(labels) != len(images):
        raise DataError(f"{len(labels)} --labels masks given for {len(images)} --images; give one per image")
    rows = []
    for image, mask in zip(images, labels):
        ids, centres = cell_table(read_labels(mask))
        rows += [{"path": str(Path(image).resolve()), **extra, "labels_path": str(Path(mask).resolve()),
                  "cell_label": int(i), "centroid_y": round(float(c[0]), 3), "centroid_x": round(float(c[1]), 3)}
                 for i, c in zip(ids, centres)]
    if not rows:
        raise DataError(f"the masks {labels} hold no labelled cells")
    return pd.DataFrame(rows)


def provenance(encoder: Encoder, checkpoint: str, sha: str) -> dict:
    """``uns['model']`` and ``uns['config']`` for an embeddings file."""
    cfg = encoder.config.model
    return {
        "model": {"checkpoint": str(Path(checkpoint).resolve()), "sha256": sha, "variant": cfg.variant,
                  "arch": cfg.arch, "patch_size": int(cfg.patch_size), "embed_dim": int(encoder.model.embed_dim),
                  "output_dim": encoder.output_dim, "channels": list(encoder.channels),
                  "input_size": encoder.input_size},
        "config": json.dumps(config_to_dict(encoder.config)),
    }


def _package_version() -> str:
    try:
        return version("cellvit-ssl")
    except PackageNotFoundError:
        from cellvit_ssl import __version__

        return __version__


def run(args: argparse.Namespace) -> Path | None:
    """Embed every row and write the output; returns its path (None when already up to date)."""
    if args.batch_size < 1 or args.chunk_rows < 1:
        raise DataError(f"--batch-size and --chunk-rows must be >= 1 (got {args.batch_size}, {args.chunk_rows})")
    if args.labels and not args.images:
        raise DataError("--labels goes with --images (an index names its masks in a 'labels_path' column)")
    if args.index:
        table, root = read_index(args.index), Path(args.root or Path(args.index).expanduser().parent)
    else:
        table, root = images_table(args.images, args.labels, args.channels), Path(args.root or ".")
    index_sha = table_sha256(table)  # of the index as stored, so that evaluate can tell if it changed
    if args.channels and args.index and "channels" not in table.columns:
        table["channels"] = args.channels
    encoder = load_encoder(args.checkpoint, device=args.device)
    crop_size = args.crop_size or encoder.crop_size
    sha = file_sha256(args.checkpoint)
    # --images rows hold absolute paths: the working folder does not change what is read
    fingerprint = {"checkpoint_sha256": sha, "index_sha256": index_sha, "channels": args.channels or "",
                   "root": str(root.resolve()) if args.index else "",
                   "crop_size": crop_size, "mask_background": args.mask_background,
                   "allow_missing": args.allow_missing, "chunk_rows": args.chunk_rows}
    writer = ResumableWriter(args.out, fingerprint, overwrite=args.overwrite)
    if writer.up_to_date():
        print(f"{args.out} is complete ({len(table)} rows); nothing to do", file=sys.stderr)
        return None
    writer.begin()
    reader = RowReader(table, root, crop_size, mask_background=args.mask_background)

    def featurize(crops: np.ndarray, names: list[str]) -> np.ndarray:
        return encoder.embed(crops, names, batch_size=args.batch_size, allow_missing=args.allow_missing)

    starts = list(range(0, len(table), args.chunk_rows))
    with tqdm(total=len(table), desc="embed", unit="row", disable=args.no_progress) as bar:
        for start in starts:
            stop = min(start + args.chunk_rows, len(table))
            if not writer.done(start):
                x, boxes = featurize_rows(reader, range(start, stop), featurize, args.workers)
                writer.save(start, x, boxes)
            bar.update(stop - start)
    uns = provenance(encoder, args.checkpoint, sha)
    uns["embed"] = {"index": str(Path(args.index).resolve()) if args.index else "", "root": str(root.resolve()),
                    "crop_size": int(crop_size), "mask_background": bool(args.mask_background),
                    "allow_missing": bool(args.allow_missing), "cellvit_ssl_version": _package_version()}
    return writer.finish(table, starts, uns)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished chunks are kept in {args.out}.partial. Run the same command again to "
              "resume.", file=sys.stderr)
        return 130
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0
