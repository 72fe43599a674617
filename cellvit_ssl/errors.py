"""The exception types users of cellvit_ssl catch.

Every user mistake (a bad path, a wrong channel name, a mistyped config key, a corrupt
checkpoint) is reported with one of these, naming the file / key / value that is wrong and
what was expected, instead of a traceback from deep inside numpy or torch.
"""


class CellVitSSLError(Exception):
    """Base class of every error cellvit_ssl raises on purpose."""


class DataError(CellVitSSLError, ValueError):
    """An input image, index or channel specification is missing, unreadable or wrong."""


class ConfigError(CellVitSSLError, ValueError):
    """A configuration key is unknown, mistyped or has an invalid value."""


class CheckpointError(CellVitSSLError, ValueError):
    """A checkpoint file is missing, truncated, corrupt or not a cellvit_ssl checkpoint."""
