"""Dataset over an index table: one row per image, per field of view or per cell crop.

Rows are read by :class:`~cellvit_ssl.data.samples.SampleReader` (the one reader shared with
``embed``, ``evaluate`` and napari; see :mod:`cellvit_ssl.data.samples` for the index columns
and the sampling modes) and turned into samples by the run's
:class:`~cellvit_ssl.preprocess.Preprocess` (normalisation, fitting), the contract that is
saved with the model so that inference sees what training saw. The random views come after.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.config import MissingChannels, Normalization, SampleMode, ZProjection
from cellvit_ssl.data.normalize import ChannelStats, cached_channel_stats, compute_channel_stats, fingerprint
from cellvit_ssl.data.samples import RawSample, SampleReader
from cellvit_ssl.errors import DataError
from cellvit_ssl.preprocess import Preprocess

__all__ = ["IndexDataset", "build_dataset", "read_index"]

logger = logging.getLogger(__name__)

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


class IndexDataset(Dataset):
    """Samples from an index table as float32 ``(C, H, W)`` in the order of ``channels``.

    Args:
        index: Path of the index table (CSV / parquet) or a DataFrame.
        channels: Channel names wanted, in the order the model expects. None takes every
            sample's own channels (their count may differ: batch with
            :func:`~cellvit_ssl.data.collate.collate_channels`).
        root: Base folder for relative paths, overriding the index's ``root`` column (default:
            that column, else the index's folder; see :class:`~cellvit_ssl.data.samples.SampleReader`).
        sample_size: Side of the square sample, in pixels.
        transform: Optional callable applied to each sample (e.g. the DINO views).
        channel_map: Your channel names → vocabulary names.
        percentiles: Normalisation percentiles ``(low, high)``.
        mode: ``auto`` | ``cells`` | ``tiles`` | ``image`` (see :mod:`cellvit_ssl.data.samples`).
        normalize: ``percentile`` (per sample and channel), ``dataset`` (per channel over the
            dataset, computed once and cached) or ``none``.
        stats_cache: JSON file for the dataset statistics (default
            ``~/.cache/cellvit_ssl/stats/<fingerprint>.json``); recomputed when stale.
        stats_samples: Rows sampled to compute dataset statistics.
        stats: Dataset statistics to use instead of computing them (e.g. from a checkpoint).
        foreground_threshold: Tiles: a pixel is foreground when some channel, scaled to
            [0, 1] by image-level (or dataset) percentiles, exceeds this.
        min_foreground: Tiles: minimum foreground fraction of a random tile (0 disables it).
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
        vocabulary: The channel vocabulary (default: built-in names plus ``channel_map``).

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
        mode: SampleMode | str = SampleMode.auto,
        normalize: Normalization | str = Normalization.percentile,
        stats_cache: str | Path | None = None,
        stats_samples: int = 256,
        stats: ChannelStats | None = None,
        foreground_threshold: float = 0.1,
        min_foreground: float = 0.0,
        tile_attempts: int = 10,
        missing_channels: MissingChannels | str = MissingChannels.error,
        skip_bad: bool = False,
        level: int = 0,
        z: str | int = "max",
        t: int = 0,
        missing_chunks: str = "error",
        metadata_columns: Sequence[str] = (),
        vocabulary: ChannelVocabulary | None = None,
    ) -> None:
        mode, normalize = _choice(SampleMode, mode, "mode"), _choice(Normalization, normalize, "normalize")
        missing_channels = _choice(MissingChannels, missing_channels, "missing_channels")
        if isinstance(index, pd.DataFrame):
            self.table = index.reset_index(drop=True)
            default_root = Path.cwd()
            self.source = "index DataFrame"
        else:
            self.table = read_index(index)
            default_root = Path(index).expanduser().parent
            self.source = str(index)
        absent = [c for c in metadata_columns if c not in self.table.columns]
        if absent:
            raise DataError(f"index {self.source!r} has no columns {absent} (columns: {list(self.table.columns)})")
        self.vocabulary = vocabulary or ChannelVocabulary.extended((), channel_map)
        self.reader = SampleReader(
            self.table, root=root, default_root=default_root, channels=channels, vocabulary=self.vocabulary,
            sample_size=sample_size,
            mode=mode, missing_channels=missing_channels, level=level, z=z, t=t, missing_chunks=missing_chunks,
            percentiles=percentiles, foreground_threshold=foreground_threshold, min_foreground=min_foreground,
            tile_attempts=tile_attempts, source=self.source,
        )
        self.channels = self.reader.channels
        self.channel_ids = None if self.channels is None else torch.tensor(self.vocabulary.ids(self.channels))
        self.transform = transform
        self.missing_channels = missing_channels
        self.skip_bad = bool(skip_bad)
        self.metadata_columns = list(metadata_columns)
        self._bad = multiprocessing.Value("l", 0)
        self._warned: set[str] = set()
        self.stats: ChannelStats | None = None
        if normalize == Normalization.dataset and stats is None:
            key = fingerprint({"index": pd.util.hash_pandas_object(self.table.astype(str)).sum(),
                               "root": self.reader.roots(), "channels": self.channels,
                               "map": dict(self.vocabulary.mapping), "percentiles": [float(p) for p in percentiles],
                               "mode": mode.value, "size": int(sample_size), "read": self.reader.read_options,
                               "n": stats_samples})
            stats = cached_channel_stats(stats_cache, key, lambda: self._compute_stats(stats_samples, percentiles))
        if normalize == Normalization.dataset:
            self.stats = stats
            self.reader.bounds = {n: (stats.low[n], stats.high[n]) for n in stats.low}
        #: The preprocessing contract of the samples (the model-input step is the run's).
        self.preprocess = Preprocess(normalize=normalize, percentiles=tuple(percentiles), sample_size=int(sample_size),
                                     mode=mode, bounds=self.reader.bounds)

    def __len__(self) -> int:
        return len(self.table)

    def _compute_stats(self, n: int, percentiles: Sequence[float]) -> ChannelStats:
        rng = np.random.default_rng(0)
        rows = rng.choice(len(self), size=min(n, len(self)), replace=False)

        def samples():
            for i in rows:
                try:
                    raw = self.reader.read(int(i), rng)
                except DataError as exc:
                    if not self.skip_bad:
                        raise
                    logger.warning("channel statistics: skipping bad sample %d: %s", i, exc)
                    continue
                yield [n for n, p in zip(raw.names, raw.present) if p], raw.pixels[raw.present]

        return compute_channel_stats(samples(), percentiles)

    # ----------------------------------------------------------------------------- items
    def raw(self, i: int, rng: np.random.Generator | None = None) -> RawSample:
        """Row ``i``'s raw pixels (:meth:`SampleReader.read <cellvit_ssl.data.samples.SampleReader.read>`)."""
        rng = rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))
        return self.reader.read(i, rng)

    def sample(self, raw: RawSample) -> torch.Tensor:
        """A raw sample through the preprocessing contract: the tensor the views are cut from."""
        return self.preprocess.to_sample(raw.pixels, raw.names, raw.present, image_sample=raw.is_image,
                                         source=raw.source)

    def load(self, i: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Row ``i`` as a normalised float32 ``(C, H, W)`` tensor, before any augmentation."""
        return self.sample(self.raw(i, rng))

    def _item(self, i: int) -> dict:
        raw = self.raw(i)
        image = self.sample(raw)
        ids = self.channel_ids.clone() if self.channels is not None else torch.tensor(self.vocabulary.ids(raw.names))
        item: dict = {"channel_ids": ids, "index": i}
        if self.channels is None or self.missing_channels == MissingChannels.pad:
            item["channel_mask"] = torch.from_numpy(raw.present.copy())
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


def _choice(kind: type, value, key: str):
    try:
        return kind(value)
    except ValueError:
        from cellvit_ssl.errors import ConfigError

        raise ConfigError(f"data.{key}={value!r}; expected one of {[m.value for m in kind]}") from None


def build_dataset(data_cfg, transform: Callable | None = None, index: str | Path | pd.DataFrame | None = None,
                  root: str | Path | None = None, stats: ChannelStats | None = None) -> IndexDataset:
    """An :class:`IndexDataset` from the ``data`` section of a run config.

    Args:
        data_cfg: ``cfg.data`` (a :class:`cellvit_ssl.config.DataConfig`).
        transform: Applied to each sample (e.g. the DINO views).
        index: Overrides ``data_cfg.index`` (e.g. the generated demo index).
        root: Overrides ``data_cfg.root``.
        stats: Dataset statistics to use (``data.normalize=dataset``) instead of computing them.

    Raises:
        DataError: If no index is set, or the index / its files are bad.
    """
    z = data_cfg.z_slice if data_cfg.z_projection == ZProjection.slice else "max"
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
        percentiles=list(data_cfg.normalize_percentiles),
        mode=data_cfg.mode,
        normalize=data_cfg.normalize,
        stats_cache=data_cfg.stats_cache,
        stats_samples=data_cfg.stats_samples,
        stats=stats,
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
        vocabulary=ChannelVocabulary.from_config(data_cfg),
    )
