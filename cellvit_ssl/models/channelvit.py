"""ChannelViT-style joint attention over the patches of all channels.

Each channel is patch-embedded by the shared 1-channel patch embedding, gets the patch
position embedding plus a learned channel embedding, and all ``C·N`` patch tokens of an
image form one sequence with one CLS token (and the registers). Cost per block is (C·N)²,
the reference point for hierarchical attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.models.base import (
    ChannelAdaptiveViT,
    cls_embedding,
    compact_channels,
    pool_over_channels,
    present_mask,
    require_a_channel,
)
from cellvit_ssl.models.vit import VisionTransformer


class ChannelViT(ChannelAdaptiveViT):
    """Joint attention over all ``C·N`` channel-patch tokens with channel embeddings.

    Training samples are images: ``x_norm_clstoken`` is the image's CLS token and
    ``x_norm_patchtokens`` the mean over present channels of the patch tokens at each
    position, so iBOT masks are ``(B, N)`` and mask a position in every channel. Absent
    channels are dropped from the sequence (or masked out when other images of the batch
    have them).

    Args:
        backbone: A ViT with ``in_chans == 1``.
        channels: The model's channel names.
        pool_patch_tokens: Append the mean patch token to the CLS token in :meth:`embed`.
        vocabulary: The channel vocabulary ids come from (default: the built-in one).
    """

    def __init__(self, backbone: VisionTransformer, channels: Sequence[str], pool_patch_tokens: bool = False,
                 vocabulary: ChannelVocabulary | None = None) -> None:
        super().__init__(channels, vocabulary)
        self._attach_single_channel_backbone(backbone, pool_patch_tokens, "channelvit")
        self.output_dim = self.embed_dim * (2 if pool_patch_tokens else 1)
        self.block_dim = self.embed_dim  # a channel's block: the mean of its patch tokens
        self.channel_embed = nn.Parameter(torch.zeros(len(self.channels), self.embed_dim))
        nn.init.trunc_normal_(self.channel_embed, std=0.02)

    def sample_shape(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> tuple[int, int]:
        """``(S, N)``: samples (= images) and patch positions, the shape of iBOT ``masks``."""
        return x.shape[0], self.grid_size(x)

    def _joint(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None,
               masks: Tensor | None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Run the joint sequence: split tokens with patch tokens ``(B, K, N, D)`` per compacted channel.

        Returns:
            The token dict, ``present (B, K)`` and ``order (B, K)`` (input channel of each column).
        """
        vit = self.backbone
        present = present_mask(channel_ids, channel_mask)
        require_a_channel(present)
        slots = self.slots(channel_ids, present)
        x, slots, present, order = compact_channels(x, slots, present)
        b, k, h, w = x.shape
        n = self.grid_size(x)
        patch_masks = None
        if masks is not None:
            patch_masks = masks.unsqueeze(1).expand(b, k, n).reshape(b * k, n)
        patches, grid = vit.embed_patches(x.reshape(b * k, 1, h, w), patch_masks)
        pos = vit.interpolate_pos_encoding(grid)
        patches = patches.reshape(b, k, n, -1) + pos[:, None, 1:] + self.channel_embed[slots.clamp_min(0)].unsqueeze(2)
        prefix = (vit.cls_token + pos[:, :1]).expand(b, -1, -1)
        if vit.register_tokens is not None:
            prefix = torch.cat([prefix, vit.register_tokens.expand(b, -1, -1)], dim=1)
        tokens = torch.cat([prefix, patches.reshape(b, k * n, -1)], dim=1)
        attn_mask = None
        if not bool(present.all()):
            keep = torch.cat([present.new_ones(b, prefix.shape[1]), present.repeat_interleave(n, dim=1)], dim=1)
            attn_mask = keep[:, None, None, :]
        for block in vit.blocks:
            tokens = block(tokens, attn_mask)
        out = vit.split_tokens(tokens)
        out["x_norm_patchtokens"] = out["x_norm_patchtokens"].reshape(b, k, n, -1)
        return out, present, order

    def forward_features(
        self,
        x: Tensor,
        channel_ids: Tensor,
        channel_mask: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Run the joint sequence; features as described in the class docstring."""
        out, present, _ = self._joint(x, channel_ids, channel_mask, masks)
        out["x_norm_patchtokens"] = pool_over_channels(out["x_norm_patchtokens"], present)
        return out

    def channel_embeddings(self, x: Tensor, channel_ids: Tensor,
                           channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each channel's mean patch token after joint attention, by model slot (zeros where absent)."""
        out, present, order = self._joint(x, channel_ids, channel_mask, None)
        per_channel = out["x_norm_patchtokens"].mean(dim=2)  # (B, K, D)
        ids = channel_ids.gather(1, order)
        return self._scatter_to_slots(per_channel[present], ids, present)

    def embed(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """Image embeddings ``(B, output_dim)``, the same width for any channel subset."""
        return cls_embedding(self.forward_features(x, channel_ids, channel_mask), self.pool_patch_tokens)
