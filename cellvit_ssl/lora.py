"""LoRA adapters (peft) on a channel-adaptive backbone, with q and v apart despite the fused qkv.

Our attention computes q, k and v with one ``nn.Linear`` (``attn.qkv``, DINOv2's layout), while
LoRA as published adapts the query and value projections only. peft adapts whole ``nn.Linear``
modules, so before the adapters are injected every ``attn.qkv`` is replaced by a
:class:`SplitQKV`: three ``nn.Linear`` (``q``, ``k``, ``v``) holding exact copies of the fused
weight's thirds, whose outputs are concatenated in the fused order. The model computes the same
function (bit for bit on CPU; the matmul is split in three), and peft then sees ``q``, ``k``
and ``v`` as the separate layers it knows how to adapt, merge and unmerge. After merging, the
split projections are fused back (:meth:`LoRA.unload`), so a merged model has the original key
layout and loads wherever a pre-trained backbone does.

Targets (:class:`LoRASpec`): ``qv`` adapts ``q`` and ``v`` of every attention (the LoRA
paper's choice); ``all`` adapts every linear layer of the transformer blocks (``q``, ``k``,
``v``, ``proj`` and the MLP's). Hierarchical attention's cross-channel blocks count as
transformer blocks. Everything else of the backbone is frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cellvit_ssl.errors import CheckpointError, ConfigError
from cellvit_ssl.models.layers import Attention

#: Values of :attr:`LoRASpec.target`.
TARGETS = ("qv", "all")


@dataclass(frozen=True)
class LoRASpec:
    """Where and how big the adapters are.

    Attributes:
        rank: Rank ``r`` of each low-rank update ``B·A``.
        alpha: Scale: the update is multiplied by ``alpha / rank``.
        dropout: Dropout on the adapter's input while training.
        target: ``qv`` (query and value projections) or ``all`` (every linear layer of the
            transformer blocks).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = "qv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", str(getattr(self.target, "value", self.target)))
        if self.target not in TARGETS:
            raise ConfigError(f"finetune.lora.target={self.target!r}; expected one of {list(TARGETS)}")
        if int(self.rank) < 1:
            raise ConfigError(f"finetune.lora.rank={self.rank}; expected >= 1")
        if not self.alpha > 0:
            raise ConfigError(f"finetune.lora.alpha={self.alpha}; expected > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"finetune.lora.dropout={self.dropout}; expected 0 <= dropout < 1")

    def to_dict(self) -> dict:
        return asdict(self)


class SplitQKV(nn.Module):
    """The fused ``qkv`` projection as three ``nn.Linear`` layers ``q``, ``k``, ``v``.

    ``forward(x)`` is ``cat([q(x), k(x), v(x)], -1)``, the fused layer's output.

    Args:
        fused: The attention's ``nn.Linear(dim, 3 * dim)``; its weights are copied.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv projection has 3 * dim outputs, got {fused.out_features}")
        width = fused.out_features // 3
        bias = fused.bias is not None
        device, dtype = fused.weight.device, fused.weight.dtype
        self.q, self.k, self.v = (nn.Linear(fused.in_features, width, bias=bias, device=device, dtype=dtype)
                                  for _ in range(3))
        with torch.no_grad():
            for i, part in enumerate((self.q, self.k, self.v)):
                part.weight.copy_(fused.weight[i * width:(i + 1) * width])
                if bias:
                    part.bias.copy_(fused.bias[i * width:(i + 1) * width])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    def fused(self) -> nn.Linear:
        """One ``nn.Linear`` with the three projections stacked (q, k, v) as the attention expects."""
        parts = (self.q, self.k, self.v)
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise RuntimeError("unload the LoRA layers (merge them) before fusing q, k and v")
        out = nn.Linear(self.q.in_features, 3 * self.q.out_features, bias=self.q.bias is not None,
                        device=self.q.weight.device, dtype=self.q.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([p.weight for p in parts]))
            if out.bias is not None:
                out.bias.copy_(torch.cat([p.bias for p in parts]))
        return out


def fused_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of a split, peft-wrapped backbone in the original layout.

    Adapter entries (``.lora_``) are dropped, peft's ``.base_layer.`` level is removed and the
    ``qkv.q`` / ``qkv.k`` / ``qkv.v`` weights and biases are stacked into ``qkv``.
    """
    plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in plain.items():
        head, _, leaf = key.rpartition(".")
        stem, _, which = head.rpartition(".")
        if which in ("q", "k", "v") and stem.endswith(".qkv"):
            parts.setdefault(f"{stem}.{leaf}", {})[which] = value
        else:
            out[key] = value
    for key, qkv in parts.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def _attentions(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def split_qkv(model: nn.Module) -> int:
    """Replace every attention's fused ``qkv`` by a :class:`SplitQKV` (in place); returns how many."""
    count = 0
    for attn in _attentions(model):
        if isinstance(attn.qkv, nn.Linear):
            attn.qkv = SplitQKV(attn.qkv)
            count += 1
    return count


def fuse_qkv(model: nn.Module) -> int:
    """Undo :func:`split_qkv` (in place); returns how many projections were fused."""
    count = 0
    for attn in _attentions(model):
        if isinstance(attn.qkv, SplitQKV):
            attn.qkv = attn.qkv.fused()
            count += 1
    return count


def target_names(model: nn.Module, target: str) -> list[str]:
    """Full names of the linear layers of ``model`` (split with :func:`split_qkv`) a target adapts."""
    blocks = model.transformer_blocks()
    inside = {id(m) for block in blocks for m in block.modules()}
    names = []
    for name, module in model.named_modules():
        if id(module) not in inside or not isinstance(module, nn.Linear):
            continue
        if target == "all" or name.endswith((".qkv.q", ".qkv.v")):
            names.append(name)
    return names


class LoRA:
    """peft LoRA adapters injected into a backbone's transformer blocks.

    The backbone is changed in place: its ``qkv`` projections are split (:func:`split_qkv`) and
    its target layers become peft ``LoraLayer`` s; every backbone parameter but the adapters'
    is frozen.

    Args:
        backbone: A :class:`~cellvit_ssl.models.base.ChannelAdaptiveViT`.
        spec: Rank, alpha, dropout and target.

    Examples:
        >>> from cellvit_ssl.config import load_config
        >>> from cellvit_ssl.models import build_model
        >>> cfg = load_config(None, ["model.arch=custom", "model.embed_dim=32", "model.depth=2",
        ...     "model.num_heads=2", "model.patch_size=8", "model.img_size=32"])
        >>> net = build_model(cfg.model, ["nucleus", "protein"])
        >>> lora = LoRA(net, LoRASpec(rank=4, target="qv"))
        >>> sorted({n.split(".")[-3] for n, p in net.named_parameters() if p.requires_grad})
        ['lora_A', 'lora_B']
    """

    def __init__(self, backbone: nn.Module, spec: LoRASpec) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        self.backbone = backbone
        self.spec = spec
        split_qkv(backbone)
        names = target_names(backbone, spec.target)
        if not names:
            raise ConfigError(f"the model has no linear layers for finetune.lora.target={spec.target!r}")
        config = LoraConfig(r=int(spec.rank), lora_alpha=float(spec.alpha), lora_dropout=float(spec.dropout),
                            target_modules=names, bias="none")
        # LoraModel injects the adapters into `backbone` in place and keeps a handle for merging.
        self._tuner = LoraModel(backbone, config, "default")

    @property
    def merged(self) -> bool:
        """True while the adapters are added into the base weights."""
        from peft.tuners.lora import LoraLayer

        return any(m.merged for m in self.backbone.modules() if isinstance(m, LoraLayer))

    def merge(self) -> None:
        """Add ``B·A · alpha / rank`` into every adapted weight (inference without the extra matmuls)."""
        if not self.merged:
            self._tuner.merge_adapter()

    def unmerge(self) -> None:
        """Subtract the merged updates again (the adapters act separately)."""
        if self.merged:
            self._tuner.unmerge_adapter()

    def unload(self) -> nn.Module:
        """Merge, drop the peft layers and fuse ``q, k, v`` back: the backbone in its original layout."""
        if self.merged:  # the base weights already hold the updates
            self._tuner.unload()
        else:
            self._tuner.merge_and_unload()
        fuse_qkv(self.backbone)
        return self.backbone

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights with the updates added, in the original layout (the model is not changed).

        What :meth:`unload` would leave, without unloading: a state dict that loads into a
        freshly built backbone of the pre-trained checkpoint's config.
        """
        from peft.tuners.lora import LoraLayer

        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        if not self.merged:
            for name, module in self.backbone.named_modules():
                if isinstance(module, LoraLayer):
                    key = f"{name}.base_layer.weight"
                    state[key] = state[key] + module.get_delta_weight("default").to(state[key].dtype)
        return fused_state_dict(state)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapters' parameters (the trainable part of the backbone)."""
        return [p for n, p in self.backbone.named_parameters() if ".lora_" in n]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' weights alone (peft's ``get_peft_model_state_dict``), on the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.backbone).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "classifier") -> None:
        """Load adapter weights written by :meth:`state_dict`.

        Raises:
            CheckpointError: If keys are missing or unexpected (another target or model).
        """
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.backbone, state)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{source}: the LoRA adapters do not fit the model (missing {missing[:3]}, "
                                  f"unexpected {list(result.unexpected_keys)[:3]})")
