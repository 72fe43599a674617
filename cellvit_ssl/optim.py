"""AdamW parameter groups and the per-step schedules of a DINO run.

Schedules are pure functions of the optimiser step, so restoring the step restores them
exactly: learning rate (linear warm-up, then cosine to ``min_lr``), weight decay (cosine from
``weight_decay`` to ``weight_decay_end``) and teacher momentum (lightly's ``cosine_schedule``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from lightly.utils.scheduler import cosine_schedule
from torch import nn

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token", "channel_embed")


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or "token" in leaf or leaf in ("pos_embed", "channel_embed")


def _layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for the rest (final norm, heads)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in _EMBEDDINGS):
        return 0
    return depth + 1


def param_groups(module: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of ``module``.

    Biases, norms, LayerScale and tokens / position embeddings get no weight decay. With
    ``layer_decay < 1`` the learning rate of block ``i`` of ``depth`` is scaled by
    ``layer_decay ** (depth + 1 - (i + 1))``, embeddings by ``layer_decay ** (depth + 1)``,
    the final norm and the heads by 1.

    Each group carries ``lr_scale`` and ``apply_wd``, read by :func:`apply_schedules`.

    Args:
        module: Usually the :class:`~cellvit_ssl.ssl.DINOMetaArch` (frozen teacher skipped).
        weight_decay: Initial weight decay of the decayed groups.
        layer_decay: Layer-wise learning-rate decay factor (1 = off).
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    depth = 1 + max((int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))), default=-1)
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in named:
        apply_wd = not _no_weight_decay(name, p)
        scale = layer_decay ** (depth + 1 - _layer_id(name, depth)) if layer_decay != 1.0 else 1.0
        group = groups.setdefault((apply_wd, scale), {
            "params": [], "weight_decay": weight_decay if apply_wd else 0.0,
            "lr_scale": scale, "apply_wd": apply_wd,
        })
        group["params"].append(p)
    return list(groups.values())


@dataclass(frozen=True)
class Schedules:
    """Per-step learning rate, weight decay and teacher momentum.

    Args:
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Linear learning-rate warm-up length.
        peak_lr: Learning rate after warm-up (already scaled by the global batch).
        min_lr: Final learning rate.
        weight_decay: Weight decay at step 0.
        weight_decay_end: Weight decay at the last step.
        momentum_start: Teacher EMA momentum at step 0.
        momentum_end: Teacher EMA momentum at the last step.
    """

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float

    def lr(self, step: int) -> float:
        """Linear warm-up to ``peak_lr``, then cosine down to ``min_lr``."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def wd(self, step: int) -> float:
        """Cosine from ``weight_decay`` to ``weight_decay_end``."""
        progress = min(step / max(self.total_steps - 1, 1), 1.0)
        return self.weight_decay_end + (self.weight_decay - self.weight_decay_end) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    def momentum(self, step: int) -> float:
        """Teacher momentum (lightly's cosine schedule)."""
        return cosine_schedule(step, self.total_steps, self.momentum_start, self.momentum_end)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's learning rate (times its ``lr_scale``) and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
