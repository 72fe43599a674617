"""The phases of a run: the main phase, then the later ones of ``train.phases``.

DINOv2 ends pre-training with a short phase at a higher resolution; ``train.phases`` declares
such phases. A run of ``T`` optimiser steps (``train.epochs`` of the main phase's steps, or
``train.max_steps``) is cut at ``round(start * T)`` for each later phase; phase ``p`` runs
from its first step to the next phase's first step (the last one to ``T``).

Each phase has:

- its **config** (:func:`phase_config`): the run config with the crop sizes times
  ``crop_scale``, ``data.sample_size`` times ``sample_scale`` and its own per-process batch.
  Everything that builds views or data reads the phase's config, so the views switch size at
  the boundary; the last phase's sizes are the preprocessing contract of the exported model;
- its **schedules** (:func:`phase_schedules`): a warm-up + cosine learning-rate segment, a cosine
  teacher-momentum segment and (later phases) the final weight decay, all functions of the
  run's step, so resuming anywhere, inside a phase or on its boundary, restores them exactly;
- its **data order**: phase 0 keeps ``train.seed``; later phases shuffle and draw their crops
  from a seed derived from ``(train.seed, phase)`` (:func:`phase_seed`), their epochs counted
  from their own first step.

Position embeddings are never re-initialised: the backbone keeps its native grid and
interpolates it to whatever grid a view has
(:meth:`~cellvit_ssl.models.vit.VisionTransformer.interpolate_pos_encoding`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cellvit_ssl.config import Config, PhaseConfig, scaled_size
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.optim import Schedules


def phase_config(cfg: Config, phase: PhaseConfig) -> Config:
    """The run config as ``phase`` trains: scaled crop and sample sizes, the phase's batch.

    The batch defaults to ``data.batch_size / crop_scale**2`` (at least 1): the same number of
    patch tokens per process, so about the memory the main phase had (attention memory grows
    faster without memory-efficient attention kernels).
    """
    sample_scale = phase.crop_scale if phase.sample_scale is None else phase.sample_scale
    batch = phase.batch_size or max(1, round(cfg.data.batch_size / phase.crop_scale**2))
    views = replace(cfg.views, global_crop_size=scaled_size(cfg.views.global_crop_size, phase.crop_scale),
                    local_crop_size=scaled_size(cfg.views.local_crop_size, phase.crop_scale))
    data = replace(cfg.data, sample_size=scaled_size(cfg.data.sample_size, sample_scale), batch_size=batch)
    return replace(cfg, data=data, views=views)


def phase_seed(seed: int, index: int) -> int:
    """Data seed of phase ``index``: ``seed`` itself for the main phase, a derived one after."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True)
class Phase:
    """One phase of a run.

    Attributes:
        index: 0 for the main phase, ``i + 1`` for ``train.phases[i]``.
        first_step: The run's step at which the phase begins.
        end_step: The step at which it ends (the next phase's first step, or the run's total).
        cfg: The run config as this phase trains (:func:`phase_config`).
        seed: Data seed of the phase (:func:`phase_seed`).
        spec: The ``train.phases`` entry (None for the main phase).
    """

    index: int
    first_step: int
    end_step: int
    cfg: Config
    seed: int
    spec: PhaseConfig | None = None

    @property
    def steps(self) -> int:
        """Optimiser steps of the phase."""
        return self.end_step - self.first_step

    def describe(self) -> str:
        """One line for the log: steps, view and sample sizes, batch."""
        v, d = self.cfg.views, self.cfg.data
        return (f"phase {self.index}: steps {self.first_step}-{self.end_step}, global views {v.global_crop_size} px, "
                f"local views {v.local_crop_size} px, samples {d.sample_size} px, batch {d.batch_size} per process")


def plan_phases(cfg: Config, total_steps: int) -> list[Phase]:
    """The phases of a run of ``total_steps`` optimiser steps (one phase without ``train.phases``).

    Raises:
        ConfigError: If a phase would have no step (starts too close to the previous one or
            to the end of a short run), naming it.
    """
    firsts = [0] + [round(p.start * total_steps) for p in cfg.train.phases]
    ends = firsts[1:] + [total_steps]
    phases = []
    for i, (first, end) in enumerate(zip(firsts, ends)):
        if end <= first:
            which = "the main phase" if i == 0 else f"train.phases[{i - 1}] (start={cfg.train.phases[i - 1].start})"
            raise ConfigError(f"{which} gets no optimiser step of the run's {total_steps}: it would run from step "
                              f"{first} to {end}; move the phase starts apart or train longer")
        spec = cfg.train.phases[i - 1] if i else None
        phase_cfg = cfg if spec is None else phase_config(cfg, spec)
        phases.append(Phase(i, first, end, phase_cfg, phase_seed(cfg.train.seed, i), spec))
    return phases


def phase_schedules(cfg: Config, phase: Phase, global_batch: int, steps_per_epoch: int) -> Schedules:
    """The learning-rate, weight-decay and teacher-momentum segment of one phase.

    The main phase is the run's usual schedule squeezed into its own span: warm-up of
    ``train.warmup_epochs`` epochs (at most the span), cosine to ``train.min_lr``, weight decay
    from ``train.weight_decay`` to ``train.weight_decay_end``, momentum from
    ``ssl.momentum_start`` to ``ssl.momentum_end``. A later phase warms up from 0 over
    ``warmup_fraction`` of its steps to its ``base_lr`` (scaled by its global batch), then
    cosine to its ``min_lr``; its weight decay stays at ``train.weight_decay_end`` and its
    momentum runs from its ``momentum_start`` to its ``momentum_end`` (each defaulting to the
    run's).

    Args:
        cfg: The run config.
        phase: The phase.
        global_batch: Images per optimiser step in this phase (all processes, all micro-batches).
        steps_per_epoch: Optimiser steps per epoch of the main phase (its warm-up is in epochs).
    """
    t, ssl = cfg.train, cfg.ssl
    spec = phase.spec
    if spec is None:
        return Schedules(total_steps=phase.steps, warmup_steps=min(t.warmup_epochs * steps_per_epoch, phase.steps),
                         peak_lr=t.base_lr * global_batch / t.lr_reference_batch, min_lr=t.min_lr,
                         weight_decay=t.weight_decay, weight_decay_end=t.weight_decay_end,
                         momentum_start=ssl.momentum_start, momentum_end=ssl.momentum_end,
                         first_step=phase.first_step)
    base_lr = t.base_lr if spec.base_lr is None else spec.base_lr
    return Schedules(
        total_steps=phase.steps,
        warmup_steps=min(round(spec.warmup_fraction * phase.steps), phase.steps),
        peak_lr=base_lr * global_batch / t.lr_reference_batch,
        min_lr=t.min_lr if spec.min_lr is None else spec.min_lr,
        weight_decay=t.weight_decay_end,
        weight_decay_end=t.weight_decay_end,
        momentum_start=ssl.momentum_start if spec.momentum_start is None else spec.momentum_start,
        momentum_end=ssl.momentum_end if spec.momentum_end is None else spec.momentum_end,
        first_step=phase.first_step,
    )
