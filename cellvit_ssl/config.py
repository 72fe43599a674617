"""Typed configuration: defaults in code, short YAML files, ``key=value`` overrides.

The dataclasses below are the single source of defaults and of the allowed values: every
choice is an :class:`~enum.Enum` (a ``str`` subclass, so ``cfg.data.mode == "cells"`` reads
naturally), checked once when the config is loaded. A YAML file only states what differs, and
command-line overrides (OmegaConf dotlist, e.g. ``train.epochs=5``) come last. Unknown or
mistyped keys raise :class:`~cellvit_ssl.errors.ConfigError` naming the key and the nearest
valid one. Loaded configs are frozen dataclass instances, so modules receive typed objects.

The trailing comment of each field is its documentation: ``--help`` of every command prints it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import io
import tokenize
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cellvit_ssl.errors import ConfigError


class Choice(str, enum.Enum):
    """Base of the config's enumerations: members compare equal to their value strings."""

    def __str__(self) -> str:
        return self.value


class DemoFormat(Choice):
    """File format of the generated demo data."""

    ome_zarr = "ome-zarr"
    ome_tiff = "ome-tiff"


class SampleMode(Choice):
    """How a sample is cut from an index row (see :mod:`cellvit_ssl.data.samples`)."""

    auto = "auto"
    cells = "cells"
    tiles = "tiles"
    image = "image"


class Normalization(Choice):
    """Intensity normalisation (see :mod:`cellvit_ssl.preprocess`)."""

    percentile = "percentile"
    dataset = "dataset"
    none = "none"


class MissingChannels(Choice):
    """What to do when a file lacks one of the wanted channels."""

    error = "error"
    pad = "pad"


class MissingChunks(Choice):
    """What to do with a chunk absent from a Zarr store."""

    error = "error"
    fill = "fill"


class ZProjection(Choice):
    """How a Z stack becomes one plane."""

    max = "max"
    slice = "slice"


class Noise(Choice):
    """Noise added to views."""

    none = "none"
    gaussian = "gaussian"
    poisson = "poisson"


class CropAnchor(Choice):
    """Where a view's random crop may lie in its sample."""

    anywhere = "anywhere"
    centre = "centre"


class ChannelMode(Choice):
    """How views treat channels: shared crops or one sample per channel."""

    joint = "joint"
    boc = "boc"


class ViewsDevice(Choice):
    """Where the training views are made."""

    auto = "auto"
    workers = "workers"
    device = "device"


class Variant(Choice):
    """Channel-adaptive model variant (see :mod:`cellvit_ssl.models`)."""

    fixed = "fixed"
    boc = "boc"
    hierarchical = "hierarchical"
    channelvit = "channelvit"


class FfnLayer(Choice):
    """Transformer MLP kind."""

    mlp = "mlp"
    swiglu = "swiglu"


class AttnBackend(Choice):
    """Attention kernel."""

    sdpa = "sdpa"
    xformers = "xformers"


class Centering(Choice):
    """Teacher centring."""

    sinkhorn_knopp = "sinkhorn_knopp"
    mean = "mean"


class ChannelSampling(Choice):
    """Training-time channel subsets."""

    none = "none"
    hierarchical = "hierarchical"


class Precision(Choice):
    """Numeric precision of training."""

    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Strategy(Choice):
    """Multi-GPU data-parallel strategy."""

    ddp = "ddp"
    fsdp = "fsdp"


class DistBackend(Choice):
    """torch.distributed backend."""

    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


