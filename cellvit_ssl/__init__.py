"""cellvit_ssl: self-supervised DINO-style learning for multichannel fluorescence microscopy.

Public API:
    load_encoder, Encoder: embed images, cells and patch grids with a trained checkpoint
        (``python -m cellvit_ssl.embed`` / ``python -m cellvit_ssl.evaluate`` for batch jobs).
    load_classifier, Classifier: apply a classifier fine-tuned by ``python -m cellvit_ssl.finetune``
        (``python -m cellvit_ssl.predict`` for batch jobs).
    read_embeddings: open an embeddings file (.h5ad / .zarr) written by the embed CLI.
    load_config: the typed run configuration.
    open_stack: lazy multichannel image reader.
    DataError, ConfigError, CheckpointError: the errors users catch.
"""

from cellvit_ssl.config import load_config
from cellvit_ssl.data.readers import ChannelStack, open_stack
from cellvit_ssl.errors import CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

# Imported on first use, so that ``import cellvit_ssl`` stays light (no torch until needed).
_LAZY = {"Encoder": "cellvit_ssl.encoder", "load_encoder": "cellvit_ssl.encoder",
         "Classifier": "cellvit_ssl.classifier", "load_classifier": "cellvit_ssl.classifier",
         "read_embeddings": "cellvit_ssl.embed_io"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellvit_ssl' has no attribute {name!r}")


__all__ = [
    "ChannelStack",
    "CheckpointError",
    "Classifier",
    "ConfigError",
    "DataError",
    "Encoder",
    "load_classifier",
    "load_config",
    "load_encoder",
    "open_stack",
    "read_embeddings",
]
