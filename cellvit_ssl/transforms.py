"""Multichannel DINO views on lightly's ``MultiViewTransform``.

lightly's ``DINOTransform`` assumes RGB PIL images (colour jitter, grayscale, solarize, PIL
blur, ImageNet normalisation). Here the structure is the same (2 global + N local random
resized crops) but every op is a channel-agnostic tensor op on ``(C, H, W)`` float tensors,
and intensity jitter is drawn independently for each channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import Tensor
from torchvision.transforms import v2


class RandomRot90:
    """Rotate by a random multiple of 90° (microscopy has no preferred orientation)."""

    def __call__(self, x: Tensor) -> Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


class PerChannelIntensityJitter:
    """Independent brightness shift and contrast scale for every channel.

    Args:
        brightness: Additive shift drawn from ``U(-b, b)`` per channel (images are in [0, 1]).
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
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        scale = 1 + (torch.rand(shape) * 2 - 1) * self.contrast
        shift = (torch.rand(shape) * 2 - 1) * self.brightness
        return x * scale + shift


def _view(size: int, scale: Sequence[float], cfg) -> v2.Compose:
    ops = [
        v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_prob),
        v2.RandomVerticalFlip(cfg.vflip_prob),
    ]
    if cfg.rot90:
        ops.append(RandomRot90())
    ops.append(PerChannelIntensityJitter(cfg.brightness, cfg.contrast, cfg.jitter_prob))
    return v2.Compose(ops)


class MultichannelDINOTransform(MultiViewTransform):
    """2 global + ``n_local_views`` local views of a ``(C, H, W)`` float tensor.

    Args:
        cfg: The ``views`` section of the run config (crop sizes, scales, flips, jitter).

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> t = MultichannelDINOTransform(load_config(None, ["views.n_local_views=2"]).views)
        >>> [tuple(v.shape) for v in t(torch.rand(4, 256, 256))]
        [(4, 224, 224), (4, 224, 224), (4, 96, 96), (4, 96, 96)]
    """

    def __init__(self, cfg) -> None:
        global_view = _view(cfg.global_crop_size, cfg.global_crop_scale, cfg)
        local_view = _view(cfg.local_crop_size, cfg.local_crop_scale, cfg)
        super().__init__([global_view, global_view] + [local_view] * cfg.n_local_views)
        self.n_global_views = 2
