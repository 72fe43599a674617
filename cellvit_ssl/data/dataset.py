"""Dataset over an index table: one row per image, per field of view or per cell crop.

Index columns (see :mod:`cellvit_ssl.data.index`, which builds such tables):
    path: image file or Zarr folder (relative to ``root`` or absolute); for one file per
        channel, the files ``;``-separated in channel order. Required.
    channels: channel names in file order, ``;``-separated. Optional when the file names them.
    channel_width: width of one channel in a CHAMMI tape (PNG). Optional.
    centroid_y, centroid_x: centre of a cell crop in pixels. Optional.
    box_y0, box_x0, box_y1, box_x1: a crop box in pixels (cell or region). Optional.
    anything else (label, plate, split, ...) is metadata (``metadata_columns``).

Sampling modes:
    ``cells``: a ``sample_size`` square centred on the row's centroid (or box centre),
        zero-padded at image borders.
    ``tiles``: a random ``sample_size`` tile of a (large) field of view; with
        ``min_foreground > 0`` tiles whose foreground fraction is lower are redrawn (up to
        ``tile_attempts`` times, keeping the best).
    ``image``: the whole image (or the row's box), resized so its longer side is
        ``sample_size`` and zero-padded to a square.
    ``auto`` (default): ``cells`` for rows with a centroid / box, ``image`` for CHAMMI tapes,
        ``tiles`` otherwise.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cellvit_ssl.data.channels import canonical_names, channel_ids
from cellvit_ssl.data.normalize import (
    ChannelStats,
    cached_channel_stats,
    check_pixels,
    compute_channel_stats,
    fingerprint,
    normalize_percentiles,
    normalize_with_bounds,
)
from cellvit_ssl.data.readers import ChannelStack, open_stack
from cellvit_ssl.errors import ConfigError, DataError

__all__ = ["IndexDataset", "build_dataset", "crop_square", "normalize_percentiles", "read_index"]

logger = logging.getLogger(__name__)

MODES = ("auto", "cells", "tiles", "image")
NORMALIZATIONS = ("percentile", "dataset", "none")
MISSING_CHANNELS = ("error", "pad")
BOX_COLUMNS = ("box_y0", "box_x0", "box_y1", "box_x1")
#: Open stacks kept per worker (least recently used are dropped; CHAMMI has ~220k files).
STACK_CACHE_SIZE = 256
#: Consecutive bad samples tolerated by ``skip_bad`` before giving up (the data is likely broken).
MAX_CONSECUTIVE_BAD = 32


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


def _fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the longer side is ``size`` (antialiased), then zero-pad to ``size``×``size``."""
    _, h, w = image.shape
    if size <= 0 or (h == size and w == size):
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    out = image.new_zeros((image.shape[0], size, size))
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top : top + nh, left : left + nw] = image
    return out


def _is_blank(image: np.ndarray) -> bool:
    flat = image.reshape(image.shape[0], -1)
    return bool(flat.shape[1] == 0 or (flat.max(axis=1) == flat.min(axis=1)).all())


