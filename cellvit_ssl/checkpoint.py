"""Atomic checkpoint files, loaded safely.

A checkpoint is a plain dict of tensors and Python primitives, written to a temporary file in
the target folder, flushed to disk and renamed over the final name, so a crash never leaves a
half-written file under that name. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cellvit_ssl.errors import CheckpointError

#: Value of the ``format`` key for a full training checkpoint and for an encoder export.
TRAINING_FORMAT = "cellvit_ssl.training"
ENCODER_FORMAT = "cellvit_ssl.encoder"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect: tuple[str, ...] = (TRAINING_FORMAT, ENCODER_FORMAT)) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check what it is.

    Args:
        path: Checkpoint file.
        map_location: Where tensors go.
        expect: Accepted values of the ``format`` key.

    Raises:
        CheckpointError: If the file is missing, truncated, corrupt, holds objects that are
            not plain data, or is not a cellvit_ssl checkpoint of an expected kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be loaded (truncated, corrupt or not plain "
            f"data): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in expect:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a cellvit_ssl checkpoint of kind {list(expect)} "
            f"(format key: {fmt!r})"
        )
    return payload
