"""Channel-adaptive ViT family."""

from cellvit_ssl.models.base import ChannelAdaptiveViT
from cellvit_ssl.models.channels import BagOfChannelsViT, FixedChannelViT, build_model
from cellvit_ssl.models.channelvit import ChannelViT
from cellvit_ssl.models.hierarchical import HierarchicalViT
from cellvit_ssl.models.sampling import sample_channel_subsets
from cellvit_ssl.models.vit import VisionTransformer, ViTSpec, build_vit

__all__ = [
    "BagOfChannelsViT",
    "ChannelAdaptiveViT",
    "ChannelViT",
    "FixedChannelViT",
    "HierarchicalViT",
    "VisionTransformer",
    "ViTSpec",
    "build_model",
    "build_vit",
    "sample_channel_subsets",
]
