"""The frozen teacher of a distillation run (``distill.teacher``), loaded from a file.

DINOv2 ships its small models distilled from its largest rather than trained from scratch: a
frozen, trained network provides the DINO and iBOT targets, the student (any size, any
variant) is trained against them with the usual objective, and the student's EMA is the model
that is kept. :class:`~cellvit_ssl.ssl.DINOMetaArch` does the training; this module builds the
frozen network from one of three kinds of file:

- a **training checkpoint** (``checkpoint.pt``) of this package: its EMA teacher's backbone
  and its DINO / iBOT heads (``teacher.dino_head``, ``teacher.ibot_head``), its model config and
  channel vocabulary;
- an **encoder export** (``teacher.pt``) of this package: the backbone alone;
- a **DINOv2-layout** ``.pth`` (a published backbone, or a DINOv2 training checkpoint whose
  ``teacher`` holds ``backbone.*``, ``dino_head.*`` and ``ibot_head.*``): the architecture is read
  off the tensor shapes (width, depth, patch size, grid, registers, FFN kind, LayerScale;
  64-wide attention heads as in every DINOv2 model) and built as the student's variant on the
  student's channels, through :func:`cellvit_ssl.models.pretrained.load_pretrained`.

**Heads.** A term's targets come from the checkpoint's head when it has one (a DINOv2
checkpoint without a separate iBOT head used its DINO head for iBOT, and so do we). A file
without a head for an enabled term (a ``teacher.pt``, a published backbone, a run trained
without that term) gets a **fresh head, initialised from** ``train.seed`` **and frozen**:
a fixed random projection of the teacher's features onto the prototypes. With Sinkhorn-Knopp
centring (the default) its targets are balanced soft assignments of the teacher's features to
random directions, which carry the teacher's neighbourhood structure; a trained head carries
more (its prototypes were learned), so prefer a ``checkpoint.pt`` when there is one. Training a
head against the frozen backbone instead would need a target of its own (it would collapse).
The student's heads are always new and trained; they output the teacher heads' number of
prototypes (``ssl.head_output_dim`` / ``ssl.ibot_head_output_dim`` are set to it in the run's
resolved config).

The frozen network never enters the optimizer, the DDP / FSDP wrapper or the checkpoints (a
ViT-L would triple every checkpoint): checkpoints record the file's path and SHA-256 instead,
and resuming with another file is refused. It runs under ``torch.inference_mode`` and, on a
GPU, under the run's bf16 autocast.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.checkpoint import ENCODER_FORMAT, TRAINING_FORMAT, load_checkpoint
from cellvit_ssl.config import Config, FfnLayer, ModelConfig, config_from_dict
from cellvit_ssl.embed_io import file_sha256
from cellvit_ssl.errors import CheckpointError, ConfigError
from cellvit_ssl.models.channels import ChannelAdaptiveViT, build_model
from cellvit_ssl.models.pretrained import _unwrap, load_mapping, load_pretrained

HEADS = ("dino_head", "ibot_head")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class FrozenTeacher(nn.Module):
    """A trained backbone and its heads, frozen: the targets of a distillation run.

    Args:
        backbone: The teacher's channel-adaptive model.
        heads: ``dino_head`` / ``ibot_head`` for the enabled terms.
        id_map: ``(V,)`` long: the teacher's vocabulary id of each of the student's vocabulary
            ids (-1 for channels the teacher does not know).
        source: Where it came from, for messages.
        heads_from: Term → ``"checkpoint"`` or ``"fresh"``.
        sha256: SHA-256 of the file.

    Examples:
        >>> teacher.forward_features(views, channel_ids, present)["x_norm_clstoken"]  # doctest: +SKIP
    """

    def __init__(self, backbone: ChannelAdaptiveViT, heads: Mapping[str, nn.Module], id_map: Tensor,
                 source: str, heads_from: Mapping[str, str], sha256: str) -> None:
        super().__init__()
        self.backbone = backbone
        for name, head in heads.items():
            setattr(self, name, head)
        self.register_buffer("id_map", id_map.long(), persistent=False)
        self.source = source
        self.heads_from = dict(heads_from)
        self.sha256 = sha256
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always in eval mode (no drop path), whatever is asked."""
        return super().train(False)

    def teacher_ids(self, channel_ids: Tensor) -> Tensor:
        """The student's channel ids in the teacher's vocabulary (padding stays padding)."""
        mapped = self.id_map[channel_ids.clamp(min=0)]
        return torch.where(channel_ids >= 0, mapped, channel_ids)

    def forward_features(self, x: Tensor, channel_ids: Tensor, channel_mask: Tensor | None = None) -> dict:
        """The teacher backbone's training samples (see :meth:`ChannelAdaptiveViT.forward_features`)."""
        return self.backbone.forward_features(x, self.teacher_ids(channel_ids), channel_mask)

    def describe(self) -> str:
        """One line for the log."""
        heads = ", ".join(f"{k} {v}" for k, v in self.heads_from.items()) or "no heads"
        return (f"distillation teacher {self.source} ({type(self.backbone).__name__}, width "
                f"{self.backbone.embed_dim}, {len(self.backbone.transformer_blocks())} blocks; heads: {heads})")


