"""Multichannel DINO multi-crop for a whole batch at once, on the batch's device.

The CPU path (:class:`cellvit_ssl.transforms.MultichannelDINOTransform`) makes the views of one
sample at a time in DataLoader workers. Here the DataLoader only delivers raw normalised tiles
``(B, C, H, W)``; after one host-to-device copy, every view of every sample is cut in a few
batched kernels: one :func:`torchvision.ops.roi_align` per crop size (random resized crops),
one gather for flips and 90° rotations, one fused multiply-add for per-channel intensity jitter.

Every random draw follows the CPU transform's distribution: torchvision
``RandomResizedCrop`` (area fraction uniform in ``scale``, log aspect ratio uniform in
``log(3/4)..log(4/3)``, ten attempts, then a central crop), horizontal / vertical flips with
their probabilities, a uniform multiple of 90°, and per-channel brightness / contrast drawn
independently for every channel with one apply-coin per view. All draws come from one
``torch.Generator`` on the batch's device, so a seed reproduces the views, and nothing reads a
value back to the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

from cellvit_ssl.errors import ConfigError

#: torchvision RandomResizedCrop's default aspect-ratio range (the CPU transform uses it).
RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Attempts before the central-crop fallback, as in torchvision.
ATTEMPTS = 10

#: Overrides that switch off the CPU transform's ops this module does not implement (gamma,
#: blur, noise, standardisation, channel drop, per-channel crops), so both paths make the same views.
GPU_VIEWS_OVERRIDES: tuple[str, ...] = (
    "views.gamma=0",
    "views.blur_prob=[0,0,0]",
    "views.noise=none",
    "views.standardize=false",
    "views.channel_drop_prob=0",
    "views.channel_mode=joint",
)


def unsupported_view_settings(cfg) -> list[str]:
    """The ``views`` settings that are on but not implemented here, as the overrides that turn them off."""
    on = []
    if float(getattr(cfg, "gamma", 0.0)) > 0:
        on.append("views.gamma=0")
    if any(float(p) > 0 for p in getattr(cfg, "blur_prob", ())):
        on.append("views.blur_prob=[0,0,0]")
    if getattr(cfg, "noise", "none") != "none" and float(getattr(cfg, "noise_prob", 0.0)) > 0:
        on.append("views.noise=none")
    if getattr(cfg, "standardize", False):
        on.append("views.standardize=false")
    if float(getattr(cfg, "channel_drop_prob", 0.0)) > 0:
        on.append("views.channel_drop_prob=0")
    if getattr(cfg, "channel_mode", "joint") != "joint":
        on.append("views.channel_mode=joint")
    return on


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    ratio: tuple[float, float] = RATIO,
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
    # Uniform integer offsets in 0..H-h (clamped against float rounding of u * (H - h + 1)).
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)

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


_DIHEDRAL_CACHE: dict[tuple[int, str], Tensor] = {}


def dihedral_index(size: int, device: torch.device | str) -> Tensor:
    """Source-pixel tables for flips then a rotation, one row per ``h + 2·v + 4·k``.

    Row ``h + 2·v + 4·k`` maps output pixels to input pixels of
    ``rot90(vflip^v(hflip^h(x)), k)`` on a flattened ``size × size`` image; it is built by
    applying exactly those torch ops to a grid of pixel numbers.
    """
    key = (size, str(device))
    if key not in _DIHEDRAL_CACHE:
        grid = torch.arange(size * size).reshape(size, size)
        rows = []
        for k in range(4):
            for v in range(2):
                for h in range(2):
                    g = grid.flip(-1) if h else grid
                    g = g.flip(-2) if v else g
                    rows.append(torch.rot90(g, k, dims=(-2, -1)).reshape(-1))
        _DIHEDRAL_CACHE[key] = torch.stack(rows).to(device)
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


class GPUMultiCrop:
    """2 global + ``n_local_views`` local views of every tile of a batch, made on its device.

    Same view distribution as :class:`cellvit_ssl.transforms.MultichannelDINOTransform` with
    the same ``views`` config, but batched: the DataLoader delivers raw tiles, the tiles are
    moved once, and the views are cut where the model runs.

    Args:
        cfg: The ``views`` section of the run config (crop sizes and scales, number of local
            views, flip probabilities, ``rot90``, brightness, contrast, jitter probability).

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> cfg = load_config(None, ["views.n_local_views=2", *GPU_VIEWS_OVERRIDES])
        >>> crops = GPUMultiCrop(cfg.views)
        >>> g = torch.Generator().manual_seed(0)
        >>> views = crops(torch.rand(8, 4, 256, 256), generator=g)
        >>> [tuple(v.shape) for v in views]
        [(8, 4, 224, 224), (8, 4, 224, 224), (8, 4, 96, 96), (8, 4, 96, 96)]
    """

    n_global_views = 2

    def __init__(self, cfg) -> None:
        missing = unsupported_view_settings(cfg)
        if missing:
            raise ConfigError(
                "GPUMultiCrop makes random resized crops, flips, 90° rotations and per-channel "
                "brightness / contrast only; these views settings are on and would be silently "
                f"left out: set {' '.join(missing)} (or use the CPU transform)"
            )
        self.global_size = int(cfg.global_crop_size)
        self.local_size = int(cfg.local_crop_size)
        self.global_scale = (float(cfg.global_crop_scale[0]), float(cfg.global_crop_scale[1]))
        self.local_scale = (float(cfg.local_crop_scale[0]), float(cfg.local_crop_scale[1]))
        self.n_local_views = int(cfg.n_local_views)
        self.hflip_prob = float(cfg.hflip_prob)
        self.vflip_prob = float(cfg.vflip_prob)
        self.rot90 = bool(cfg.rot90)
        self.brightness = float(cfg.brightness)
        self.contrast = float(cfg.contrast)
        self.jitter_prob = float(cfg.jitter_prob)

    def _views(self, images: Tensor, n_views: int, size: int, scale: tuple[float, float],
               generator: torch.Generator | None) -> Tensor:
        b, c, height, width = images.shape
        n = n_views * b
        device = images.device
        boxes = sample_crop_boxes(n, height, width, scale, generator, device)
        index = torch.arange(b, device=device).repeat(n_views)  # view-major: view 0 of all tiles first
        views = crop_resize(images, index, boxes, size)
        u = _rand((n, 3), generator, device)
        k = torch.floor(u[:, 2] * 4) if self.rot90 else torch.zeros_like(u[:, 2])
        views = flip_rotate(views, u[:, 0] < self.hflip_prob, u[:, 1] < self.vflip_prob, k)
        mul, add = jitter_params(n, c, self.brightness, self.contrast, self.jitter_prob, generator, device)
        views = torch.addcmul(add.to(views.dtype)[..., None, None], views, mul.to(views.dtype)[..., None, None])
        return views.reshape(n_views, b, c, size, size)

    def packed(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Global and local views stacked by view: ``(2, B, C, g, g)`` and ``(N, B, C, l, l)``.

        Args:
            images: ``(B, C, H, W)`` floating-point tiles, normalised, on any device.
            generator: Random source on ``images.device`` (the global one when None).

        Raises:
            ValueError: If ``images`` is not a 4-D floating-point tensor.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"GPUMultiCrop expects floating-point tiles (B, C, H, W), got {tuple(images.shape)} {images.dtype}"
            )
        glob = self._views(images, self.n_global_views, self.global_size, self.global_scale, generator)
        loc = self._views(images, self.n_local_views, self.local_size, self.local_scale, generator)
        return glob, loc

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views for the batch: 2 global then ``n_local_views`` local, each ``(B, C, s, s)``.

        The list has the layout the training loop gets from the CPU transform after collation.
        """
        glob, loc = self.packed(images, generator)
        return list(glob.unbind(0)) + list(loc.unbind(0))
