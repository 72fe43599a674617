"""Typed configuration: defaults in code, short YAML files, ``key=value`` overrides.

The schema below is the single source of defaults. A YAML file only states what differs,
and command-line overrides (OmegaConf dotlist, e.g. ``train.epochs=5``) come last. Unknown or
mistyped keys raise :class:`~cellvit_ssl.errors.ConfigError` naming the key and the nearest
valid one.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cellvit_ssl.errors import ConfigError


@dataclass
class DemoConfig:
    """Synthetic HPA-like demo data, generated on first use into ``cache_dir``."""

    enabled: bool = False
    cache_dir: str = "~/.cache/cellvit_ssl/demo"
    n_images: int = 8
    image_size: int = 192
    cells_per_image: int = 12
    seed: int = 0
    format: str = "ome-zarr"  # "ome-zarr" or "ome-tiff"


@dataclass
class DataConfig:
    """Where samples come from and how they are cut and normalised."""

    index: str | None = None  # CSV / parquet index: one row per image or per cell crop
    root: str | None = None  # base folder for relative paths in the index
    channels: list[str] = field(default_factory=lambda: ["nucleus", "microtubules", "er", "protein"])
    channel_map: dict[str, str] = field(default_factory=dict)  # your names -> vocabulary
    sample_size: int = 64  # side of the square cut around a cell / from an image, in px
    normalize_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.8])
    mode: str = "auto"  # auto | cells (centroid crops) | tiles (random tiles) | image (whole image, resized)
    normalize: str = "percentile"  # percentile (per sample) | dataset (cached per-channel stats) | none
    stats_cache: str | None = None  # JSON for dataset stats; default ~/.cache/cellvit_ssl/stats/<hash>.json
    stats_samples: int = 256  # rows sampled to compute dataset stats
    foreground_threshold: float = 0.1  # tiles: a pixel is foreground above this (image-scaled to [0, 1])
    min_foreground: float = 0.0  # tiles: redraw tiles with a smaller foreground fraction (0 = off)
    tile_attempts: int = 10  # tiles: draws per sample before keeping the best
    missing_channels: str = "error"  # error | pad (zeros + channel_mask False)
    skip_bad: bool = False  # log and skip unreadable / corrupt samples, counted per epoch
    missing_chunks: str = "error"  # error | fill: a chunk absent from a Zarr store
    level: int = 0  # pyramid level (OME-Zarr, pyramidal TIFF)
    z_projection: str = "max"  # max | slice (then z_slice)
    z_slice: int = 0
    t_frame: int = 0
    metadata_columns: list[str] = field(default_factory=list)  # index columns returned with each sample
    batch_size: int = 32  # per process
    num_workers: int = 2
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class ViewsConfig:
    """Multi-crop DINO views (lightly DINOTransform's structure, channel-agnostic ops)."""

    global_crop_size: int = 224
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    n_local_views: int = 6
    local_crop_size: int = 96
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90: bool = True
    gamma: float = 0.2  # per-channel gamma exponent in [1/(1+g), 1+g] (log-uniform)
    brightness: float = 0.3  # per-channel additive shift (in std units when standardize)
    contrast: float = 0.3  # per-channel multiplicative jitter
    jitter_prob: float = 0.8  # probability of gamma and of contrast/brightness per view
    blur_prob: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # px of the view
    noise: str = "gaussian"  # none | gaussian | poisson
    noise_prob: float = 0.5
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.05])  # gaussian, image units
    noise_photons: list[float] = field(default_factory=lambda: [50.0, 1000.0])  # poisson counts at 1.0
    standardize: bool = False  # per-view, per-channel zero mean / unit variance (embed must match)
    channel_drop_prob: float = 0.0  # per channel, joint mode only; never all channels
    protected_channels: list[str] = field(default_factory=list)  # never dropped, e.g. [protein]
    channel_mode: str = "joint"  # joint: channels share a crop | boc: each channel its own sample and crop