class IndexDataset(Dataset):
    """Samples from an index table as float32 ``(C, H, W)`` in the order of ``channels``.

    Args:
        index: Path of the index table (CSV / parquet) or a DataFrame.
        channels: Channel names wanted, in the order the model expects. None takes every
            sample's own channels (their count may differ: batch with
            :func:`~cellvit_ssl.data.collate.collate_channels`).
        root: Base folder for relative paths (default: the index's folder).
        sample_size: Side of the square sample, in pixels.
        transform: Optional callable applied to the normalised tensor (e.g. the DINO views).
        channel_map: Your channel names → vocabulary names.
        percentiles: Normalisation percentiles ``(low, high)``.
        mode: ``auto`` | ``cells`` | ``tiles`` | ``image`` (see the module docstring).
        normalize: ``percentile`` (per sample and channel), ``dataset`` (per channel over the
            dataset, computed once and cached) or ``none``.
        stats_cache: JSON file for the dataset statistics (default
            ``~/.cache/cellvit_ssl/stats/<fingerprint>.json``); recomputed when stale.
        stats_samples: Rows sampled to compute dataset statistics.
        foreground_threshold: A pixel is foreground when some channel, scaled to [0, 1] by
            image-level (or dataset) percentiles, exceeds this.
        min_foreground: Minimum foreground fraction of a random tile (0 disables the check).
        tile_attempts: Tiles drawn at most per sample in ``tiles`` mode.
        missing_channels: ``error`` when a file lacks a wanted channel, or ``pad``: zeros
            there and ``channel_mask`` False.
        skip_bad: Log and skip unreadable or corrupt samples (another row is drawn) instead
            of stopping; :meth:`end_epoch` reports how many were skipped.
        level: Pyramid level to read (OME-Zarr, pyramidal TIFF).
        z: ``"max"`` (maximum projection over Z) or a Z slice index.
        t: Time frame index.
        missing_chunks: ``error`` or ``fill`` for chunks absent from a Zarr store.
        metadata_columns: Index columns returned as strings under ``metadata``.

    Each item is a dict with ``image`` (or ``views`` when a transform is given),
    ``channel_ids`` (C,), ``index`` (the row used), ``channel_mask`` (C,) when channels are
    padded or taken per sample, and ``metadata`` when ``metadata_columns`` are given.

    Raises:
        ConfigError: On an unknown mode / normalisation / missing-channel policy.
        DataError: On a bad index or a wrong channel name.
    """

    def __init__(
        self,
        index: str | Path | pd.DataFrame,
        channels: Sequence[str] | None,
        root: str | Path | None = None,
        sample_size: int = 64,
        transform: Callable | None = None,
        channel_map: Mapping[str, str] | None = None,
        percentiles: Sequence[float] = (1.0, 99.8),
        *,
        mode: str = "auto",
        normalize: str = "percentile",
        stats_cache: str | Path | None = None,
        stats_samples: int = 256,
        foreground_threshold: float = 0.1,
        min_foreground: float = 0.0,
        tile_attempts: int = 10,
        missing_channels: str = "error",
        skip_bad: bool = False,
        level: int = 0,
        z: str | int = "max",
        t: int = 0,
        missing_chunks: str = "error",
        metadata_columns: Sequence[str] = (),
    ) -> None:
        for name, value, allowed in (("mode", mode, MODES), ("normalize", normalize, NORMALIZATIONS),
                                     ("missing_channels", missing_channels, MISSING_CHANNELS)):
            if value not in allowed:
                raise ConfigError(f"data.{name}={value!r}; expected one of {list(allowed)}")
        if isinstance(index, pd.DataFrame):
            self.table = index.reset_index(drop=True)
            self.root = Path(root) if root is not None else Path.cwd()
            self.source = "index DataFrame"
        else:
            self.table = read_index(index)
            self.root = Path(root) if root is not None else Path(index).expanduser().parent
            self.source = str(index)
        absent = [c for c in metadata_columns if c not in self.table.columns]
        if absent:
            raise DataError(f"index {self.source!r} has no columns {absent} (columns: {list(self.table.columns)})")
        self.channel_map = dict(channel_map or {})
        self.channels = None if channels is None else canonical_names(channels, self.channel_map, source="config")
        self.channel_ids = None if self.channels is None else torch.tensor(channel_ids(self.channels))
        self.sample_size = int(sample_size)
        self.transform = transform
        self.percentiles = tuple(float(p) for p in percentiles)
        self.mode = mode
        self.normalize = normalize
        self.foreground_threshold = float(foreground_threshold)
        self.min_foreground = float(min_foreground)
        self.tile_attempts = max(1, int(tile_attempts))
        self.missing_channels = missing_channels
        self.skip_bad = bool(skip_bad)
        self.read_options = {"level": int(level), "z": z, "t": int(t), "missing_chunks": missing_chunks}
        self.metadata_columns = list(metadata_columns)
        self._stacks: OrderedDict[tuple, tuple[ChannelStack, list[str]]] = OrderedDict()
        self._reference: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._bad = multiprocessing.Value("l", 0)
        self._warned: set[str] = set()
        self.stats: ChannelStats | None = None
        if normalize == "dataset":
            key = fingerprint({"index": pd.util.hash_pandas_object(self.table.astype(str)).sum(),
                               "root": str(self.root), "channels": self.channels, "map": self.channel_map,
                               "percentiles": self.percentiles, "mode": mode, "size": self.sample_size,
                               "read": self.read_options, "n": stats_samples})
            self.stats = cached_channel_stats(stats_cache, key, lambda: self._compute_stats(stats_samples))

    def __len__(self) -> int:
        return len(self.table)

    # ----------------------------------------------------------------------------- reading
    def _resolve(self, path: str) -> str:
        parts = []
        for part in str(path).split(";"):
            p = Path(part.strip()).expanduser()
            parts.append(str(p if p.is_absolute() else self.root / p))
        return ";".join(parts)

    def _open(self, row: pd.Series) -> tuple[ChannelStack, list[str]]:
        """The row's stack (cached per worker) and its canonical channel names."""
        path = self._resolve(str(row["path"]))
        width = row.get("channel_width")
        width = int(width) if width is not None and pd.notna(width) else None
        key = (path, width)
        if key in self._stacks:
            self._stacks.move_to_end(key)
        else:
            names = row.get("channels")
            names = [n for n in str(names).split(";") if n] if isinstance(names, str) and names else None
            stack = open_stack(path, channel_names=names, channel_width=width, **self.read_options)
            found = canonical_names(stack.channel_names, self.channel_map, source=stack.path)
            self._check_file_names(stack, found)
            if self.channels is not None and self.missing_channels == "error":
                missing = [c for c in self.channels if c not in found]
                if missing:
                    raise DataError(
                        f"{stack.path}: has {len(found)} channels {stack.channel_names} but the config asks for "
                        f"{len(self.channels)} {self.channels}; missing {missing}. Fix data.channels or "
                        "data.channel_map, or set data.missing_channels=pad"
                    )
            self._stacks[key] = (stack, found)
            if len(self._stacks) > STACK_CACHE_SIZE:
                self._stacks.popitem(last=False)
        return self._stacks[key]

    def _check_file_names(self, stack: ChannelStack, found: list[str]) -> None:
        """Refuse index channel names that contradict the names stored in the file itself."""
        stored = stack.metadata.get("file_channel_names")
        if not stored or stored == stack.channel_names:
            return
        try:
            stored_canon = canonical_names(stored, self.channel_map)
        except DataError:  # placeholder names such as "C0", "Channel:0:1": the index's names stand
            return
        if stored_canon != found:
            raise DataError(
                f"{stack.path}: the file names its channels {stored} ({stored_canon}) but the index says "
                f"{stack.channel_names} ({found}); fix the index's 'channels' column, or relabel with "
                "data.channel_map"
            )

    def _layout(self, found: list[str]) -> tuple[list[str], list[int | None]]:
        """Output channel names and, for each, its position in the file (None = absent)."""
        if self.channels is None:
            return found, list(range(len(found)))
        return self.channels, [found.index(c) if c in found else None for c in self.channels]

    @staticmethod
    def _centre(row: pd.Series) -> tuple[float, float] | None:
        if "centroid_y" in row and "centroid_x" in row and pd.notna(row["centroid_y"]):
            return float(row["centroid_y"]), float(row["centroid_x"])
        if all(c in row for c in BOX_COLUMNS) and pd.notna(row["box_y0"]):
            return (float(row["box_y0"]) + float(row["box_y1"])) / 2, (float(row["box_x0"]) + float(row["box_x1"])) / 2
        return None

    def _row_mode(self, row: pd.Series) -> str:
        if self.mode != "auto":
            return self.mode
        if self._centre(row) is not None:
            return "cells"
        if "channel_width" in row and pd.notna(row["channel_width"]):
            return "image"
        return "tiles"

    def _read_box(self, stack: ChannelStack, row: pd.Series, positions: list[int]) -> np.ndarray:
        _, height, width = stack.shape
        if all(c in row for c in BOX_COLUMNS) and pd.notna(row["box_y0"]):
            y0, x0, y1, x1 = (int(round(float(row[c]))) for c in BOX_COLUMNS)
            y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
            if y1 <= y0 or x1 <= x0:
                raise DataError(f"{stack.path}: crop box {[row[c] for c in BOX_COLUMNS]} is outside the "
                                f"{height}x{width} image")
            return stack.read((y0, x0, y1 - y0, x1 - x0), positions)
        return stack.read(None, positions)

    def _reference_bounds(self, stack: ChannelStack, names: list[str], positions: list[int],
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image-level (or dataset) intensity bounds, for judging whether a tile is foreground."""
        if self.stats is not None:
            return self.stats.bounds(names, stack.path)
        key = stack.path
        if key not in self._reference:
            levels = stack.metadata.get("levels", 1)
            _, h, w = stack.shape
            if levels > 1:  # the coarsest pyramid level is a cheap overview of the whole image
                coarse = open_stack(stack.path, stack.channel_names, **{**self.read_options, "level": levels - 1})
                pixels = coarse.read()
            elif h * w <= 2048 * 2048:
                pixels = stack.read()
            else:
                pixels = np.concatenate([crop_square(stack, None, self.sample_size, range(stack.num_channels), rng)
                                         for _ in range(8)], axis=2)
            check_pixels(pixels, stack.path)
            lo, hi = np.percentile(pixels.astype(np.float32), self.percentiles, axis=(1, 2))
            self._reference[key] = (lo, hi)
        lo, hi = self._reference[key]
        return lo[positions], hi[positions]

    def _tile(self, stack: ChannelStack, names: list[str], positions: list[int],
              rng: np.random.Generator) -> np.ndarray:
        best, best_fg = None, -1.0
        bounds = None
        for _ in range(self.tile_attempts):
            tile = crop_square(stack, None, self.sample_size, positions, rng)
            check_pixels(tile, stack.path)
            if _is_blank(tile):
                continue
            if self.min_foreground <= 0:
                return tile
            if bounds is None:
                bounds = self._reference_bounds(stack, names, positions, rng)
            scaled = normalize_with_bounds(tile, *bounds)
            fg = float((scaled.max(axis=0) > self.foreground_threshold).mean())
            if fg >= self.min_foreground:
                return tile
            if fg > best_fg:
                best, best_fg = tile, fg
        if best is None:
            raise DataError(f"{stack.path}: {self.tile_attempts} random {self.sample_size}px tiles were all blank "
                            "(every channel constant); expected image content")
        return best

    def _raw(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray, ChannelStack]:
        """Row ``i`` as raw float32 ``(C, h, w)``, its channel names, presence mask and stack."""
        row = self.table.iloc[i]
        stack, found = self._open(row)
        names, positions = self._layout(found)
        present = np.array([p is not None for p in positions])
        read_at = [p for p in positions if p is not None]
        mode = self._row_mode(row)
        if mode != "image" and self.sample_size <= 0:
            raise ConfigError(f"data.sample_size={self.sample_size}; {mode} mode needs a positive crop size "
                              "(0 = native size is for whole images only)")
        if mode == "cells":
            centre = self._centre(row)
            if centre is None:
                raise DataError(f"{stack.path}: index row {i} has no centroid_y/centroid_x or box columns; "
                                "cells mode needs them")
            part = crop_square(stack, centre, self.sample_size, read_at, rng)
        elif mode == "tiles":
            part = self._tile(stack, [n for n, p in zip(names, positions) if p is not None], read_at, rng)
        else:
            part = self._read_box(stack, row, read_at)
        check_pixels(part, stack.path)
        if _is_blank(part):
            raise DataError(f"{stack.path}: the {mode} sample of index row {i} is blank (every channel constant "
                            f"at {part.reshape(-1)[0] if part.size else 'no pixels'}); expected image content")
        out = np.zeros((len(names), *part.shape[1:]), np.float32)
        out[present] = part
        return out, names, present, stack

    def _normalised(self, raw: np.ndarray, names: list[str], present: np.ndarray, source: str) -> np.ndarray:
        out = raw
        if self.normalize == "percentile":
            out = raw.copy()
            out[present] = normalize_percentiles(raw[present], *self.percentiles, source=source)
        elif self.normalize == "dataset":
            out = raw.copy()
            lo, hi = self.stats.bounds([n for n, p in zip(names, present) if p], source)
            out[present] = normalize_with_bounds(raw[present], lo, hi)
        return out

    def _compute_stats(self, n: int) -> ChannelStats:
        rng = np.random.default_rng(0)
        rows = rng.choice(len(self), size=min(n, len(self)), replace=False)

        def samples():
            for i in rows:
                try:
                    raw, names, present, _ = self._raw(int(i), rng)
                except DataError as exc:
                    if not self.skip_bad:
                        raise
                    logger.warning("channel statistics: skipping bad sample %d: %s", i, exc)
                    continue
                yield [nm for nm, p in zip(names, present) if p], raw[present]

        return compute_channel_stats(samples(), self.percentiles)

    # ----------------------------------------------------------------------------- items
    def load(self, i: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Row ``i`` as a normalised float32 ``(C, H, W)`` tensor, without the transform."""
        return self._load(i, rng)[0]

    def _load(self, i: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, list[str], np.ndarray]:
        rng = rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
        raw, names, present, stack = self._raw(i, rng)
        image = torch.from_numpy(self._normalised(raw, names, present, stack.path))
        if self._row_mode(self.table.iloc[i]) == "image":
            image = _fit_square(image, self.sample_size)
        return image, names, present

    def _item(self, i: int) -> dict:
        image, names, present = self._load(i)
        ids = self.channel_ids.clone() if self.channels is not None else torch.tensor(channel_ids(names))
        item: dict = {"channel_ids": ids, "index": i}
        if self.channels is None or self.missing_channels == "pad":
            item["channel_mask"] = torch.from_numpy(present.copy())
        if self.metadata_columns:
            row = self.table.iloc[i]
            item["metadata"] = {c: "" if pd.isna(row[c]) else str(row[c]) for c in self.metadata_columns}
        if self.transform is None:
            item["image"] = image
        else:
            item["views"] = self.transform(image)
        return item

    def __getitem__(self, i: int) -> dict:
        if not self.skip_bad:
            return self._item(i)
        # the requested row first, then distinct random rows (torch's RNG: seeded per loader worker)
        others = [int(k) for k in torch.randperm(len(self))[:MAX_CONSECUTIVE_BAD] if int(k) != i]
        tried = [i, *others][:MAX_CONSECUTIVE_BAD]
        for j in tried:
            try:
                return self._item(j)
            except DataError as exc:
                with self._bad.get_lock():
                    self._bad.value += 1
                path = str(self.table.iloc[j]["path"])
                if path not in self._warned:  # once per file and worker: a broken file has many rows
                    self._warned.add(path)
                    logger.warning("skipping bad sample (row %d): %s", j, exc)
                last = exc
        raise DataError(f"{self.source}: {len(tried)} bad samples in a row with skip_bad on; the data looks "
                        f"broken. Last: {last}")

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped since the last :meth:`end_epoch` (summed over loader workers)."""
        return int(self._bad.value)

    def end_epoch(self) -> int:
        """Log and reset the count of skipped bad samples; call at the end of every epoch.

        Returns:
            The number of samples skipped during the epoch.
        """
        with self._bad.get_lock():
            n, self._bad.value = int(self._bad.value), 0
        if n:
            logger.warning("skipped %d bad samples this epoch (skip_bad is on; see the warnings above)", n)
        return n


def build_dataset(data_cfg, transform: Callable | None = None, index: str | Path | pd.DataFrame | None = None,
                  root: str | Path | None = None) -> IndexDataset:
    """An :class:`IndexDataset` from the ``data`` section of a run config.

    Args:
        data_cfg: ``cfg.data`` (:class:`cellvit_ssl.config.DataConfig` fields).
        transform: Applied to each normalised sample (e.g. the DINO views).
        index: Overrides ``data_cfg.index`` (e.g. the generated demo index).
        root: Overrides ``data_cfg.root``.
    """
    z = data_cfg.z_slice if data_cfg.z_projection == "slice" else "max"
    if data_cfg.z_projection not in ("max", "slice"):
        raise ConfigError(f"data.z_projection={data_cfg.z_projection!r}; expected 'max' or 'slice'")
    index = index if index is not None else data_cfg.index
    if index is None:
        raise DataError("data.index is not set; point it at your index table "
                        "(python -m cellvit_ssl.data.index builds one)")
    return IndexDataset(
        index,
        channels=list(data_cfg.channels) if data_cfg.channels else None,
        root=root if root is not None else data_cfg.root,
        sample_size=data_cfg.sample_size,
        transform=transform,
        channel_map=dict(data_cfg.channel_map),
        percentiles=list(data_cfg.normalize_percentiles),
        mode=data_cfg.mode,
        normalize=data_cfg.normalize,
        stats_cache=data_cfg.stats_cache,
        stats_samples=data_cfg.stats_samples,
        foreground_threshold=data_cfg.foreground_threshold,
        min_foreground=data_cfg.min_foreground,
        tile_attempts=data_cfg.tile_attempts,
        missing_channels=data_cfg.missing_channels,
        skip_bad=data_cfg.skip_bad,
        level=data_cfg.level,
        z=z,
        t=data_cfg.t_frame,
        missing_chunks=data_cfg.missing_chunks,
        metadata_columns=list(data_cfg.metadata_columns),
    )
