"""Transformer layers of the DINOv2 family: attention, FFNs, LayerScale, stochastic depth.

Parameter names follow the official DINOv2 layout (``attn.qkv``, ``attn.proj``, ``mlp.fc1`` /
``mlp.fc2`` or ``mlp.w12`` / ``mlp.w3``, ``ls1.gamma``) so published checkpoints map onto them.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellvit_ssl.config import AttnBackend, FfnLayer

#: DINOv2's name for the fused SwiGLU, accepted as ``swiglu``.
_FFN_SPELLINGS = {"swiglufused": "swiglu"}


@functools.lru_cache(maxsize=1)
def xformers_ops():
    """The ``xformers.ops`` module, or None when xformers is not installed (probed once)."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def resolve_attn_backend(name: str) -> str:
    """Check an attention backend name; fall back to SDPA, with a warning, without xformers.

    Raises:
        ValueError: On an unknown name.
    """
    try:
        name = AttnBackend(name).value
    except ValueError:
        raise ValueError(f"attention backend {name!r}; expected one of {[b.value for b in AttnBackend]}") from None
    if name == "xformers" and xformers_ops() is None:
        warnings.warn("attn_backend='xformers' asked for but xformers is not installed; using torch SDPA",
                      stacklevel=3)
        return "sdpa"
    return name


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (DINOv2's ``ls1`` / ``ls2``)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention.

    Runs on :func:`torch.nn.functional.scaled_dot_product_attention`. With ``backend="xformers"``
    it uses ``xformers.ops.memory_efficient_attention`` for CUDA inputs without a mask (and SDPA
    otherwise, so masked or CPU calls always work).

    Args:
        dim: Token width.
        num_heads: Attention heads; must divide ``dim``.
        qkv_bias: Bias on the qkv projection.
        backend: ``"sdpa"`` or ``"xformers"`` (see :func:`resolve_attn_backend`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attend over the tokens of ``x (B, L, D)``.

        Args:
            x: Tokens.
            attn_mask: Optional SDPA mask broadcastable to ``(B, heads, L, L)``; boolean True =
                may attend.
        """
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        if self.backend == "xformers" and attn_mask is None and x.is_cuda:
            q, k, v = qkv.unbind(2)  # (B, L, H, Dh): xformers' layout
            out = xformers_ops().memory_efficient_attention(q, k, v)
            return self.proj(out.reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP (DINOv2's ``mlp.fc1`` / ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (DINOv2's ``mlp.w12`` / ``mlp.w3``): ``w3(silu(a) * b)``, ``[a, b] = w12(x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def build_ffn(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    """The feed-forward layer ``kind`` for tokens of width ``dim``.

    ``mlp`` is the ViT MLP; ``swiglu`` is DINOv2's fused SwiGLU (hidden width 2/3 of the MLP's,
    rounded up to a multiple of 8; DINOv2 calls it ``swiglufused``).

    Raises:
        ValueError: On an unknown kind.
    """
    hidden = int(dim * mlp_ratio)
    try:
        kind = FfnLayer(_FFN_SPELLINGS.get(str(kind), str(kind)))
    except ValueError:
        raise ValueError(f"ffn layer {kind!r}; expected one of {[k.value for k in FfnLayer]}") from None
    if kind == FfnLayer.mlp:
        return Mlp(dim, hidden)
    return SwiGLUFFN(dim, (int(hidden * 2 / 3) + 7) // 8 * 8)
