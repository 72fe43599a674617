"""Atomic checkpoint files, loaded safely, and the bookkeeping of a run's checkpoints.

A checkpoint is a plain dict of tensors and Python primitives, written to a temporary file in
the target folder, flushed to disk and renamed over the final name, so a crash never leaves a
half-written file under that name. Loading uses ``torch.load(weights_only=True)``; random
states are therefore stored as tensors and lists (:func:`rng_state`), never NumPy objects.

A training run keeps ``checkpoint_<step>.pt`` files (the last K) and ``checkpoint.pt``, the
newest of them, which ``train.resume=auto`` continues from.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellvit_ssl.errors import CheckpointError
from cellvit_ssl.io import atomic_write_with

#: Value of the ``format`` key for a full training checkpoint and for an encoder export.
TRAINING_FORMAT = "cellvit_ssl.training"
ENCODER_FORMAT = "cellvit_ssl.encoder"
#: ``format`` of a classifier file (:func:`cellvit_ssl.classifier.load_classifier`) and of a fine-tuning
#: run's own checkpoints (``python -m cellvit_ssl.finetune``, resumed exactly like training).
CLASSIFIER_FORMAT = "cellvit_ssl.classifier"
FINETUNE_FORMAT = "cellvit_ssl.finetune"

#: Key layout of the ``model`` and ``optimizer`` entries of a training checkpoint, stored under
#: ``state_layout``. 1 (checkpoints without the key): the meta-architecture's flat attributes
#: (``student.*``, ``teacher.*``, ``student_dino_head.*``, ...). 2: its ``student`` / ``teacher``
#: module dicts (``student.backbone.*``, ``teacher.dino_head.*``, ...). An encoder export holds
#: the teacher backbone alone, whose keys are the same in both.
STATE_LAYOUT = 2

# Layout 1 -> 2 key prefixes. The head prefixes cannot be confused with the backbones'
# ("student_" is not "student.").
_LAYOUT_1_PREFIXES = (
    ("student_dino_head.", "student.dino_head."),
    ("teacher_dino_head.", "teacher.dino_head."),
    ("student_ibot_head.", "student.ibot_head."),
    ("teacher_ibot_head.", "teacher.ibot_head."),
    ("student.", "student.backbone."),
    ("teacher.", "teacher.backbone."),
)
# Under Sinkhorn-Knopp centring, layout 1 kept lightly's loss modules with a centre frozen at
# zero (momentum 1); layout 2 holds no centre in that mode.
_LAYOUT_1_SINKHORN_CENTRES = ("dino_loss.", "ibot_loss.")


def upgrade_state_layout(payload: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint's payload with ``model`` and ``optimizer`` in the current key layout.

    The one place that knows older layouts (see :data:`STATE_LAYOUT`). From layout 1 the keys of
    the model state, of the optimizer state and of the optimizer's parameter groups are
    renamed::

        student.<k>             -> student.backbone.<k>
        teacher.<k>             -> teacher.backbone.<k>
        student_dino_head.<k>   -> student.dino_head.<k>    (teacher_dino_head likewise)
        student_ibot_head.<k>   -> student.ibot_head.<k>    (teacher_ibot_head likewise)
        dino_loss.<k>, ibot_loss.<k>: kept under mean centring; dropped under Sinkhorn-Knopp
                                      centring (the checkpoint's ``ssl.centering``), where they
                                      were a constant zero centre

    Payloads of the current layout, and encoder exports, are returned as they are.

    Raises:
        CheckpointError: If the payload says it has a layout newer than this code knows.
    """
    if payload.get("format") != TRAINING_FORMAT:
        return payload
    layout = int(payload.get("state_layout", 1))
    if layout == STATE_LAYOUT:
        return payload
    if layout > STATE_LAYOUT:
        raise CheckpointError(
            f"the checkpoint has state_layout={layout}, newer than this version of cellvit_ssl reads "
            f"({STATE_LAYOUT}); update cellvit_ssl"
        )
    ssl = payload.get("config", {}).get("ssl", {})
    sinkhorn = ssl.get("centering", "sinkhorn_knopp") == "sinkhorn_knopp"

    def rename(key: str) -> str | None:
        if sinkhorn and key.startswith(_LAYOUT_1_SINKHORN_CENTRES):
            return None
        for old, new in _LAYOUT_1_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def renamed(state: dict[str, Any]) -> dict[str, Any]:
        return {new: v for k, v in state.items() if (new := rename(k)) is not None}

    out = {**payload, "state_layout": STATE_LAYOUT}
    if "model" in payload:
        out["model"] = renamed(payload["model"])
    optim = payload.get("optimizer")
    if optim is not None:  # keyed by parameter name (torch.distributed.checkpoint's full state dict)
        groups = [{**g, "params": [rename(k) for k in g["params"]]} for g in optim.get("param_groups", [])]
        out["optimizer"] = {**optim, "state": renamed(optim.get("state", {})), "param_groups": groups}
    return out


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + rename, :mod:`cellvit_ssl.io`).

    Raises:
        CheckpointError: If the folder cannot be written (full disk, permissions, a file in the
            way), naming the path; a previous file at ``path`` is unchanged.
    """
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return atomic_write_with(path, write, fsync=True, error=CheckpointError)


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words (never torch's advice to turn it off)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y"
    if found:
        return (f"it holds Python objects other than tensors and plain data (it references {found.group(1)}), which "
                "could run code when loaded, so it was refused; cellvit_ssl checkpoints hold plain data only. Load "
                "only files written by cellvit_ssl (teacher.pt, checkpoint.pt) or a source you trust, exported as "
                "plain tensors")
    if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "zip archive" in text or "central directory" in text:
        return "it is truncated, corrupt or incomplete (a damaged archive); copy it again or use another one"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = detail.group(1).strip() if detail else (text.splitlines()[0] if text else "")
    return f"it is truncated, corrupt or not a torch checkpoint ({type(exc).__name__}: {first[:200]})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect: tuple[str, ...] = (TRAINING_FORMAT, ENCODER_FORMAT)) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``, check what it is, bring it to the current layout.

    Training checkpoints of an older key layout come back in the current one
    (:func:`upgrade_state_layout`).

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
        raise CheckpointError(f"checkpoint {str(path)!r} could not be loaded: {_load_failure(exc)}") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in expect:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a cellvit_ssl checkpoint of kind {list(expect)} "
            f"(format key: {fmt!r})"
        )
    try:
        return upgrade_state_layout(payload)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {exc}") from exc


LATEST = "checkpoint.pt"
_STEP_NAME = re.compile(r"^checkpoint_(\d{8,})\.pt$")


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint_<step>.pt`` files of a run folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_training_checkpoint(payload: dict[str, Any], folder: str | Path, step: int, keep_last: int = 3) -> Path:
    """Write ``checkpoint_<step>.pt`` atomically, point ``checkpoint.pt`` at it, keep the last K.

    ``checkpoint.pt`` is replaced atomically by a hard link to the new file (a copy where the
    file system has no hard links), so it is always a complete checkpoint of the newest step.

    Args:
        payload: The training state (``format`` = :data:`TRAINING_FORMAT`).
        folder: The run's output folder.
        step: Optimiser steps done; names the file.
        keep_last: How many ``checkpoint_<step>.pt`` files to keep (older ones are deleted).

    Returns:
        The path of the step file.
    """
    folder = Path(folder)
    path = save_checkpoint(payload, folder / f"checkpoint_{step:08d}.pt")

    def point_at_step(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)

    atomic_write_with(folder / LATEST, point_at_step, error=CheckpointError)
    for old in step_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def find_resume_checkpoint(resume: str, folder: str | Path) -> Path | None:
    """The checkpoint a run should resume from, or None to start fresh.

    Args:
        resume: ``auto`` (``folder/checkpoint.pt`` when it exists), ``none`` (never), or a
            path to a training checkpoint.
        folder: The run's output folder.

    Raises:
        CheckpointError: If an explicit path does not exist.
    """
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        latest = Path(folder) / LATEST
        return latest if latest.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise CheckpointError(f"train.resume={resume!r}: checkpoint {str(path)!r} does not exist")
    return path


def rng_state() -> dict[str, Any]:
    """The random state of Python, NumPy and torch (CPU and CUDA) as plain tensors and lists.

    Stored this way so that ``torch.load(weights_only=True)`` can read it back.
    """
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete half-written checkpoint temporaries a killed run left in ``folder``; returns them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".checkpoint*") if p.suffix in (".tmp", ".link")] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
