"""Dataset over an index table: one row per image or per cell crop.

Index columns:
    path: image file or Zarr folder (relative to ``root`` or absolute). Required.
    channels: channel names in file order, ``;``-separated. Optional when the file names them.
    centroid_y, centroid_x: centre of a cell crop in pixels. Optional; without them a random
        square is cut from the image.
    anything else (label, plate, split, ...) travels along as metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cellvit_ssl.data.channels import canonical_name, channel_ids
from cellvit_ssl.data.readers import ChannelStack, open_stack
from cellvit_ssl.errors import DataError


def normalize_percentiles(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, source: str = "image"
) -> np.ndarray:
    """Scale each channel to [0, 1] between its ``low`` and ``high`` percentiles (clipped).

    Args:
        image: ``(C, H, W)`` array of any numeric dtype.
        low: Lower percentile, mapped to 0.
        high: Upper percentile, mapped to 1.
        source: Name used in error messages (e.g. the file path).

    Raises:
        DataError: If the image is not 3-D or holds NaN / Inf.
    """
    if image.ndim != 3:
        raise DataError(f"{source}: expected a (C, H, W) image, got shape {tuple(image.shape)}")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise DataError(f"{source}: the image holds NaN or Inf pixels")
    lo, hi = np.percentile(image, [low, high], axis=(1, 2), keepdims=True)
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    return np.clip((image - lo) / np.maximum(hi - lo, np.float32(1e-6)), 0.0, 1.0)


def read_index(path: str | Path) -> pd.DataFrame:
    """Read an index table (CSV or parquet) and check it has a ``path`` column.

    Raises:
        DataError: If the file is missing, unreadable, empty or has no ``path`` column.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"index {str(p)!r} does not exist")
    try:
        table = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:
        raise DataError(f"index {str(p)!r} could not be read: {exc}") from exc
    if "path" not in table.columns:
        raise DataError(f"index {str(p)!r} has no 'path' column (columns: {list(table.columns)})")
    if table.empty:
        raise DataError(f"index {str(p)!r} has no rows")
    return table


def crop_square(stack: ChannelStack, centre: tuple[float, float] | None, size: int,
                channels: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Read a ``size``-px square around ``centre`` (random when None), zero-padded at borders."""
    _, height, width = stack.shape
    if centre is None:
        y0 = int(rng.integers(0, max(height - size, 0) + 1))
        x0 = int(rng.integers(0, max(width - size, 0) + 1))
    else:
        y0, x0 = int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, height), min(x0 + size, width)
    if ye <= ys or xe <= xs:
        raise DataError(f"{stack.path}: crop centre {centre} lies outside the {height}x{width} image")
    out = np.zeros((len(channels), size, size), dtype=stack.dtype)
    out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = stack.read((ys, xs, ye - ys, xe - xs), channels)
    return out


class IndexDataset(Dataset):
    """Samples from an index table as float32 ``(C, H, W)`` in the order of ``channels``.

    Args:
        index: Path of the index table or a DataFrame.
        channels: Channel names wanted, in the order the model expects.
        root: Base folder for relative paths (default: the index's folder).
        sample_size: Side of the square cut from each image, in pixels.
        transform: Optional callable applied to the normalised tensor (e.g. the DINO views).
        channel_map: Your channel names → vocabulary names.
        percentiles: Per-channel normalisation percentiles ``(low, high)``.

    Each item is a dict with ``image`` (or ``views`` when a transform is given),
    ``channel_ids`` (C,) and ``index`` (the row number).
    """

    def __init__(
        self,
        index: str | Path | pd.DataFrame,
        channels: Sequence[str],
        root: str | Path | None = None,
        sample_size: int = 64,
        transform: Callable | None = None,
        channel_map: Mapping[str, str] | None = None,
        percentiles: Sequence[float] = (1.0, 99.8),
    ) -> None:
        if isinstance(index, pd.DataFrame):
            self.table = index.reset_index(drop=True)
            self.root = Path(root) if root is not None else Path.cwd()
        else:
            self.table = read_index(index)
            self.root = Path(root) if root is not None else Path(index).expanduser().parent
        self.channel_map = dict(channel_map or {})
        self.channels = [canonical_name(c, self.channel_map) for c in channels]
        self.channel_ids = torch.tensor(channel_ids(self.channels), dtype=torch.long)
        self.sample_size = sample_size
        self.transform = transform
        self.percentiles = tuple(percentiles)
        self._stacks: dict[str, tuple[ChannelStack, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def _resolve(self, path: str) -> str:
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else self.root / p)

    def _open(self, row: pd.Series) -> tuple[ChannelStack, list[int]]:
        path = self._resolve(str(row["path"]))
        if path not in self._stacks:
            names = row.get("channels")
            names = str(names).split(";") if isinstance(names, str) and names else None
            stack = open_stack(path, channel_names=names)
            found = [canonical_name(c, self.channel_map) for c in stack.channel_names]
            missing = [c for c in self.channels if c not in found]
            if missing:
                raise DataError(
                    f"{path}: channels {missing} are missing; the file has {stack.channel_names}, "
                    f"the config asks for {self.channels}"
                )
            self._stacks[path] = (stack, [found.index(c) for c in self.channels])
        return self._stacks[path]

    def load(self, i: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Row ``i`` as a normalised float32 ``(C, H, W)`` tensor, without the transform."""
        row = self.table.iloc[i]
        stack, order = self._open(row)
        centre = None
        if "centroid_y" in row and "centroid_x" in row and pd.notna(row["centroid_y"]):
            centre = (float(row["centroid_y"]), float(row["centroid_x"]))
        rng = rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
        crop = crop_square(stack, centre, self.sample_size, order, rng)
        return torch.from_numpy(normalize_percentiles(crop, *self.percentiles, source=stack.path))

    def __getitem__(self, i: int) -> dict:
        image = self.load(i)
        item = {"channel_ids": self.channel_ids.clone(), "index": i}
        if self.transform is None:
            item["image"] = image
        else:
            item["views"] = self.transform(image)
        return item