@dataclass(frozen=True)
class DemoConfig:
    """Synthetic HPA-like demo data, generated on first use into ``cache_dir``."""

    enabled: bool = False  # train on the built-in synthetic demo data instead of data.index
    cache_dir: str = "~/.cache/cellvit_ssl/demo"  # where the demo data is generated (reused afterwards)
    n_images: int = 8  # demo fields of view
    image_size: int = 192  # side of a demo field in px
    cells_per_image: int = 12  # cells per demo field
    seed: int = 0  # seed of the demo generator
    format: DemoFormat = DemoFormat.ome_zarr  # ome_zarr | ome_tiff


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are cut and normalised."""

    index: str | None = None  # CSV / parquet index: one row per image or per cell crop
    root: str | None = None  # base folder for relative paths in the index
    channels: list[str] = field(default_factory=lambda: ["nucleus", "microtubules", "er", "protein"])  # model channels
    channel_map: dict[str, str] = field(default_factory=dict)  # your channel names -> vocabulary names
    extra_channels: list[str] = field(default_factory=list)  # new stains the built-in vocabulary lacks (ids follow)
    sample_size: int = 64  # side of the square cut around a cell / from an image, in px
    normalize_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.8])  # [low, high] mapped to 0, 1
    mode: SampleMode = SampleMode.auto  # auto | cells (centroid crops) | tiles (random tiles) | image (whole, fit)
    normalize: Normalization = Normalization.percentile  # percentile (per sample) | dataset (stats) | none
    stats_cache: str | None = None  # JSON for dataset stats; default ~/.cache/cellvit_ssl/stats/<hash>.json
    stats_samples: int = 256  # rows sampled to compute dataset stats
    foreground_threshold: float = 0.1  # tiles: a pixel is foreground above this (image-scaled to [0, 1])
    min_foreground: float = 0.0  # tiles: redraw tiles with a smaller foreground fraction (0 = off)
    tile_attempts: int = 10  # tiles: draws per sample before keeping the best
    missing_channels: MissingChannels = MissingChannels.error  # error | pad (zeros + channel_mask False)
    skip_bad: bool = False  # log and skip unreadable / corrupt samples, counted per epoch
    missing_chunks: MissingChunks = MissingChunks.error  # error | fill: a chunk absent from a Zarr store
    level: int = 0  # pyramid level (OME-Zarr, pyramidal TIFF)
    z_projection: ZProjection = ZProjection.max  # max | slice (then z_slice)
    z_slice: int = 0  # Z plane read when z_projection=slice
    t_frame: int = 0  # time frame read
    metadata_columns: list[str] = field(default_factory=list)  # index columns returned with each sample
    batch_size: int = 32  # per process
    num_workers: int = 2  # data-loading processes per GPU process (0: load in the main process)
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass(frozen=True)
class ViewsConfig:
    """Multi-crop DINO views (lightly DINOTransform's structure, channel-agnostic ops)."""

    global_crop_size: int = 224  # side of the 2 global views in px (the model input size at inference)
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # area fraction of the sample
    n_local_views: int = 6  # local views per sample
    local_crop_size: int = 96  # side of the local views in px
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # area fraction of the sample
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # width / height range of a crop
    crop_anchor: CropAnchor = CropAnchor.anywhere  # centre: every crop holds the sample's centre (its cell)
    hflip_prob: float = 0.5  # probability of a horizontal flip per view
    vflip_prob: float = 0.5  # probability of a vertical flip per view
    rot90: bool = True  # random multiples of 90° rotation per view
    gamma: float = 0.2  # per-channel gamma exponent in [1/(1+g), 1+g] (log-uniform)
    brightness: float = 0.05  # per-channel additive shift (in std units when standardize); intensity is signal
    contrast: float = 0.3  # per-channel multiplicative jitter
    jitter_prob: float = 0.8  # probability of gamma and of contrast/brightness per view
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # px of the view
    noise: Noise = Noise.gaussian  # none | gaussian | poisson
    noise_prob: float = 0.5  # probability of noise per view
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.05])  # gaussian, image units
    noise_photons: list[float] = field(default_factory=lambda: [50.0, 1000.0])  # poisson counts at 1.0
    standardize: bool = False  # per-view, per-channel zero mean / unit variance (embed must match)
    channel_drop_prob: float = 0.0  # per channel, joint mode only; never all channels
    protected_channels: list[str] = field(default_factory=list)  # never dropped, e.g. [protein]
    channel_mode: ChannelMode = ChannelMode.joint  # joint: channels share a crop | boc: each its own sample
    device: ViewsDevice = ViewsDevice.auto  # auto: device on CUDA | workers: per sample on CPU | device: batched


