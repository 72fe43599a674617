"""Data layer: readers, channel vocabulary, index builders, datasets and synthetic demo data."""

from cellvit_ssl.data.collate import collate_channels
from cellvit_ssl.data.dataset import IndexDataset, build_dataset, read_index
from cellvit_ssl.data.readers import ChannelStack, open_stack

__all__ = ["ChannelStack", "IndexDataset", "build_dataset", "collate_channels", "open_stack", "read_index"]
