"""Channel-adaptive wrappers around the ViT backbone.

Every variant takes images ``(B, C, H, W)`` with ``channel_ids (B, C)`` (global vocabulary ids,
see :mod:`cellvit_ssl.data.channels`) and an optional ``channel_mask (B, C)`` (True = present).
Two entry points:

- ``forward_features`` gives the *training samples* the SSL objective works on: a dict with
  ``x_norm_clstoken (S, D)`` and ``x_norm_patchtokens (S, N, D)``. For ``boc`` each present
  channel of each image is its own sample (S = number of present channels in the batch).
- ``embed`` gives one image embedding ``(B, output_dim)`` per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cellvit_ssl.data.channels import channel_ids as names_to_ids
from cellvit_ssl.models.vit import VisionTransformer


class ChannelAdaptiveViT(nn.Module):
    """Base class: holds the model's channel vocabulary (the channels it was trained on)."""

    def __init__(self, channels: Sequence[str]) -> None:
        super().__init__()
        self.channels = list(channels)
        ids = names_to_ids(self.channels)
        self.register_buffer("vocab_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        slot = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        slot[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("_slot_of_id", slot, persistent=False)

    def slots(self, channel_ids: Tensor) -> Tensor:
        """Position of each channel id in the model's channel list.

        Raises:
            ValueError: If an id is not one of the model's channels.
        """
        ids = channel_ids.long()
        inside = (ids >= 0) & (ids < self._slot_of_id.numel())
        slots = torch.where(inside, self._slot_of_id[ids.clamp(0, self._slot_of_id.numel() - 1)], -1)
        if (slots < 0).any():
            raise ValueError(
                f"channel ids {sorted(set(ids[slots < 0].tolist()))} are not among the model's "
                f"channels {self.channels}"
            )
        return slots


def _present(channel_ids: Tensor, channel_mask: Tensor | None) -> Tensor:
    if channel_mask is None:
        return torch.ones_like(channel_ids, dtype=torch.bool)
    return channel_mask.bool()


class BagOfChannelsViT(ChannelAdaptiveViT):
    """Bag of channels: one shared 1-channel ViT applied to every channel separately.

    The image embedding concatenates the per-channel CLS tokens (optionally each followed by
    the channel's mean patch token) in the order of the model's channel list, whatever order
    the input channels come in. A channel absent from an image is an explicit zero block; the
    other blocks never shift.

    Args:
        backbone: A ViT with ``in_chans == 1``.
        channels: The model's channel names, in embedding order.
        pool_patch_tokens: Append each channel's mean patch token to its CLS token.
    """

    def __init__(
        self, backbone: VisionTransformer, channels: Sequence[str], pool_patch_tokens: bool = False
    ) -> None:
        super().__init__(channels)
        if backbone.spec.in_chans != 1:
            raise ValueError("bag-of-channels needs a 1-channel backbone")
        self.backbone = backbone
        self.pool_patch_tokens = pool_patch_tokens
        self.embed_dim = backbone.embed_dim
        self.block_dim = self.embed_dim * (2 if pool_patch_tokens else 1)
        self.output_dim = len(self.channels) * self.block_dim

    def sample_shape(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> tuple[int, int]:
        """``(S, N)``: samples and patch tokens per sample of ``forward_features`` on ``x``.

        This is the shape of its iBOT ``masks`` argument.
        """
        grid = (x.shape[-2] // self.backbone.patch_size) * (x.shape[-1] // self.backbone.patch_size)
        return int(_present(channel_ids, channel_mask).sum()), grid

    def forward_features(
        self,
        x: Tensor,
        channel_ids: Tensor,
        channel_mask: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Features of every present channel as its own sample, in (image, channel) order.

        ``masks``, when given, is boolean ``(S, N)`` (see :meth:`sample_shape`); True patches
        are replaced by the mask token (iBOT).
        """
        present = _present(channel_ids, channel_mask)
        singles = x[present].unsqueeze(1)  # (S, 1, H, W)
        return self.backbone.forward_features(singles, masks=masks)

    def embed(
        self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None
    ) -> Tensor:
        """Image embeddings ``(B, len(channels) · block_dim)`` in the model's channel order."""
        present = _present(channel_ids, channel_mask)
        slots = self.slots(channel_ids)
        feats = self.forward_features(x, channel_ids, present)
        block = feats["x_norm_clstoken"]
        if self.pool_patch_tokens:
            block = torch.cat([block, feats["x_norm_patchtokens"].mean(dim=1)], dim=-1)
        out = block.new_zeros(x.shape[0], len(self.channels), self.block_dim)
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(slots)
        out[rows[present], slots[present]] = block
        return out.flatten(1)


def build_model(model_cfg, channels: Sequence[str]) -> ChannelAdaptiveViT:
    """Build the channel-adaptive model a config's ``model`` section describes.

    Args:
        model_cfg: The ``model`` section of a :class:`cellvit_ssl.config.Config`.
        channels: The model's channel names (``data.channels``).
    """
    from cellvit_ssl.models.vit import build_vit

    kwargs = dict(
        patch_size=model_cfg.patch_size,
        img_size=model_cfg.img_size,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        drop_path_rate=model_cfg.drop_path_rate,
        layerscale_init=model_cfg.layerscale_init,
        num_register_tokens=model_cfg.num_register_tokens,
    )
    if model_cfg.variant == "boc":
        return BagOfChannelsViT(build_vit(model_cfg.arch, in_chans=1, **kwargs), channels)
    raise NotImplementedError(
        f"model.variant={model_cfg.variant!r} is not available yet; use 'boc'"
    )
