"""Per-channel intensity normalisation: per-sample percentiles or cached dataset statistics.

Two ways to bring channels of any bit depth to ``[0, 1]``:

- :func:`normalize_percentiles`: each sample's own ``low``/``high`` percentiles per channel
  (robust, no preparation; the brightness of a sample relative to others is lost).
- :class:`ChannelStats` + :func:`normalize_with_bounds`: the ``low``/``high`` percentiles of
  each named channel over a sample of the whole dataset, computed once and cached as JSON
  (keeps relative brightness across samples, which matters for e.g. expression levels).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cellvit_ssl.errors import DataError

logger = logging.getLogger(__name__)

EPS = np.float32(1e-6)


def check_pixels(image: np.ndarray, source: str = "image") -> None:
    """Refuse what must never reach a model: a non-``(C, H, W)`` array, NaN or Inf pixels.

    Raises:
        DataError: Naming ``source`` and what was found.
    """
    if image.ndim != 3:
        raise DataError(f"{source}: expected a (C, H, W) image, got shape {tuple(image.shape)}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise DataError(f"{source}: the image holds {bad} NaN or Inf pixels; expected finite intensities")


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
    check_pixels(image, source)
    image = image.astype(_working_dtype(image), copy=False)
    lo, hi = np.percentile(image, [low, high], axis=(1, 2), keepdims=True)
    return normalize_with_bounds(image, lo.reshape(-1), hi.reshape(-1))


def _working_dtype(image: np.ndarray) -> type:
    # float64 / 64-bit integer pixels can exceed float32's range (~3.4e38): scale them in float64
    return np.float64 if image.dtype.itemsize > 4 else np.float32


def normalize_with_bounds(image: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Scale channel ``c`` to [0, 1] between ``low[c]`` and ``high[c]`` (clipped), as float32.

    The scaling runs in float64 for 64-bit pixels, so values beyond float32's range still map
    into ``[0, 1]`` instead of overflowing to Inf.
    """
    dtype = _working_dtype(image)
    lo = np.asarray(low, dtype).reshape(-1, 1, 1)
    hi = np.asarray(high, dtype).reshape(-1, 1, 1)
    image = image.astype(dtype, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # a spread beyond float64's range: clipped below
        scaled = (image - lo) / np.maximum(hi - lo, EPS)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0).astype(np.float32)


@dataclass
class ChannelStats:
    """Per-channel intensity statistics of a dataset, keyed by canonical channel name.

    Attributes:
        percentiles: The ``(low, high)`` percentiles the bounds were taken at.
        low: Channel name → intensity at the low percentile.
        high: Channel name → intensity at the high percentile.
        mean: Channel name → mean intensity.
        std: Channel name → standard deviation.
        n_samples: Number of samples the statistics were computed from.
        key: Fingerprint of the data and settings they were computed for (cache validity).
    """

    percentiles: tuple[float, float]
    low: dict[str, float]
    high: dict[str, float]
    mean: dict[str, float]
    std: dict[str, float]
    n_samples: int
    key: str = ""

    def bounds(self, names: Sequence[str], source: str = "dataset statistics") -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` arrays for channels in the order of ``names``.

        Raises:
            DataError: If a channel was not seen when the statistics were computed.
        """
        missing = [n for n in names if n not in self.low]
        if missing:
            raise DataError(f"{source}: no statistics for channels {missing}; they cover {sorted(self.low)}")
        return (np.array([self.low[n] for n in names], np.float32),
                np.array([self.high[n] for n in names], np.float32))

    def save(self, path: str | Path) -> Path:
        """Write as JSON atomically (:mod:`cellvit_ssl.io`) and return the path.

        Raises:
            DataError: If the file cannot be written (the message says where and why).
        """
        from cellvit_ssl.io import atomic_write_text

        return atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ChannelStats:
        """Read statistics written by :meth:`save`.

        Raises:
            DataError: If the file is not valid statistics JSON.
        """
        try:
            data = json.loads(Path(path).expanduser().read_text())
            data["percentiles"] = tuple(data["percentiles"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{path}: not a channel statistics file ({type(exc).__name__}: {exc})") from exc


def compute_channel_stats(
    samples: Iterable[tuple[Sequence[str], np.ndarray]],
    percentiles: Sequence[float] = (1.0, 99.8),
    pixels_per_sample: int = 4096,
    seed: int = 0,
) -> ChannelStats:
    """Statistics from ``(channel names, raw (C, H, W) array)`` samples.

    Each sample contributes up to ``pixels_per_sample`` random pixels per channel, so memory
    stays bounded whatever the image size.

    Raises:
        DataError: If no sample was given.
    """
    rng = np.random.default_rng(seed)
    pixels: dict[str, list[np.ndarray]] = {}
    n = 0
    for names, image in samples:
        n += 1
        flat = image.reshape(image.shape[0], -1).astype(np.float32, copy=False)
        take = rng.choice(flat.shape[1], size=min(pixels_per_sample, flat.shape[1]), replace=False)
        for name, row in zip(names, flat[:, take]):
            pixels.setdefault(name, []).append(row)
    if not pixels:
        raise DataError("no readable samples to compute channel statistics from")
    low, high, mean, std = {}, {}, {}, {}
    for name, rows in pixels.items():
        values = np.concatenate(rows)
        lo, hi = np.percentile(values, list(percentiles))
        low[name], high[name] = float(lo), float(hi)
        mean[name], std[name] = float(values.mean()), float(values.std())
    return ChannelStats(tuple(float(p) for p in percentiles), low, high, mean, std, n)


def fingerprint(parts: Mapping) -> str:
    """A short stable hash of JSON-serialisable settings (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_channel_stats(cache: str | Path | None, key: str, compute: Callable[[], ChannelStats]) -> ChannelStats:
    """Load statistics from ``cache`` when they were computed for ``key``, else compute and save.

    Args:
        cache: JSON file path; None uses ``~/.cache/cellvit_ssl/stats/<key>.json``.
        key: Fingerprint of the index and settings (see :func:`fingerprint`).
        compute: Called when the cache is absent or stale.
    """
    path = Path(cache).expanduser() if cache else Path("~/.cache/cellvit_ssl/stats").expanduser() / f"{key}.json"
    if path.is_file():
        stats = ChannelStats.load(path)
        if stats.key == key:
            return stats
        logger.info("channel statistics in %s are for other data or settings; recomputing", path)
    stats = compute()
    stats.key = key
    try:
        stats.save(path)
    except DataError as exc:  # the statistics are in hand (and go into the checkpoint); only the cache is lost
        logger.warning("channel statistics are not cached (data.stats_cache): %s; they are computed again next "
                       "time", exc)
        return stats
    logger.info("channel statistics from %d samples written to %s", stats.n_samples, path)
    return stats
