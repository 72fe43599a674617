"""``python -m cellvit_ssl.finetune``: a classifier from a pre-trained backbone and a labelled index.

Examples:
    python -m cellvit_ssl.finetune configs/finetune.yaml finetune.checkpoint=runs/demo/teacher.pt data.index=cells.csv
    python -m cellvit_ssl.finetune runs/demo/teacher.pt --index cells.csv --mode lora --out runs/lora
    torchrun --standalone --nproc_per_node 4 -m cellvit_ssl.finetune hpa_ft.yaml finetune.mode=full

Modes (``finetune.mode``):

- ``linear``: the backbone is frozen (in eval mode); only a linear head on its image
  embedding is trained.
- ``full``: everything is trained; the pre-trained layers at ``finetune.backbone_lr_scale``
  (default 1/10) of the head's learning rate, with layer-wise decay (``train.layer_decay``)
  from the last block down to the embeddings.
- ``lora``: peft LoRA adapters (``finetune.lora.*``: rank, alpha, dropout, target ``qv`` or
  ``all``; see :mod:`cellvit_ssl.lora`) and the head are trained, the rest is frozen; the
  adapters are new weights and learn at the head's rate (with layer-wise decay), their B
  matrices ``finetune.lora.lr_ratio`` times faster than A (LoRA+).

Rows are read by the reader ``embed`` uses (:class:`~cellvit_ssl.data.samples.SampleReader`
with the model's channels) and preprocessed by the contract stored in the checkpoint
(:class:`~cellvit_ssl.preprocess.Preprocess`): the ``data`` keys of that contract (channels,
normalisation, sample size) and the view size are the checkpoint's and cannot be changed here.
Training samples get one view (:class:`~cellvit_ssl.transforms.ClassifierView`,
``finetune.augment``): by default the inference input randomly flipped and turned by multiples
of 90° (``geometric``), or one view of the pre-training augmentations without the multi-crop
(``views``; the ``views`` defaults are the checkpoint's), or none; validation and test samples
get none, exactly as :func:`~cellvit_ssl.classifier.load_classifier` will see them.

Every mode has the same head (:class:`~cellvit_ssl.classifier.LinearHead`): the embedding
standardised per feature by the mean and standard deviation of the training rows' pre-trained
embeddings (computed once before the first step, ``finetune.standardize``), then a linear layer;
the statistics are saved with the head, so ``predict``, ``load_classifier`` and napari apply them.
This is what makes a linear probe train well at one learning rate whatever the backbone's
feature scale (the logistic-regression probe of ``evaluate`` standardises too).

Labels (:mod:`cellvit_ssl.labels`): ``finetune.label_columns`` names one column of class names
(``single_label``: softmax + cross-entropy), or for ``multi_label`` (sigmoid + BCE) one column of
``;``-separated classes or one 0/1 column per class; ``finetune.class_weights=balanced`` weighs
classes by inverse frequency. The split column names ``train`` / ``val`` / ``test`` rows; without
``val`` rows, ``finetune.val_fraction`` of the training rows are held out. After every epoch the
validation rows are scored (macro-F1; multi-label: mAP); the best epoch is kept and training
stops after ``finetune.patience`` epochs without improvement. Multi-label decision thresholds
are chosen per class on the validation rows (best F1). The test rows are scored at the end.

Outputs in ``train.output_dir``: ``config.yaml``; ``checkpoint_<step>.pt`` / ``checkpoint.pt``
(exact resume with ``train.resume=auto``, also after SIGKILL; SIGTERM / SIGUSR1 checkpoint and
stop; as in training, resuming under changed settings is refused naming every changed key unless
``train.allow_config_change`` names it, and a finished run says so and writes nothing);
``metrics.jsonl`` (training steps and per-epoch validation); ``classifier.pt`` (see
:mod:`cellvit_ssl.classifier`); ``evaluation.json`` (validation and test scores in
``evaluate``'s terms: macro-F1, accuracy, per-class F1, mAP for multi-label).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from cellvit_ssl import distributed as D
from cellvit_ssl.checkpoint import (
    ENCODER_FORMAT,
    FINETUNE_FORMAT,
    TRAINING_FORMAT,
    find_resume_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from cellvit_ssl.classifier import Classifier, ClassifierNet
from cellvit_ssl.cli import CommandLine, Flag
from cellvit_ssl.config import (
    Choice,
    DataConfig,
    DistBackend,
    MissingChannels,
    Precision,
    ViewsConfig,
    ViewsDevice,
    check_allowed_changes,
    check_device,
    config_to_dict,
    save_config,
)
from cellvit_ssl.data.dataset import read_index
from cellvit_ssl.data.samples import SampleReader
from cellvit_ssl.embed import CONTRACT_KEYS, encoder_featurizer, featurize_rows, sample_reader
from cellvit_ssl.encoder import pretrained_backbone
from cellvit_ssl.errors import CellVitSSLError, CheckpointError, ConfigError, DataError
from cellvit_ssl.io import atomic_write_text
from cellvit_ssl.labels import Labels, class_weights, read_labels, require_trained_classes, scores, select_thresholds
from cellvit_ssl.lora import LoRA, LoRASpec
from cellvit_ssl.optim import Schedules, apply_schedules, layer_decay_groups
from cellvit_ssl.preprocess import Preprocess
from cellvit_ssl.train import (
    MetricsLog,
    SeededViews,
    StopRequest,
    build_loader,
    check_resume_config,
    seed_everything,
    use_bf16,
)
from cellvit_ssl.transforms import ClassifierView

EXIT_ERROR = 2
EXIT_DIVERGED = 3
#: ``views`` keys that belong to the preprocessing contract (the model input): the checkpoint's.
VIEW_CONTRACT_KEYS = ("global_crop_size", "standardize")
#: ``data`` keys fixed by the checkpoint: the contract, and the sample size the model learnt on.
DATA_CONTRACT_KEYS = (*CONTRACT_KEYS, "sample_size")
CLASSIFIER_FILE = "classifier.pt"


class FinetuneMode(Choice):
    """What fine-tuning trains."""

    linear = "linear"
    full = "full"
    lora = "lora"


class LabelTask(Choice):
    """One class per row, or several."""

    single_label = "single_label"
    multi_label = "multi_label"


class ClassWeighting(Choice):
    """How classes are weighed in the loss."""

    none = "none"
    balanced = "balanced"


class Augment(Choice):
    """How much augmentation a labelled training sample gets (see :class:`~cellvit_ssl.transforms.ClassifierView`)."""

    views = "views"
    geometric = "geometric"
    none = "none"


class LoraTarget(Choice):
    """Which linear layers get LoRA adapters."""

    qv = "qv"
    all = "all"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (``finetune.mode=lora``), injected by peft."""

    rank: int = 8  # rank r of each low-rank update B·A
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training
    target: LoraTarget = LoraTarget.qv  # qv (query and value projections) | all (every linear layer of the blocks)
    lr_ratio: float = 16.0  # learning rate of the B matrices relative to A's (LoRA+, Hayou et al. 2024; 1 = same)


