"""Rows to crops and crops to files, for the batch embedding CLI and the evaluation baselines.

:class:`RowReader` turns the rows of an index table (or of an embeddings file's ``obs``) into
raw ``(C, h, w)`` crops with their channel names: a crop box (``crop_y0``, ``crop_x0``,
``crop_h``, ``crop_w``), else a square around ``centroid_y`` / ``centroid_x``, else the whole
image. :class:`ResumableWriter` stores finished chunks of embeddings in ``OUT.partial/`` so an
interrupted run resumes where it stopped, then writes the AnnData ``.h5ad`` or Zarr store
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellvit_ssl.crops import box_around, read_region
from cellvit_ssl.data.channels import canonical_name
from cellvit_ssl.data.readers import ChannelStack, open_stack
from cellvit_ssl.errors import DataError

#: obs columns describing the crop each row was cut from.
BOX_COLUMNS = ("crop_y0", "crop_x0", "crop_h", "crop_w")


def read_labels(path: str | Path) -> np.ndarray:
    """Read a 2-D segmentation mask: a TIFF, a Zarr array, or an OME-Zarr label image (level 0).

    Raises:
        DataError: If the file is missing, unreadable or not 2-D.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"label mask {str(p)!r}: no such file or folder")
    try:
        if p.name.lower().endswith((".tif", ".tiff")):
            import tifffile

            mask = tifffile.imread(p)
        else:
            import zarr

            mask = _zarr_level0(zarr.open(str(p), mode="r"))[...]
    except Exception as exc:
        raise DataError(f"label mask {str(p)!r} could not be read ({type(exc).__name__}: {exc})") from exc
    mask = np.squeeze(np.asarray(mask))
    if mask.ndim != 2:
        raise DataError(f"label mask {str(p)!r} has shape {mask.shape}; expected a 2-D (Y, X) mask")
    return mask


def _zarr_level0(node):
    """The full-resolution array of a Zarr array, OME-Zarr label image, ``labels`` group or image."""
    for _ in range(3):
        if hasattr(node, "shape"):
            return node
        attrs = dict(node.attrs)
        attrs = attrs.get("ome", attrs)
        is_image_with_labels = "image-label" not in attrs and "labels" in node
        if "multiscales" in attrs and not is_image_with_labels:
            return node[attrs["multiscales"][0]["datasets"][0]["path"]]
        if "labels" in attrs:  # the labels group: its first label image
            node = node[attrs["labels"][0]]
        elif "labels" in node:  # an OME-Zarr image with a labels group
            node = node["labels"]
        else:
            break
    raise ValueError("no label array found (expected a Zarr array, an OME-Zarr label image or a labels group)")


class RowReader:
    """Raw crops for the rows of an index table.

    Args:
        table: One row per image or cell: ``path`` (required), optional ``channels``
            (``;``-separated, file order), a crop box (:data:`BOX_COLUMNS`) or
            ``centroid_y`` / ``centroid_x``, and for background masking ``labels_path`` +
            ``cell_label``.
        root: Base folder of relative paths.
        crop_size: Side of centroid crops.
        mask_background: Zero the pixels of a cell crop outside its cell (needs
            ``labels_path`` and ``cell_label``); applied to raw pixels after reading.
        cache: How many open images to keep.
    """

    def __init__(self, table: pd.DataFrame, root: str | Path, crop_size: int, mask_background: bool = False,
                 cache: int = 8) -> None:
        if "path" not in table.columns:
            raise DataError(f"the index has no 'path' column (columns: {list(table.columns)})")
        if mask_background and not {"labels_path", "cell_label"} <= set(table.columns):
            raise DataError("background masking needs 'labels_path' and 'cell_label' columns in the index "
                            f"(columns: {list(table.columns)})")
        self.table = table.reset_index(drop=True)
        self.root = Path(root)
        self.crop_size = int(crop_size)
        self.mask_background = mask_background
        self._stacks: OrderedDict[str, ChannelStack] = OrderedDict()
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache = cache

    def __len__(self) -> int:
        return len(self.table)

    def resolve(self, path: str) -> str:
        p = Path(str(path)).expanduser()
        return str(p if p.is_absolute() else self.root / p)

    def _cached(self, store: OrderedDict, key: str, make: Callable):
        if key not in store:
            store[key] = make()
            if len(store) > self._cache:
                store.popitem(last=False)
        store.move_to_end(key)
        return store[key]

    def stack(self, i: int) -> ChannelStack:
        row = self.table.iloc[i]
        names = row.get("channels")
        names = str(names).split(";") if isinstance(names, str) and names else None
        path = self.resolve(row["path"])
        return self._cached(self._stacks, path, lambda: open_stack(path, channel_names=names))

    def box(self, i: int, stack: ChannelStack) -> tuple[int, int, int, int]:
        """Crop of row ``i`` as ``(y0, x0, h, w)`` (may reach past the border: zero padding)."""
        row = self.table.iloc[i]
        if all(c in row for c in BOX_COLUMNS) and pd.notna(row["crop_y0"]):
            return tuple(int(row[c]) for c in BOX_COLUMNS)
        if "centroid_y" in row and "centroid_x" in row and pd.notna(row["centroid_y"]):
            box = box_around((float(row["centroid_y"]), float(row["centroid_x"])), self.crop_size)
            return (box.y0, box.x0, box.size, box.size)
        return (0, 0, stack.shape[1], stack.shape[2])

    def read(self, i: int) -> tuple[np.ndarray, list[str], tuple[int, int, int, int]]:
        """Row ``i`` as (raw crop ``(C, h, w)``, channel names in file order, ``(y0, x0, h, w)``).

        Raises:
            DataError: If the file cannot be read or the crop lies outside the image.
        """
        stack = self.stack(i)
        box = self.box(i, stack)
        try:
            crop = read_region(_StackView(stack), *box)
        except DataError as exc:
            raise DataError(f"{stack.path} (index row {i}): {exc}") from exc
        if self.mask_background:
            row = self.table.iloc[i]
            path = self.resolve(row["labels_path"])
            labels = self._cached(self._labels, path, lambda: read_labels(path))
            crop = crop * (read_region(labels, *box) == int(row["cell_label"]))
        return crop, list(stack.channel_names), box


