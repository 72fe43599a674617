"""Channel-adaptive models: ``fixed`` and ``boc`` here, and :func:`build_model` for every variant.

See :mod:`cellvit_ssl.models.base` for the shared interface, :mod:`~cellvit_ssl.models.hierarchical`
and :mod:`~cellvit_ssl.models.channelvit` for the other two variants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.config import Variant
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.models.base import ChannelAdaptiveViT, cls_embedding, present_mask
from cellvit_ssl.models.channelvit import ChannelViT
from cellvit_ssl.models.hierarchical import HierarchicalViT
from cellvit_ssl.models.vit import ARCHS, VisionTransformer, build_vit

__all__ = ["BagOfChannelsViT", "ChannelAdaptiveViT", "FixedChannelViT", "build_model"]



class FixedChannelViT(ChannelAdaptiveViT):
    """Plain ViT with ``in_chans = len(channels)``: the baseline that cannot change channel sets.

    Input channels are put into the model's channel order by their ids; a channel that is
    absent (masked or not in the input) is fed as zeros.

    Args:
        backbone: A ViT with ``in_chans == len(channels)``.
        channels: The model's channel names, in the order of the backbone's input channels.
        pool_patch_tokens: Append the mean patch token to the CLS token in :meth:`embed`.
        vocabulary: The channel vocabulary ids come from (default: the built-in one).
    """

    def __init__(self, backbone: VisionTransformer, channels: Sequence[str], pool_patch_tokens: bool = False,
                 vocabulary: ChannelVocabulary | None = None) -> None:
        super().__init__(channels, vocabulary)
        if backbone.spec.in_chans != len(self.channels):
            raise ValueError(f"fixed needs a backbone with in_chans={len(self.channels)}, got {backbone.spec.in_chans}")
        self.backbone = backbone
        self.pool_patch_tokens = pool_patch_tokens
        self.embed_dim = backbone.embed_dim
        self.output_dim = self.embed_dim * (2 if pool_patch_tokens else 1)

    def arrange(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """``x`` rearranged to the model's channel order ``(B, len(channels), H, W)``, zeros where absent."""
        present = present_mask(channel_ids, channel_mask)
        slots = self.slots(channel_ids, present)
        out = x.new_zeros(x.shape[0], len(self.channels), *x.shape[2:])
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(slots)
        return out.index_put((rows[present], slots[present]), x[present])

    def sample_shape(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> tuple[int, int]:
        """``(S, N)``: images and patch tokens per image, the shape of iBOT ``masks``."""
        return x.shape[0], self.grid_size(x)

    def forward_features(
        self,
        x: Tensor,
        channel_ids: Tensor,
        channel_mask: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Features of every image (one sample per image)."""
        return self.backbone.forward_features(self.arrange(x, channel_ids, channel_mask), masks=masks)

    def embed(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> Tensor:
        """Image embeddings ``(B, output_dim)``."""
        return cls_embedding(self.forward_features(x, channel_ids, channel_mask), self.pool_patch_tokens)


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
        vocabulary: The channel vocabulary ids come from (default: the built-in one).
    """

    def __init__(
        self, backbone: VisionTransformer, channels: Sequence[str], pool_patch_tokens: bool = False,
        vocabulary: ChannelVocabulary | None = None,
    ) -> None:
        super().__init__(channels, vocabulary)
        self._attach_single_channel_backbone(backbone, pool_patch_tokens, "bag-of-channels")
        self.block_dim = self.embed_dim * (2 if pool_patch_tokens else 1)
        self.output_dim = len(self.channels) * self.block_dim

    def sample_shape(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> tuple[int, int]:
        """``(S, N)``: samples and patch tokens per sample of ``forward_features`` on ``x``.

        This is the shape of its iBOT ``masks`` argument.
        """
        return int(present_mask(channel_ids, channel_mask).sum()), self.grid_size(x)

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
        present = present_mask(channel_ids, channel_mask)
        singles = x[present].unsqueeze(1)  # (S, 1, H, W)
        return self.backbone.forward_features(singles, masks=masks)

    def channel_embeddings(self, x: Tensor, channel_ids: Tensor,
                           channel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each channel's CLS token (+ mean patch token) in the model's channel order, zeros where absent."""
        present = present_mask(channel_ids, channel_mask)
        block = cls_embedding(self.forward_features(x, channel_ids, present), self.pool_patch_tokens)
        return self._scatter_to_slots(block, channel_ids, present)

    def embed(
        self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None
    ) -> Tensor:
        """Image embeddings ``(B, len(channels) · block_dim)`` in the model's channel order."""
        return self.channel_embeddings(x, channel_ids, channel_mask)[0].flatten(1)


def _check(model_cfg) -> None:
    if model_cfg.arch not in (*ARCHS, "custom"):
        raise ConfigError(f"model.arch={model_cfg.arch!r}; expected one of {[*ARCHS, 'custom']}")
    if model_cfg.img_size % model_cfg.patch_size:
        raise ConfigError(
            f"model.img_size={model_cfg.img_size} is not a multiple of model.patch_size={model_cfg.patch_size}"
        )
    if model_cfg.arch == "custom" and model_cfg.embed_dim % model_cfg.num_heads:
        raise ConfigError(
            f"model.embed_dim={model_cfg.embed_dim} is not divisible by model.num_heads={model_cfg.num_heads}"
        )


def build_model(model_cfg, channels: Sequence[str], *, vocabulary: ChannelVocabulary | None = None,
                load_pretrained: bool = True) -> ChannelAdaptiveViT:
    """Build the channel-adaptive model a config's ``model`` section describes.

    When ``model.pretrained`` names a local DINOv2-layout checkpoint, its weights are loaded
    into the backbone (see :func:`cellvit_ssl.models.pretrained.load_pretrained`).

    Args:
        model_cfg: The ``model`` section of a :class:`cellvit_ssl.config.Config`.
        channels: The model's channel names (``data.channels``).
        vocabulary: The run's channel vocabulary (default: the built-in one).
        load_pretrained: Load ``model.pretrained``; pass False when trained weights are
            loaded right after (e.g. rebuilding an encoder from its checkpoint).

    Raises:
        ConfigError: On an unknown variant, arch, FFN or attention backend, or inconsistent sizes.
        CheckpointError: When ``model.pretrained`` cannot be read or does not fit the model.
    """
    _check(model_cfg)
    variant = model_cfg.variant
    pool = bool(model_cfg.pool_patch_tokens)
    backbone = build_vit(
        model_cfg.arch,
        patch_size=model_cfg.patch_size,
        img_size=model_cfg.img_size,
        in_chans=len(channels) if variant == "fixed" else 1,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        drop_path_rate=model_cfg.drop_path_rate,
        layerscale_init=model_cfg.layerscale_init,
        num_register_tokens=model_cfg.num_register_tokens,
        qkv_bias=model_cfg.qkv_bias,
        ffn_layer=model_cfg.ffn_layer,
        attn_backend=model_cfg.attn_backend,
        interpolate_offset=model_cfg.interpolate_offset,
        interpolate_antialias=model_cfg.interpolate_antialias,
    )
    wrapper = {
        Variant.fixed: FixedChannelViT,
        Variant.boc: BagOfChannelsViT,
        Variant.hierarchical: HierarchicalViT,
        Variant.channelvit: ChannelViT,
    }[Variant(variant)]
    model = wrapper(backbone, channels, pool_patch_tokens=pool, vocabulary=vocabulary)
    if load_pretrained and model_cfg.pretrained:
        from cellvit_ssl.models.pretrained import load_pretrained as load

        load(model, model_cfg.pretrained, strict=model_cfg.pretrained_strict)
    return model