@dataclass(frozen=True)
class FinetuneConfig:
    """What to fine-tune, on which labels (the ``finetune`` section)."""

    checkpoint: str | None = None  # pre-trained teacher.pt (or training checkpoint.pt) to start from
    mode: FinetuneMode = FinetuneMode.linear  # linear (frozen backbone + head) | full | lora (adapters + head)
    task: LabelTask = LabelTask.single_label  # single_label (softmax, cross-entropy) | multi_label (sigmoid, BCE)
    label_columns: list[str] = field(default_factory=lambda: ["label"])  # class column, or one 0/1 column per class
    label_separator: str = ";"  # multi_label in one column: the separator of a row's classes
    classes: list[str] = field(default_factory=list)  # class order (default: sorted classes of the training rows)
    split_column: str = "split"  # index column naming each row's split
    train_value: str = "train"  # split value of the rows trained on
    val_value: str = "val"  # split value of validation rows (early stopping, multi-label thresholds)
    test_value: str = "test"  # split value of held-out rows, scored once at the end
    val_fraction: float = 0.2  # without val rows: fraction of training rows held out for validation (0 = none)
    class_weights: ClassWeighting = ClassWeighting.none  # none | balanced (inverse frequency; BCE: pos_weight)
    augment: Augment = Augment.geometric  # geometric (flips, 90° turns) | views (pre-training's, one crop) | none
    standardize: bool = True  # standardise the embedding before the head by the training rows' pre-trained mean / std
    backbone_lr_scale: float = 0.1  # full: learning rate of the pre-trained layers relative to the head
    patience: int = 10  # epochs without a better validation score before stopping (0 = never stop early)
    standalone: bool = False  # store the backbone's weights in classifier.pt (full mode always does)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class FinetuneTrainConfig:
    """The optimisation loop (training's key names, fine-tuning's defaults)."""

    output_dir: str = "runs/finetune"  # folder of classifier.pt, checkpoints, config.yaml and metrics
    epochs: int = 30  # passes over the training rows
    base_lr: float = 5.0e-2  # head (and LoRA) learning rate per `lr_reference_batch` samples of global batch
    lr_reference_batch: int = 256  # lr = base_lr * global batch / this
    min_lr: float = 1.0e-6  # learning rate at the end of the cosine schedule
    warmup_epochs: int = 1  # epochs of linear learning-rate warm-up
    weight_decay: float = 0.05  # AdamW weight decay (norms, biases, tokens: none)
    layer_decay: float = 0.75  # full / lora: layer-wise lr decay from the last block down (1 = off)
    clip_grad: float = 3.0  # max total grad norm (0 = off)
    seed: int = 0  # seed of the head, adapters, data order, crops and validation split
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    dist_backend: DistBackend = DistBackend.auto  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    deterministic: bool = False  # deterministic kernels (slower; for exact reproducibility)
    log_every: int = 10  # steps between JSONL records of the training loss
    tensorboard: bool = False  # TensorBoard scalars in output_dir/tb (needs tensorboard installed)
    progress: bool = True  # progress bar on rank 0
    checkpoint_every: int = 0  # steps; 0 = only at each epoch end (after validation)
    keep_last: int = 2  # step checkpoints kept (checkpoint.pt always points at the newest)
    resume: str = "auto"  # auto (latest in output_dir) | none | path to a fine-tuning checkpoint
    allow_config_change: list[str] = field(default_factory=list)  # keys a resumed run may change, e.g. [train.epochs]
    max_steps: int = 0  # stop after this many steps (0 = run all epochs)