class _StackView:
    """``stack[..., ys:ye, xs:xe]`` on a :class:`ChannelStack`, reading only that region."""

    def __init__(self, stack: ChannelStack) -> None:
        self.stack = stack
        self.shape = stack.shape

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key[-2], key[-1]
        return self.stack.read((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))


def order_channels(crop: np.ndarray, names: Sequence[str], wanted: Sequence[str],
                   channel_map: dict | None = None, source: str = "image") -> np.ndarray:
    """Reorder a crop's channels into ``wanted`` (canonical names); absent ones become zeros.

    Raises:
        DataError: If a channel name is unknown.
    """
    found = [canonical_name(c, channel_map) for c in names]
    out = np.zeros((len(wanted),) + crop.shape[1:], np.float32)
    for k, name in enumerate(wanted):
        if name in found:
            out[k] = crop[found.index(name)]
    if not any(name in found for name in wanted):
        raise DataError(f"{source}: none of its channels {list(names)} is among {list(wanted)}")
    return out


def read_rows(reader: RowReader, rows: Sequence[int], workers: int = 0) -> list:
    """``reader.read`` of each row, in order; ``workers`` > 0 reads in DataLoader worker processes."""
    if workers <= 0 or len(rows) < 2:
        return [reader.read(i) for i in rows]
    from torch.utils.data import DataLoader

    loader = DataLoader(_RowDataset(reader, rows), batch_size=None, num_workers=min(workers, len(rows)),
                        collate_fn=_identity)
    return list(loader)


def _identity(item):
    return item


class _RowDataset:
    def __init__(self, reader: RowReader, rows: Sequence[int]) -> None:
        self.reader, self.rows = reader, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        return self.reader.read(self.rows[k])


