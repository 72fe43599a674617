"""The preprocessing contract: how raw pixels become what the model sees, saved with the model.

Training and inference share one :class:`Preprocess`: the training dataset applies
:meth:`Preprocess.to_sample` to every raw crop before the random views, and the
:class:`~cellvit_ssl.encoder.Encoder` applies the same method, then :meth:`Preprocess.model_input`
(resize to the training view size, optional per-channel standardisation). The contract is
written into ``checkpoint.pt`` and ``teacher.pt`` — with the dataset statistics themselves when
``data.normalize=dataset`` — so a model embeds the same way in a fresh process on another
machine, without the statistics cache of the machine it was trained on.

Steps, in order:

1. **normalise** each present channel to ``[0, 1]``: by the sample's own percentiles
   (``percentile``), by per-channel bounds over the training data (``dataset``), or not at all
   (``none``); absent channels stay zero.
2. **fit** (``image`` samples only): resize so the longer side is ``sample_size``, keeping the
   aspect ratio, and zero-pad to a square. Cell and tile samples are already ``sample_size``
   squares cut from the image (see :mod:`cellvit_ssl.data.samples`).
3. **model input** (inference): resize the sample to ``input_size`` (the global view size the
   model was trained on) and, when the run trained on standardised views, standardise each
   channel to zero mean / unit variance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from cellvit_ssl.config import Normalization, SampleMode
from cellvit_ssl.data.normalize import ChannelStats, check_pixels, normalize_percentiles, normalize_with_bounds
from cellvit_ssl.errors import CheckpointError, DataError

#: Version of the stored contract; bump when a stored field changes meaning.
CONTRACT_VERSION = 1


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(C, H, W)`` so the longer side is ``size`` (antialiased), then zero-pad to a square.

    ``size <= 0`` keeps the image as it is. The image is centred in the square.
    """
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