@dataclass(frozen=True)
class FinetuneCommand:
    """``python -m cellvit_ssl.finetune``: data and views (defaults from the checkpoint), train, finetune."""

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


COMMAND_LINE = CommandLine(
    prog="python -m cellvit_ssl.finetune",
    description="Fine-tune a pre-trained backbone into a classifier on a labelled index (linear head, full "
                "fine-tuning or LoRA; single- or multi-label). data.* and views.* default to the checkpoint's own; "
                "its preprocessing contract cannot be changed here.",
    schema=FinetuneCommand,
    positionals=("finetune.checkpoint",),
    flags=(
        Flag(("--index",), "data.index"), Flag(("--root",), "data.root"), Flag(("--out",), "train.output_dir"),
        Flag(("--mode",), "finetune.mode"), Flag(("--task",), "finetune.task"),
        Flag(("--labels",), "finetune.label_columns"), Flag(("--split-column",), "finetune.split_column"),
        Flag(("--epochs",), "train.epochs"), Flag(("--lr",), "train.base_lr"),
        Flag(("--batch-size",), "data.batch_size"), Flag(("--workers",), "data.num_workers"),
        Flag(("--device",), "train.device"), Flag(("--no-progress",), "train.progress", False),
    ),
    examples=(
        "python -m cellvit_ssl.finetune runs/demo/teacher.pt --index cells.csv --mode lora --out runs/lora",
        "python -m cellvit_ssl.finetune ft.yaml finetune.mode=full finetune.class_weights=balanced",
        "python -m cellvit_ssl.finetune teacher.pt --index hpa.csv --task multi_label --labels Label "
        "finetune.label_separator='|'",
    ),
)


# ----------------------------------------------------------------------------- config
def validate(cfg: FinetuneCommand) -> None:
    """Check a fine-tuning config for values that cannot work.

    Raises:
        ConfigError: Naming the key, its value and what was expected.
    """
    f, t, d = cfg.finetune, cfg.train, cfg.data
    if not f.checkpoint:
        raise ConfigError("give the pre-trained checkpoint: finetune.checkpoint=teacher.pt (or as the first argument)")
    if not d.index:
        raise ConfigError("give the labelled index: data.index=cells.csv (--index)")
    if d.demo.enabled:
        raise ConfigError("data.demo.enabled: fine-tuning needs a labelled index (data.index), not the demo switch")
    for key in ("epochs", "lr_reference_batch", "keep_last"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)}; expected >= 1")
    for key in ("warmup_epochs", "log_every", "checkpoint_every", "max_steps", "clip_grad", "base_lr", "min_lr",
                "weight_decay"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)}; expected >= 0")
    if not 0 < t.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={t.layer_decay}; expected 0 < layer_decay <= 1")
    check_device(t.device, "train.device")
    check_allowed_changes(t.allow_config_change, FinetuneCommand)
    if d.batch_size < 1 or d.num_workers < 0:
        raise ConfigError(f"data.batch_size={d.batch_size} must be >= 1 and data.num_workers={d.num_workers} >= 0")
    if not 0 <= f.val_fraction < 1:
        raise ConfigError(f"finetune.val_fraction={f.val_fraction}; expected 0 <= fraction < 1")
    if not f.backbone_lr_scale > 0:
        raise ConfigError(f"finetune.backbone_lr_scale={f.backbone_lr_scale}; expected > 0")
    if f.patience < 0:
        raise ConfigError(f"finetune.patience={f.patience}; expected >= 0 (0: never stop early)")
    if len(set(f.label_columns)) != len(f.label_columns) or not f.label_columns:
        raise ConfigError(f"finetune.label_columns={list(f.label_columns)}; expected one or more distinct columns")
    if len({f.train_value, f.val_value, f.test_value}) != 3:
        raise ConfigError(f"finetune.train_value, val_value and test_value must differ (got {f.train_value!r}, "
                          f"{f.val_value!r}, {f.test_value!r})")
    if d.skip_bad:
        raise ConfigError("data.skip_bad: fine-tuning reads every labelled row (a bad row is an error naming it); "
                          "fix or drop the row instead")
    if cfg.views.device == ViewsDevice.device:
        raise ConfigError("views.device=device: fine-tuning makes its one view per sample in the loader's workers; "
                          "leave views.device at auto (or workers)")
    if not f.lora.lr_ratio > 0:
        raise ConfigError(f"finetune.lora.lr_ratio={f.lora.lr_ratio}; expected > 0")
    LoRASpec(f.lora.rank, f.lora.alpha, f.lora.dropout, f.lora.target)


