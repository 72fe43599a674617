"""Hierarchical attention (HA): within each channel over its patches, then across channels.

Every token ``x[b, c, t]`` (t = CLS, registers, patches of channel c) carries the shared
ViT's patch position embedding and a channel-id embedding. Each block of the shared 1-channel
ViT runs on every present channel separately (cost C·N² per block), then a cross-channel
block attends across the C channels at each token position (cost N·C², absent channels
masked). The cross-channel LayerScale and the channel-id embeddings start at 0, so a freshly
built HA computes exactly the bag-of-channels features of its backbone: BoC or DINOv2 weights
are a valid starting point.
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
from cellvit_ssl.models.layers import Attention, DropPath, LayerScale
from cellvit_ssl.models.vit import VisionTransformer


class CrossChannelBlock(nn.Module):
    """Pre-norm attention across channels at each token position, LayerScale from 0.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        qkv_bias: Bias on the qkv projection.
        drop_path: Stochastic-depth rate of the branch.
        backend: Attention backend (see :class:`~cellvit_ssl.models.layers.Attention`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, drop_path: float = 0.0,
                 backend: str = "sdpa") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.ls = LayerScale(dim, 0.0)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, present: Tensor) -> Tensor:
        """Update tokens ``x (B, C, T, D)``; only present channels ``(B, C)`` are attended to."""
        b, c, t, d = x.shape
        seq = x.transpose(1, 2).reshape(b * t, c, d)
        mask = None
        if not bool(present.all()):
            mask = present[:, None, :].expand(b, t, c).reshape(b * t, 1, 1, c)
        out = self.attn(self.norm(seq), attn_mask=mask).reshape(b, t, c, d).transpose(1, 2)
        return x + self.drop_path(self.ls(out))


class HierarchicalViT(ChannelAdaptiveViT):
    """Hierarchical channel attention over a shared 1-channel ViT.

    Training samples are images: ``x_norm_clstoken`` is the mean over present channels of
    their (normalised) CLS tokens, ``x_norm_patchtokens`` the mean over present channels at
    each position, so iBOT masks are ``(B, N)`` and mask a position in every channel. The image
    embedding has a fixed width for any channel subset.

    Args:
        backbone: A ViT with ``in_chans == 1`` (the same weights a bag of channels uses).
        channels: The model's channel names.
        pool_patch_tokens: Append the pooled mean patch token to the pooled CLS token in :meth:`embed`.
        vocabulary: The channel vocabulary ids come from (default: the built-in one).
    """

    def __init__(self, backbone: VisionTransformer, channels: Sequence[str], pool_patch_tokens: bool = False,
                 vocabulary: ChannelVocabulary | None = None) -> None:
        super().__init__(channels, vocabulary)
        self._attach_single_channel_backbone(backbone, pool_patch_tokens, "hierarchical attention")
        spec = backbone.spec
        self.output_dim = self.embed_dim * (2 if pool_patch_tokens else 1)
        self.block_dim = self.output_dim
        self.channel_embed = nn.Parameter(torch.zeros(len(self.channels), self.embed_dim))
        rates = torch.linspace(0, spec.drop_path_rate, spec.depth).tolist()
        self.cross_blocks = nn.ModuleList(
            CrossChannelBlock(self.embed_dim, spec.num_heads, spec.qkv_bias, r, spec.attn_backend) for r in rates
        )
        for m in self.cross_blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def transformer_layers(self) -> list[tuple[nn.Module, ...]]:
        """Per depth: the within-channel ViT block, then the cross-channel block."""
        return list(zip(self.backbone.blocks, self.cross_blocks))

    def sample_shape(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> tuple[int, int]:
        """``(S, N)``: samples (= images) and patch positions, the shape of iBOT ``masks``."""
        return x.shape[0], self.grid_size(x)

    def channel_tokens(
        self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None, masks: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised output tokens of every present channel.

        Returns:
            ``tokens (S, T, D)`` for the present channels in (image, compacted channel) order,
            ``present (B, K)`` and ``order (B, K)`` from
            :func:`~cellvit_ssl.models.base.compact_channels`.
        """
        present = present_mask(channel_ids, channel_mask)
        require_a_channel(present)
        slots = self.slots(channel_ids, present)
        x, slots, present, order = compact_channels(x, slots, present)
        b, k = present.shape
        sample_masks = None
        if masks is not None:
            sample_masks = masks.unsqueeze(1).expand(b, k, masks.shape[-1])[present]
        tokens, _ = self.backbone.prepare_tokens(x[present].unsqueeze(1), sample_masks)
        tokens = tokens + self.channel_embed[slots[present]].unsqueeze(1).to(tokens.dtype)
        rows, cols = present.nonzero(as_tuple=True)
        full = bool(present.all())  # then (S, T, D) is (B, K, T, D) flattened: no scatter needed
        for block, cross in self.transformer_layers():
            tokens = block(tokens)
            if full:
                tokens = cross(tokens.reshape((b, k) + tokens.shape[1:]), present).flatten(0, 1)
            else:
                dense = tokens.new_zeros((b, k) + tokens.shape[1:]).index_put((rows, cols), tokens)
                tokens = cross(dense, present)[present]
        return self.backbone.norm(tokens), present, order

    def per_channel_features(
        self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-channel outputs in the input's channel order, zeros for absent channels.

        Returns:
            ``x_norm_clstoken (B, C, D)``, ``x_norm_patchtokens (B, C, N, D)`` and
            ``channel_mask (B, C)``.
        """
        tokens, present, order = self.channel_tokens(x, channel_ids, channel_mask)
        b, c = channel_ids.shape
        rows = torch.arange(b, device=x.device).unsqueeze(1).expand_as(order)
        dense = tokens.new_zeros((b, c) + tokens.shape[1:])
        dense = dense.index_put((rows[present], order[present]), tokens)
        r = self.backbone.num_prefix_tokens
        return {
            "x_norm_clstoken": dense[:, :, 0],
            "x_norm_patchtokens": dense[:, :, r:],
            "channel_mask": present_mask(channel_ids, channel_mask),
        }

    def channel_embeddings(self, x: Tensor, channel_ids: Tensor,
                           channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each channel's CLS token (+ its mean patch token) after cross-channel attention, by model slot."""
        feats = self.per_channel_features(x, channel_ids, channel_mask)
        present = feats["channel_mask"]
        block = feats["x_norm_clstoken"]
        if self.pool_patch_tokens:
            block = torch.cat([block, feats["x_norm_patchtokens"].mean(dim=2)], dim=-1)
        return self._scatter_to_slots(block[present], channel_ids, present)

    def forward_features(
        self,
        x: Tensor,
        channel_ids: Tensor,
        channel_mask: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Image-level features pooled over the present channels (one sample per image)."""
        tokens, present, _ = self.channel_tokens(x, channel_ids, channel_mask, masks)
        b, k = present.shape
        dense = tokens.new_zeros((b, k) + tokens.shape[1:]).index_put(present.nonzero(as_tuple=True), tokens)
        pooled = pool_over_channels(dense, present)  # (B, T, D)
        r = self.backbone.num_prefix_tokens
        return {
            "x_norm_clstoken": pooled[:, 0],
            "x_norm_regtokens": pooled[:, 1:r],
            "x_norm_patchtokens": pooled[:, r:],
        }

    def embed(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """Image embeddings ``(B, output_dim)``, the same width for any channel subset."""
        return cls_embedding(self.forward_features(x, channel_ids, channel_mask), self.pool_patch_tokens)