@dataclass(frozen=True)
class ModelConfig:
    """Channel-adaptive ViT: variant and backbone size."""

    variant: Variant = Variant.boc  # fixed | boc | hierarchical | channelvit
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2, or custom
    patch_size: int = 16  # side of a patch token in px
    img_size: int = 224  # native size of the position embedding
    embed_dim: int = 384  # used when arch == "custom"
    depth: int = 12  # transformer blocks, when arch == custom
    num_heads: int = 6  # attention heads, when arch == custom
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear in depth)
    layerscale_init: float | None = 1.0e-5  # LayerScale start value (null: no LayerScale)
    num_register_tokens: int = 0  # register tokens (DINOv2 with registers: 4)
    qkv_bias: bool = True  # bias on the attention's qkv projection
    ffn_layer: FfnLayer = FfnLayer.mlp  # mlp | swiglu (DINOv2's fused SwiGLU, e.g. for vit_giant2)
    pool_patch_tokens: bool = False  # embed(): append the mean patch token to each CLS token
    attn_backend: AttnBackend = AttnBackend.sdpa  # sdpa | xformers (used only when installed and on CUDA)
    interpolate_offset: float = 0.0  # 0: exact grid; 0.1: DINOv2's resize (models without registers)
    interpolate_antialias: bool = False  # antialias the pos-embed resize (DINOv2 register models, timm)
    pretrained: str | None = None  # local DINOv2-layout .pth loaded into the backbone at build time
    pretrained_strict: bool = True  # missing / unexpected checkpoint keys are an error (else a warning)


@dataclass(frozen=True)
class GramConfig:
    """DINOv3's Gram anchoring: keep the student's patch-similarity structure near an earlier teacher's."""

    enabled: bool = False  # add the Gram loss (off by default)
    weight: float = 1.0  # weight of the Gram term in the loss
    start_step: int = 0  # first optimiser step with the Gram term; the Gram teacher is taken from the EMA teacher then
    refresh_every: int = 10000  # steps between Gram-teacher refreshes from the EMA teacher (0: never after the first)


@dataclass(frozen=True)
class SSLConfig:
    """Student/teacher objective: DINO + iBOT + KoLeo on lightly heads and losses."""

    dino: bool = True  # DINO loss on CLS tokens
    ibot: bool = True  # iBOT masked-patch loss
    koleo: bool = True  # KoLeo regulariser on the student's global CLS tokens
    cell_target: bool = False  # boc: DINO and KoLeo on each cell's mean channel CLS token, not on every channel's
    dino_loss_weight: float = 1.0  # weight of the DINO term
    ibot_loss_weight: float = 1.0  # weight of the iBOT term
    koleo_loss_weight: float = 0.1  # weight of the KoLeo term
    head_hidden_dim: int = 2048  # projection head hidden width
    head_bottleneck_dim: int = 256  # projection head bottleneck width
    head_output_dim: int = 65536  # prototypes of the DINO head
    ibot_head_output_dim: int | None = None  # None: same as head_output_dim
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.02  # teacher temperature after the warm-up (sharp Sinkhorn-Knopp targets)
    warmup_teacher_temp: float = 0.02  # teacher temperature at the start (mean centring: DINO used 0.04 -> 0.07)
    warmup_teacher_temp_epochs: int = 30  # epochs of the linear teacher-temperature warm-up
    centering: Centering = Centering.sinkhorn_knopp  # sinkhorn_knopp | mean
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp normalisations per batch
    center_momentum: float = 0.9  # mean centering only
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # iBOT per-sample range
    mask_sample_probability: float = 0.5  # fraction of global-view samples that get a mask
    freeze_last_layer_epochs: int = 1  # epochs the heads' last layer is frozen
    channel_sampling: ChannelSampling = ChannelSampling.none  # none | hierarchical (k ~ U{1..C}, then a k-subset)
    momentum_start: float = 0.996  # teacher EMA momentum at the start (cosine to momentum_end)
    momentum_end: float = 1.0  # teacher EMA momentum at the end
    gram: GramConfig = field(default_factory=GramConfig)


