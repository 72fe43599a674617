"""cellvit_ssl: self-supervised DINO-style learning for multichannel fluorescence microscopy.

Public API:
    load_encoder, Encoder: embed images with a trained checkpoint.
    load_config: the typed run configuration.
    open_stack: lazy multichannel image reader.
    DataError, ConfigError, CheckpointError: the errors users catch.
"""

from cellvit_ssl.config import load_config
from cellvit_ssl.data.readers import ChannelStack, open_stack
from cellvit_ssl.embed import Encoder, load_encoder
from cellvit_ssl.errors import CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = [
    "ChannelStack",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Encoder",
    "load_config",
    "load_encoder",
    "open_stack",
]