def featurize_rows(reader: RowReader, rows: Iterable[int],
                   featurize: Callable[[np.ndarray, list[str]], np.ndarray],
                   workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features of several rows in order; rows sharing channel names and crop shape share a call.

    Args:
        reader: Where the crops come from.
        rows: Row numbers.
        featurize: ``(crops (b, C, h, w), channel names) -> (b, D)``.
        workers: Reader processes (0: read in this process).

    Returns:
        ``(features (n, D) float32, boxes (n, 4) int64)`` in the order of ``rows``.
    """
    rows = list(rows)
    crops = read_rows(reader, rows, workers)
    groups: dict[tuple, list[int]] = {}
    for k, (crop, names, _) in enumerate(crops):
        groups.setdefault((tuple(names), crop.shape), []).append(k)
    out: list[np.ndarray | None] = [None] * len(rows)
    for (names, _), members in groups.items():
        feats = featurize(np.stack([crops[k][0] for k in members]), list(names))
        for k, f in zip(members, feats):
            out[k] = f
    boxes = np.asarray([box for _, _, box in crops], dtype=np.int64).reshape(-1, 4)
    return np.stack(out).astype(np.float32, copy=False), boxes


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def table_sha256(table: pd.DataFrame) -> str:
    """SHA-256 of a table's content (columns and values)."""
    return hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()


def obs_table(table: pd.DataFrame, boxes: np.ndarray) -> pd.DataFrame:
    """The AnnData ``obs`` for an index: its columns, h5ad-safe, plus the crop box columns."""
    obs = table.reset_index(drop=True).copy()
    for col in obs.columns:
        if obs[col].dtype == object:
            obs[col] = obs[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    for k, col in enumerate(BOX_COLUMNS):
        obs[col] = boxes[:, k].astype(np.int64)
    obs.index = obs.index.astype(str)
    return obs


class ResumableWriter:
    """Chunked, resumable output of an embedding run.

    Finished chunks are saved as ``OUT.partial/chunk_<start>.npz`` (embeddings + crop boxes),
    each written to a temporary file and renamed, next to a ``manifest.json`` holding the run's
    fingerprint. A rerun with the same fingerprint skips the saved chunks; :meth:`finish`
    writes the final file atomically and removes the partial folder.

    Args:
        out: ``*.h5ad`` or ``*.zarr``.
        fingerprint: What identifies the run (checkpoint hash, index hash, settings).
        overwrite: Replace an existing output / partial run made with another fingerprint.

    Raises:
        DataError: On an unknown output suffix, or an existing output or partial run made
            with another fingerprint (without ``overwrite``).
    """

    def __init__(self, out: str | Path, fingerprint: dict, overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.suffix not in (".h5ad", ".zarr"):
            raise DataError(f"output {str(self.out)!r}: expected a .h5ad or .zarr path")
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.overwrite = overwrite
        self.partial = self.out.with_name(self.out.name + ".partial")

    def up_to_date(self) -> bool:
        """True when ``out`` already holds this run's complete result (nothing to do).

        Raises:
            DataError: If ``out`` exists but was made from other inputs or settings (without
                ``overwrite``).
        """
        if not self.out.exists():
            return False
        try:
            uns_fp = json.loads(str(read_embeddings(self.out).uns["embed"]["fingerprint"]))
        except (DataError, KeyError, TypeError, ValueError):
            uns_fp = None
        if uns_fp == self.fingerprint:
            return True
        if not self.overwrite:
            raise DataError(f"{self.out} exists and was made from other inputs or settings; "
                            "choose another --out or pass --overwrite")
        return False

    def begin(self) -> None:
        """Create (or reuse, when the fingerprint matches) the partial folder."""
        manifest = self.partial / "manifest.json"
        if self.partial.exists():
            old = json.loads(manifest.read_text()) if manifest.is_file() else None
            if old != self.fingerprint:
                if not self.overwrite:
                    raise DataError(f"{self.partial} holds a partial run with other inputs or settings; "
                                    "delete it or pass --overwrite")
                shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(manifest, json.dumps(self.fingerprint).encode())

    def _chunk(self, start: int) -> Path:
        return self.partial / f"chunk_{start:010d}.npz"

    def done(self, start: int) -> bool:
        return self._chunk(start).is_file()

    def save(self, start: int, embeddings: np.ndarray, boxes: np.ndarray) -> None:
        path = self._chunk(start)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, X=embeddings.astype(np.float32), boxes=boxes.astype(np.int64))
        os.replace(tmp, path)

    def load(self, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        parts = [np.load(self._chunk(s)) for s in starts]
        return np.concatenate([p["X"] for p in parts]), np.concatenate([p["boxes"] for p in parts])

    def finish(self, table: pd.DataFrame, starts: Sequence[int], uns: dict) -> Path:
        """Assemble the chunks into the final AnnData file (atomic) and drop the partial folder."""
        import anndata

        x, boxes = self.load(starts)
        if len(x) != len(table):
            raise DataError(f"{self.partial}: {len(x)} embeddings saved for {len(table)} index rows")
        uns = dict(uns)
        uns.setdefault("embed", {})["fingerprint"] = json.dumps(self.fingerprint, sort_keys=True)
        adata = anndata.AnnData(X=x, obs=obs_table(table, boxes), uns=uns)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        if self.out.suffix == ".h5ad":
            adata.write_h5ad(tmp)
        else:
            with anndata.settings.override(zarr_write_format=3):  # the Zarr format the package reads and writes
                adata.write_zarr(tmp)
        if self.out.is_dir():
            shutil.rmtree(self.out)
        os.replace(tmp, self.out)
        shutil.rmtree(self.partial)
        return self.out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_embeddings(path: str | Path):
    """Open an embeddings file written by ``python -m cellvit_ssl.embed`` (.h5ad or .zarr) as AnnData.

    Raises:
        DataError: If it is missing or not an AnnData file.
    """
    import anndata

    p = Path(path)
    if not p.exists():
        raise DataError(f"embeddings file {str(p)!r} does not exist")
    try:
        return anndata.read_zarr(p) if p.suffix == ".zarr" else anndata.read_h5ad(p)
    except Exception as exc:
        raise DataError(f"embeddings file {str(p)!r} could not be read as AnnData ({type(exc).__name__}: {exc})") \
            from exc
