"""Multichannel DINO multi-crop for a whole batch at once, on the batch's device.

The CPU path (:class:`cellvit_ssl.transforms.MultichannelDINOTransform`) makes the views of one
sample at a time in DataLoader workers. Here the DataLoader only delivers normalised samples
``(B, C, H, W)``; after one host-to-device copy every view of every sample is made in a few
batched kernels, in the CPU transform's order:

    crop → flips → rot90 → gamma → blur → noise → standardise → contrast/brightness → drop

- random resized crops: one :func:`torchvision.ops.roi_align` per crop size;
- flips and 90° rotations: one gather;
- gamma: one ``pow`` with an exponent per view and channel;
- Gaussian blur: one separable depthwise convolution (reflect padding, as torchvision's
  ``gaussian_blur``) whose taps are zero beyond each channel's own kernel radius, so every
  channel gets exactly its own ``(k, sigma)`` kernel; channels left unblurred get a unit tap;
- Gaussian / Poisson noise, standardisation, contrast / brightness: element-wise, with
  parameters per view and channel;
- channel drop: a keep mask per view (protected channels always kept, never all dropped).

Every random draw follows the CPU transform's law for the same ``views`` config: torchvision
``RandomResizedCrop`` (area fraction uniform in ``scale``, log aspect ratio uniform in
``log(3/4)..log(4/3)``, ten attempts, then a central crop), the flip probabilities, a uniform
multiple of 90°, one apply-coin per view for gamma, noise and contrast/brightness, one per
channel for blur, and parameters drawn independently for every channel. ``views.channel_mode=boc``
cuts every channel of every sample as its own one-channel sample (own crop, flips and draws),
as the CPU transform does. All draws come from one ``torch.Generator`` on the batch's device,
so a seed reproduces the views, and nothing is copied between host and device: a call issues
no host-device synchronisation (small lookup tables are built on the device and kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from cellvit_ssl.preprocess import standardize_channels
from cellvit_ssl.transforms import centre_offset_range, check_view_settings

#: torchvision RandomResizedCrop's default aspect-ratio range (the CPU transform uses it).
RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Attempts before the central-crop fallback, as in torchvision.
ATTEMPTS = 10


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


_DIHEDRAL_CACHE: dict[tuple[int, str], Tensor] = {}


def _per_view(x: Tensor) -> Tensor:
    """``(n,)`` or ``(n, c)`` → broadcastable over ``(n, c, h, w)``."""
    return x.view(*x.shape, *([1] * (4 - x.ndim)))


# ----- geometry ------------------------------------------------------------------------------


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    ratio: tuple[float, float] = RATIO,
    centred: bool = False,
) -> Tensor:
    """Draw ``n`` random-resized-crop boxes with torchvision ``RandomResizedCrop``'s law.

    All attempts are drawn at once; each box takes its first valid attempt, else the central
    fallback crop, so the result is distributed exactly like the per-sample loop.

    Args:
        n: Number of boxes.
        height: Tile height in pixels.
        width: Tile width in pixels.
        scale: ``(low, high)`` range of the crop's area as a fraction of the tile's.
        generator: Random source (on ``device``); the global one when None.
        device: Where to draw.
        ratio: ``(low, high)`` aspect-ratio (width / height) range.
        centred: Place every box uniformly among the positions that hold the tile's centre
            (``views.crop_anchor=centre``) instead of anywhere in the tile.

    Returns:
        ``(n, 4)`` float boxes ``(top, left, crop_height, crop_width)`` in whole pixels.
    """
    device = torch.device(device)
    area = float(height * width)
    u = _rand((n, ATTEMPTS, 4), generator, device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)  # first True (0 when none)
    h, w, u_top, u_left = (t.gather(1, first).squeeze(1) for t in (h, w, u[..., 2], u[..., 3]))
    # Uniform integer offsets in low..high (clamped against float rounding of u * (high - low + 1)).
    (top_low, top_high), (left_low, left_high) = (
        centre_offset_range(length, crop) if centred else (torch.zeros_like(crop), length - crop)
        for length, crop in ((height, h), (width, w)))
    top = top_low + torch.minimum(torch.floor(u_top * (top_high - top_low + 1)), top_high - top_low)
    left = left_low + torch.minimum(torch.floor(u_left * (left_high - left_low + 1)), left_high - left_low)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fb_w, fb_h = round(height * max(ratio)), height
    else:
        fb_w, fb_h = width, height
    ok = valid.any(dim=1)
    # Python-scalar fallbacks keep this free of host-to-device copies.
    columns = [(top, (height - fb_h) // 2), (left, (width - fb_w) // 2), (h, fb_h), (w, fb_w)]
    return torch.stack([torch.where(ok, col, float(fb)) for col, fb in columns], dim=1)


def crop_resize(images: Tensor, sample_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut ``boxes`` out of ``images`` and resample each to ``size × size``.

    Bilinear with pixel-centre alignment (``align_corners=False``); when a crop shrinks, each
    output pixel averages ``ceil(crop / size)²`` bilinear samples of its footprint, which
    anti-aliases like torchvision's ``antialias=True`` resize.

    Args:
        images: ``(B, C, H, W)`` float tiles.
        sample_index: ``(K,)`` which tile each box is cut from.
        boxes: ``(K, 4)`` ``(top, left, height, width)`` in pixels.
        size: Output side.

    Returns:
        ``(K, C, size, size)`` crops.
    """
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    rois = torch.stack([sample_index.to(images.dtype), left, top, left + w, top + h], dim=1)
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def dihedral_index(size: int, device: torch.device | str) -> Tensor:
    """Source-pixel tables for flips then a rotation, one row per ``h + 2·v + 4·k``.

    Row ``h + 2·v + 4·k`` maps output pixels to input pixels of
    ``rot90(vflip^v(hflip^h(x)), k)`` on a flattened ``size × size`` image; it is built by
    applying exactly those torch ops to a grid of pixel numbers.
    """
    device = torch.device(device)
    key = (size, str(device))
    if key not in _DIHEDRAL_CACHE:  # built where it is used: no host-to-device copy
        grid = torch.arange(size * size, device=device).reshape(size, size)
        rows = []
        for k in range(4):
            for v in range(2):
                for h in range(2):
                    g = grid.flip(-1) if h else grid
                    g = g.flip(-2) if v else g
                    rows.append(torch.rot90(g, k, dims=(-2, -1)).reshape(-1))
        _DIHEDRAL_CACHE[key] = torch.stack(rows)
    return _DIHEDRAL_CACHE[key]