@dataclass(frozen=True)
class TeacherFile:
    """What a teacher file holds, before anything is built.

    Attributes:
        kind: ``training``, ``encoder`` or ``dinov2``.
        model: The teacher's model config (its variant: the student's for DINOv2 files).
        channels: The teacher model's channel names.
        vocabulary: Its channel vocabulary.
        backbone: The backbone state (keys of :class:`ChannelAdaptiveViT`, or DINOv2 keys).
        heads: Head name → state (lightly ``DINOProjectionHead`` keys), as found.
        preprocess: Its stored preprocessing contract (cellvit_ssl files only).
    """

    kind: str
    model: ModelConfig
    channels: list[str]
    vocabulary: ChannelVocabulary
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]
    preprocess: dict | None = None


def _with_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _dinov2_teacher_state(payload: Mapping) -> dict[str, Tensor]:
    """The flat teacher-level state (``backbone.*``, ``dino_head.*``, ...) of a DINOv2-layout file."""
    state = payload
    for key in ("teacher", "model", "state_dict"):
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, (Tensor, Mapping)) for v in inner.values()):
            state = inner
    flat = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    for prefix in ("module.", "teacher."):
        if any(k.startswith(prefix) for k in flat):
            flat = _with_prefix(flat, prefix)
    return flat


