"""AdamW parameter groups and the per-step schedules of a DINO run.

Schedules are pure functions of the optimiser step, so restoring the step restores them
exactly. They are lightly's: learning rate ``cosine_warmup_schedule`` (linear warm-up, then
cosine to ``min_lr``), weight decay and teacher momentum ``cosine_schedule``.

The parameter groups are ours: lightly's ``get_weight_decay_parameters`` spares norms and
biases only (it would decay LayerScale, the tokens and the position and channel embeddings)
and has no layer-wise learning-rate decay.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule

_EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token", "channel_embed")


def _no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norms, LayerScale (all 1-D), tokens, position and channel embeddings."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or "token" in leaf or leaf in ("pos_embed", "channel_embed")


def param_groups(meta, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of the trainable parameters of a meta-architecture.

    Biases, norms, LayerScale and tokens / position / channel embeddings get no weight decay.
    With ``layer_decay < 1`` the learning rate of the blocks at depth ``i`` of ``depth``
    (``meta.student.backbone.transformer_layers()``: hierarchical attention's cross-channel
    block with the ViT block of its depth) is scaled by ``layer_decay ** (depth - i)``, the
    embeddings by ``layer_decay ** (depth + 1)``, the final norm and the heads by 1.

    Each group carries ``lr_scale`` and ``apply_wd``, read by :func:`apply_schedules`.

    Args:
        meta: The :class:`~cellvit_ssl.ssl.DINOMetaArch` (its frozen teacher is skipped).
        weight_decay: Initial weight decay of the decayed groups.
        layer_decay: Layer-wise learning-rate decay factor (1 = off).
    """
    return layer_decay_groups(meta.named_parameters(), meta.student.backbone.transformer_layers(), weight_decay,
                              layer_decay)


def layer_decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]],
                       layers: Sequence[Sequence[torch.nn.Module]], weight_decay: float, layer_decay: float = 1.0,
                       lr_scale: float = 1.0) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay over ``layers``.

    The rule of :func:`param_groups` for any set of parameters: a parameter of a block in
    ``layers[i - 1]`` gets ``layer_decay ** (depth + 1 - i)``, an embedding (patch, tokens,
    position, channel) ``layer_decay ** (depth + 1)``, anything else (final norm, heads) 1; every
    scale is multiplied by ``lr_scale``. Parameters that do not require gradients are left out.

    Args:
        named_parameters: ``(name, parameter)`` pairs, e.g. ``module.named_parameters()``.
        layers: The transformer blocks by depth (``transformer_layers()`` of a backbone).
        weight_decay: Initial weight decay of the decayed groups.
        layer_decay: Layer-wise learning-rate decay factor (1 = off).
        lr_scale: Factor on every group's learning rate (e.g. 0.1 for a pre-trained backbone
            fine-tuned beside a new head).
    """
    depth = len(layers)
    layer_of = {id(p): i + 1 for i, layer in enumerate(layers) for block in layer for p in block.parameters()}
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        apply_wd = not _no_weight_decay(name, p)
        layer = layer_of.get(id(p), 0 if any(part in name for part in _EMBEDDINGS) else depth + 1)
        scale = lr_scale * (layer_decay ** (depth + 1 - layer) if layer_decay != 1.0 else 1.0)
        group = groups.setdefault((apply_wd, scale), {
            "params": [], "weight_decay": weight_decay if apply_wd else 0.0,
            "lr_scale": scale, "apply_wd": apply_wd,
        })
        group["params"].append(p)
    return list(groups.values())


@dataclass(frozen=True)
class Schedules:
    """Per-step learning rate, weight decay and teacher momentum (lightly's schedules).

    Args:
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Linear learning-rate warm-up length.
        peak_lr: Learning rate after warm-up (already scaled by the global batch).
        min_lr: Final learning rate.
        weight_decay: Weight decay at step 0.
        weight_decay_end: Weight decay at the last step.
        momentum_start: Teacher EMA momentum at step 0.
        momentum_end: Teacher EMA momentum at the last step.
        first_step: The run's optimiser step at which these schedules begin (a later phase of a
            run has its own segment: see :mod:`cellvit_ssl.phases`); ``step`` arguments are the
            run's steps, ``total_steps`` and ``warmup_steps`` count from here.
    """

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    momentum_end: float
    first_step: int = 0

    def lr(self, step: int) -> float:
        """Linear warm-up from 0 to ``peak_lr`` (reached at step ``warmup_steps - 1``), then cosine.

        The cosine reaches ``min_lr`` at step ``total_steps``, one past the last optimiser
        step (lightly's schedule ends at ``max_steps - 1``, hence ``total_steps + 1``).
        """
        return cosine_warmup_schedule(step - self.first_step, self.total_steps + 1, self.peak_lr, self.min_lr,
                                      warmup_steps=self.warmup_steps, warmup_start_value=0.0)

    def wd(self, step: int) -> float:
        """Cosine from ``weight_decay`` (step 0) to ``weight_decay_end`` (the last step)."""
        return cosine_schedule(step - self.first_step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def momentum(self, step: int) -> float:
        """Cosine from ``momentum_start`` (step 0) to ``momentum_end`` (the last step)."""
        return cosine_schedule(step - self.first_step, self.total_steps, self.momentum_start, self.momentum_end)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set every group's learning rate (times its ``lr_scale``) and weight decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("apply_wd", True) else 0.0