def flip_rotate(views: Tensor, hflip: Tensor, vflip: Tensor, k: Tensor) -> Tensor:
    """Per-sample horizontal flip, vertical flip, then ``k`` quarter turns, in one gather.

    Args:
        views: ``(K, C, s, s)`` square views.
        hflip: ``(K,)`` bool.
        vflip: ``(K,)`` bool.
        k: ``(K,)`` integer quarter turns in 0..3.
    """
    n, c, s, s2 = views.shape
    if s != s2:
        raise ValueError(f"flip_rotate needs square views, got {s}x{s2}")
    code = hflip.long() + 2 * vflip.long() + 4 * k.long()
    index = dihedral_index(s, views.device)[code]  # (K, s·s)
    flat = views.reshape(n, c, s * s)
    return flat.gather(2, index.unsqueeze(1).expand(n, c, s * s)).reshape(n, c, s, s)


# ----- intensity ops, each with parameters per view and channel -------------------------------


def random_gamma(views: Tensor, gamma: float, p: float, generator: torch.Generator | None = None) -> Tensor:
    """``x ** g`` (on ``x`` clamped at 0) with ``log g ~ U(-log(1 + gamma), log(1 + gamma))`` per channel.

    One coin per view (probability ``p``); views it spares are returned untouched (not clamped),
    as by :class:`~cellvit_ssl.transforms.PerChannelGamma`.
    """
    n, c = views.shape[:2]
    u = _rand((n, c + 1), generator, views.device)
    log_range = math.log1p(gamma)
    g = torch.exp(log_range * (2 * u[:, 1:] - 1)).to(views.dtype)
    return torch.where(_per_view(u[:, 0] < p), views.clamp_min(0) ** _per_view(g), views)


def blur_radius_limit(height: int, width: int) -> int:
    """The largest kernel radius the CPU transform uses on a ``height × width`` view."""
    return (min(height, width) - 1) // 2