def _dinov2_heads(flat: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    heads = {}
    for name in HEADS:
        state = _with_prefix(flat, f"{name}.")
        if state:  # DINOv2's DINOHead names its MLP ``mlp``; lightly's is ``layers`` (same indices)
            heads[name] = {re.sub(r"^mlp\.", "layers.", k): v for k, v in state.items()}
    if "dino_head" in heads and "ibot_head" not in heads:
        heads["ibot_head"] = heads["dino_head"]  # DINOv2 without a separate iBOT head shares the DINO head
    return heads


def dinov2_model_config(state: Mapping[str, Tensor], like: ModelConfig) -> ModelConfig:
    """The model config of a DINOv2-layout backbone state, read off its tensor shapes.

    Width (``pos_embed``), depth (``blocks.N``), patch size (``patch_embed.proj``), native grid,
    register tokens, FFN kind and MLP ratio, LayerScale and qkv bias are taken from the
    tensors; attention heads are 64 wide as in every DINOv2 model. Variant, channel pooling and
    position-embedding interpolation are ``like``'s (the student's).

    Raises:
        CheckpointError: If the state is not a ViT (no patch embedding / position embedding).
    """
    try:
        proj, pos = state["patch_embed.proj.weight"], state["pos_embed"]
    except KeyError as exc:
        raise CheckpointError(f"not a DINOv2-layout ViT: no {exc.args[0]!r} (first keys: {sorted(state)[:5]})") \
            from None
    dim, patch = int(pos.shape[-1]), int(proj.shape[-1])
    extra = int(pos.shape[1]) - 1
    side = math.isqrt(extra)
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:  # w12 holds both SwiGLU halves; DINOv2's hidden = int(2/3 * ratio * dim) rounded up to 8
        hidden = int(state["blocks.0.mlp.w12.weight"].shape[0]) // 2
        ratio = next((r for r in (4.0, hidden * 1.5 / dim) if (int(int(dim * r) * 2 / 3) + 7) // 8 * 8 == hidden),
                     hidden * 1.5 / dim)
    else:
        ratio = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / dim
    registers = state.get("register_tokens")
    return replace(
        like, arch="custom", embed_dim=dim, depth=depth, num_heads=max(1, dim // 64), patch_size=patch,
        img_size=side * patch, mlp_ratio=ratio, drop_path_rate=0.0,
        layerscale_init=1.0e-5 if "blocks.0.ls1.gamma" in state else None,
        num_register_tokens=0 if registers is None else int(registers.shape[1]),
        qkv_bias="blocks.0.attn.qkv.bias" in state, ffn_layer=FfnLayer.swiglu if swiglu else FfnLayer.mlp,
        pretrained=None,
    )


def read_teacher_file(path: str | Path, cfg: Config) -> TeacherFile:
    """Read a teacher file of any of the three kinds (see the module docstring).

    Raises:
        CheckpointError: If the file is missing, unreadable, or none of the three kinds.
    """
    path = Path(path).expanduser()
    raw = load_mapping(path, f"distill.teacher={str(path)!r}")
    if raw.get("format") in (TRAINING_FORMAT, ENCODER_FORMAT):
        payload = load_checkpoint(path, expect=(TRAINING_FORMAT, ENCODER_FORMAT))  # layout upgrade
        config = config_from_dict(payload["config"])
        vocabulary = (ChannelVocabulary.from_dict(payload["vocabulary"]) if "vocabulary" in payload
                      else ChannelVocabulary.from_config(config.data))
        if payload["format"] == ENCODER_FORMAT:
            backbone, heads, kind = dict(payload["backbone"]), {}, "encoder"
        else:
            model = payload["model"]
            backbone, kind = _with_prefix(model, "teacher.backbone."), "training"
            heads = {name: state for name in HEADS if (state := _with_prefix(model, f"teacher.{name}."))}
        return TeacherFile(kind, config.model, list(config.data.channels), vocabulary, backbone, heads,
                           payload.get("preprocess"))
    flat = _dinov2_teacher_state(raw)
    backbone = _unwrap(flat)  # drops the heads, strips backbone. prefixes, unchunks blocks
    try:
        model = dinov2_model_config(backbone, cfg.model)
    except CheckpointError as exc:
        raise CheckpointError(f"distill.teacher={str(path)!r} is neither a cellvit_ssl checkpoint nor a "
                              f"DINOv2-layout ViT: {exc}") from exc
    return TeacherFile("dinov2", model, list(cfg.data.channels), ChannelVocabulary.from_config(cfg.data), backbone,
                       _dinov2_heads(flat))


def head_from_state(state: Mapping[str, Tensor], source: str) -> DINOProjectionHead:
    """A frozen lightly ``DINOProjectionHead`` with a checkpoint's weights, its sizes read off them.

    Raises:
        CheckpointError: If the state is not a 3-layer DINO head.
    """
    try:
        first, last, proto = state["layers.0.weight"], state["layers.4.weight"], state["last_layer.weight_v"]
        head = DINOProjectionHead(input_dim=int(first.shape[1]), hidden_dim=int(first.shape[0]),
                                  bottleneck_dim=int(last.shape[0]), output_dim=int(proto.shape[0]))
        head.load_state_dict(dict(state))
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a 3-layer DINO head ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}; keys {sorted(state)[:6]})") from exc
    return head.requires_grad_(False)


def _fresh_head(input_dim: int, output_dim: int, cfg: Config) -> DINOProjectionHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return DINOProjectionHead(input_dim=input_dim, hidden_dim=cfg.ssl.head_hidden_dim,
                                  bottleneck_dim=cfg.ssl.head_bottleneck_dim,
                                  output_dim=output_dim).requires_grad_(False)


def _id_map(student: ChannelVocabulary, teacher: ChannelVocabulary, channels: Sequence[str],
            teacher_channels: Sequence[str], source: str) -> Tensor:
    names = student.canonical_names(list(channels), source="data.channels")
    known = set(teacher_channels)
    unknown = [n for n in names if n not in known or n not in teacher.names]
    if unknown:
        raise ConfigError(f"distill.teacher={source}: the teacher model knows the channels {list(teacher_channels)}, "
                          f"not {unknown} of data.channels={list(channels)}; distil on channels it was trained on")
    id_map = torch.full((len(student),), -1, dtype=torch.long)
    for name in names:
        id_map[student.id(name)] = teacher.id(name)
    return id_map


def build_frozen_teacher(cfg: Config, vocabulary: ChannelVocabulary) -> FrozenTeacher:
    """The frozen teacher ``distill.teacher`` names, with a head for every enabled term.

    Args:
        cfg: The run config (``distill.teacher`` set).
        vocabulary: The run's (the student's) channel vocabulary.

    Raises:
        CheckpointError: If the file cannot be read or its weights do not fit its own config.
        ConfigError: If the student's channels are unknown to the teacher.
    """
    source = str(cfg.distill.teacher)
    found = read_teacher_file(source, cfg)
    model = build_model(found.model, found.channels, vocabulary=found.vocabulary, load_pretrained=False)
    if found.kind == "dinov2":
        load_pretrained(model, found.backbone, strict=True)
    else:
        try:
            model.load_state_dict(found.backbone)
        except RuntimeError as exc:
            raise CheckpointError(f"distill.teacher={source!r}: the weights do not fit the checkpoint's own model "
                                  f"config: {str(exc).splitlines()[0]}") from exc
    wanted = [name for name, on in (("dino_head", cfg.ssl.dino), ("ibot_head", cfg.ssl.ibot)) if on]
    heads, heads_from = {}, {}
    for name in wanted:
        if name in found.heads:
            heads[name] = head_from_state(found.heads[name], f"distill.teacher={source!r} {name}")
            heads_from[name] = "checkpoint"
        else:
            k = cfg.ssl.head_output_dim if name == "dino_head" else (cfg.ssl.ibot_head_output_dim
                                                                      or cfg.ssl.head_output_dim)
            heads[name] = _fresh_head(model.embed_dim, k, cfg)
            heads_from[name] = "fresh (frozen random projection)"
        if heads[name].layers[0].in_features != model.embed_dim:
            raise CheckpointError(f"distill.teacher={source!r}: its {name} takes {heads[name].layers[0].in_features} "
                                  f"features, its backbone gives {model.embed_dim}")
    id_map = _id_map(vocabulary, found.vocabulary, cfg.data.channels, model.channels, source)
    teacher = FrozenTeacher(model, heads, id_map, source, heads_from, file_sha256(Path(source).expanduser()))
    _warn_on_other_preprocessing(found.preprocess, cfg, source)
    return teacher


def _warn_on_other_preprocessing(stored: dict | None, cfg: Config, source: str) -> None:
    if not stored:
        return
    ours = {"normalize": cfg.data.normalize.value, "percentiles": [float(p) for p in cfg.data.normalize_percentiles],
            "standardize": bool(cfg.views.standardize)}
    theirs = {"normalize": stored.get("normalize"), "percentiles": [float(p) for p in stored.get("percentiles", [])],
              "standardize": bool(stored.get("standardize"))}
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        print(f"cellvit_ssl: warning: distill.teacher={source} was trained with "
              f"{ {k: theirs[k] for k in differ} }, this run uses { {k: ours[k] for k in differ} }; the teacher "
              "sees its inputs differently from its own training", file=sys.stderr)


def resolve_distill_config(cfg: Config, teacher: FrozenTeacher) -> Config:
    """The run config with the student's head sizes set from the teacher's heads.

    The student's heads must score the teacher's prototypes (``ssl.head_output_dim``,
    ``ssl.ibot_head_output_dim``); with ``distill.init_student_heads`` their hidden and
    bottleneck widths are the teacher's too (of its DINO head, else its iBOT head), so that
    :func:`init_student_heads` can copy them. The resolved config is what ``config.yaml`` and
    the checkpoints record (so an encoder rebuilds the run's model from them).
    """
    heads = {name: getattr(teacher, name) for name in HEADS if hasattr(teacher, name)}
    ssl = cfg.ssl
    dino_k = heads["dino_head"].last_layer.out_features if "dino_head" in heads else ssl.head_output_dim
    ibot_k = heads["ibot_head"].last_layer.out_features if "ibot_head" in heads \
        else ssl.ibot_head_output_dim or ssl.head_output_dim
    resolved = replace(ssl, head_output_dim=dino_k, ibot_head_output_dim=None if ibot_k == dino_k else ibot_k)
    if cfg.distill.init_student_heads and heads:
        head = next(iter(heads.values()))
        resolved = replace(resolved, head_hidden_dim=head.layers[0].out_features,
                           head_bottleneck_dim=head.last_layer.in_features)
    return cfg if resolved == ssl else replace(cfg, ssl=resolved)


@torch.no_grad()
def init_student_heads(meta: nn.Module, teacher: FrozenTeacher) -> list[str]:
    """Start the student's heads (and their EMA copies) as the frozen teacher's, but for the first layer.

    The first layer reads the student's features (another width); the rest of each head and its
    prototypes are the teacher's, so from the first step the student only has to produce
    features the teacher's head maps to the teacher's assignments, instead of also finding a
    head and prototypes of its own. Tensors whose shapes differ are left as initialised.

    Returns:
        The keys copied, as ``<head>.<key>``.
    """
    copied = []
    for name in HEADS:
        if name not in meta.student or not hasattr(teacher, name):
            continue
        source = getattr(teacher, name).state_dict()
        for net in (meta.student, meta.teacher):
            target = net[name].state_dict()
            for key, value in source.items():
                if not key.startswith("layers.0.") and key in target and target[key].shape == value.shape:
                    target[key].copy_(value)
                    if net is meta.student:
                        copied.append(f"{name}.{key}")
    return copied


def check_compatible(student: ChannelAdaptiveViT, teacher: FrozenTeacher, cfg: Config, view_sizes: Sequence[int],
                     vocabulary: ChannelVocabulary) -> None:
    """Refuse a student / teacher pair whose training samples or patch grids do not line up.

    Every row of the DINO loss pairs a teacher sample with a student sample (``boc``: one per
    channel; the other variants: one per image), and iBOT pairs their patch tokens, for each
    global view size the run uses.

    Raises:
        ConfigError: Naming both variants, patch sizes and the view size.
    """
    channels = list(cfg.data.channels)
    ids = torch.tensor([vocabulary.ids(channels)])
    t_patch = teacher.backbone.backbone.patch_size
    for size in view_sizes:
        x = torch.zeros(1, len(channels), size, size)
        if size % t_patch:
            raise ConfigError(f"distill: {size}-px global views are not a multiple of the teacher's patch size "
                              f"{t_patch}; choose views.global_crop_size (and phase crop scales) so that they are")
        s_shape = student.sample_shape(x, ids)
        t_shape = teacher.backbone.sample_shape(x, teacher.teacher_ids(ids))
        if s_shape[0] != t_shape[0]:
            raise ConfigError(
                f"distill: the teacher ({type(teacher.backbone).__name__}) makes {t_shape[0]} training sample(s) of a "
                f"{len(channels)}-channel image, the student (model.variant={cfg.model.variant.value}) "
                f"{s_shape[0]}; DINO pairs them row by row: use variants with the same layout (boc with boc; fixed, "
                "hierarchical and channelvit with each other)")
        if cfg.ssl.ibot and s_shape[1] != t_shape[1]:
            raise ConfigError(
                f"distill: at {size}-px views the teacher has {t_shape[1]} patch tokens (patch {t_patch}), the student "
                f"{s_shape[1]} (model.patch_size={cfg.model.patch_size}); iBOT pairs them token by token: use the "
                "same patch grid or ssl.ibot=false")