def load(argv: list[str]) -> tuple[FinetuneCommand, dict]:
    """The command's config (``data`` and ``views`` defaults from the checkpoint) and the checkpoint's content.

    Raises:
        ConfigError: On a bad key or value, or a key of the checkpoint's preprocessing contract.
        CheckpointError: If the checkpoint cannot be read.
    """
    sources = COMMAND_LINE.parse(argv)
    first = COMMAND_LINE.load(sources)
    if not first.finetune.checkpoint:
        raise ConfigError("give the pre-trained checkpoint: finetune.checkpoint=teacher.pt (or as the first argument)")
    payload = load_checkpoint(first.finetune.checkpoint)
    cfg = COMMAND_LINE.load(sources, checkpoint_defaults(payload, sources))
    validate(cfg)
    return cfg, payload


def checkpoint_defaults(payload: dict, sources) -> list[tuple[str, dict]]:
    """The checkpoint's ``data`` and ``views`` settings as config defaults; refuse overrides of its contract.

    Raises:
        ConfigError: If ``sources`` set a contract key (naming it).
    """
    stored = payload.get("config")
    if not isinstance(stored, dict):
        raise CheckpointError("the checkpoint holds no run config; it was not written by cellvit_ssl")
    for section, keys in (("data", DATA_CONTRACT_KEYS), ("views", VIEW_CONTRACT_KEYS)):
        given = {k for _, src in sources for k in (src.get(section) or {}).keys()}
        fixed = sorted(given & set(keys))
        if fixed:
            raise ConfigError(f"{section}.{fixed[0]} is part of the model's preprocessing contract (stored in the "
                              "checkpoint); fine-tuning with another value would not match pre-training")
    data = {k: v for k, v in dict(stored.get("data", {})).items() if k not in ("demo", "index", "root")}
    # Fine-tuning cuts its one view in the loader's workers, whatever pre-training's views.device was.
    views = {k: v for k, v in dict(stored.get("views", {})).items() if k != "device"}
    return [("checkpoint config", {"data": data, "views": views})]


# ----------------------------------------------------------------------------- data
@dataclass
class Splits:
    """The rows of the labelled index by role, and their targets."""

    table: pd.DataFrame
    root: Path | None  # data.root: overrides the index's root column
    index_folder: Path  # where rows without a root column's value start
    labels: Labels
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_carved: bool


def split_rows(table: pd.DataFrame, f: FinetuneConfig, seed: int, source: str) -> tuple[dict[str, np.ndarray], bool]:
    """Train / val / test row numbers from the split column (val carved from train when absent).

    Raises:
        DataError: If the split column is missing or there are no training rows.
    """
    if f.split_column not in table.columns:
        raise DataError(f"{source}: no split column {f.split_column!r} (finetune.split_column); the index has columns "
                        f"{list(table.columns)}")
    split = table[f.split_column].astype(str).str.strip().to_numpy()
    rows = {name: np.flatnonzero(split == value)
            for name, value in (("train", f.train_value), ("val", f.val_value), ("test", f.test_value))}
    if rows["train"].size == 0:
        raise DataError(f"{source}: no row has {f.split_column}={f.train_value!r} (values: "
                        f"{sorted(set(split))[:10]}); set finetune.train_value")
    carved = False
    if rows["val"].size == 0 and f.val_fraction > 0:
        rng = np.random.default_rng(seed)
        train = rng.permutation(rows["train"])
        n_val = int(round(f.val_fraction * len(train)))
        if n_val >= 1 and n_val < len(train):
            rows["val"], rows["train"] = np.sort(train[:n_val]), np.sort(train[n_val:])
            carved = True
    return rows, carved


def read_splits(cfg: FinetuneCommand) -> Splits:
    """The labelled index, its targets and its splits, checked.

    Raises:
        DataError: On a bad index, split column or label (see :mod:`cellvit_ssl.labels`).
    """
    f = cfg.finetune
    source = str(cfg.data.index)
    table = read_index(cfg.data.index)
    # data.root over the rows' root column over the index's folder (the rule of every command)
    root = Path(cfg.data.root).expanduser() if cfg.data.root else None
    rows, carved = split_rows(table, f, cfg.train.seed, source)
    used = np.sort(np.concatenate(list(rows.values())))
    labelled = table.iloc[used]
    multi = f.task == LabelTask.multi_label
    labels = read_labels(labelled, list(f.label_columns), multi, f.label_separator, list(f.classes), source)
    targets = np.zeros((len(table), *labels.targets.shape[1:]), labels.targets.dtype)
    targets[used] = labels.targets
    labels = Labels(labels.classes, labels.multi_label, targets)
    others = {"validation": rows["val"], "test": rows["test"]}
    require_trained_classes(labels, rows["train"], others, table, source)
    return Splits(table, root, Path(cfg.data.index).expanduser().parent, labels, rows["train"], rows["val"],
                  rows["test"], carved)


class LabelledSamples(Dataset):
    """Training samples of some rows: the reader, the preprocessing contract, then one random view.

    Args:
        reader: The rows' reader (:func:`cellvit_ssl.embed.sample_reader`).
        preprocess: The checkpoint's preprocessing contract.
        rows: Row numbers of the index.
        transform: The view (:class:`~cellvit_ssl.transforms.ClassifierView`).
        channel_ids: Vocabulary ids of the reader's channels ``(C,)``.

    Each item holds ``views`` (one view), ``channel_ids``, ``channel_mask`` and ``index`` (the
    position in ``rows``).
    """

    def __init__(self, reader: SampleReader, preprocess: Preprocess, rows: np.ndarray, transform,
                 channel_ids: torch.Tensor) -> None:
        self.reader, self.preprocess, self.rows = reader, preprocess, np.asarray(rows)
        self.transform, self.channel_ids = transform, channel_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**31, ()).item()))  # a tiles row's tile: seeded per item
        raw = self.reader.read(int(self.rows[k]), rng)
        x = self.preprocess.to_sample(raw.pixels, raw.names, raw.present, image_sample=raw.is_image,
                                      source=f"{raw.source} ({self.reader.source} row {raw.row})")
        return {"views": self.transform(x), "channel_ids": self.channel_ids.clone(),
                "channel_mask": torch.from_numpy(raw.present.copy()), "index": k}


