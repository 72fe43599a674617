"""Channel-adaptive ViT family."""

from cellvit_ssl.models.channels import BagOfChannelsViT, ChannelAdaptiveViT, build_model
from cellvit_ssl.models.vit import VisionTransformer, ViTSpec, build_vit

__all__ = ["BagOfChannelsViT", "ChannelAdaptiveViT", "VisionTransformer", "ViTSpec", "build_model", "build_vit"]