def standardize_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each channel of each image to zero mean and unit variance (``(..., C, H, W)``).

    A constant channel becomes all zeros (its spread is below ``eps``).
    """
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(eps)


def stats_bounds(stats: ChannelStats) -> dict[str, tuple[float, float]]:
    """Channel name → ``(low, high)`` normalisation bounds of dataset statistics."""
    return {name: (float(stats.low[name]), float(stats.high[name])) for name in stats.low}


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become model inputs; the same object serves training and inference.

    Args:
        normalize: ``percentile``, ``dataset`` or ``none``.
        percentiles: ``(low, high)`` percentiles mapped to 0 and 1 (``percentile`` mode, and
            the percentiles the dataset bounds were taken at).
        sample_size: Side of a sample in pixels (cells / tiles: the crop; image: the fitted square).
        mode: The run's ``data.mode`` (``image`` samples are fitted, see :func:`fit_square`).
        input_size: Side of the model input at inference (the training global view size).
        standardize: Standardise each channel of the model input (the run used
            ``views.standardize``).
        bounds: ``dataset`` mode: channel name → ``(low, high)`` intensity bounds.
    """

    normalize: Normalization = Normalization.percentile
    percentiles: tuple[float, float] = (1.0, 99.8)
    sample_size: int = 64
    mode: SampleMode = SampleMode.auto
    input_size: int = 224
    standardize: bool = False
    bounds: Mapping[str, tuple[float, float]] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "normalize", Normalization(self.normalize))
        object.__setattr__(self, "mode", SampleMode(self.mode))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.normalize == Normalization.dataset and not self.bounds:
            raise DataError("data.normalize=dataset needs per-channel bounds (dataset statistics)")

    # ------------------------------------------------------------------ building and storing
    @classmethod
    def from_config(cls, cfg, stats: ChannelStats | None = None) -> Preprocess:
        """The contract a run config implies; ``stats`` are its dataset statistics (``dataset`` mode)."""
        bounds = None
        if stats is not None:
            bounds = stats_bounds(stats)
        return cls(normalize=cfg.data.normalize, percentiles=tuple(cfg.data.normalize_percentiles),
                   sample_size=int(cfg.data.sample_size), mode=cfg.data.mode,
                   input_size=int(cfg.views.global_crop_size), standardize=bool(cfg.views.standardize),
                   bounds=bounds)

    def with_stats(self, stats: ChannelStats | None) -> Preprocess:
        """The same contract with dataset statistics attached (no-op without statistics)."""
        return self if stats is None else replace(self, bounds=stats_bounds(stats))

    def to_dict(self) -> dict:
        """Plain data for a checkpoint (``torch.load(weights_only=True)`` reads it back)."""
        return {"version": CONTRACT_VERSION, "normalize": self.normalize.value, "percentiles": list(self.percentiles),
                "sample_size": self.sample_size, "mode": self.mode.value, "input_size": self.input_size,
                "standardize": self.standardize,
                "bounds": None if self.bounds is None else {k: list(v) for k, v in self.bounds.items()}}

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "checkpoint") -> Preprocess:
        """Rebuild a contract written by :meth:`to_dict`.

        Raises:
            CheckpointError: If it was written by a newer version or is malformed.
        """
        try:
            version = int(data.get("version", 0))
            if version > CONTRACT_VERSION:
                raise CheckpointError(f"{source}: preprocessing contract version {version} is newer than this "
                                      f"cellvit_ssl understands ({CONTRACT_VERSION}); upgrade cellvit_ssl")
            bounds = data.get("bounds")
            return cls(normalize=data["normalize"], percentiles=tuple(data["percentiles"]),
                       sample_size=int(data["sample_size"]), mode=data["mode"], input_size=int(data["input_size"]),
                       standardize=bool(data["standardize"]),
                       bounds=None if bounds is None else {k: (float(v[0]), float(v[1])) for k, v in bounds.items()})
        except (KeyError, TypeError, ValueError, DataError) as exc:
            raise CheckpointError(f"{source}: malformed preprocessing contract ({type(exc).__name__}: {exc})") from exc

    # ------------------------------------------------------------------ the steps
    def normalized(self, pixels: np.ndarray, names: Sequence[str], present: np.ndarray | None = None,
                   source: str = "image") -> np.ndarray:
        """Step 1: raw ``(C, h, w)`` → float32 in ``[0, 1]`` per present channel (absent ones stay 0).

        Raises:
            DataError: On NaN / Inf pixels, a shape that is not ``(C, H, W)``, or (dataset mode) a
                channel without statistics — naming ``source``.
        """
        check_pixels(pixels, source)
        present = np.ones(len(names), bool) if present is None else np.asarray(present, bool)
        out = np.zeros(pixels.shape, np.float32)
        if not present.any():
            return out
        kept = pixels[present]
        if self.normalize == Normalization.percentile:
            out[present] = normalize_percentiles(kept, *self.percentiles, source=source)
        elif self.normalize == Normalization.dataset:
            wanted = [n for n, p in zip(names, present) if p]
            missing = [n for n in wanted if n not in self.bounds]
            if missing:
                raise DataError(f"{source}: no dataset statistics for channels {missing}; the model has them for "
                                f"{sorted(self.bounds)}")
            lo = [self.bounds[n][0] for n in wanted]
            hi = [self.bounds[n][1] for n in wanted]
            out[present] = normalize_with_bounds(kept, lo, hi)
        else:
            if kept.dtype.kind == "f" and kept.size and np.abs(kept).max() > np.finfo(np.float32).max:
                raise DataError(f"{source}: intensities up to {np.abs(kept).max():.3g} exceed float32's range, and "
                                "the model was trained without normalisation (data.normalize=none); rescale them")
            out[present] = kept.astype(np.float32, copy=False)
        return out

    def fitted(self, image: torch.Tensor, image_sample: bool) -> torch.Tensor:
        """Step 2: ``image`` samples are fitted into a ``sample_size`` square; others pass through."""
        return fit_square(image, self.sample_size) if image_sample else image

    def to_sample(self, pixels: np.ndarray, names: Sequence[str], present: np.ndarray | None = None, *,
                  image_sample: bool, source: str = "image") -> torch.Tensor:
        """Steps 1 and 2: the float32 ``(C, S, S)`` sample the training views are cut from."""
        return self.fitted(torch.from_numpy(self.normalized(pixels, names, present, source)), image_sample)

    def model_input(self, samples: torch.Tensor) -> torch.Tensor:
        """Step 3: samples ``(B, C, h, w)`` → the model's input ``(B, C, input_size, input_size)``."""
        size = (self.input_size, self.input_size)
        if tuple(samples.shape[-2:]) != size:
            samples = F.interpolate(samples, size=size, mode="bilinear", antialias=True, align_corners=False)
        return standardize_channels(samples) if self.standardize else samples

    def describe(self) -> str:
        """One line for logs and ``embed``'s ``uns``."""
        how = {"percentile": f"per-sample percentiles {list(self.percentiles)}",
               "dataset": f"dataset bounds at percentiles {list(self.percentiles)} for {sorted(self.bounds or {})}",
               "none": "none"}[self.normalize.value]
        fit = "fitted (aspect kept, zero-padded)" if self.mode == SampleMode.image else "cut"
        return (f"normalise: {how}; sample {self.sample_size}px {fit}; model input {self.input_size}px"
                f"{', standardised' if self.standardize else ''}")
