"""Hierarchical channel sampling for training (draw a channel count, then a channel subset)."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_channel_subsets(channel_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Hierarchical channel sampling: per image, draw ``k`` uniformly in ``1..C``, then a ``k``-subset.

    ``C`` is the number of channels present in that image, and the subset is drawn uniformly
    among them, so every channel count is equally likely (unlike dropping each channel
    independently). The result is a new ``channel_mask`` for the same batch; it is never empty
    and never turns on an absent channel. ``hierarchical`` and ``channelvit`` then run on
    shorter sequences (see :func:`cellvit_ssl.models.base.compact_channels`).

    Args:
        channel_mask: Boolean ``(B, C)``, True = present. Pass ``torch.ones(B, C, dtype=bool)``
            when every channel is present.
        generator: Optional random generator (on the mask's device) for reproducible draws.

    Returns:
        Boolean ``(B, C)`` mask, a subset of ``channel_mask``.

    Raises:
        ValueError: If an image has no present channel to sample from.

    Examples:
        >>> mask = sample_channel_subsets(torch.ones(3, 5, dtype=torch.bool))
        >>> bool((mask.sum(1) >= 1).all())
        True
    """
    present = channel_mask.bool()
    if present.ndim != 2:
        raise ValueError(f"channel_mask must be (B, C), got shape {tuple(present.shape)}")
    counts = present.sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"images {(counts == 0).nonzero().flatten().tolist()} have no channel to sample from")
    b, c = present.shape
    device = present.device
    k = (torch.rand(b, generator=generator, device=device) * counts).long().clamp(max=counts - 1) + 1
    scores = torch.rand(b, c, generator=generator, device=device).masked_fill(~present, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < k.unsqueeze(1)
