"""Import DINOv2 weights from a local checkpoint file into any channel-adaptive variant.

One filter, :func:`checkpoint_filter`, makes a DINOv2-layout state dict fit a backbone:

- unwraps training checkpoints (``teacher`` / ``model`` / ``state_dict`` / ``backbone``
  entries, ``backbone.`` / ``module.`` prefixes) and block-chunked keys (``blocks.0.N.*``
  written by DINOv2's FSDP chunking) to ``blocks.N.*``;
- resamples the position embedding to the model's native grid (e.g. the 37×37 grid of a
  518-px /14 checkpoint to 16×16 at 224 px);
- resamples the patch kernels to the model's patch size (FlexiViT PI-resize, e.g. /14 → /16)
  and folds the RGB patch kernels to 1 channel (``boc`` / ``hierarchical`` / ``channelvit``) by
  summing them, or spreads that grey kernel over C channels (``fixed``).

:func:`load_pretrained` applies it and reports missing and unexpected keys by name. Nothing
is downloaded.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cellvit_ssl.errors import CheckpointError
from cellvit_ssl.models.base import ChannelAdaptiveViT
from cellvit_ssl.models.vit import VisionTransformer, resample_grid

_log = logging.getLogger(__name__)
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_WRAPPERS = ("teacher", "model", "state_dict", "backbone")
_PREFIXES = ("module.", "teacher.", "backbone.", "_orig_mod.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        loaded: Backbone keys taken from the checkpoint.
        missing: Backbone keys the checkpoint did not provide (left as initialised).
        unexpected: Checkpoint keys the backbone has no place for (ignored).
        new: Keys of the channel-adaptive wrapper outside the backbone (e.g. hierarchical
            attention's cross-channel blocks), which a DINOv2 checkpoint never has.
        adapted: Keys whose tensors were reshaped to fit, with ``"old shape -> new shape"``
            (position-embedding grid, patch size, input channels).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """Patch-embedding kernels ``(D, c, p, p)`` adapted to ``in_chans`` input channels.

    The kernels are summed over their input channels (the grey kernel: a grey image gives
    what the RGB model gave for the same grey in all three channels). With more than one
    target channel each gets the grey kernel divided by ``in_chans``: fluorescence channels
    have nothing to do with R, G or B, so none is tied to one of them, and an image whose
    channels are all equal gives the response of the grey model.
    """
    c = weight.shape[1]
    if in_chans == c:
        return weight
    grey = weight.sum(dim=1, keepdim=True)
    return grey.expand(-1, in_chans, -1, -1) / in_chans if in_chans > 1 else grey


def resample_patch_kernel(weight: Tensor, patch_size: int) -> Tensor:
    """Patch-embedding kernels ``(D, c, p, p)`` resampled to ``patch_size`` (FlexiViT's PI-resize).

    The new kernel is the least-squares solution of ``<resize(x), w_new> = <x, w>`` for
    patches ``x`` (bilinear ``resize``), so a checkpoint trained with 14-px patches gives the
    same patch embeddings on images upsampled by 16/14 with 16-px patches.
    """
    old = weight.shape[-1]
    if old == patch_size:
        return weight
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resize = F.interpolate(basis, size=(patch_size, patch_size), mode="bilinear", align_corners=False)
    resize = resize.reshape(old * old, patch_size * patch_size)  # row i: resize of basis patch i
    solve = torch.linalg.pinv(resize)  # (new², old²): least-squares w_new for resize @ w_new = w
    flat = weight.reshape(-1, old * old).double()
    return (flat @ solve.T).reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


def _unwrap(state: Mapping) -> dict[str, Tensor]:
    for key in _WRAPPERS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            return _unwrap(inner)
    out = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    # A training checkpoint: keep the (teacher's) backbone, drop heads stored beside it. Until
    # nothing changes, as wrappers nest (cellvit_ssl's teacher.backbone.backbone.*).
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if any(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
                changed = True
    return {_unchunk(k): v for k, v in out.items()}


def _unchunk(key: str) -> str:
    """``blocks.<chunk>.<i>.rest`` → ``blocks.<i>.rest`` (DINOv2 keeps the global block index)."""
    match = _CHUNKED.match(key)
    return f"blocks.{match[1]}.{match[2]}" if match else key


def load_mapping(path: Path, name: str, missing_hint: str = "") -> Mapping:
    """A ``weights_only`` load of a file that must hold a mapping (a state dict or a checkpoint).

    Args:
        path: The file.
        name: How errors name it (e.g. ``"distill.teacher='t.pt'"``).
        missing_hint: Appended to the error for a missing file (e.g. the config key).

    Raises:
        CheckpointError: If the file is missing, unreadable, or not a mapping.
    """
    if not path.is_file():
        raise CheckpointError(f"{name} does not exist{missing_hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors come in many types
        raise CheckpointError(f"{name} could not be read: {exc}") from exc
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{name} holds a {type(payload).__name__}, expected a state dict")
    return payload


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a local DINOv2-layout checkpoint (``weights_only`` load) into a flat state dict.

    Raises:
        CheckpointError: If the file is missing, unreadable, or holds no ViT weights.
    """
    path = Path(path).expanduser()
    payload = load_mapping(path, f"pretrained checkpoint {str(path)!r}", " (model.pretrained)")
    state = _unwrap(payload)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(
            f"pretrained checkpoint {str(path)!r} is not a DINOv2-layout ViT: it has no "
            f"'patch_embed.proj.weight' / 'pos_embed' (first keys: {sorted(state)[:5]})"
        )
    return state


def checkpoint_filter(state_dict: Mapping[str, Tensor], backbone: VisionTransformer) -> dict[str, Tensor]:
    """Make a DINOv2-layout state dict fit ``backbone`` (see the module docstring).

    Keys the backbone does not have are kept as they are, so the caller can report them.

    Raises:
        CheckpointError: When a tensor cannot be made to fit (other width, patch size or
            a non-square position grid), naming the key and both shapes.
    """
    state = _unwrap(dict(state_dict))
    target = backbone.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed" and key in target:
            value = _resample_pos_embed(value, backbone)
        elif key == "patch_embed.proj.weight" and key in target:
            want = target[key].shape
            if value.shape[0] != want[0] or value.ndim != 4 or value.shape[2] != value.shape[3]:
                raise CheckpointError(
                    f"checkpoint key 'patch_embed.proj.weight' has shape {tuple(value.shape)}, the model "
                    f"needs {tuple(want)} (embed_dim, in_chans, patch, patch): check model.arch / model.embed_dim"
                )
            value = adapt_input_conv(resample_patch_kernel(value, want[-1]), want[1])
        elif key == "mask_token" and key in target and value.numel() == target[key].numel():
            value = value.reshape(target[key].shape)
        if key in target and value.shape != target[key].shape:
            raise CheckpointError(
                f"checkpoint key {key!r} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(target[key].shape)}: the checkpoint is for another architecture"
            )
        out[key] = value
    return out


def _resample_pos_embed(value: Tensor, backbone: VisionTransformer) -> Tensor:
    n = value.shape[1] - 1
    side = math.isqrt(n)
    if value.ndim != 3 or side * side != n:
        raise CheckpointError(
            f"checkpoint key 'pos_embed' has shape {tuple(value.shape)}; expected (1, 1 + g*g, D) with a square grid"
        )
    if value.shape[-1] != backbone.embed_dim:
        raise CheckpointError(
            f"checkpoint key 'pos_embed' has width {value.shape[-1]}, the model's embed_dim is {backbone.embed_dim}"
        )
    # antialias: a 518-px checkpoint shrinks to a much smaller grid
    patch = resample_grid(value[:, 1:], (side, side), backbone.native_grid, antialias=True)
    return torch.cat([value[:, :1], patch], dim=1)


def load_pretrained(
    model: ChannelAdaptiveViT | VisionTransformer,
    source: str | Path | Mapping[str, Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load DINOv2 weights into a model's backbone.

    Args:
        model: Any channel-adaptive variant (its ``backbone`` is loaded) or a bare ViT.
        source: A local checkpoint file or an already-loaded state dict.
        strict: Raise when backbone keys are missing from the checkpoint or checkpoint keys
            are unexpected; otherwise warn, naming them.

    Returns:
        A :class:`LoadReport` naming loaded, missing, unexpected and wrapper-only keys.

    Raises:
        CheckpointError: On a file that cannot be read or does not fit, or (strict) on
            missing or unexpected keys.
    """
    name = str(source) if isinstance(source, (str, Path)) else "state dict"
    state = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    backbone = model.backbone if isinstance(model, ChannelAdaptiveViT) else model
    try:
        filtered = checkpoint_filter(state, backbone)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    target = backbone.state_dict()
    report = LoadReport(
        loaded=sorted(k for k in filtered if k in target),
        missing=sorted(k for k in target if k not in filtered),
        unexpected=sorted(k for k in filtered if k not in target),
    )
    originals = _unwrap(state)
    report.adapted = {
        k: f"{tuple(originals[k].shape)} -> {tuple(filtered[k].shape)}"
        for k in report.loaded
        if k in originals and originals[k].shape != filtered[k].shape
    }
    if isinstance(model, ChannelAdaptiveViT):
        report.new = sorted(k for k in model.state_dict() if not k.startswith("backbone."))
    problems = []
    if report.missing:
        problems.append(f"missing keys {_names(report.missing)}")
    if report.unexpected:
        problems.append(f"unexpected keys {_names(report.unexpected)}")
    if problems and strict:
        raise CheckpointError(
            f"{name} does not fit the model: {'; '.join(problems)} "
            "(check model.arch, model.num_register_tokens, model.ffn_layer, model.layerscale_init, "
            "or set model.pretrained_strict=false to load what fits)"
        )
    if problems:
        warnings.warn(f"{name}: loaded {len(report.loaded)} tensors; {'; '.join(problems)}", stacklevel=2)
    backbone.load_state_dict({k: filtered[k] for k in report.loaded}, strict=False)
    _log.info("%s: loaded %d tensors into the backbone; adapted %s; new (not in the checkpoint) %d tensors",
              name, len(report.loaded), report.adapted or "none", len(report.new))
    return report


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"