@dataclass(frozen=True)
class PhaseConfig:
    """A later phase of a run (e.g. DINOv2's high-resolution adaptation): its own views and schedules.

    From ``start`` (a fraction of the run's optimiser steps) to the next phase's start or the
    end of the run, views are cut at ``crop_scale`` times the crop sizes from samples
    ``sample_scale`` times ``data.sample_size``, with a per-process batch of ``batch_size``, and
    the learning rate and teacher momentum follow this phase's own warm-up + cosine segment.
    """

    start: float = 0.9  # fraction of the run's steps done when this phase begins (0 < start < 1)
    crop_scale: float = 2.0  # global and local crop sizes times this (must stay multiples of model.patch_size)
    sample_scale: float | None = None  # data.sample_size times this (null: crop_scale); see the README on modes
    batch_size: int = 0  # per-process batch in this phase (0: data.batch_size / crop_scale**2, at least 1)
    base_lr: float | None = None  # peak lr per lr_reference_batch images in this phase (null: train.base_lr)
    min_lr: float | None = None  # lr at the end of this phase (null: train.min_lr)
    warmup_fraction: float = 0.1  # fraction of this phase's steps with a linear lr warm-up from 0
    momentum_start: float | None = None  # teacher EMA momentum at the phase start (null: ssl.momentum_start)
    momentum_end: float | None = None  # teacher EMA momentum at the phase end (null: ssl.momentum_end)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation loop, distribution, checkpoints and logging."""

    output_dir: str = "runs/default"  # folder of checkpoints, teacher.pt, config.yaml and metrics
    epochs: int = 100  # passes over the index
    base_lr: float = 5.0e-4  # per `lr_reference_batch` images of global batch
    lr_reference_batch: int = 256  # lr = base_lr * global batch / this
    min_lr: float = 1.0e-6  # learning rate at the end of the cosine schedule
    warmup_epochs: int = 10  # epochs of linear learning-rate warm-up
    weight_decay: float = 0.04  # AdamW weight decay at the start
    weight_decay_end: float = 0.4  # cosine schedule from weight_decay to this
    layer_decay: float = 1.0  # layer-wise lr decay (1 = off; 0.65-0.9 for fine-tuning)
    clip_grad: float = 3.0  # max total grad norm (0 = off)
    accumulate_steps: int = 1  # micro-batches per optimiser step
    seed: int = 0  # seed of data order, crops and initialisation
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    strategy: Strategy = Strategy.ddp  # ddp | fsdp (FSDP2, fully_shard per transformer block)
    dist_backend: DistBackend = DistBackend.auto  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute student blocks in backward
    deterministic: bool = False  # deterministic kernels (slower; for exact reproducibility)
    log_every: int = 10  # steps between JSONL / TensorBoard records
    tensorboard: bool = True  # TensorBoard scalars in output_dir/tb (needs tensorboard installed)
    progress: bool = True  # progress bar on rank 0
    checkpoint_every: int = 0  # steps; 0 = only at each epoch end
    keep_last: int = 3  # step checkpoints kept (checkpoint.pt always points at the newest)
    resume: str = "auto"  # auto (latest in output_dir) | none | path to a checkpoint
    max_steps: int = 0  # stop early after this many steps (0 = run all epochs)
    phases: list[PhaseConfig] = field(default_factory=list)  # later phases: [{start: 0.9, crop_scale: 2}, ...]
    allow_config_change: list[str] = field(default_factory=list)  # keys a resumed run may change, e.g. [train.epochs]


