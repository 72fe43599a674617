"""Data layer: readers, channel vocabulary, datasets and synthetic demo data."""

from cellvit_ssl.data.readers import ChannelStack, open_stack

__all__ = ["ChannelStack", "open_stack"]
