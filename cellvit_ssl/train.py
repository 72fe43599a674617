"""Training entry point: ``python -m cellvit_ssl.train CONFIG [key=value ...]``.

The same command runs on one CPU, one GPU, or under ``torchrun`` on many GPUs and nodes
(``torchrun --nproc_per_node 8 -m cellvit_ssl.train CONFIG``; SLURM ``srun`` works too).
It loads the config (code defaults ← YAML ← overrides), builds data, model and the
student/teacher objective, trains with AdamW under warm-up + cosine learning rate, cosine
weight decay and cosine teacher momentum, and writes into ``train.output_dir``:

- ``config.yaml``: the resolved config;
- ``checkpoint_<step>.pt`` (last ``train.keep_last``) and ``checkpoint.pt`` (the newest):
  everything needed to continue the run exactly (``train.resume=auto`` does so);
- ``teacher.pt``: the teacher backbone alone, for :func:`cellvit_ssl.load_encoder`;
- ``metrics.jsonl`` and TensorBoard scalars under ``tb/`` (each record names the phase, the
  side of the global and local views and the per-process batch the step trained on).

A run may end with later phases (``train.phases``, e.g. DINOv2's high-resolution adaptation:
:mod:`cellvit_ssl.phases`): the data loader and its views are rebuilt at each phase boundary
and a checkpoint is written there; ``teacher.pt`` carries the last phase's preprocessing
contract (sample and view size). With ``distill.teacher`` the run distils a frozen teacher
into the model (:mod:`cellvit_ssl.distill`); everything else is unchanged.

SIGTERM or SIGUSR1 (cluster preemption) let the step in progress finish, write its checkpoint
and exit cleanly (see :class:`StopRequest` for exactly which step); a NaN / Inf loss stops the
run and keeps the last good checkpoint.

Nothing is written before the data and a resumed checkpoint have been checked: a resumed run
whose settings differ from its checkpoint's is refused, naming the keys
(:func:`check_resume_config`; ``train.allow_config_change`` allows named ones), and a finished
run says so and writes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as recompute
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cellvit_ssl import distributed as D
from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.checkpoint import (
    ENCODER_FORMAT,
    STATE_LAYOUT,
    TRAINING_FORMAT,
    find_resume_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    save_training_checkpoint,
    set_rng_state,
)
from cellvit_ssl.cli import CommandLine
from cellvit_ssl.config import Config, Precision, config_changes, config_to_dict, save_config, validate_config
from cellvit_ssl.data.collate import collate_or_error
from cellvit_ssl.data.dataset import build_dataset as build_index_dataset
from cellvit_ssl.data.normalize import ChannelStats
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.distill import (
    FrozenTeacher,
    build_frozen_teacher,
    check_compatible,
    init_student_heads,
    resolve_distill_config,
)
from cellvit_ssl.errors import CellVitSSLError, CheckpointError, ConfigError, DataError
from cellvit_ssl.io import AppendLog, ensure_folder, exclusive_lock
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.optim import Schedules, apply_schedules, param_groups
from cellvit_ssl.phases import Phase, phase_schedules, plan_phases
from cellvit_ssl.preprocess import Preprocess
from cellvit_ssl.ssl import DINOMetaArch, with_gram_teacher
from cellvit_ssl.view_maker import DeviceViews, WorkerViews, build_view_maker

EXIT_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def resolve_index(cfg: Config) -> tuple[Path, Path | None]:
    """Return (index path, root) for the run, generating the demo data when it is enabled.

    Raises:
        DataError: If no index is configured or it does not exist (naming it and pointing at
            the demo).
    """
    demo = cfg.data.demo
    if demo.enabled:
        spec = DemoSpec(n_images=demo.n_images, image_size=demo.image_size,
                        cells_per_image=demo.cells_per_image, seed=demo.seed)
        index = generate_demo(demo.cache_dir, spec, fmt=demo.format)
        return index, None
    hint = "To try the package on built-in synthetic data: python -m cellvit_ssl.train configs/demo.yaml"
    if not cfg.data.index:
        raise DataError(f"data.index is not set; point it at your index CSV. {hint}")
    index = Path(cfg.data.index).expanduser()
    if not index.is_file():
        raise DataError(f"data.index {str(index)!r} does not exist; download or build the data first. {hint}")
    root = Path(cfg.data.root).expanduser() if cfg.data.root else None
    return index, root


#: Keys a resumed run may change freely: where and how it runs, not what it learns.
RESUME_FREE_KEYS = (
    "train.output_dir", "train.resume", "train.allow_config_change", "train.device", "train.dist_backend",
    "train.strategy", "train.compile", "train.activation_checkpointing", "train.deterministic", "train.log_every",
    "train.tensorboard", "train.progress", "train.checkpoint_every", "train.keep_last",
    "data.root", "data.num_workers", "data.stats_cache", "data.skip_bad", "data.metadata_columns",
    "data.demo.cache_dir", "model.attn_backend", "model.pretrained", "model.pretrained_strict",
)


def _same_path(a, b) -> bool:
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_resume_config(stored: dict | None, cfg: Any, source: Path, schema: type = Config,
                        path_keys: tuple[str, ...] = ("data.index",)) -> dict[str, tuple]:
    """Refuse to resume a run whose settings changed, unless the user allowed those keys.

    A checkpoint's weights, optimiser state and schedules belong to the config it was trained
    with; continuing under other settings would leave a run whose ``config.yaml`` and
    ``teacher.pt`` (or ``classifier.pt``) describe something that never happened. Keys in
    :data:`RESUME_FREE_KEYS` may change; any other key only when named (or its section is named)
    in ``train.allow_config_change``.

    Args:
        stored: The checkpoint's config (:func:`~cellvit_ssl.config.config_to_dict`); None: nothing to check.
        cfg: This run's config, an instance of ``schema`` with ``train.allow_config_change``.
        source: The checkpoint, named in the error.
        schema: The command's config dataclass (training's :class:`~cellvit_ssl.config.Config`,
            fine-tuning's command config, ...).
        path_keys: Keys holding a file path: the same file by another spelling is no change.

    Returns:
        The allowed changes, ``{key: (old, new)}``.

    Raises:
        ConfigError: Naming every changed key with its old and new value, and the ways on.
    """
    if not stored:
        return {}
    changes = config_changes(stored, config_to_dict(cfg), schema)
    changes = {k: v for k, v in changes.items() if k not in RESUME_FREE_KEYS
               and not (k in path_keys and _same_path(*v))}
    allowed = list(cfg.train.allow_config_change)
    refused = {k: v for k, v in changes.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}
    if refused:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        keys = ",".join(refused)
        raise ConfigError(
            f"{source} was trained with other settings ({listed}); resuming would continue its weights under "
            f"settings they were not trained with. Either give the run's own settings again, train a new run "
            f"in another folder (train.output_dir=...), start over here (train.resume=none), or continue with "
            f"the changes allowed: train.allow_config_change=[{keys}] (schedules are recomputed for the new "
            "settings)"
        )
    return changes


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentations: a well-mixed function of (run seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededViews(Dataset):
    """A dataset whose item ``(epoch, i)`` draws its random crops from its own seed.

    A bad sample's :class:`~cellvit_ssl.errors.CellVitSSLError` is returned instead of raised:
    from a loader worker it then reaches the main process as the error itself (see
    :func:`~cellvit_ssl.data.collate.collate_or_error`), not wrapped in the worker's traceback.

    The augmentations of sample ``i`` in epoch ``e`` then depend on neither the rank, the
    data-loader worker nor what was loaded before, so a run gives the same batches on any
    number of processes, and a resumed run the same batches as an uninterrupted one.

    Args:
        dataset: The underlying dataset (its transforms use torch's global RNG).
        seed: The run seed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict | CellVitSSLError:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            try:
                return self.dataset[index]
            except CellVitSSLError as exc:  # a value: it reaches the main process as it was raised
                return exc


def build_dataset(cfg: Config, view_maker: WorkerViews | DeviceViews | None = None,
                  stats: ChannelStats | None = None, seed: int | None = None) -> SeededViews:
    """The run's dataset (generating the demo data if enabled).

    Its items hold the multichannel DINO views when ``view_maker`` makes them in the loader's
    workers, and the normalised samples (``image``) when it makes them on the device.

    Args:
        cfg: The run config (for a later phase: the phase's, see :func:`cellvit_ssl.phases.phase_config`).
        view_maker: From :func:`~cellvit_ssl.view_maker.build_view_maker` (default: the one a
            CPU run of ``cfg`` uses).
        stats: Dataset statistics to use (``data.normalize=dataset``) instead of computing them.
        seed: Seed of the augmentations (default ``train.seed``).
    """
    index, root = resolve_index(cfg)
    seed = cfg.train.seed if seed is None else seed
    view_maker = view_maker or build_view_maker(cfg, torch.device("cpu"), seed=seed)
    dataset = build_index_dataset(cfg.data, view_maker.sample_transform, index=index, root=root, stats=stats)
    if not cfg.data.skip_bad:
        dataset.reader.check_files()  # a wrong data.root fails now, not at the first step
    return SeededViews(dataset, seed)


def _ignore_stop_signals(_worker_id: int) -> None:
    # Preemption signals reach the whole process group; only the main process checkpoints, and
    # a data worker dying of SIGTERM first would abort the run before it can.
    for name in StopRequest.SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_loader(cfg: Config, info: D.DistInfo | None = None,
                 dataset: SeededViews | None = None, seed: int | None = None) -> DataLoader:
    """DataLoader over this rank's shard of the index (see :class:`~cellvit_ssl.distributed.ShardedSampler`).

    Its sampler is ``loader.sampler``; call ``set_position(epoch, skip)`` before each epoch.
    ``seed`` (default ``train.seed``) orders the samples.

    Raises:
        DataError: If the index has fewer samples than one global batch.
    """
    info = info or D.DistInfo(0, 1, 0, torch.device("cpu"))
    seed = cfg.train.seed if seed is None else seed
    dataset = dataset if dataset is not None else build_dataset(
        cfg, build_view_maker(cfg, info.device, info.rank, seed=seed), seed=seed)
    per_step = cfg.data.batch_size * info.world_size
    if len(dataset) < per_step:
        raise DataError(
            f"the index has {len(dataset)} samples, fewer than one global batch "
            f"(data.batch_size={cfg.data.batch_size} x {info.world_size} processes)"
        )
    sampler = D.ShardedSampler(dataset, info, seed=seed)
    sampler.set_position(0)
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_or_error,  # pads mixed channel sets, adds channel_mask; passes a sample's error on
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
        pin_memory=info.device.type == "cuda",
        # Its own generator: creating an iterator must not draw from the global RNG.
        generator=torch.Generator().manual_seed(seed + info.rank),
    )