@dataclass(frozen=True)
class DistillConfig:
    """Distillation: train the model against a frozen, larger teacher instead of its own EMA."""

    teacher: str | None = None  # teacher.pt / checkpoint.pt of cellvit_ssl or a DINOv2-layout .pth (null: off)
    masking: bool = False  # iBOT-mask the student's global views (iBOT on masked tokens only: less memory)
    init_student_heads: bool = True  # student heads start as the teacher's but for the first layer (false: new)


@dataclass(frozen=True)
class Config:
    """The whole run. See the dataclasses above for every field and its default."""

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ----------------------------------------------------------------------------- field documentation
def field_docs(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of a config dataclass (its documentation)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app, REPL): documentation is optional
        return {}
    docs: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    line_field: dict[int, str] = {}
    for number, line in enumerate(source.splitlines(), 1):
        head = line.strip().split(":", 1)[0]
        if head in names and line.startswith("    ") and not line.startswith("     "):
            line_field[number] = head
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            docs[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return docs


def describe(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, documentation)`` of every leaf key of a config dataclass, in order."""
    rows = []
    docs = field_docs(schema)
    hints = typing.get_type_hints(schema)
    default = schema()
    for f in dataclasses.fields(schema):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
            continue
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if item is not None and dataclasses.is_dataclass(item):  # a list of sections: the list, then its fields
            rows.append((f"{prefix}{f.name}", _yaml_value(value), docs.get(f.name, "")))
            rows += describe(item, f"{prefix}{f.name}[].")
            continue
        shown = value.value if isinstance(value, enum.Enum) else value
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], enum.Enum):
            names = [m.name for m in hints[f.name]]
            doc = docs.get(f.name, "")
            if not any(n in doc for n in names):
                docs[f.name] = f"{' | '.join(names)}; {doc}".rstrip("; ")
        rows.append((f"{prefix}{f.name}", _yaml_value(shown if not isinstance(value, enum.Enum) else value.name),
                     docs.get(f.name, "")))
    return rows


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------- loading
def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node[k], full + "."))
    return keys


def nearest_key(key: str, schema: type) -> str | None:
    """The valid key of ``schema`` closest to a mistyped ``key`` (None when nothing is close)."""
    known = _all_keys(OmegaConf.structured(schema))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:  # compare the last component too: "train.epoch" -> "train.epochs"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[c] for c in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
    return close[0] if close else None


def _wrap(exc: OmegaConfBaseException, source: str, schema: type) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError):
        near = nearest_key(key, schema)
        return ConfigError(f"{source}: unknown config key {key!r}" + (f"; did you mean {near!r}?" if near else ""))
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: invalid value for config key {key!r}: {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]} (key {key!r})")


def _enum_paths(schema: type, prefix: tuple = ()) -> dict[tuple, type[enum.Enum]]:
    paths: dict[tuple, type[enum.Enum]] = {}
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            paths.update(_enum_paths(hint, prefix + (name,)))
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            paths[prefix + (name,)] = hint
    return paths


def _enum_values_to_names(node: Any, schema: type) -> Any:
    """Accept an enum's value where its name is expected (``ome-zarr`` for ``ome_zarr``).

    OmegaConf matches enum fields by member name; configs written before the enums existed
    (and YAML written by hand) may use the value spelling.
    """
    if not isinstance(node, DictConfig):
        return node
    for path, kind in _enum_paths(schema).items():
        parent = node
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, DictConfig) else None
        if not isinstance(parent, DictConfig) or path[-1] not in parent:
            continue
        value = parent[path[-1]]
        if isinstance(value, str) and value not in kind.__members__:
            by_value = {m.value: m.name for m in kind}
            if value in by_value:
                parent[path[-1]] = by_value[value]
    return node


def _writable(node: DictConfig | ListConfig) -> DictConfig | ListConfig:
    OmegaConf.set_readonly(node, None)
    if isinstance(node, DictConfig):
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                _writable(child)
    return node


def merge_config(schema: type, sources: Sequence[tuple[str, Any]]) -> Any:
    """Merge ``(name, mapping or DictConfig)`` sources onto ``schema``'s defaults; a typed instance.

    Raises:
        ConfigError: Naming the source and key of an unknown key or an invalid value.
    """
    cfg = _writable(OmegaConf.structured(schema))  # frozen dataclasses make read-only nodes
    for name, source in sources:
        node = source if isinstance(source, DictConfig) else OmegaConf.create(dict(source))
        try:
            cfg = OmegaConf.merge(cfg, _enum_values_to_names(node, schema))
        except OmegaConfBaseException as exc:
            raise _wrap(exc, name, schema) from exc
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, "config", schema) from exc


def read_yaml(path: str | Path) -> DictConfig:
    """A YAML config file as a DictConfig.

    Raises:
        ConfigError: If it is missing, not YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several types
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return node


def dotlist(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings as a DictConfig.

    Raises:
        ConfigError: On a string that is not ``key=value``.
    """
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command-line override: {str(exc).splitlines()[0]}") from exc


# ----------------------------------------------------------------------------- the training config
def validate_config(cfg: Config) -> None:
    """Check a merged training config for inconsistent values.

    Raises:
        ConfigError: Naming the key, its value and what was expected.
    """
    from cellvit_ssl.models.vit import ARCHS

    if cfg.model.arch not in (*ARCHS, "custom"):
        near = difflib.get_close_matches(cfg.model.arch, [*ARCHS, "custom"], n=1)
        raise ConfigError(f"model.arch={cfg.model.arch!r}; expected one of {[*ARCHS, 'custom']}"
                          + (f"; did you mean {near[0]!r}?" if near else ""))
    if cfg.model.patch_size < 1 or cfg.model.img_size % cfg.model.patch_size:
        raise ConfigError(f"model.img_size={cfg.model.img_size} is not a multiple of "
                          f"model.patch_size={cfg.model.patch_size}")
    for name in ("global_crop_size", "local_crop_size"):
        size = getattr(cfg.views, name)
        if size < 1 or size % cfg.model.patch_size:
            raise ConfigError(
                f"views.{name}={size} is not a positive multiple of model.patch_size={cfg.model.patch_size}"
            )
    for name in ("global_crop_scale", "local_crop_scale"):
        lo_hi = list(getattr(cfg.views, name))
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"views.{name}={lo_hi}; expected [low, high] with 0 < low <= high <= 1")
    ratio = list(cfg.views.crop_ratio)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"views.crop_ratio={ratio}; expected [low, high] width / height with 0 < low <= high")
    _validate_data(cfg.data)
    _validate_train(cfg.train)
    _validate_views(cfg)
    _validate_ssl(cfg)
    _validate_phases(cfg)


def _validate_data(data: DataConfig) -> None:
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size={data.batch_size}; expected >= 1")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers={data.num_workers}; expected >= 0 (0 reads in the main process)")
    if data.sample_size < 1:
        raise ConfigError(f"data.sample_size={data.sample_size}; expected a side in pixels >= 1")
    if not data.channels:
        raise ConfigError("data.channels is empty; name the channels of your images in order")
    lo_hi = list(data.normalize_percentiles)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
        raise ConfigError(f"data.normalize_percentiles={lo_hi}; expected [low, high] with 0 <= low < high <= 100")
    if data.stats_samples < 1:
        raise ConfigError(f"data.stats_samples={data.stats_samples}; expected >= 1")
    for key in ("level", "z_slice", "t_frame"):
        if getattr(data, key) < 0:
            raise ConfigError(f"data.{key}={getattr(data, key)}; expected >= 0")
    from cellvit_ssl.channels import ChannelVocabulary
    from cellvit_ssl.errors import DataError

    try:
        vocab = ChannelVocabulary.from_config(data)
        vocab.canonical_names(list(data.channels), source="data.channels")
    except DataError as exc:
        raise ConfigError(str(exc)) from exc


def _validate_train(train: TrainConfig) -> None:
    positive = ("epochs", "accumulate_steps", "lr_reference_batch", "keep_last")
    for key in positive:
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)}; expected >= 1")
    for key in ("warmup_epochs", "log_every", "checkpoint_every", "max_steps", "clip_grad", "base_lr",
                "min_lr", "weight_decay", "weight_decay_end"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key}={getattr(train, key)}; expected >= 0")
    if not 0 < train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={train.layer_decay}; expected 0 < layer_decay <= 1")
    check_allowed_changes(train.allow_config_change, Config)
    check_device(train.device, "train.device")


def check_allowed_changes(keys: Sequence[str], schema: type) -> None:
    """Refuse a ``train.allow_config_change`` entry that names no key or section of ``schema``.

    Raises:
        ConfigError: Naming the entry and the nearest valid key.
    """
    known = set(_all_keys(OmegaConf.structured(schema)))
    for key in keys:
        if key not in known:
            near = nearest_key(key, schema)
            raise ConfigError(f"train.allow_config_change names {key!r}, which is no config key or section"
                              + (f"; did you mean {near!r}?" if near else ""))


def check_device(device: str, key: str) -> None:
    """Refuse a device string that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: Naming ``key``.
    """
    text = str(device)
    ok = text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise ConfigError(f"{key}={text!r}; expected auto, cpu, cuda or cuda:N")


def _validate_views(cfg: Config) -> None:
    views = cfg.views
    if views.channel_mode == ChannelMode.boc and cfg.model.variant != Variant.boc:
        raise ConfigError(
            f"views.channel_mode='boc' cuts every channel separately, which only the 'boc' model "
            f"reads; model.variant={cfg.model.variant.value!r} needs views.channel_mode='joint'"
        )
    if len(views.blur_prob) != 3:
        raise ConfigError(f"views.blur_prob={list(views.blur_prob)}; expected [global 1, global 2, local]")
    if not 0 <= views.channel_drop_prob < 1:
        raise ConfigError(f"views.channel_drop_prob={views.channel_drop_prob}; expected 0 <= p < 1")
    unknown = [c for c in views.protected_channels if c not in cfg.data.channels]
    if unknown:
        raise ConfigError(
            f"views.protected_channels {unknown} are not among data.channels={list(cfg.data.channels)}"
        )


def _validate_ssl(cfg: Config) -> None:
    ssl = cfg.ssl
    if not (ssl.dino or ssl.ibot):
        raise ConfigError("ssl.dino and ssl.ibot are both false; enable at least one of them")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        if not getattr(ssl, key) > 0:
            raise ConfigError(f"ssl.{key}={getattr(ssl, key)}; expected a temperature > 0")
    lo_hi = list(ssl.mask_ratio)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] < 1:
        raise ConfigError(f"ssl.mask_ratio={lo_hi}; expected [low, high] with 0 <= low <= high < 1")
    if ssl.channel_sampling == ChannelSampling.hierarchical and cfg.model.variant == Variant.fixed:
        raise ConfigError("ssl.channel_sampling='hierarchical' needs a channel-adaptive model; "
                          "model.variant='fixed' takes a fixed channel set")
    gram = ssl.gram
    if gram.weight < 0 or gram.start_step < 0 or gram.refresh_every < 0:
        raise ConfigError(f"ssl.gram weight={gram.weight}, start_step={gram.start_step}, "
                          f"refresh_every={gram.refresh_every}; expected values >= 0")


def scaled_size(size: int, scale: float) -> int:
    """``size * scale`` rounded to the nearest pixel (the crop and sample sizes of a phase)."""
    return max(1, round(size * scale))


def _validate_phases(cfg: Config) -> None:
    previous = 0.0
    for i, phase in enumerate(cfg.train.phases):
        key = f"train.phases[{i}]"
        if not previous < phase.start < 1:
            raise ConfigError(f"{key}.start={phase.start}; expected a fraction of the run's steps in "
                              f"({previous}, 1), phases in increasing order")
        previous = phase.start
        for name in ("crop_scale", "sample_scale"):
            value = getattr(phase, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{key}.{name}={value}; expected a factor > 0")
        for name in ("global_crop_size", "local_crop_size"):
            size = scaled_size(getattr(cfg.views, name), phase.crop_scale)
            if size % cfg.model.patch_size:
                raise ConfigError(
                    f"{key}.crop_scale={phase.crop_scale} makes views.{name} {size} px, not a multiple of "
                    f"model.patch_size={cfg.model.patch_size}"
                )
        if phase.batch_size < 0:
            raise ConfigError(f"{key}.batch_size={phase.batch_size}; expected >= 1 (0: scaled from data.batch_size)")
        if not 0 <= phase.warmup_fraction <= 1:
            raise ConfigError(f"{key}.warmup_fraction={phase.warmup_fraction}; expected 0 <= fraction <= 1")
        for name in ("base_lr", "min_lr"):
            value = getattr(phase, name)
            if value is not None and value < 0:
                raise ConfigError(f"{key}.{name}={value}; expected >= 0")
        for name in ("momentum_start", "momentum_end"):
            value = getattr(phase, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"{key}.{name}={value}; expected a momentum in [0, 1]")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a run configuration: code defaults, then a YAML file, then ``key=value`` overrides.

    Args:
        path: A YAML file stating only what differs from the defaults, or None.
        overrides: OmegaConf dotlist strings such as ``"train.epochs=5"``.

    Returns:
        The merged, validated configuration (a frozen :class:`Config`).

    Raises:
        ConfigError: If the file is missing or not YAML, a key is unknown, a value has the
            wrong type, or values are inconsistent.

    Examples:
        >>> cfg = load_config(None, ["train.epochs=2"])
        >>> cfg.train.epochs
        2
    """
    sources: list[tuple[str, Any]] = []
    if path is not None:
        sources.append((str(path), read_yaml(path)))
    sources.append(("command-line override", dotlist(overrides)))
    cfg = merge_config(Config, sources)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """A plain-Python copy of a config (enums as their names), for checkpoints and provenance."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def config_from_dict(data: Mapping, schema: type = Config) -> Any:
    """Rebuild a config from :func:`config_to_dict` output (e.g. from a checkpoint).

    Keys this version no longer knows are an error naming them; keys it added since take
    their defaults.

    Raises:
        ConfigError: If the stored config does not fit the schema.
    """
    return merge_config(schema, [("checkpoint config", OmegaConf.create(dict(data)))])


def flat_config(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 5}}`` → ``{"train.epochs": 5}`` (lists and leaf values kept as they are)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key != "channel_map":  # a mapping-valued key is one value
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = dict(value) if isinstance(value, Mapping) else value
    return flat


def config_changes(old: Mapping, new: Mapping, schema: type = Config) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two configs written by :func:`config_to_dict`.

    ``old`` (e.g. a checkpoint's config) is read onto ``schema`` first, so keys a newer version
    added compare at their defaults; when it no longer fits the schema, it is compared as stored.

    Returns:
        ``{"train.epochs": (25, 5), ...}`` in key order.
    """
    try:
        old = config_to_dict(config_from_dict(old, schema))
    except ConfigError:
        old = dict(old)
    before, after = flat_config(old), flat_config(new)
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)}


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write a config as YAML atomically."""
    from cellvit_ssl.io import atomic_write_text

    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))