def gaussian_blur_per_channel(views: Tensor, sigma: Tensor, apply: Tensor, max_sigma: float) -> Tensor:
    """Blur each channel of each view with its own Gaussian, as torchvision's ``gaussian_blur``.

    Channel ``(i, c)`` gets the kernel of size ``k = 2·ceil(3σ) + 1`` (capped at the view's
    largest odd size below its side) and standard deviation ``σ = sigma[i, c]`` with reflect
    padding, i.e. what :class:`~cellvit_ssl.transforms.PerChannelGaussianBlur` applies; channels
    where ``apply`` is False come back unchanged. One separable depthwise convolution serves
    all channels: taps beyond a channel's own radius are zero, and a reflect padding wider
    than a channel's radius agrees with its own padding wherever its taps reach.

    Args:
        views: ``(n, c, h, w)`` float views.
        sigma: ``(n, c)`` standard deviations in pixels.
        apply: ``(n, c)`` bool.
        max_sigma: Upper bound of ``sigma`` (sets the shared kernel width).
    """
    n, c, h, w = views.shape
    limit = blur_radius_limit(h, w)
    reach = min(math.ceil(3 * max_sigma), limit)
    if reach < 1:  # views of 1-2 px: every kernel is a single tap
        return views
    offsets = torch.arange(-reach, reach + 1, device=views.device, dtype=views.dtype)
    sigma = sigma.to(views.dtype).unsqueeze(-1)
    radius = torch.clamp(torch.ceil(3 * sigma), max=limit)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= radius)
    taps = taps / taps.sum(-1, keepdim=True)
    unit = (offsets == 0).to(views.dtype)
    taps = torch.where(apply.unsqueeze(-1), taps, unit).reshape(n * c, 1, 1, 2 * reach + 1)
    x = F.pad(views.reshape(1, n * c, h, w), [reach] * 4, mode="reflect")
    x = F.conv2d(x, taps, groups=n * c)  # along rows
    x = F.conv2d(x, taps.transpose(-1, -2), groups=n * c)  # along columns
    return x.reshape(n, c, h, w)