@dataclass
class ModelConfig:
    """Channel-adaptive ViT: variant and backbone size."""

    variant: str = "boc"  # fixed | boc | hierarchical | channelvit
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant, or "custom"
    patch_size: int = 16
    img_size: int = 224  # native size of the position embedding
    embed_dim: int = 384  # used when arch == "custom"
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1.0e-5
    num_register_tokens: int = 0
    qkv_bias: bool = True
    ffn_layer: str = "mlp"  # mlp | swiglu (DINOv2's fused SwiGLU, e.g. for vit_giant2)
    pool_patch_tokens: bool = False  # embed(): append the mean patch token to each CLS token
    attn_backend: str = "sdpa"  # sdpa | xformers (used only when installed and on CUDA)
    # pos-embed resize: 0 = exact grid; 0.1 = DINOv2's scale-factor resize (its models without
    # registers; its register models use 0 with antialias, as timm does)
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False
    pretrained: str | None = None  # local DINOv2-layout .pth loaded into the backbone at build time
    pretrained_strict: bool = True  # missing / unexpected checkpoint keys are an error (else a warning)


@dataclass
class SSLConfig:
    """Student/teacher objective: DINO + iBOT + KoLeo on lightly heads and losses."""

    dino: bool = True  # DINO loss on CLS tokens
    ibot: bool = True  # iBOT masked-patch loss
    koleo: bool = True  # KoLeo regulariser on the student's global CLS tokens
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_output_dim: int = 65536
    ibot_head_output_dim: int | None = None  # None: same as head_output_dim
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | mean
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9  # mean centering only
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # iBOT per-sample range
    mask_sample_probability: float = 0.5  # fraction of global-view samples that get a mask
    freeze_last_layer_epochs: int = 1
    channel_sampling: str = "none"  # none | hierarchical (k ~ U{1..C}, then a k-subset)
    momentum_start: float = 0.996
    momentum_end: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation loop, distribution, checkpoints and logging."""

    output_dir: str = "runs/default"
    epochs: int = 100
    base_lr: float = 5.0e-4  # per `lr_reference_batch` images of global batch
    lr_reference_batch: int = 256  # lr = base_lr * global batch / this
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4  # cosine schedule from weight_decay to this
    layer_decay: float = 1.0  # layer-wise lr decay (1 = off; 0.65-0.9 for fine-tuning)
    clip_grad: float = 3.0  # max total grad norm (0 = off)
    accumulate_steps: int = 1  # micro-batches per optimiser step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    strategy: str = "ddp"  # ddp | fsdp (FSDP2, fully_shard per transformer block)
    dist_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute student blocks in backward
    deterministic: bool = False  # deterministic kernels (slower; for exact reproducibility)
    log_every: int = 10  # steps between JSONL / TensorBoard records
    tensorboard: bool = True
    progress: bool = True  # progress bar on rank 0
    checkpoint_every: int = 0  # steps; 0 = only at each epoch end
    keep_last: int = 3  # step checkpoints kept (checkpoint.pt always points at the newest)
    resume: str = "auto"  # auto (latest in output_dir) | none | path to a checkpoint
    max_steps: int = 0  # stop early after this many steps (0 = run all epochs)


@dataclass
class Config:
    """The whole run. See the dataclasses above for every field and its default."""

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


VARIANTS = ("fixed", "boc", "hierarchical", "channelvit")


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node[k], full + "."))
    return keys


def _nearest_hint(key: str) -> str:
    known = _all_keys(OmegaConf.structured(Config))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:  # compare the last component too: "train.epoch" -> "train.epochs"
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[c] for c in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
    return f"; did you mean {close[0]!r}?" if close else ""


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key {key!r}{_nearest_hint(key)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: invalid value for config key {key!r}: {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]} (key {key!r})")


def _validate(cfg: DictConfig) -> None:
    if cfg.model.variant not in VARIANTS:
        raise ConfigError(f"model.variant={cfg.model.variant!r}; expected one of {list(VARIANTS)}")
    for name in ("global_crop_size", "local_crop_size"):
        size = cfg.views[name]
        if size % cfg.model.patch_size:
            raise ConfigError(
                f"views.{name}={size} is not a multiple of model.patch_size={cfg.model.patch_size}"
            )
    for name in ("global_crop_scale", "local_crop_scale"):
        lo_hi = list(cfg.views[name])
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"views.{name}={lo_hi}; expected [low, high] with 0 < low <= high <= 1")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}; expected >= 1")
    if not cfg.data.channels:
        raise ConfigError("data.channels is empty; name the channels of your images in order")
    _validate_train(cfg.train)
    _validate_views(cfg)
    _validate_ssl(cfg)


_CHOICES = {
    "precision": ("auto", "bf16", "fp32"),
    "strategy": ("ddp", "fsdp"),
    "dist_backend": ("auto", "nccl", "gloo"),
}


def _validate_train(train: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        if train[key] not in choices:
            raise ConfigError(f"train.{key}={train[key]!r}; expected one of {list(choices)}")
    positive = ("epochs", "accumulate_steps", "lr_reference_batch", "keep_last")
    for key in positive:
        if train[key] < 1:
            raise ConfigError(f"train.{key}={train[key]}; expected >= 1")
    for key in ("warmup_epochs", "log_every", "checkpoint_every", "max_steps", "clip_grad", "base_lr",
                "min_lr", "weight_decay", "weight_decay_end"):
        if train[key] < 0:
            raise ConfigError(f"train.{key}={train[key]}; expected >= 0")
    if not 0 < train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay={train.layer_decay}; expected 0 < layer_decay <= 1")
    if not (train.device in ("auto", "cpu", "cuda") or train.device.startswith("cuda:")):
        raise ConfigError(f"train.device={train.device!r}; expected auto, cpu, cuda or cuda:N")


def _validate_views(cfg: DictConfig) -> None:
    views = cfg.views
    if views.channel_mode not in ("joint", "boc"):
        raise ConfigError(f"views.channel_mode={views.channel_mode!r}; expected 'joint' or 'boc'")
    if views.channel_mode == "boc" and cfg.model.variant != "boc":
        raise ConfigError(
            f"views.channel_mode='boc' cuts every channel separately, which only the 'boc' model "
            f"reads; model.variant={cfg.model.variant!r} needs views.channel_mode='joint'"
        )
    if len(views.blur_prob) != 3:
        raise ConfigError(f"views.blur_prob={list(views.blur_prob)}; expected [global 1, global 2, local]")
    if views.noise not in ("none", "gaussian", "poisson"):
        raise ConfigError(f"views.noise={views.noise!r}; expected 'none', 'gaussian' or 'poisson'")
    if not 0 <= views.channel_drop_prob < 1:
        raise ConfigError(f"views.channel_drop_prob={views.channel_drop_prob}; expected 0 <= p < 1")
    unknown = [c for c in views.protected_channels if c not in cfg.data.channels]
    if unknown:
        raise ConfigError(
            f"views.protected_channels {unknown} are not among data.channels={list(cfg.data.channels)}"
        )


def _validate_ssl(cfg: DictConfig) -> None:
    ssl = cfg.ssl
    if not (ssl.dino or ssl.ibot):
        raise ConfigError("ssl.dino and ssl.ibot are both false; enable at least one of them")
    if ssl.centering not in ("sinkhorn_knopp", "mean"):
        raise ConfigError(f"ssl.centering={ssl.centering!r}; expected 'sinkhorn_knopp' or 'mean'")
    lo_hi = list(ssl.mask_ratio)
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] < 1:
        raise ConfigError(f"ssl.mask_ratio={lo_hi}; expected [low, high] with 0 <= low <= high < 1")
    if ssl.channel_sampling not in ("none", "hierarchical"):
        raise ConfigError(f"ssl.channel_sampling={ssl.channel_sampling!r}; expected 'none' or 'hierarchical'")
    if ssl.channel_sampling == "hierarchical" and cfg.model.variant == "fixed":
        raise ConfigError("ssl.channel_sampling='hierarchical' needs a channel-adaptive model; "
                          "model.variant='fixed' takes a fixed channel set")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run configuration: code defaults, then a YAML file, then ``key=value`` overrides.

    Args:
        path: A YAML file stating only what differs from the defaults, or None.
        overrides: OmegaConf dotlist strings such as ``"train.epochs=5"``.

    Returns:
        The merged, validated, read-only configuration.

    Raises:
        ConfigError: If the file is missing or not YAML, a key is unknown, a value has the
            wrong type, or values are inconsistent.

    Examples:
        >>> cfg = load_config(None, ["train.epochs=2"])
        >>> cfg.train.epochs
        2
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise _wrap(exc, str(path)) from exc
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _wrap(exc, "command-line override") from exc
    _validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_to_dict(cfg: DictConfig | ListConfig) -> dict:
    """Return a plain-Python copy of a config (for checkpoints and provenance)."""
    return OmegaConf.to_container(cfg, resolve=True)


def config_from_dict(data: dict) -> DictConfig:
    """Rebuild a validated config from :func:`config_to_dict` output (e.g. from a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    except OmegaConfBaseException as exc:
        raise _wrap(exc, "checkpoint config") from exc
    OmegaConf.set_readonly(cfg, True)
    return cfg
