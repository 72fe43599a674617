"""Where curation's features come from: an ``embed`` output, a checkpoint, or raw pixels.

- An embeddings file (``.h5ad`` / AnnData ``.zarr`` from ``python -m cellvit_ssl.embed``) is
  read a block of rows at a time, never whole; its rows must be the index's rows
  (:func:`check_alignment`).
- A checkpoint (``teacher.pt``) is run over the index by the embed command
  (:func:`embed_with_checkpoint`), which writes an embeddings file that is then read as above.
- Raw pixels (:class:`PixelFeatures`): each crop normalised per channel, blurred and
  area-resized to a small thumbnail. Thumbnails are not flip-invariant, so they come with
  their 8 *poses* (the flips and 90° rotations of the crop, as permutations of the feature
  dimensions): duplicates are compared in their best-matching pose and clusters are formed
  on the pose-averaged features.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.errors import DataError


class FeaturesMismatchError(DataError):
    """The rows of a features file are not the rows of the index being curated."""


class FeatureKind(str, Enum):
    """What ``curate.features`` names."""

    embeddings = "embeddings"  # an .h5ad / .zarr written by python -m cellvit_ssl.embed
    checkpoint = "checkpoint"  # a teacher.pt / checkpoint.pt: the index is embedded first
    pixels = "pixels"  # raw-pixel thumbnails (no model needed)


#: Index / obs columns that identify the crop a row stands for.
IDENTITY_COLUMNS = ("path", "crop_y0", "crop_x0", "crop_h", "crop_w", "centroid_y", "centroid_x",
                    "labels_path", "cell_label", "cell_id")


def feature_kind(spec: str) -> FeatureKind:
    """The kind of features ``curate.features`` names: by suffix, or the word ``pixels``.

    Raises:
        DataError: If it is none of ``.h5ad``, ``.zarr``, ``.pt``, ``.pth`` or ``pixels``.
    """
    if spec == FeatureKind.pixels.value:
        return FeatureKind.pixels
    suffix = Path(spec).suffix.lower()
    if suffix in (".h5ad", ".zarr"):
        return FeatureKind.embeddings
    if suffix in (".pt", ".pth"):
        return FeatureKind.checkpoint
    raise DataError(f"curate.features={spec!r}: expected an embeddings file (.h5ad / .zarr), a checkpoint "
                    "(.pt) or the word 'pixels'")


# ----------------------------------------------------------------------------- embeddings files
def _read_elem(node):
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


class EmbeddingsFile:
    """An AnnData ``.h5ad`` / ``.zarr`` opened for reading ``X`` block by block.

    ``obs`` and ``uns`` are read whole (they are small); ``X`` stays on disk, as in AnnData's
    backed mode, and :meth:`read` returns one block of rows.

    Args:
        path: The file (``.h5ad``) or folder (``.zarr``).

    Raises:
        DataError: If it is missing, not AnnData, or ``X`` is sparse or not 2-D.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"embeddings file {str(self.path)!r} does not exist")
        self._file = None
        try:
            if self.path.suffix == ".zarr":
                import zarr

                group = zarr.open_group(str(self.path), mode="r")
            else:
                import h5py

                group = self._file = h5py.File(self.path, "r")
            x = group["X"]
            self.obs = _read_elem(group["obs"]).reset_index(drop=True)
            self.uns = _read_elem(group["uns"]) if "uns" in group else {}
        except Exception as exc:
            self.close()
            raise DataError(f"embeddings file {str(self.path)!r} could not be read as AnnData "
                            f"({type(exc).__name__}: {exc})") from exc
        if not hasattr(x, "dtype") or len(x.shape) != 2:
            self.close()
            raise DataError(f"embeddings file {str(self.path)!r}: X must be a dense 2-D array (a sparse or "
                            "missing X cannot be curated)")
        self._x = x
        self.n_rows, self.dim = (int(n) for n in x.shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``X`` as float32."""
        return np.asarray(self._x[start:stop], dtype=np.float32)

    def index_sha256(self) -> str | None:
        """The fingerprint of the index the embed command read, when recorded."""
        import json

        try:
            return str(json.loads(str(self.uns["embed"]["fingerprint"]))["index_sha256"])
        except (KeyError, TypeError, ValueError):
            return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EmbeddingsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_alignment(table: pd.DataFrame, index_path: str | Path, emb: EmbeddingsFile,
                    index_sha256: str | None = None) -> str:
    """Make sure row ``i`` of the embeddings describes row ``i`` of the index.

    Accepted when the row counts agree and either the index fingerprint recorded by the embed
    command matches, or every identity column (:data:`IDENTITY_COLUMNS`) present in both agrees
    row by row. With neither a fingerprint nor identity columns only the row count can be checked.

    Args:
        table: The index as read.
        index_path: Its file (for messages).
        emb: The embeddings.
        index_sha256: ``embed_io.table_sha256(table)`` when already computed.

    Returns:
        How the rows were matched (for the summary).

    Raises:
        FeaturesMismatchError: On a different row count or the first row whose identity differs.
    """
    from cellvit_ssl.embed_io import table_sha256

    hint = (f"embed this index (python -m cellvit_ssl.embed CHECKPOINT --index {index_path} --out ...) "
            "or pass the index the embeddings were made from")
    if emb.n_rows != len(table):
        raise FeaturesMismatchError(f"{emb.path} holds {emb.n_rows} rows but the index {index_path} has {len(table)}; "
                                    f"{hint}")
    recorded = emb.index_sha256()
    if recorded is not None and recorded == (index_sha256 or table_sha256(table)):
        return "index fingerprint"
    columns = [c for c in IDENTITY_COLUMNS if c in table.columns and c in emb.obs.columns]
    if not columns:
        if recorded is not None:
            raise FeaturesMismatchError(f"{emb.path} was made from another index than {index_path} (its recorded "
                                        f"fingerprint differs) and has no path / crop columns to match rows by; {hint}")
        return "row count only"
    for column in columns:
        ours, theirs = table[column], emb.obs[column]
        if column in ("path", "labels_path"):
            differ = ours.astype(str).to_numpy() != theirs.astype(str).to_numpy()
        else:
            a = pd.to_numeric(ours, errors="coerce").to_numpy(np.float64)
            b = pd.to_numeric(theirs.astype(object), errors="coerce").to_numpy(np.float64)
            differ = ~(np.isclose(a, b, atol=1e-3) | (np.isnan(a) & np.isnan(b)))
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise FeaturesMismatchError(
                f"{emb.path} row {i} has {column}={theirs.iloc[i]!r} but row {i} of the index {index_path} has "
                f"{column}={ours.iloc[i]!r} ({int(differ.sum())} rows differ); {hint}")
    return "columns " + ", ".join(columns)


def embed_with_checkpoint(checkpoint: str | Path, index: str | Path, out: str | Path, root: str | Path | None = None,
                          crop_size: int | None = None, batch_size: int = 64, workers: int = 0,
                          device: str = "auto", allow_missing: bool = False, pooling: str = "default",
                          overwrite: bool = False, progress: bool = True) -> Path:
    """Embed every row of ``index`` with ``checkpoint`` into ``out`` (the embed command, resumable).

    This is the one place curation computes model features.

    Raises:
        CheckpointError, DataError: As ``python -m cellvit_ssl.embed``.
    """
    from cellvit_ssl import embed

    argv = [str(checkpoint), f"data.index={index}", f"embed.out={out}", f"data.batch_size={batch_size}",
            f"data.num_workers={workers}", f"embed.device={device}", f"embed.allow_missing={allow_missing}",
            f"embed.pooling={pooling}",
            f"embed.overwrite={overwrite}", f"embed.progress={progress}"]
    if root is not None:
        argv.append(f"data.root={root}")
    if crop_size:
        argv.append(f"data.sample_size={crop_size}")
    cfg, payload = embed.load(argv)
    embed.run(cfg, payload)
    return Path(out)


# ----------------------------------------------------------------------------- raw pixels
def dihedral_poses(channels: int, size: int) -> np.ndarray:
    """The 8 flips / 90° rotations of a ``(channels, size, size)`` thumbnail as index permutations.

    Returns:
        int64 ``(8, channels·size²)``: ``x[perm[g]]`` is the flattened thumbnail in pose ``g``
        (pose 0 is the identity).
    """
    grid = np.arange(channels * size * size).reshape(channels, size, size)
    poses = []
    for quarter_turns in range(4):
        turned = np.rot90(grid, quarter_turns, axes=(1, 2))
        poses += [turned.ravel(), turned[:, :, ::-1].ravel()]
    return np.stack(poses).astype(np.int64)


class PixelFeatures:
    """Raw-pixel thumbnails of index rows: normalised, blurred, area-resized, flattened.

    Args:
        table: The index (one row per image or cell).
        root: Folder of relative paths overriding the index's ``root`` column (``data.root``);
            None to use the column (see :class:`~cellvit_ssl.data.samples.SampleReader`).
        crop_size: Side of centroid crops in pixels.
        channels: Channel names to use, in this order (absent ones are zeros); empty: every
            channel in file order (all rows must then have the same number of channels).
        size: Thumbnail side.
        blur: Gaussian sigma in crop pixels before resizing (makes 1-px shifts matter less).
        percentiles: Per-channel normalisation percentiles ``(low, high)``.
        workers: Processes reading crops (0: this process).
        default_root: Folder of rows without a usable ``root`` column (the index's folder).
    """

    def __init__(self, table: pd.DataFrame, root: str | Path | None, crop_size: int, channels: Sequence[str] = (),
                 size: int = 16, blur: float = 2.0, percentiles: Sequence[float] = (1.0, 99.8),
                 workers: int = 0, default_root: str | Path | None = None) -> None:
        self.table, self.crop_size = table, int(crop_size)
        self.root = Path(root) if root is not None else None
        self.default_root = Path(default_root) if default_root is not None else None
        self.channels = list(channels)
        self.size, self.blur = int(size), float(blur)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.workers = int(workers)
        self._n_channels: int | None = len(self.channels) or None
        self._reader = None

    @property
    def n_channels(self) -> int:
        if self._n_channels is None:
            self._n_channels = self.read(0, 1).shape[1] // (self.size * self.size)
        return self._n_channels

    @property
    def dim(self) -> int:
        return self.n_channels * self.size * self.size

    def poses(self) -> np.ndarray:
        """See :func:`dihedral_poses`."""
        return dihedral_poses(self.n_channels, self.size)

    def thumbnails(self, samples: Sequence) -> np.ndarray:
        """Flattened thumbnails ``(b, C·size²)`` of raw samples (:class:`~cellvit_ssl.data.samples.RawSample`).

        Each sample goes through the percentile normalisation of the preprocessing contract
        (:class:`~cellvit_ssl.preprocess.Preprocess`; whole images are fitted into a square).
        """
        import torch
        import torch.nn.functional as F
        from scipy import ndimage

        from cellvit_ssl.preprocess import Preprocess

        contract = Preprocess(percentiles=self.percentiles, sample_size=self.crop_size)
        out = []
        for raw in samples:
            x = contract.to_sample(raw.pixels, raw.names, raw.present, image_sample=raw.is_image,
                                   source=raw.source).numpy()
            if self.blur > 0:
                x = ndimage.gaussian_filter(x, sigma=(0, self.blur, self.blur), mode="nearest")
            small = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None], size=(self.size, self.size),
                                  mode="area")
            out.append(small.reshape(-1).numpy())
        return np.stack(out).astype(np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Thumbnails of rows ``start:stop``.

        Raises:
            DataError: If a crop cannot be read, or rows differ in channel count without
                ``channels``.
        """
        x = read_row_features(self._row_reader(), range(start, stop), self.thumbnails, self.workers)
        expected = self._n_channels and self._n_channels * self.size * self.size
        if expected and x.shape[1] != expected:
            raise DataError(f"index rows {start}..{stop - 1} have {x.shape[1] // self.size ** 2} channels, others "
                            f"{self._n_channels}; name the channels to use with curate.pixels.channels=[...]")
        return x

    def _row_reader(self):
        if self._reader is None:
            from cellvit_ssl.data.samples import SampleReader

            self._reader = SampleReader(self.table, root=self.root, default_root=self.default_root,
                                        channels=self.channels or None, sample_size=self.crop_size,
                                        percentiles=self.percentiles,
                                        missing_channels="pad" if self.channels else "error", source="curate index")
        return self._reader


def read_row_features(reader, rows: Sequence[int], featurize, workers: int = 0) -> np.ndarray:
    """Features of index rows from their samples: the one place curation reads pixels.

    Args:
        reader: A :class:`~cellvit_ssl.data.samples.SampleReader` over the index (the training reader).
        rows: Row numbers.
        featurize: ``list[RawSample] -> (b, D)``.
        workers: Reader processes.

    Raises:
        DataError: If a sample cannot be read, or rows give features of different widths.
    """
    from cellvit_ssl.embed import featurize_rows

    try:
        x, _, _ = featurize_rows(reader, list(rows), featurize, workers)
    except ValueError as exc:  # np.stack of thumbnails of different channel counts
        raise DataError(f"index rows {rows[0]}..{rows[-1]} differ in their number of channels; name the channels "
                        "to use with curate.pixels.channels=[...]") from exc
    return x