def shutdown_workers(loader: DataLoader) -> None:
    """Stop a loader's worker processes now.

    Persistent workers otherwise live until their iterator is garbage-collected; when a run ends
    by an error, that may only happen at interpreter exit, after ``multiprocessing`` has sent
    them SIGTERM (which they ignore, see ``_ignore_stop_signals``) and waits for them forever.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()  # what the iterator's __del__ does; torch has no public call for it
        loader._iterator = None


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return recompute(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def enable_activation_checkpointing(meta: DINOMetaArch) -> None:
    """Recompute each transformer block of the student in backward instead of storing activations.

    Every block of ``meta.transformer_blocks(teacher=False)`` (hierarchical attention's
    cross-channel blocks included) keeps only its inputs for backward. Each block's ``forward``
    is patched on the instance, so parameter names (and checkpoints) are unchanged. The teacher
    runs without gradients and stores nothing anyway.
    """
    for block in meta.transformer_blocks(teacher=False):
        block.forward = functools.partial(_checkpointed_forward, block.forward)


def compile_blocks(meta: DINOMetaArch, backend: str | Callable = "inductor") -> None:
    """``torch.compile`` every transformer block of student and teachers (names unchanged).

    Args:
        meta: The meta-architecture; its ``transformer_blocks()`` (cross-channel blocks and the
            Gram teacher's included) and a distillation teacher's blocks are compiled in place
            (``nn.Module.compile``).
        backend: ``torch.compile`` backend.
    """
    for block in meta.transformer_blocks() + meta.frozen_teacher_blocks():
        block.compile(backend=backend)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` → bf16 autocast on GPU, fp32 on CPU."""
    if precision == Precision.auto:
        return device.type == "cuda"
    return precision == Precision.bf16


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 so that the run stops, checkpointed, at the end of a step.

    The handler only records the signal. Each optimiser step reads the record once, after the
    forward and backward passes of all its micro-batches, and all-reduces it with the step's
    loss terms, so every rank agrees on where to stop. A signal that arrives before that point
    ends the run at the end of that same step (after its optimiser and teacher updates): its
    checkpoint is written and training returns. One that arrives after it, during the
    optimiser and teacher updates, ends the run at the end of the next step.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for name in self.SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _record_up_to(step: int) -> Callable[[str], bool]:
    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False  # a line cut short by a kill

    return keep


class MetricsLog:
    """JSONL records and TensorBoard scalars, written on rank 0 only."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool, resumed_step: int | None = None) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        self.file = AppendLog(folder / "metrics.jsonl", hint=f"the checkpoints in {folder} are kept; free space (or "
                              "fix the folder) and run the same command again to resume")
        if resumed_step is not None:
            self.file.keep(_record_up_to(resumed_step))  # steps a killed run did past its checkpoint
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                print(f"cellvit_ssl: TensorBoard logging is off ({exc}); `pip install tensorboard` "
                      "to turn it on, or set train.tensorboard=false", file=sys.stderr)
            else:
                purge = resumed_step + 1 if resumed_step is not None else None
                self.tb = SummaryWriter(str(folder / "tb"), purge_step=purge)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record))
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@contextmanager
def _rng_untouched():
    """Leave Python's, NumPy's and torch's global random state as they were.

    A later phase's loader is built when the run reaches the phase, or at once when a run is
    resumed inside it; nothing it does may shift the random streams of the steps that follow.
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@dataclass(frozen=True)
class PhaseRun:
    """A phase of this run on this process: batch sizes, steps per epoch, schedules, contract.

    Attributes:
        phase: The phase (:class:`cellvit_ssl.phases.Phase`; ``phase.cfg`` its config).
        micro_batch: Per-process batch of one forward pass.
        global_batch: Images per optimiser step (all processes, all micro-batches).
        steps_per_epoch: Optimiser steps per pass over this phase's shard of the index.
        schedules: Learning rate, weight decay and teacher momentum of the phase's steps.
        preprocess: The preprocessing contract of a model trained up to this phase.
    """

    phase: Phase
    micro_batch: int
    global_batch: int
    steps_per_epoch: int
    schedules: Schedules
    preprocess: Preprocess


def load_distill_teacher(cfg: Config, vocabulary: ChannelVocabulary) -> tuple[FrozenTeacher, Config]:
    """The frozen teacher of a distillation run and the run config resolved against it.

    Built under ``train.seed`` (fresh heads, hierarchical attention's new blocks), the same on
    every process and without touching the run's random streams.
    """
    with _rng_untouched():
        torch.manual_seed(cfg.train.seed)
        teacher = build_frozen_teacher(cfg, vocabulary)
    resolved = resolve_distill_config(cfg, teacher)
    return teacher, resolved


class Trainer:
    """One training run on this process (one rank of many under torchrun).

    Args:
        cfg: The loaded run config.
        info: From :func:`cellvit_ssl.distributed.init_distributed`.
    """

    def __init__(self, cfg: Config, info: D.DistInfo) -> None:
        t = cfg.train
        self.info = info
        self.out = Path(t.output_dir).expanduser()
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        seed_everything(t.seed)
        self.vocabulary = ChannelVocabulary.from_config(cfg.data)
        frozen = None
        if cfg.distill.teacher:  # before the run folder exists: a bad teacher file leaves none
            frozen, resolved = load_distill_teacher(cfg, self.vocabulary)
            if resolved.ssl != cfg.ssl and info.is_main:
                s = resolved.ssl
                print(f"cellvit_ssl: the student's heads follow the teacher's: ssl.head_output_dim="
                      f"{s.head_output_dim}, ssl.ibot_head_output_dim={s.ibot_head_output_dim}, "
                      f"ssl.head_hidden_dim={s.head_hidden_dim}, ssl.head_bottleneck_dim={s.head_bottleneck_dim} "
                      "(the saved config.yaml has them)", flush=True)
            cfg = resolved
        self.cfg = cfg
        #: Makes each micro-batch's views: in the loader's workers or on the device (views.device);
        #: rebuilt with the loader at each phase boundary.
        self.view_maker = build_view_maker(cfg, info.device, info.rank)
        # Rank 0 generates demo data / opens the index first; the others then reuse it. Nothing is
        # written into the run folder before fit() has the model and the checkpoint it resumes from.
        dataset = build_dataset(cfg, self.view_maker) if info.is_main else None
        D.barrier()
        # Nothing is written before the data and a resumed checkpoint's settings are checked (see fit):
        # a failed or refused command leaves nothing that blocks the corrected one.
        self.resume_from = find_resume_checkpoint(t.resume, self.out)
        self._resume_payload = None
        self.config_changes: dict[str, tuple] = {}
        if self.resume_from is not None:
            self._resume_payload = load_checkpoint(self.resume_from, expect=(TRAINING_FORMAT,))
            self.config_changes = check_resume_config(self._resume_payload.get("config"), cfg, self.resume_from)
        self.loader = build_loader(cfg, info, dataset if dataset is not None else build_dataset(cfg, self.view_maker))
        self.sampler: D.ShardedSampler = self.loader.sampler
        inner = self.loader.dataset.dataset
        #: Dataset statistics (``data.normalize=dataset``), shared by every phase.
        self.stats: ChannelStats | None = inner.stats
        #: The preprocessing contract (with the dataset statistics) of the main phase.
        self.preprocess = Preprocess.from_config(cfg, self.stats)
        self.meta = DINOMetaArch(build_model(cfg.model, list(cfg.data.channels), vocabulary=self.vocabulary),
                                 cfg.ssl, frozen_teacher=frozen, mask_student=cfg.distill.masking).to(info.device)
        if frozen is not None and cfg.distill.init_student_heads:
            init_student_heads(self.meta, frozen)
        seed_everything(t.seed + info.rank)  # per-rank stream for stochastic layers (drop path)
        if t.activation_checkpointing:
            enable_activation_checkpointing(self.meta)
        if t.compile:
            compile_blocks(self.meta)
        self.bf16 = use_bf16(t.precision, info.device)
        self.model = D.wrap_model(self.meta, info, t.strategy, bf16=self.bf16)
        self.optimizer = torch.optim.AdamW(param_groups(self.meta, t.weight_decay, t.layer_decay))
        self.trainable = [p for p in self.meta.parameters() if p.requires_grad]

        self.micro_batch = cfg.data.batch_size
        self.global_batch = self.micro_batch * info.world_size * t.accumulate_steps
        self.steps_per_epoch = self.sampler.num_samples // (self.micro_batch * t.accumulate_steps)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the index has {len(self.loader.dataset)} samples, fewer than one optimiser step needs "
                f"(data.batch_size={self.micro_batch} x {info.world_size} processes x "
                f"train.accumulate_steps={t.accumulate_steps})"
            )
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        #: Every phase of the run (one without ``train.phases``); the main phase's schedules are ``schedules``.
        self.phases = self._plan_phases()
        self.schedules = self.phases[0].schedules
        self._active_phase = 0
        if frozen is not None:
            check_compatible(self.meta.student.backbone, frozen, cfg,
                             [run.phase.cfg.views.global_crop_size for run in self.phases], self.vocabulary)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.saved_step = -1

    # -- phases --------------------------------------------------------------------------------

    def _plan_phases(self) -> list[PhaseRun]:
        """Batch sizes, steps per epoch and schedules of every phase (see :mod:`cellvit_ssl.phases`).

        Raises:
            ConfigError: If a phase gets no step.
            DataError: If a phase's batch is larger than the index allows.
        """
        accumulate, world = self.cfg.train.accumulate_steps, self.info.world_size
        runs = []
        for phase in plan_phases(self.cfg, self.total_steps):
            micro = phase.cfg.data.batch_size
            per_epoch = self.sampler.num_samples // (micro * accumulate)
            if per_epoch == 0:
                raise DataError(f"phase {phase.index}: the index has {len(self.loader.dataset)} samples, fewer than "
                                f"one optimiser step of batch {micro} x {world} processes x {accumulate} needs")
            global_batch = micro * world * accumulate
            runs.append(PhaseRun(phase, micro, global_batch, per_epoch,
                                 phase_schedules(self.cfg, phase, global_batch, self.steps_per_epoch),
                                 Preprocess.from_config(phase.cfg, self.stats)))
        return runs

    def phase_at(self, step: int) -> PhaseRun:
        """The phase that trains the run's optimiser step ``step``."""
        return next((run for run in self.phases if step < run.phase.end_step), self.phases[-1])

    def _enter_phase(self, run: PhaseRun) -> None:
        """Switch the data loader and the view maker to ``run``'s phase if it is not the active one.

        Both view makers switch: worker views are cut by the phase's transform in the loader,
        device views by the phase's batched crops, each drawn from the phase's seed.
        """
        index = run.phase.index
        if index == self._active_phase:
            return
        phase = run.phase
        with _rng_untouched():
            self.view_maker = build_view_maker(phase.cfg, self.info.device, self.info.rank, seed=phase.seed)
            dataset = build_dataset(phase.cfg, self.view_maker, stats=self.stats, seed=phase.seed)
            self.loader = build_loader(phase.cfg, self.info, dataset, seed=phase.seed)
        self.sampler = self.loader.sampler
        self._active_phase = index
        if self.info.is_main:
            tqdm.write(f"cellvit_ssl: {run.phase.describe()}")

    # -- checkpoints -------------------------------------------------------------------------

    def _contract(self) -> dict:
        """What inference needs besides the weights: the preprocessing contract and the channel vocabulary.

        The contract is that of the phase the last step trained in (a run that ends with a
        high-resolution phase embeds at that phase's sample and view size).
        """
        preprocess = self.phase_at(max(self.step - 1, 0)).preprocess
        return {"preprocess": preprocess.to_dict(), "vocabulary": self.vocabulary.to_dict()}

    def _distill_record(self) -> dict:
        teacher = self.meta.frozen_teacher
        if teacher is None:
            return {}
        return {"distill_teacher": {"path": teacher.source, "sha256": teacher.sha256}}

    def _training_payload(self) -> dict:
        model_state, optim_state = D.full_state_dict(self.model, self.optimizer)
        rngs = D.gather_objects(rng_state())
        return {"format": TRAINING_FORMAT, "state_layout": STATE_LAYOUT, "config": config_to_dict(self.cfg),
                **self._contract(), "model": model_state, "optimizer": optim_state, "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "phase": self.phase_at(max(self.step - 1, 0)).phase.index,
                "world_size": self.info.world_size, "global_batch": self.global_batch, "rng": rngs,
                **self._distill_record()}

    def _what_was_kept(self) -> str:
        kept = (f"the last complete checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")
        return f"{kept}; free space (or fix the folder) and run the same command again to resume"

    def save(self) -> Path:
        """Checkpoint the current step (all ranks call; rank 0 writes).

        Raises:
            CheckpointError: If it cannot be written, saying which checkpoint is kept.
        """
        payload = self._training_payload()
        path = self.out / f"checkpoint_{self.step:08d}.pt"
        if self.info.is_main:
            try:
                path = save_training_checkpoint(payload, self.out, self.step, self.cfg.train.keep_last)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; {self._what_was_kept()}") from exc
        D.barrier()
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    def export_teacher(self) -> Path:
        """Write ``teacher.pt``: the teacher backbone alone (all ranks call; rank 0 writes)."""
        backbone = self.meta.teacher_backbone_state_dict()
        path = self.out / "teacher.pt"
        if self.info.is_main:
            try:
                save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(self.cfg), **self._contract(),
                                 "backbone": backbone}, path)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; the training checkpoint {self.last_checkpoint} is complete: free "
                                      "space and run the same command again to write teacher.pt") from exc
        D.barrier()
        return path

    def resume(self, path: Path, payload: dict | None = None) -> None:
        """Restore model, optimizer, step and random state from a training checkpoint.

        Checkpoints of an older key layout are read through
        :func:`~cellvit_ssl.checkpoint.upgrade_state_layout` (in :func:`load_checkpoint`).

        Args:
            path: The checkpoint.
            payload: Its content, when already loaded.

        Raises:
            CheckpointError: If the file is unreadable or does not fit this run's model.
        """
        payload = payload if payload is not None else load_checkpoint(path, expect=(TRAINING_FORMAT,))
        missing = [k for k in ("model", "optimizer", "step", "rng") if k not in payload]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} has no {missing}; it cannot be resumed from")
        self._check_distill_teacher(payload.get("distill_teacher"), path)
        model_state = payload["model"]
        if self.meta.gram_enabled:
            model_state, added = with_gram_teacher(model_state)
            if added and self.info.is_main:
                print(f"cellvit_ssl: {path} has no Gram teacher (written without ssl.gram): it starts as the "
                      f"checkpoint's EMA teacher (step {payload['step']})", file=sys.stderr)
        try:
            D.load_full_state_dict(self.model, self.optimizer, model_state, payload["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            changed = _changed_settings(payload.get("config", {}), config_to_dict(self.cfg), ("model", "ssl"))
            why = (f"it was trained with {', '.join(changed)}" if changed
                   else f"changed model or ssl settings? {str(exc).splitlines()[0]}")
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this run's model/optimizer: {why}. Keep the run's "
                "settings to resume it, or start a new run in another train.output_dir (or train.resume=none)"
            ) from exc
        self.step = int(payload["step"])
        rngs = payload["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        elif self.info.is_main:
            print(f"cellvit_ssl: the checkpoint was written by {len(rngs)} processes, this run has "
                  f"{self.info.world_size}; it continues, but not bit-exactly", file=sys.stderr)
        if payload.get("global_batch", self.global_batch) != self.global_batch and self.info.is_main:
            print(f"cellvit_ssl: the checkpoint was trained with global batch {payload['global_batch']}, "
                  f"this run has {self.global_batch}; the data order and schedules change from here",
                  file=sys.stderr)
        self.last_checkpoint, self.saved_step = path, self.step

    def _prepare_output(self) -> None:
        """Create the run folder and write ``config.yaml`` (rank 0), once everything has been checked."""
        ensure_folder(self.out, what="train.output_dir")
        remove_stale_temporaries(self.out)
        save_config(self.cfg, self.out / "config.yaml")

    def _check_distill_teacher(self, stored: dict | None, path: Path) -> None:
        """Refuse to resume a distillation run against another frozen teacher than it started with.

        Raises:
            CheckpointError: Naming both files.
        """
        ours = self._distill_record().get("distill_teacher")
        if stored is None and ours is None:
            return
        if stored is None or ours is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written by a run {'with' if stored else 'without'} distill.teacher, "
                f"this run is {'with' if ours else 'without'} one; resume with the same setting")
        if stored["sha256"] != ours["sha256"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was distilled from {stored['path']} (sha256 {stored['sha256'][:12]}...), "
                f"distill.teacher={ours['path']} has other content (sha256 {ours['sha256'][:12]}...); resuming "
                "against another teacher would not continue the run")

    # -- the loop ----------------------------------------------------------------------------

    def _model_inputs(self, batch: dict, epoch: int, micro: int) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """Views, channel ids and model keyword arguments of one micro-batch, on the device.

        Every copy is non-blocking (the loader pins its batches on CUDA); the views come from
        :attr:`view_maker`, seeded by the data ``epoch`` and the micro-batch's number within it
        on this rank, both counted from the first step of the current phase (as the sampler counts).
        """
        device = self.info.device
        ids = batch["channel_ids"].to(device, non_blocking=True)
        kwargs = {}
        if "channel_mask" in batch:
            kwargs["channel_mask"] = batch["channel_mask"].to(device, non_blocking=True)
        run = self.phase_at(self.step)
        number = ((self.step - run.phase.first_step) % run.steps_per_epoch) * self.cfg.train.accumulate_steps + micro
        return self.view_maker(batch, ids, epoch, number), ids, kwargs

    def _train_step(self, batches, epoch: int, stop: StopRequest) -> dict:
        """One optimiser step and its record (loss terms averaged over ranks, schedules).

        The record's ``stop`` is True when any rank had a stop signal by the time its forward
        and backward passes were done (see :class:`StopRequest`).
        """
        t, device = self.cfg.train, self.info.device
        run = self.phase_at(self.step)
        schedules = run.schedules
        lr, wd, momentum = schedules.lr(self.step), schedules.wd(self.step), schedules.momentum(self.step)
        apply_schedules(self.optimizer, lr, wd)
        self.meta.refresh_gram_teacher(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        # the views' epoch counts from the phase's first step, ``epoch`` (the schedules') from the run's
        data_epoch = (self.step - run.phase.first_step) // run.steps_per_epoch
        for micro in range(t.accumulate_steps):
            batch = next(batches)
            if isinstance(batch, Exception):  # a bad sample, read in a loader worker (see SeededViews)
                raise batch
            views, ids, kwargs = self._model_inputs(batch, data_epoch, micro)
            with D.no_sync(self.model, micro < t.accumulate_steps - 1):
                with autocast:
                    out = self.model(views, ids, epoch=epoch, step=self.step, **kwargs)
                (out["loss"] / t.accumulate_steps).backward()
            for key, value in out.items():
                value = value.detach().float() / t.accumulate_steps
                terms[key] = terms[key] + value if key in terms else value
        keys = sorted(terms)
        stop_flag = torch.tensor(float(stop.signal is not None), device=device)
        local = torch.stack([terms[k] for k in keys] + [stop_flag])
        reduced = D.all_reduce_mean(local).tolist()
        record = dict(zip(keys, reduced[:-1]))
        record["stop"] = reduced[-1] > 0
        if not np.isfinite(record["loss"]):
            return record
        self.meta.cancel_last_layer_gradients(epoch)
        if t.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.clip_grad)
            record["grad_norm"] = float(D.grad_norm_value(norm))
        self.optimizer.step()
        self.meta.update_teacher(momentum)
        record.update(lr=lr, wd=wd, momentum=momentum, phase=run.phase.index, micro_batch=int(views[0].shape[0]),
                      global_crop=int(views[0].shape[-1]),
                      local_crop=int(views[-1].shape[-1]) if len(views) > 2 else 0)
        return record

    def fit(self) -> Path:
        """Train to the end (or to a stop signal); returns ``teacher.pt`` (or the checkpoint)."""
        t, info = self.cfg.train, self.info
        source = self.resume_from
        if source is not None:
            self.resume(source, self._resume_payload)
            self._resume_payload = None
            if self.step >= self.total_steps:
                return self._finished(source)
        if info.is_main:
            self._prepare_output()
        D.barrier()
        if info.is_main:
            resumed = f", resumed at step {self.step} from {source}" if source is not None else ""
            if self.config_changes:
                resumed += " with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in
                                                self.config_changes.items())
            strategy = f", {t.strategy}" if info.world_size > 1 else ""
            print(f"cellvit_ssl: {len(self.loader.dataset)} samples, {info.world_size} process(es) on "
                  f"{info.device.type}, global batch {self.global_batch}, {self.steps_per_epoch} steps/epoch, "
                  f"{self.total_steps} steps, model {self.cfg.model.variant}/{self.cfg.model.arch}, views "
                  f"{'batched on ' + info.device.type if self.view_maker.on_device else 'in loader workers'}, "
                  f"{'bf16' if self.bf16 else 'fp32'}{strategy}, output {self.out}{resumed}", flush=True)
            if len(self.phases) > 1:
                print("cellvit_ssl: " + "; ".join(run.phase.describe() for run in self.phases), flush=True)
            if self.meta.frozen_teacher is not None:
                print(f"cellvit_ssl: {self.meta.frozen_teacher.describe()}", flush=True)
        log = MetricsLog(self.out, info.is_main, t.tensorboard, self.step if source is not None else None)
        stop = StopRequest().install()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (info.is_main and t.progress),
                   desc="train", dynamic_ncols=True)
        try:
            path, message = self._loop(log, stop, bar)
        finally:
            bar.close()  # before the final line, which then stands on a line of its own
            stop.restore()
            log.close()
        if info.is_main:
            print(message, flush=True)
        return path

    def _finished(self, source: Path) -> Path:
        """A resumed run that has nothing left to train: say so and write nothing (but a missing ``teacher.pt``)."""
        teacher = self.out / "teacher.pt"
        missing = not teacher.is_file()
        if missing:  # killed between the last checkpoint and the export
            teacher = self.export_teacher()
        if self.info.is_main:
            more = "" if self.step == self.total_steps else f" (this config asks for {self.total_steps})"
            print(f"cellvit_ssl: {self.out} is finished: {source} is at step {self.step}{more}; nothing to train. "
                  f"{'Wrote' if missing else 'Its encoder:'} {teacher}. To train longer, raise train.epochs with "
                  "train.allow_config_change=[train.epochs]; to start over, train.resume=none", flush=True)
        return teacher

    def _end_epoch(self, run: PhaseRun, epoch: int, losses: list[float], seconds: float) -> None:
        inner = getattr(self.loader.dataset, "dataset", self.loader.dataset)
        end = getattr(inner, "end_epoch", None)  # IndexDataset logs the bad samples skip_bad skipped
        skipped = end() if end is not None else 0
        if self.info.is_main and losses:
            rate = len(losses) * run.global_batch / max(seconds, 1e-9)
            note = f", {skipped} bad samples skipped" if skipped else ""
            if len(losses) < run.steps_per_epoch:  # resumed mid-epoch: metrics.jsonl has the earlier steps
                note += (f"; mean of the {len(losses)} steps since the resume, of {run.steps_per_epoch} in the "
                         "epoch")
            where = f"epoch {epoch + 1}/{self.cfg.train.epochs}" if run.phase.index == 0 else \
                f"phase {run.phase.index} epoch {epoch + 1}"
            tqdm.write(f"{where}  loss {np.mean(losses):.4f}  ({rate:.1f} images/s{note})")

    def _loop(self, log: MetricsLog, stop: StopRequest, bar: tqdm) -> tuple[Path, str]:
        t = self.cfg.train
        self.model.train()
        tick, tick_step = time.perf_counter(), self.step
        while self.step < self.total_steps:
            run = self.phase_at(self.step)
            self._enter_phase(run)
            # Epochs of the data order count from the phase's first step; the schedule epoch
            # (teacher temperature, frozen last layer) counts main-phase epochs over the whole run.
            epoch, within = divmod(self.step - run.phase.first_step, run.steps_per_epoch)
            self.sampler.set_position(epoch, within * run.micro_batch * t.accumulate_steps)
            batches = iter(self.loader)
            epoch_losses, epoch_start = [], time.perf_counter()
            for _ in range(within, run.steps_per_epoch):
                if self.step >= run.phase.end_step:
                    break
                schedule_epoch = self.step // self.steps_per_epoch
                record = self._train_step(batches, schedule_epoch, stop)
                if not np.isfinite(record["loss"]):
                    kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint \
                        else "no checkpoint was written yet"
                    raise FloatingPointError(
                        f"loss is {record['loss']} at step {self.step + 1} (epoch {schedule_epoch}); stopping. "
                        f"{kept}. Lower train.base_lr, raise train.warmup_epochs or check the data."
                    )
                self.step += 1
                epoch_losses.append(record["loss"])
                now = time.perf_counter()
                rate = (self.step - tick_step) * run.global_batch / max(now - tick, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.1f}", refresh=False)
                if (t.log_every and self.step % t.log_every == 0) or self.step == self.total_steps:
                    extra = {"images_per_s": rate}
                    if self.info.device.type == "cuda":
                        extra["max_memory_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
                    log.write({"step": self.step, "epoch": schedule_epoch,
                               **{k: v for k, v in record.items() if k != "stop"}, **extra})
                    tick, tick_step = now, self.step
                end_of_epoch = (self.step - run.phase.first_step) % run.steps_per_epoch == 0
                if end_of_epoch:
                    self._end_epoch(run, epoch, epoch_losses, time.perf_counter() - epoch_start)
                # a phase's last step is checkpointed too: the model as it was before the next phase
                end_of_phase = self.step == run.phase.end_step
                due = self.step % t.checkpoint_every == 0 if t.checkpoint_every else end_of_epoch
                if record["stop"]:
                    path = self.save()
                    return path, (f"cellvit_ssl: stop requested (SIGTERM/SIGUSR1): checkpoint at step {self.step} "
                                  f"written to {path}; run the same command again to resume")
                if due or end_of_phase:
                    self.save()
        if self.saved_step != self.step:
            self.save()
        export = self.export_teacher()
        return export, (f"done: wrote {self.out / 'checkpoint.pt'} (step {self.step}), {export} (the encoder) and "
                        f"{self.out / 'config.yaml'}")


def _changed_settings(stored: dict, current: dict, sections: tuple[str, ...]) -> list[str]:
    """``section.key=old (now new)`` for the settings of ``sections`` that differ between two configs."""
    out = []
    for section in sections:
        old, new = stored.get(section) or {}, current.get(section) or {}
        out += [f"{section}.{k}={old[k]!r} (now {new.get(k)!r})" for k in sorted(old) if k in new and old[k] != new[k]]
    return out


def run(cfg: Config) -> Path:
    """Train with a loaded config on this process; returns ``teacher.pt``.

    Under ``torchrun`` every process calls this; it joins the process group and leaves it
    when done. When a stop signal arrives the returned path is the checkpoint written.

    Raises:
        FloatingPointError: On a NaN / Inf loss (the last good checkpoint is kept).
        DataError: If another run holds ``train.output_dir`` (naming its process).
    """
    info = D.init_distributed(cfg.train.device, cfg.train.dist_backend)
    try:
        trainer = Trainer(cfg, info)
        # one run per output folder: a second one would interleave its checkpoints with ours
        with exclusive_lock(trainer.out) if info.is_main else nullcontext():
            try:
                return trainer.fit()
            finally:
                shutdown_workers(trainer.loader)
    finally:
        D.cleanup()


COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.train",
    description="Self-supervised DINO / DINOv2 training of a channel-adaptive ViT. The same command runs on one "
                "CPU or GPU, and under torchrun / srun on many GPUs and nodes.",
    schema=Config,
    examples=(
        "python -m cellvit_ssl.train configs/demo.yaml",
        "python -m cellvit_ssl.train configs/hpa.yaml data.index=data/hpa/index.csv train.epochs=5",
        "torchrun --standalone --nproc_per_node 8 -m cellvit_ssl.train configs/hpa.yaml train.strategy=fsdp",
    ),
)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    try:
        cfg = COMMAND_LINE.load(COMMAND_LINE.parse(sys.argv[1:] if argv is None else argv))
        validate_config(cfg)
        run(cfg)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint written is kept. Run the same command again to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
