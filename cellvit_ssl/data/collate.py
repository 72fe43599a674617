"""Batch samples whose channel sets differ (mixed-dataset training): pad + ``channel_mask``.

HPA has 4 channels, WTC-11 3, Cell Painting 5. :func:`collate_channels` pads every sample's
channel axis to the largest in the batch with zero planes, pads ``channel_ids`` with
:data:`~cellvit_ssl.channels.PAD_CHANNEL_ID` (an id no channel has) and returns
``channel_mask`` (True = a real channel) so the model skips the padding. Samples that already
carry a ``channel_mask`` keep it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import default_collate

from cellvit_ssl.channels import PAD_CHANNEL_ID


def _pad_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[0] == c:
        return x
    return torch.cat([x, x.new_zeros((c - x.shape[0], *x.shape[1:]))])


def collate_channels(batch: Sequence[dict]) -> dict:
    """Collate dataset items with possibly different channel counts.

    Args:
        batch: Items with ``channel_ids`` (C_i,), ``image`` (C_i, H, W) or ``views`` (list of
            (C_i, h, w)), optional ``channel_mask`` (C_i,) and any other default-collatable keys.

    Returns:
        A dict like :func:`torch.utils.data.default_collate` would give, with ``image`` /
        every view ``(B, C, ...)``, ``channel_ids`` (B, C) and ``channel_mask`` (B, C) bool,
        where ``C = max C_i``.

    Examples:
        >>> a = {"image": torch.ones(3, 4, 4), "channel_ids": torch.tensor([0, 7, 3])}
        >>> b = {"image": torch.ones(5, 4, 4), "channel_ids": torch.tensor([0, 4, 2, 5, 6])}
        >>> out = collate_channels([a, b])
        >>> out["image"].shape, out["channel_mask"].sum(1).tolist()
        (torch.Size([2, 5, 4, 4]), [3, 5])
    """
    c = max(int(item["channel_ids"].numel()) for item in batch)
    ids, masks, images, views = [], [], [], []
    for item in batch:
        n = int(item["channel_ids"].numel())
        mask = item.get("channel_mask")
        mask = torch.ones(n, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        masks.append(torch.cat([mask, torch.zeros(c - n, dtype=torch.bool)]))
        ids.append(torch.cat([item["channel_ids"].long(), torch.full((c - n,), PAD_CHANNEL_ID, dtype=torch.long)]))
        if "image" in item:
            images.append(_pad_channels(item["image"], c))
        if "views" in item:
            views.append([_pad_channels(v, c) for v in item["views"]])
    handled = {"channel_ids", "channel_mask", "image", "views"}
    rest = [{k: v for k, v in item.items() if k not in handled} for item in batch]
    out = default_collate(rest) if rest and rest[0] else {}
    out["channel_ids"] = torch.stack(ids)
    out["channel_mask"] = torch.stack(masks)
    if images:
        out["image"] = torch.stack(images)
    if views:
        out["views"] = [torch.stack(list(vs)) for vs in zip(*views)]
    return out


def collate_or_error(batch: Sequence[dict | Exception]) -> dict | Exception:
    """:func:`collate_channels`, or the first item that is an exception instead of a sample.

    A dataset read in loader worker processes returns its errors as values (see
    :class:`cellvit_ssl.train.SeededViews`); they reach the main process as they were raised,
    without the worker's traceback wrapped into their message, and are raised there.
    """
    for item in batch:
        if isinstance(item, Exception):
            return item
    return collate_channels(batch)