# ----------------------------------------------------------------------------- the trainer
class FinetuneTrainer:
    """One fine-tuning run on this process (one rank of many under torchrun).

    Args:
        cfg: The loaded command config (:func:`load`).
        info: From :func:`cellvit_ssl.distributed.init_distributed`.
        payload: The pre-trained checkpoint's content (read from ``finetune.checkpoint`` when None).
    """

    def __init__(self, cfg: FinetuneCommand, info: D.DistInfo, payload: dict | None = None) -> None:
        from cellvit_ssl.embed_io import file_sha256

        self.cfg, self.info = cfg, info
        f, t = cfg.finetune, cfg.train
        self.out = Path(t.output_dir).expanduser()
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        base_path = Path(f.checkpoint).expanduser()
        payload = payload if payload is not None else load_checkpoint(base_path)
        if payload.get("format") not in (ENCODER_FORMAT, TRAINING_FORMAT):
            raise CheckpointError(f"finetune.checkpoint={str(base_path)!r} is not a pre-trained checkpoint")
        self.splits = read_splits(cfg)
        seed_everything(t.seed)
        backbone, config, vocabulary, preprocess = pretrained_backbone(payload, base_path)
        self.mode = FinetuneMode(f.mode)
        self.lora = LoRA(backbone, LoRASpec(f.lora.rank, f.lora.alpha, f.lora.dropout, f.lora.target)) \
            if self.mode == FinetuneMode.lora else None
        if self.mode == FinetuneMode.linear:
            backbone.requires_grad_(False)
        labels = self.splits.labels
        self.net = ClassifierNet(backbone, len(labels.classes))
        self.classifier = Classifier(self.net, config, info.device, classes=labels.classes,
                                     multi_label=labels.multi_label, mode=self.mode.value, lora=self.lora,
                                     source=str(self.out / CLASSIFIER_FILE), preprocess=preprocess,
                                     vocabulary=vocabulary,
                                     base={"path": str(base_path.resolve()), "sha256": file_sha256(base_path)})
        self.reader = sample_reader(self.splits.table, self.splits.root, cfg.data, self.classifier,
                                    allow_missing=cfg.data.missing_channels == MissingChannels.pad,
                                    mask_background=False, source=str(cfg.data.index),
                                    default_root=self.splits.index_folder)
        self.reader.check_files()  # a wrong root fails here, before the run folder is made
        ids = self.classifier.resolve_channels(self.classifier.channels)
        view = ClassifierView(cfg.views, self.classifier.channels, f.augment, preprocess.model_input)
        samples = LabelledSamples(self.reader, preprocess, self.splits.train, view, ids)
        # Nothing is written before the data and a resumed checkpoint's settings are checked (fit writes):
        # a failed or refused command leaves the run folder as it was.
        self.resume_from = find_resume_checkpoint(t.resume, self.out)
        self._resume_payload: dict | None = None
        #: Changes to the resumed checkpoint's settings that train.allow_config_change allowed.
        self.config_changes: dict[str, tuple] = {}
        if self.resume_from is not None:
            self._resume_payload = self._checked_resume_payload(self.resume_from)
            self.config_changes = check_resume_config(self._resume_payload.get("config"), cfg, self.resume_from,
                                                      schema=FinetuneCommand,
                                                      path_keys=("data.index", "finetune.checkpoint"))
        self.loader = build_loader(cfg, info, SeededViews(samples, t.seed))
        self.sampler: D.ShardedSampler = self.loader.sampler
        seed_everything(t.seed + info.rank)  # per-rank stream for dropout
        self.bf16 = use_bf16(t.precision, info.device)
        self.model = D.wrap_model(self.net, info, "ddp")
        # Pre-trained weights (full) learn slower than the new head; LoRA's adapters are new weights and
        # learn at the head's rate (both with layer-wise decay), their B matrices lr_ratio times faster than A
        # (LoRA+: B starts at zero and one shared rate leaves it learning too slowly).
        scale = f.backbone_lr_scale if self.mode == FinetuneMode.full else 1.0
        layers = self.net.backbone.transformer_layers()
        named = list(self.net.backbone.named_parameters(prefix="backbone"))
        lora_b = [(n, p) for n, p in named if ".lora_B." in n] if f.lora.lr_ratio != 1 else []
        rest = [(n, p) for n, p in named if ".lora_B." not in n] if lora_b else named
        backbone_groups = layer_decay_groups(rest, layers, t.weight_decay, t.layer_decay, lr_scale=scale)
        if lora_b:
            backbone_groups += layer_decay_groups(lora_b, layers, t.weight_decay, t.layer_decay,
                                                  lr_scale=scale * f.lora.lr_ratio)
        head_groups = layer_decay_groups(self.net.head.named_parameters(prefix="head"), [], t.weight_decay)
        self.optimizer = torch.optim.AdamW(backbone_groups + head_groups)
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]
        targets = torch.as_tensor(labels.targets[self.splits.train])
        self.train_targets = targets.float() if labels.multi_label else targets.long()
        weights = None
        if f.class_weights == ClassWeighting.balanced:
            weights = torch.as_tensor(class_weights(labels, self.splits.train), device=info.device)
        self.loss_fn = (torch.nn.BCEWithLogitsLoss(pos_weight=weights) if labels.multi_label
                        else torch.nn.CrossEntropyLoss(weight=weights))
        self.batch = cfg.data.batch_size
        self.global_batch = self.batch * info.world_size
        self.steps_per_epoch = self.sampler.num_samples // self.batch
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.schedules = Schedules(total_steps=self.total_steps,
                                   warmup_steps=min(t.warmup_epochs * self.steps_per_epoch, self.total_steps),
                                   peak_lr=t.base_lr * self.global_batch / t.lr_reference_batch, min_lr=t.min_lr,
                                   weight_decay=t.weight_decay, weight_decay_end=t.weight_decay,
                                   momentum_start=1.0, momentum_end=1.0)
        self.step = 0
        self.saved_step = -1
        self.last_checkpoint: Path | None = None
        #: Early stopping: best validation score, its epoch, epochs since, whether training stopped, best weights.
        self.best = {"score": -1.0, "epoch": -1, "bad_epochs": 0, "stopped": False, "state": None}

    # -- state ---------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.net.named_parameters() if p.requires_grad}

    def _set_train_mode(self) -> None:
        self.net.train()
        if self.mode == FinetuneMode.linear:
            self.net.backbone.eval()  # a linear probe reads the frozen features as inference does

    def save(self) -> Path:
        """Checkpoint the current step (all ranks call; rank 0 writes)."""
        model_state, optim_state = D.full_state_dict(self.model, self.optimizer)
        rngs = D.gather_objects(rng_state())
        payload = {"format": FINETUNE_FORMAT, "config": config_to_dict(self.cfg), "classes": self.classifier.classes,
                   "model": model_state, "optimizer": optim_state, "step": self.step,
                   "epoch": self.step // self.steps_per_epoch, "world_size": self.info.world_size,
                   "global_batch": self.global_batch, "rng": rngs, "early_stopping": self.best}
        path = self.out / f"checkpoint_{self.step:08d}.pt"
        if self.info.is_main:
            path = save_training_checkpoint(payload, self.out, self.step, self.cfg.train.keep_last)
        D.barrier()
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    def _checked_resume_payload(self, path: Path) -> dict:
        """A fine-tuning checkpoint to resume from, read and checked to belong to this run's classes.

        Raises:
            CheckpointError: If the file is unreadable or was fine-tuned on other classes.
        """
        payload = load_checkpoint(path, expect=(FINETUNE_FORMAT,))
        if payload.get("classes") != self.classifier.classes:
            raise CheckpointError(f"checkpoint {str(path)!r} was fine-tuned on classes {payload.get('classes')}, this "
                                  f"run has {self.classifier.classes}; use another train.output_dir or "
                                  "train.resume=none")
        return payload

    def resume(self, path: Path, payload: dict | None = None) -> None:
        """Restore model, optimizer, step, random state and early-stopping state.

        Args:
            path: The fine-tuning checkpoint.
            payload: Its content when already read (and checked) by the caller.

        Raises:
            CheckpointError: If the file is unreadable or belongs to another set-up.
        """
        payload = payload if payload is not None else self._checked_resume_payload(path)
        try:
            D.load_full_state_dict(self.model, self.optimizer, payload["model"], payload["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run (another finetune.mode, LoRA "
                                  f"setting or checkpoint?): {str(exc).splitlines()[0]}") from exc
        self.step = int(payload["step"])
        self.best = dict(payload["early_stopping"])
        rngs = payload["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        elif self.info.is_main:
            print(f"cellvit_ssl: the checkpoint was written by {len(rngs)} processes, this run has "
                  f"{self.info.world_size}; it continues, but not bit-exactly", file=sys.stderr)
        self.last_checkpoint, self.saved_step = path, self.step

    # -- evaluation ------------------------------------------------------------------------------
    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        """Image embeddings ``(len(rows), D)`` of some rows as inference computes them (each rank reads a share)."""
        mine = rows[self.info.rank::self.info.world_size]
        was_training = self.net.training
        self.net.eval()
        try:
            featurize = encoder_featurizer(self.classifier, None, self.cfg.data.batch_size, self.reader.source)
            if len(mine):
                z = featurize_rows(self.reader, [int(r) for r in mine], featurize, self.cfg.data.num_workers)[0]
            else:
                z = np.zeros((0, int(self.net.backbone.output_dim)), np.float32)
        finally:
            self.net.train(was_training)
        parts = D.gather_objects(z)
        out = np.zeros((len(rows), parts[0].shape[1]), np.float32)
        for rank, part in enumerate(parts):
            out[rank::self.info.world_size] = part
        return out

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities of some rows as inference computes them (each rank reads a share)."""
        return self.classifier.probabilities(self.embeddings(rows))

    def score(self, rows: np.ndarray, thresholds: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        probs = self.probabilities(rows)
        return scores(self.splits.labels, rows, probs, thresholds), probs

    @property
    def metric(self) -> str:
        """The validation score early stopping follows: mAP (multi-label) or macro-F1."""
        return "mAP" if self.splits.labels.multi_label else "macro_f1"

    def _validate(self, epoch: int, log: MetricsLog) -> None:
        if len(self.splits.val) == 0:
            return
        result, _ = self.score(self.splits.val)
        value = result[self.metric]
        if value > self.best["score"]:
            self.best.update(score=value, epoch=epoch, bad_epochs=0, state=self._trainable_state())
        else:
            self.best["bad_epochs"] += 1
        patience = self.cfg.finetune.patience
        self.best["stopped"] = bool(patience and self.best["bad_epochs"] >= patience)
        log.write({"step": self.step, "epoch": epoch, f"val_{self.metric}": value, "val_macro_f1": result["macro_f1"],
                   "val_accuracy": result["accuracy"], "best_epoch": self.best["epoch"]})
        if self.info.is_main:
            tqdm.write(f"epoch {epoch + 1}: validation {self.metric} {value:.4f} (best {self.best['score']:.4f} "
                       f"at epoch {self.best['epoch'] + 1})")

    # -- the loop --------------------------------------------------------------------------------
    def _train_step(self, batches, stop: StopRequest) -> dict:
        t, device = self.cfg.train, self.info.device
        lr, wd = self.schedules.lr(self.step), self.schedules.wd(self.step)
        apply_schedules(self.optimizer, lr, wd)
        self.optimizer.zero_grad(set_to_none=True)
        batch = next(batches)
        x = batch["views"][0].to(device, non_blocking=True)
        ids, mask = batch["channel_ids"].to(device), batch["channel_mask"].to(device)
        targets = self.train_targets[batch["index"]].to(device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            logits = self.model(x, ids, mask)
        loss = self.loss_fn(logits.float(), targets)
        loss.backward()
        stop_flag = torch.tensor(float(stop.signal is not None), device=device)
        reduced = D.all_reduce_mean(torch.stack([loss.detach(), stop_flag])).tolist()
        record = {"loss": reduced[0], "stop": reduced[1] > 0}
        if not np.isfinite(record["loss"]):
            return record
        if t.clip_grad and self.trainable:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.clip_grad)
            record["grad_norm"] = float(D.grad_norm_value(norm))
        self.optimizer.step()
        record.update(lr=lr, wd=wd)
        return record

    def fit(self) -> Path:
        """Fine-tune to the end (or early stop, or a stop signal); returns ``classifier.pt`` (or the checkpoint)."""
        t, info = self.cfg.train, self.info
        source = self.resume_from
        if source is not None:
            self.resume(source, self._resume_payload)
            self._resume_payload = None
            finished = self.step >= self.total_steps or self.best["stopped"]
            if finished and (self.out / CLASSIFIER_FILE).is_file():
                if info.is_main:
                    print(f"cellvit_ssl: {self.out} holds a finished run ({self.out / CLASSIFIER_FILE}); nothing to "
                          "do (train.resume=none starts over)", flush=True)
                return self.out / CLASSIFIER_FILE
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            save_config(self.cfg, self.out / "config.yaml")
        D.barrier()
        if source is None and self.cfg.finetune.standardize:
            # the training rows as inference reads them, through the pre-trained backbone (LoRA's B starts at 0)
            self.net.head.fit_standardization(self.embeddings(self.splits.train))
        if info.is_main:
            resumed = f", resumed at step {self.step} from {source}" if source is not None else ""
            if self.config_changes:
                resumed += " with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in
                                                self.config_changes.items())
            counts = self.classifier.count_parameters()
            print(f"cellvit_ssl finetune: {self.mode.value}, {len(self.splits.train)} training / "
                  f"{len(self.splits.val)} validation{' (held out of train)' if self.splits.val_carved else ''} / "
                  f"{len(self.splits.test)} test rows, {len(self.classifier.classes)} classes "
                  f"({'multi' if self.splits.labels.multi_label else 'single'}-label), {counts['trainable']:,} of "
                  f"{counts['total']:,} parameters trained, {self.total_steps} steps, {info.world_size} process(es) "
                  f"on {info.device.type}{resumed}", flush=True)
        log = MetricsLog(self.out, info.is_main, t.tensorboard, self.step if source is not None else None)
        stop = StopRequest().install()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (info.is_main and t.progress),
                   desc="finetune", dynamic_ncols=True)
        try:
            if not self._loop(log, stop, bar):
                return self.last_checkpoint
            return self.finish(log)
        finally:
            bar.close()
            stop.restore()
            log.close()

    def _loop(self, log: MetricsLog, stop: StopRequest, bar: tqdm) -> bool:
        """Train until the end or early stop (True) or until a stop signal (False, checkpointed)."""
        t = self.cfg.train
        self._set_train_mode()
        tick, tick_step = time.perf_counter(), self.step
        while self.step < self.total_steps and not self.best["stopped"]:
            epoch, within = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_position(epoch, within * self.batch)
            batches = iter(self.loader)
            for _ in range(within, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                record = self._train_step(batches, stop)
                if not np.isfinite(record["loss"]):
                    kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint \
                        else "no checkpoint was written yet"
                    raise FloatingPointError(f"loss is {record['loss']} at step {self.step + 1}; stopping. {kept}. "
                                             "Lower train.base_lr or check the labels.")
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if (t.log_every and self.step % t.log_every == 0) or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = (self.step - tick_step) * self.global_batch / max(now - tick, 1e-9)
                    log.write({"step": self.step, "epoch": epoch, "samples_per_s": rate,
                               **{k: v for k, v in record.items() if k != "stop"}})
                    tick, tick_step = now, self.step
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch or self.step == self.total_steps:
                    self._validate(epoch, log)
                due = self.step % t.checkpoint_every == 0 if t.checkpoint_every else end_of_epoch
                if record["stop"]:
                    path = self.save()
                    if self.info.is_main:
                        print(f"cellvit_ssl: stop requested (SIGTERM/SIGUSR1): checkpoint at step {self.step} "
                              f"written to {path}; run the same command again to resume", flush=True)
                    return False
                if due:
                    self.save()
                if self.best["stopped"]:
                    if self.info.is_main:
                        tqdm.write(f"early stop after epoch {epoch + 1}: no better validation {self.metric} for "
                                   f"{self.cfg.finetune.patience} epochs")
                    break
        if self.saved_step != self.step:
            self.save()
        return True

    def finish(self, log: MetricsLog) -> Path:
        """Keep the best epoch, choose thresholds, score the test rows, write ``classifier.pt`` and the scores."""
        labels = self.splits.labels
        if self.best["state"] is not None:
            current = dict(self.net.named_parameters())
            with torch.no_grad():
                for name, value in self.best["state"].items():
                    current[name].copy_(value.to(current[name].device))
        evaluation: dict = {"metric": self.metric, "best_epoch": self.best["epoch"],
                            "stopped_early": bool(self.best["stopped"]), "steps": self.step}
        thresholds = None
        if len(self.splits.val):
            probs = self.probabilities(self.splits.val)
            if labels.multi_label:
                thresholds = select_thresholds(probs, labels.indicators(self.splits.val))
            evaluation["validation"] = scores(labels, self.splits.val, probs, thresholds)
        self.classifier.thresholds = thresholds
        if len(self.splits.test):
            evaluation["test"] = self.score(self.splits.test, thresholds)[0]
        counts = self.classifier.count_parameters()
        evaluation.update(mode=self.mode.value, classes=labels.classes, multi_label=labels.multi_label,
                          parameters=counts, rows={"train": int(len(self.splits.train)),
                                                   "validation": int(len(self.splits.val)),
                                                   "test": int(len(self.splits.test))})
        self.classifier.metrics = evaluation
        path = self.out / CLASSIFIER_FILE
        if self.info.is_main:
            extra = {"finetune": config_to_dict(self.cfg)}
            self.classifier.save(path, standalone=True if self.cfg.finetune.standalone else None, extra=extra)
            evaluation["classifier_bytes"] = path.stat().st_size
            atomic_write_text(self.out / "evaluation.json", json.dumps(evaluation, indent=2))
            if "test" in evaluation:
                log.write({"step": self.step, "epoch": self.step // self.steps_per_epoch,
                           **{f"test_{k}": v for k, v in evaluation["test"].items() if isinstance(v, float)}})
            print(summary_line(evaluation), flush=True)
            print(f"done: classifier {path}, scores {self.out / 'evaluation.json'}", flush=True)
        D.barrier()
        return path


def summary_line(evaluation: dict) -> str:
    """One line of the held-out scores of an ``evaluation.json``."""
    part = evaluation.get("test") or evaluation.get("validation") or {}
    which = "test" if "test" in evaluation else "validation"
    keys = ("macro_f1", "mAP", "accuracy") if evaluation.get("multi_label") else ("macro_f1", "accuracy")
    shown = ", ".join(f"{k} {part[k]:.3f}" for k in keys if k in part)
    return f"{evaluation.get('mode')} classifier, {which} rows (n={part.get('n', 0)}): {shown or 'not scored'}"


def run(cfg: FinetuneCommand, payload: dict | None = None) -> Path:
    """Fine-tune with a loaded config on this process; returns ``classifier.pt``.

    Under ``torchrun`` every process calls this. When a stop signal arrives, the returned
    path is the checkpoint written.

    Raises:
        DataError / ConfigError / CheckpointError: On bad input, named.
        FloatingPointError: On a NaN / Inf loss.
    """
    validate(cfg)
    info = D.init_distributed(cfg.train.device, cfg.train.dist_backend)
    try:
        return FinetuneTrainer(cfg, info, payload).fit()
    finally:
        D.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 ok, 2 user error, 3 diverged)."""
    try:
        cfg, payload = load(list(sys.argv[1:] if argv is None else argv))
        run(cfg, payload)
    except CellVitSSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