def random_blur(views: Tensor, p: Tensor | float, sigma: tuple[float, float],
                generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur of each channel with probability ``p`` and ``σ ~ U(sigma)``, drawn per channel.

    Args:
        views: ``(n, c, h, w)`` float views.
        p: Blur probability, a float or ``(n, 1)`` per view (the CPU transform's probabilities
            differ between the first and second global view and the local views).
        sigma: ``(low, high)`` range of the standard deviation in pixels.
        generator: Random source on the views' device.
    """
    n, c = views.shape[:2]
    u = _rand((n, 2 * c), generator, views.device)
    apply = u[:, :c] < p
    s = sigma[0] + (sigma[1] - sigma[0]) * u[:, c:]
    return gaussian_blur_per_channel(views, s, apply, sigma[1])


def random_noise(views: Tensor, kind: str, p: float, std: tuple[float, float], photons: tuple[float, float],
                 generator: torch.Generator | None = None) -> Tensor:
    """Gaussian or Poisson noise with a level per channel; one coin per view (probability ``p``).

    ``gaussian``: ``x + N(0, s²)`` with ``s ~ U(std)``. ``poisson``: ``Poisson(λ·max(x, 0)) / λ``
    with ``λ`` log-uniform in ``photons``. Spared views are returned untouched, as by
    :class:`~cellvit_ssl.transforms.PerChannelNoise`.
    """
    if kind == "none":
        return views
    n, c = views.shape[:2]
    u = _rand((n, c + 1), generator, views.device)
    on = _per_view(u[:, 0] < p)
    if kind == "gaussian":
        level = _per_view((std[0] + (std[1] - std[0]) * u[:, 1:]).to(views.dtype))
        noise = torch.randn(views.shape, generator=generator, device=views.device, dtype=views.dtype)
        return torch.where(on, views + noise * level, views)
    lo, hi = math.log(photons[0]), math.log(photons[1])
    lam = _per_view(torch.exp(lo + (hi - lo) * u[:, 1:]).to(views.dtype))
    # Spared views get rate 0, which the sampler answers at no cost.
    rate = torch.where(on, views.clamp_min(0) * lam, 0.0)
    return torch.where(on, torch.poisson(rate, generator=generator) / lam, views)


def jitter_params(
    n: int,
    channels: int,
    brightness: float,
    contrast: float,
    p: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Per-view, per-channel ``(scale, shift)`` of the intensity jitter, each ``(n, channels)``.

    One coin per view decides (probability ``p``) whether the view is jittered; if so every
    channel gets its own ``scale ~ U(1 - contrast, 1 + contrast)`` and
    ``shift ~ U(-brightness, brightness)``; otherwise scale 1 and shift 0.
    """
    device = torch.device(device)
    u = _rand((n, 2 * channels + 1), generator, device)
    on = (u[:, :1] < p).to(u.dtype)
    scale = 1 + on * (u[:, 1 : 1 + channels] * 2 - 1) * contrast
    shift = on * (u[:, 1 + channels :] * 2 - 1) * brightness
    return scale, shift


def random_channel_drop(views: Tensor, p: float, protected: Tensor, real: Tensor | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """Zero whole channels, each with probability ``p``; never a protected one, never all.

    As :class:`~cellvit_ssl.transforms.RandomChannelDrop`, with one draw per view: when a
    draw would drop every channel, one channel chosen uniformly is kept.

    Args:
        views: ``(n, c, h, w)`` float views.
        p: Drop probability per unprotected channel.
        protected: ``(c,)`` bool, channels never dropped.
        real: ``(n, c)`` bool, False at batch padding (the kept channel is chosen among the
            others); None when nothing is padded.
        generator: Random source on the views' device.
    """
    n, c = views.shape[:2]
    u = _rand((n, 2 * c), generator, views.device)
    keep = (u[:, :c] >= p) | protected
    pick = u[:, c:] if real is None else torch.where(real, u[:, c:], -1.0)
    kept = keep if real is None else keep & real
    chosen = torch.arange(c, device=views.device) == pick.argmax(dim=1, keepdim=True)
    fallback = chosen & ~kept.any(dim=1, keepdim=True)
    return views * _per_view((keep | fallback).to(views.dtype))


def view_probabilities(probs: Sequence[float], per_view: int, device: torch.device) -> Tensor | float:
    """Probability per row of view-major views (``per_view`` rows of view 0, then of view 1, ...).

    A float when all views share it, else ``(len(probs) · per_view, 1)``, made on ``device``.
    """
    if len(set(probs)) == 1:
        return float(probs[0])
    view = torch.arange(len(probs) * per_view, device=device) // per_view
    p = torch.full(view.shape, float(probs[-1]), device=device)
    for v, pv in enumerate(probs[:-1]):
        p = torch.where(view == v, float(pv), p)
    return p.unsqueeze(1)


# ----- the multi-crop ------------------------------------------------------------------------


class GPUMultiCrop:
    """2 global + ``n_local_views`` local views of every sample of a batch, made on its device.

    Same view distribution as :class:`cellvit_ssl.transforms.MultichannelDINOTransform` with
    the same ``views`` config, every option included, but batched: the DataLoader delivers
    normalised samples, they are moved once, and the views are cut where the model runs (on
    CPU tensors too, which the tests and ``views.device=device`` on a CPU run use).

    Args:
        cfg: The ``views`` section of the run config.
        channels: The channel names of the input, in order (``data.channels``); needed only
            when ``views.protected_channels`` is set.

    Raises:
        ConfigError: As the CPU transform: an unknown channel mode or noise kind, channel drop
            in ``boc`` mode, or a protected channel that is not among ``channels``.

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> cfg = load_config(None, ["views.n_local_views=2"])
        >>> crops = GPUMultiCrop(cfg.views)
        >>> g = torch.Generator().manual_seed(0)
        >>> views = crops(torch.rand(8, 4, 256, 256), generator=g)
        >>> [tuple(v.shape) for v in views]
        [(8, 4, 224, 224), (8, 4, 224, 224), (8, 4, 96, 96), (8, 4, 96, 96)]
    """

    n_global_views = 2

    def __init__(self, cfg, channels: Sequence[str] | None = None) -> None:
        self.protected = tuple(check_view_settings(cfg, channels))
        self.boc = cfg.channel_mode == "boc"
        self.global_size = int(cfg.global_crop_size)
        self.local_size = int(cfg.local_crop_size)
        self.global_scale = (float(cfg.global_crop_scale[0]), float(cfg.global_crop_scale[1]))
        self.local_scale = (float(cfg.local_crop_scale[0]), float(cfg.local_crop_scale[1]))
        self.ratio = (float(cfg.crop_ratio[0]), float(cfg.crop_ratio[1]))
        self.centred = cfg.crop_anchor == "centre"
        self.n_local_views = int(cfg.n_local_views)
        self.hflip_prob = float(cfg.hflip_prob)
        self.vflip_prob = float(cfg.vflip_prob)
        self.rot90 = bool(cfg.rot90)
        self.gamma = float(cfg.gamma)
        self.blur_prob = tuple(float(p) for p in cfg.blur_prob)  # global 1, global 2, local
        self.blur_sigma = (float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1]))
        self.noise = str(cfg.noise)
        self.noise_prob = float(cfg.noise_prob)
        self.noise_std = (float(cfg.noise_std[0]), float(cfg.noise_std[1]))
        self.noise_photons = (float(cfg.noise_photons[0]), float(cfg.noise_photons[1]))
        self.standardize = bool(cfg.standardize)
        self.brightness = float(cfg.brightness)
        self.contrast = float(cfg.contrast)
        self.jitter_prob = float(cfg.jitter_prob)
        self.drop_prob = float(cfg.channel_drop_prob)

    def _intensity(self, views: Tensor, blur_probs: tuple[float, ...], per_view: int, real: Tensor | None,
                   generator: torch.Generator | None) -> Tensor:
        """The CPU transform's ops after the geometry, on ``(n_views · per_view, c, s, s)`` views."""
        n, c = views.shape[:2]
        if self.gamma > 0 and self.jitter_prob > 0:
            views = random_gamma(views, self.gamma, self.jitter_prob, generator)
        if any(p > 0 for p in blur_probs):
            views = random_blur(views, view_probabilities(blur_probs, per_view, views.device), self.blur_sigma,
                                generator)
        if self.noise != "none" and self.noise_prob > 0:
            views = random_noise(views, self.noise, self.noise_prob, self.noise_std, self.noise_photons, generator)
        if self.standardize:
            views = standardize_channels(views)
        if self.jitter_prob > 0:
            mul, add = jitter_params(n, c, self.brightness, self.contrast, self.jitter_prob, generator, views.device)
            views = torch.addcmul(_per_view(add.to(views.dtype)), views, _per_view(mul.to(views.dtype)))
        if self.drop_prob > 0:
            index = torch.arange(c, device=views.device)
            protected = torch.zeros(c, dtype=torch.bool, device=views.device)
            for i in self.protected:
                protected |= index == i
            views = random_channel_drop(views, self.drop_prob, protected, real, generator)
        return views

    def _views(self, images: Tensor, n_views: int, size: int, scale: tuple[float, float],
               blur_probs: tuple[float, ...], real: Tensor | None, generator: torch.Generator | None) -> Tensor:
        b, c, height, width = images.shape
        n = n_views * b
        device = images.device
        boxes = sample_crop_boxes(n, height, width, scale, generator, device, ratio=self.ratio, centred=self.centred)
        index = torch.arange(b, device=device).repeat(n_views)  # view-major: view 0 of all tiles first
        views = crop_resize(images, index, boxes, size)
        u = _rand((n, 3), generator, device)
        k = torch.floor(u[:, 2] * 4) if self.rot90 else torch.zeros_like(u[:, 2])
        views = flip_rotate(views, u[:, 0] < self.hflip_prob, u[:, 1] < self.vflip_prob, k)
        real = None if real is None else real.repeat(n_views, 1)
        views = self._intensity(views, blur_probs, b, real, generator)
        return views.reshape(n_views, b, c, size, size)

    def packed(self, images: Tensor, generator: torch.Generator | None = None,
               padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Global and local views stacked by view: ``(2, B, C, g, g)`` and ``(N, B, C, l, l)``.

        Args:
            images: ``(B, C, H, W)`` floating-point samples, normalised, on any device.
            generator: Random source on ``images.device`` (the global one when None).
            padding: Optional ``(B, C)`` bool, True at channels that only pad the batch
                (:func:`~cellvit_ssl.data.collate.collate_channels`); their views are zero, as
                the CPU path's (which pads after the views), and channel drop never keeps one
                of them in place of a real channel.

        Raises:
            ValueError: If ``images`` is not a 4-D floating-point tensor.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"GPUMultiCrop expects floating-point tiles (B, C, H, W), got {tuple(images.shape)} {images.dtype}"
            )
        b, c = images.shape[:2]
        real = None if padding is None else ~padding.to(device=images.device, dtype=torch.bool)
        if self.boc:  # every channel its own one-channel sample: own crop, flips and draws
            images = images.reshape(b * c, 1, *images.shape[2:])
        g1, g2, local = self.blur_prob
        glob = self._views(images, self.n_global_views, self.global_size, self.global_scale, (g1, g2),
                           None if self.boc else real, generator)
        loc = self._views(images, self.n_local_views, self.local_size, self.local_scale, (local,) * self.n_local_views,
                          None if self.boc else real, generator)
        glob, loc = (v.reshape(v.shape[0], b, c, *v.shape[-2:]) for v in (glob, loc))
        if real is not None:
            keep = real.to(glob.dtype)[:, :, None, None]
            glob, loc = glob * keep, loc * keep
        return glob, loc

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 padding: Tensor | None = None) -> list[Tensor]:
        """Views for the batch: 2 global then ``n_local_views`` local, each ``(B, C, s, s)``.

        The list has the layout the training loop gets from the CPU transform after collation.
        See :meth:`packed` for the arguments.
        """
        glob, loc = self.packed(images, generator, padding)
        return list(glob.unbind(0)) + list(loc.unbind(0))
