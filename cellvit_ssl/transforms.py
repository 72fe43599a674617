"""Multichannel DINO views on lightly's ``MultiViewTransform``.

lightly's ``DINOTransform`` assumes RGB PIL images (colour jitter, grayscale, solarize, PIL
blur, ImageNet normalisation). Here the structure and parameters are the same (2 global + N
local random resized crops, blur probabilities 1.0 / 0.1 / 0.5 for global 1 / global 2 /
local views) but every op is a channel-agnostic tensor op on ``(C, H, W)`` float tensors and
every random intensity op draws its parameters independently for each channel:

    crop → flips → rot90 → gamma → blur → noise → standardise → contrast/brightness → drop

Crops lie anywhere in the sample, or (``views.crop_anchor=centre``) always hold its centre,
where a single-cell sample's cell is.

Two channel modes:

- ``joint``: all channels of a view share one crop geometry (for ``fixed``, ``hierarchical``
  and ``channelvit`` models). Channel drop may zero channels (never all, never a protected
  one).
- ``boc``: bag of channels; every channel is its own single-channel sample with its own crop,
  flips and intensity draws. A view stays ``(C, h, w)`` (channel ``c`` is sample ``c``'s view),
  so batches keep their shape and the ``boc`` model makes ``C`` samples per image.

Hierarchical channel sampling (draw ``k`` in ``1..C``, then a ``k``-subset) works on a whole
batch through the model's channel mask: the objective applies
:func:`cellvit_ssl.models.sampling.sample_channel_subsets` when ``ssl.channel_sampling`` asks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cellvit_ssl.errors import ConfigError
from cellvit_ssl.preprocess import standardize_channels

CHANNEL_MODES = ("joint", "boc")
NOISE_KINDS = ("none", "gaussian", "poisson")
CROP_ANCHORS = ("anywhere", "centre")


def centre_offset_range(length, crop):
    """``(low, high)``: the offsets at which a ``crop``-long window over ``length`` holds its centre.

    The window ``[offset, offset + crop]`` holds the point ``length / 2`` exactly when
    ``low <= offset <= high``. ``crop`` may be an int or a float tensor of whole pixels.
    """
    half = length / 2
    if isinstance(crop, Tensor):
        return (half - crop).ceil().clamp_min(0), (length - crop).clamp_max(math.floor(half))
    return max(0, math.ceil(half - crop)), min(length - crop, math.floor(half))


class CentredRandomResizedCrop(v2.RandomResizedCrop):
    """``RandomResizedCrop`` whose crop always holds the centre of the input.

    Size and aspect ratio follow ``RandomResizedCrop``'s law; the position is uniform among
    the positions whose window holds the centre point. For single-cell samples (centred on
    their cell) every view then shows the cell the sample is about, not only its neighbours.
    """

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        height, width = v2.query_size(flat_inputs)
        for key, length, crop in (("top", height, params["height"]), ("left", width, params["width"])):
            low, high = centre_offset_range(length, crop)
            params[key] = int(torch.randint(low, high + 1, ()).item())
        return params


def _per_channel(x: Tensor, low: float, high: float) -> Tensor:
    """Uniform draws in ``[low, high)``, one per channel, shaped to broadcast over ``x``."""
    return low + (high - low) * torch.rand((x.shape[0],) + (1,) * (x.ndim - 1))


class RandomRot90:
    """Rotate by a random multiple of 90° (microscopy has no preferred orientation)."""

    def __call__(self, x: Tensor) -> Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class PerChannelGamma:
    """Gamma correction ``x ** g`` with ``log g ~ U(-log(1 + gamma), log(1 + gamma))`` per channel.

    Args:
        gamma: Spread of the exponent; 0 disables the op.
        p: Probability of applying it to a view.
    """

    def __init__(self, gamma: float = 0.2, p: float = 0.8) -> None:
        self.log_range = math.log1p(gamma)
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        if self.log_range == 0 or torch.rand(()) >= self.p:
            return x
        g = torch.exp(_per_channel(x, -self.log_range, self.log_range))
        return x.clamp_min(0) ** g


class PerChannelIntensityJitter:
    """Independent contrast scale and brightness shift for every channel.

    Args:
        brightness: Additive shift drawn from ``U(-b, b)`` per channel (in the image's units:
            the [0, 1] range, or standard deviations after standardisation).
        contrast: Multiplicative factor drawn from ``U(1 - c, 1 + c)`` per channel.
        p: Probability that the jitter is applied to the view at all.
    """

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, p: float = 0.8) -> None:
        self.brightness = brightness
        self.contrast = contrast
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        if torch.rand(()) >= self.p:
            return x
        scale = _per_channel(x, 1 - self.contrast, 1 + self.contrast)
        shift = _per_channel(x, -self.brightness, self.brightness)
        return x * scale + shift


class PerChannelGaussianBlur:
    """Gaussian blur, applied to each channel with probability ``p`` and its own sigma.

    Args:
        sigma: ``(low, high)`` range of the blur's standard deviation, in pixels of the view.
        p: Probability per channel.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0), p: float = 0.5) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        apply = torch.rand(x.shape[0]) < self.p
        if not apply.any():
            return x
        sigmas = _per_channel(x, *self.sigma).flatten()
        out = x.clone()
        for c in torch.nonzero(apply).flatten().tolist():
            s = float(sigmas[c])
            k = min(2 * math.ceil(3 * s) + 1, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
            out[c] = TF.gaussian_blur(x[c : c + 1], [k, k], [s, s])[0]
        return out


class PerChannelNoise:
    """Additive Gaussian or Poisson (shot) noise with a level drawn per channel.

    Args:
        kind: ``"gaussian"`` (std drawn from ``std``) or ``"poisson"`` (the view is taken as
            ``photons`` expected counts at intensity 1, photons drawn log-uniformly).
        std: ``(low, high)`` Gaussian standard deviation range.
        photons: ``(low, high)`` Poisson count range at intensity 1.
        p: Probability of adding noise to a view.
    """

    def __init__(self, kind: str = "gaussian", std: Sequence[float] = (0.0, 0.05),
                 photons: Sequence[float] = (50.0, 1000.0), p: float = 0.5) -> None:
        if kind not in NOISE_KINDS:
            raise ConfigError(f"views.noise={kind!r}; expected one of {list(NOISE_KINDS)}")
        self.kind = kind
        self.std = (float(std[0]), float(std[1]))
        self.log_photons = (math.log(photons[0]), math.log(photons[1]))
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "none" or torch.rand(()) >= self.p:
            return x
        if self.kind == "gaussian":
            return x + torch.randn_like(x) * _per_channel(x, *self.std)
        lam = torch.exp(_per_channel(x, *self.log_photons))
        return torch.poisson(x.clamp_min(0) * lam) / lam


class PerChannelStandardize:
    """Per-image, per-channel standardisation to zero mean and unit variance.

    A constant channel becomes all zeros (its spread is below ``eps``).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, x: Tensor) -> Tensor:
        return standardize_channels(x, self.eps)


class RandomChannelDrop:
    """Zero whole channels, each with probability ``p``; never a protected one, never all.

    Args:
        p: Drop probability per unprotected channel.
        protected: Indices of channels that are always kept (e.g. HPA's protein channel).
    """

    def __init__(self, p: float, protected: Sequence[int] = ()) -> None:
        self.p = p
        self.protected = sorted(set(int(i) for i in protected))

    def keep_mask(self, n_channels: int) -> Tensor:
        """Boolean ``(C,)``: which channels survive one draw."""
        keep = torch.rand(n_channels) >= self.p
        keep[self.protected] = True
        if not keep.any():  # only reachable without protected channels
            keep[int(torch.randint(0, n_channels, ()).item())] = True
        return keep

    def __call__(self, x: Tensor) -> Tensor:
        if self.p <= 0:
            return x
        keep = self.keep_mask(x.shape[0])
        return x * keep.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class _PerChannelView:
    """Bag-of-channels: run a 1-channel view pipeline on every channel independently."""

    def __init__(self, view: v2.Compose) -> None:
        self.view = view

    def __call__(self, x: Tensor) -> Tensor:
        return torch.cat([self.view(x[c : c + 1]) for c in range(x.shape[0])])


def check_view_settings(cfg, channels: Sequence[str] | None = None) -> list[int]:
    """Check the ``views`` settings both view makers share; return the protected channels' indices.

    Args:
        cfg: The ``views`` section of the run config.
        channels: The channel names of the input, in order (``data.channels``); needed only
            when ``views.protected_channels`` is set.

    Raises:
        ConfigError: On an unknown channel mode, channel drop in ``boc`` mode (dropping a
            channel there would only feed the model blank samples), or a protected channel
            that is not among ``channels``.
    """
    if cfg.channel_mode not in CHANNEL_MODES:
        raise ConfigError(f"views.channel_mode={cfg.channel_mode!r}; expected one of {list(CHANNEL_MODES)}")
    if cfg.noise not in NOISE_KINDS:
        raise ConfigError(f"views.noise={cfg.noise!r}; expected one of {list(NOISE_KINDS)}")
    if cfg.crop_anchor not in CROP_ANCHORS:
        raise ConfigError(f"views.crop_anchor={cfg.crop_anchor!r}; expected one of {list(CROP_ANCHORS)}")
    if cfg.channel_mode == "boc" and cfg.channel_drop_prob > 0:
        raise ConfigError(
            f"views.channel_drop_prob={cfg.channel_drop_prob} with views.channel_mode='boc': in a bag "
            "of channels every channel is its own sample, so set channel_drop_prob to 0"
        )
    names = list(cfg.protected_channels)
    if not names:
        return []
    if channels is None:
        raise ConfigError(
            f"views.protected_channels={names} needs the channel names: build the views "
            "with channels=data.channels"
        )
    missing = [n for n in names if n not in channels]
    if missing:
        raise ConfigError(f"views.protected_channels {missing} are not in data.channels={list(channels)}")
    return [list(channels).index(n) for n in names]


def _flips_and_turns(cfg) -> list:
    """The label-preserving geometric ops of a view: random flips and (``views.rot90``) 90° turns."""
    ops = [
        v2.RandomHorizontalFlip(cfg.hflip_prob),
        v2.RandomVerticalFlip(cfg.vflip_prob),
    ]
    if cfg.rot90:
        ops.append(RandomRot90())
    return ops


def _view(size: int, scale: Sequence[float], blur_p: float, cfg, drop: RandomChannelDrop | None) -> v2.Compose:
    cropper = CentredRandomResizedCrop if cfg.crop_anchor == "centre" else v2.RandomResizedCrop
    crop = cropper(size, scale=tuple(scale), ratio=tuple(cfg.crop_ratio), antialias=True)
    ops = [crop, *_flips_and_turns(cfg)]
    ops += [
        PerChannelGamma(cfg.gamma, cfg.jitter_prob),
        PerChannelGaussianBlur(cfg.blur_sigma, blur_p),
        PerChannelNoise(cfg.noise, cfg.noise_std, cfg.noise_photons, cfg.noise_prob),
    ]
    if cfg.standardize:
        ops.append(PerChannelStandardize())
    ops.append(PerChannelIntensityJitter(cfg.brightness, cfg.contrast, cfg.jitter_prob))
    if drop is not None:
        ops.append(drop)
    return v2.Compose(ops)


class MultichannelDINOTransform(MultiViewTransform):
    """2 global + ``n_local_views`` local views of a ``(C, H, W)`` float tensor.

    Args:
        cfg: The ``views`` section of the run config (crop sizes and scales, flips, intensity,
            blur, noise, standardisation, channel drop, channel mode).
        channels: The channel names of the input, in order (``data.channels``); needed only
            when ``views.protected_channels`` is set.

    Raises:
        ConfigError: On an unknown channel mode or noise kind, a protected channel that is
            not among ``channels``, or channel drop in ``boc`` mode (dropping a channel there
            would only feed the model blank samples).

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> t = MultichannelDINOTransform(load_config(None, ["views.n_local_views=2"]).views)
        >>> [tuple(v.shape) for v in t(torch.rand(4, 256, 256))]
        [(4, 224, 224), (4, 224, 224), (4, 96, 96), (4, 96, 96)]
    """

    def __init__(self, cfg, channels: Sequence[str] | None = None) -> None:
        protected = check_view_settings(cfg, channels)
        drop = RandomChannelDrop(cfg.channel_drop_prob, protected) if cfg.channel_drop_prob > 0 else None
        blur_g1, blur_g2, blur_local = cfg.blur_prob
        views = [
            _view(cfg.global_crop_size, cfg.global_crop_scale, blur_g1, cfg, drop),
            _view(cfg.global_crop_size, cfg.global_crop_scale, blur_g2, cfg, drop),
        ] + [_view(cfg.local_crop_size, cfg.local_crop_scale, blur_local, cfg, drop)] * cfg.n_local_views
        if cfg.channel_mode == "boc":
            views = [_PerChannelView(v) for v in views]
        super().__init__(views)
        self.n_global_views = 2
        self.channel_mode = cfg.channel_mode


class _OneSample:
    """A batch function ``(B, ...) -> (B, ...)`` applied to one sample (picklable, for loader workers)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x[None])[0]


#: ``finetune.augment`` choices of :class:`ClassifierView`.
CLASSIFIER_AUGMENTS = ("views", "geometric", "none")


class ClassifierView:
    """One view of a ``(C, H, W)`` sample for supervised fine-tuning.

    ``augment`` picks how much of pre-training's augmentation a labelled sample gets:

    - ``views``: the pre-training views without the multi-crop: one random resized crop at the
      global view size (``global_crop_size``, ``global_crop_scale``), then the same flips,
      rotations, intensity jitter, noise, standardisation and channel drop as a global view.
      Blur comes with the second global view's probability (``blur_prob[1]``): DINO blurs its
      first global view always, which would blur every labelled sample. All channels share one
      crop (an image is one labelled sample), whatever ``channel_mode`` pre-training used.
    - ``geometric``: the whole sample as the model sees it at inference (``model_input``:
      resized to the view size, standardised when the run was), randomly flipped
      (``hflip_prob``, ``vflip_prob``) and rotated by multiples of 90° (``rot90``): label-preserving
      changes only.
    - ``none``: exactly the inference input.

    Args:
        cfg: The ``views`` section of the run config.
        channels: The channel names of the input, in order; needed only when
            ``views.protected_channels`` is set.
        augment: ``views``, ``geometric`` or ``none``.
        model_input: ``(B, C, h, w) -> (B, C, S, S)``, the inference input step
            (:meth:`cellvit_ssl.preprocess.Preprocess.model_input`); needed unless ``views``.

    Returns (when called):
        A list holding the one view ``(C, global_crop_size, global_crop_size)``, the shape
        :func:`~cellvit_ssl.data.collate.collate_channels` batches as ``views``.

    Raises:
        ConfigError: On an unknown ``augment``.
    """

    def __init__(self, cfg, channels: Sequence[str] | None = None, augment: str = "views",
                 model_input=None) -> None:
        augment = str(getattr(augment, "value", augment))
        if augment not in CLASSIFIER_AUGMENTS:
            raise ConfigError(f"finetune.augment={augment!r}; expected one of {list(CLASSIFIER_AUGMENTS)}")
        if augment == "views":
            # One crop for all channels whatever pre-training's channel mode: check the rest as a joint view.
            protected = check_view_settings(replace(cfg, channel_mode="joint"), channels)
            drop = RandomChannelDrop(cfg.channel_drop_prob, protected) if cfg.channel_drop_prob > 0 else None
            self.view = _view(cfg.global_crop_size, cfg.global_crop_scale, cfg.blur_prob[1], cfg, drop)
            return
        if model_input is None:
            raise ValueError(f"augment={augment!r} needs the model_input step of the preprocessing contract")
        ops = [_OneSample(model_input)]
        if augment == "geometric":
            ops += _flips_and_turns(cfg)
        self.view = v2.Compose(ops)

    def __call__(self, x: Tensor) -> list[Tensor]:
        return [self.view(x)]
