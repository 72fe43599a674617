"""The interface every channel-adaptive model shares, and channel bookkeeping helpers.

Every variant takes images ``(B, C, H, W)`` with ``channel_ids (B, C)`` (global vocabulary ids,
see :mod:`cellvit_ssl.channels`) and an optional ``channel_mask (B, C)`` (True = present).
Three entry points:

- ``forward_features`` gives the *training samples* the SSL objective works on: a dict with
  ``x_norm_clstoken (S, D)`` and ``x_norm_patchtokens (S, N, D)``.
- ``sample_shape`` gives ``(S, N)`` for an input, the shape of iBOT ``masks``.
- ``embed`` gives one image embedding ``(B, output_dim)`` per image.

``transformer_blocks`` / ``transformer_layers`` name the model's transformer blocks for the
code that wraps, compiles or recomputes them; nothing finds blocks by attribute name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cellvit_ssl.channels import BUILTIN, ChannelVocabulary


class ChannelAdaptiveViT(nn.Module):
    """Base class: holds the model's channel vocabulary (the channels it was trained on).

    Subclasses set ``backbone`` (a :class:`~cellvit_ssl.models.vit.VisionTransformer`),
    ``embed_dim`` (width of a training sample's CLS token) and ``output_dim`` (width of
    :meth:`embed`).
    """

    def __init__(self, channels: Sequence[str], vocabulary: ChannelVocabulary | None = None) -> None:
        super().__init__()
        self.vocabulary = vocabulary or BUILTIN
        self.channels = self.vocabulary.canonical_names(channels, source="model channels")
        ids = self.vocabulary.ids(self.channels)
        self.register_buffer("vocab_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        slot = torch.full((len(self.vocabulary),), -1, dtype=torch.long)
        slot[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("_slot_of_id", slot, persistent=False)

    def _attach_single_channel_backbone(self, backbone: nn.Module, pool_patch_tokens: bool, variant: str) -> None:
        """Hold the shared 1-channel ViT that every variant but ``fixed`` runs on each channel."""
        if backbone.spec.in_chans != 1:
            raise ValueError(f"{variant} needs a 1-channel backbone")
        self.backbone = backbone
        self.pool_patch_tokens = pool_patch_tokens
        self.embed_dim = backbone.embed_dim

    def slots(self, channel_ids: Tensor, present: Tensor | None = None) -> Tensor:
        """Position of each channel id in the model's channel list; -1 where not ``present``.

        Only present entries are looked up, so padded positions may hold any id (e.g.
        :data:`~cellvit_ssl.channels.PAD_CHANNEL_ID`).

        Raises:
            ValueError: If a present id is not one of the model's channels.
        """
        ids = channel_ids.long()
        present = torch.ones_like(ids, dtype=torch.bool) if present is None else present.bool()
        inside = (ids >= 0) & (ids < self._slot_of_id.numel())
        slots = torch.where(inside, self._slot_of_id[ids.clamp(0, self._slot_of_id.numel() - 1)], -1)
        unknown = present & (slots < 0)
        if bool(unknown.any()):
            raise ValueError(
                f"channel ids {sorted(set(ids[unknown].tolist()))} are not among the model's "
                f"channels {self.channels}"
            )
        return torch.where(present, slots, -1)

    def channel_embeddings(self, x: Tensor, channel_ids: Tensor,
                           channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-channel embeddings in the model's channel order.

        Returns:
            ``(blocks (B, len(channels), block_dim), present (B, len(channels)) bool)``; absent
            channels are zero blocks.

        Raises:
            NotImplementedError: For models whose tokens mix all channels from the start (``fixed``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no per-channel embeddings")

    def _scatter_to_slots(self, values: Tensor, channel_ids: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """``values (S, D)`` of the present (image, channel) pairs → ``(B, len(channels), D)`` by slot."""
        slots = self.slots(channel_ids, present)
        b = channel_ids.shape[0]
        out = values.new_zeros(b, len(self.channels), values.shape[-1])
        rows = torch.arange(b, device=values.device).unsqueeze(1).expand_as(slots)
        out[rows[present], slots[present]] = values
        where = torch.zeros(b, len(self.channels), dtype=torch.bool, device=values.device)
        where[rows[present], slots[present]] = True
        return out, where

    def transformer_layers(self) -> list[tuple[nn.Module, ...]]:
        """The transformer blocks by depth: item ``i`` holds every block at depth ``i``.

        One block per depth here (the shared ViT's); variants that add blocks (hierarchical
        attention's cross-channel blocks) return them beside the ViT block of the same depth.
        Layer-wise learning-rate decay gives every block of a depth the same rate.
        """
        return [(block,) for block in self.backbone.blocks]

    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer block, in the order they run.

        These are the units that FSDP shards, ``torch.compile`` compiles and activation
        checkpointing recomputes.
        """
        return [block for layer in self.transformer_layers() for block in layer]

    def grid_size(self, x: Tensor) -> int:
        """Patch tokens per channel for images shaped like ``x``."""
        h, w = self.backbone.patch_grid(x.shape[-2], x.shape[-1])
        return h * w


def present_mask(channel_ids: Tensor, channel_mask: Tensor | None) -> Tensor:
    """Boolean ``(B, C)`` mask of present channels (all True when ``channel_mask`` is None)."""
    if channel_mask is None:
        return torch.ones_like(channel_ids, dtype=torch.bool)
    if channel_mask.shape != channel_ids.shape:
        raise ValueError(f"channel_mask of shape {tuple(channel_mask.shape)}, expected {tuple(channel_ids.shape)}")
    return channel_mask.bool()


def require_a_channel(present: Tensor) -> None:
    """Raise ValueError when an image has no present channel."""
    has_one = present.any(dim=1)
    if not bool(has_one.all()):
        empty = (~has_one).nonzero().flatten().tolist()
        raise ValueError(f"images {empty} of the batch have no present channel")


def compact_channels(x: Tensor, channel_ids: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Move each image's present channels first and drop channel columns absent everywhere.

    Models whose cost grows with the number of channels run on the shortest channel axis that
    holds every present channel (e.g. after :func:`sample_channel_subsets`).

    Returns:
        ``x (B, K, H, W)``, ``channel_ids (B, K)``, ``present (B, K)`` and ``order (B, K)``, the
        original channel index of each kept column; ``K`` is the most channels any image has.
    """
    if bool(present.all()):
        order = torch.arange(present.shape[1], device=present.device).expand_as(present)
        return x, channel_ids, present, order
    order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
    k = int(present.sum(dim=1).max())
    order = order[:, :k]
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, order], channel_ids.gather(1, order), present.gather(1, order), order


def pool_over_channels(values: Tensor, present: Tensor) -> Tensor:
    """Mean over the present channels: ``(B, C, ...)`` → ``(B, ...)``."""
    weights = present.to(values.dtype).reshape(present.shape + (1,) * (values.ndim - 2))
    return (values * weights).sum(dim=1) / weights.sum(dim=1)


def cls_embedding(feats: dict[str, Tensor], pool_patch_tokens: bool) -> Tensor:
    """CLS token of each sample, optionally followed by its mean patch token."""
    cls = feats["x_norm_clstoken"]
    if pool_patch_tokens:
        cls = torch.cat([cls, feats["x_norm_patchtokens"].mean(dim=1)], dim=-1)
    return cls
