"""DINOv2-style Vision Transformer backbone.

Parameter names follow the official DINOv2 layout (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ``norm``, ...) so that
published checkpoints map onto it with few renames. Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Backbone sizes by name: (embed_dim, depth, num_heads).
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1536, 40, 24),
}


@dataclass(frozen=True)
class ViTSpec:
    """Everything needed to build a :class:`VisionTransformer`."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 1
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layerscale_init: float | None = 1e-5
    num_register_tokens: int = 0
    qkv_bias: bool = True


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C, H, W)`` → ``(B, h·w, D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


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
    """Multi-head self-attention on SDPA; ``attn_mask`` is passed through to SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP (DINOv2's ``mlp.fc1`` / ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, spec: ViTSpec, drop_path: float) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, spec.num_heads, spec.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))
        init = spec.layerscale_init
        self.ls1 = LayerScale(dim, init) if init is not None else nn.Identity()
        self.ls2 = LayerScale(dim, init) if init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), attn_mask)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """DINOv2-family ViT returning CLS, register and patch tokens.

    Args:
        spec: Architecture (sizes, patch size, native image size, input channels, ...).

    Examples:
        >>> vit = VisionTransformer(ViTSpec(embed_dim=32, depth=2, num_heads=2, patch_size=8,
        ...                                 img_size=32))
        >>> out = vit.forward_features(torch.randn(2, 1, 32, 32))
        >>> out["x_norm_clstoken"].shape, out["x_norm_patchtokens"].shape
        (torch.Size([2, 32]), torch.Size([2, 16, 32]))
    """

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.embed_dim
        self.embed_dim = dim
        self.patch_size = spec.patch_size
        self.num_register_tokens = spec.num_register_tokens
        self.patch_embed = PatchEmbed(spec.patch_size, spec.in_chans, dim)
        grid = spec.img_size // spec.patch_size
        self.native_grid = (grid, grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, spec.num_register_tokens, dim))
            if spec.num_register_tokens
            else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        rates = torch.linspace(0, spec.drop_path_rate, spec.depth).tolist()
        self.blocks = nn.ModuleList(Block(spec, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embedding (1, 1 + h·w, D) resampled to a patch grid of size ``grid``.

        At the native grid this returns the stored embedding unchanged.
        """
        if grid == self.native_grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        gh, gw = self.native_grid
        patch_pos = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos.float(), size=grid, mode="bicubic", align_corners=False
        ).to(self.pos_embed.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed ``x`` and add CLS, position embedding and register tokens.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            masks: Optional boolean ``(B, h·w)``; True patches are replaced by the mask token.

        Returns:
            Tokens ``(B, 1 + R + h·w, D)`` and the patch grid ``(h, w)``.
        """
        tokens, grid = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_encoding(grid)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens, grid

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """Run the ViT and split the normalised output into CLS, register and patch tokens."""
        tokens, _ = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        r = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1:r],
            "x_norm_patchtokens": tokens[:, r:],
        }

    def forward(self, x: Tensor) -> Tensor:
        """Return the CLS embedding ``(B, D)``."""
        return self.forward_features(x)["x_norm_clstoken"]


def build_vit(
    arch: str,
    *,
    patch_size: int,
    img_size: int,
    in_chans: int = 1,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    **kwargs: object,
) -> VisionTransformer:
    """Build a ViT by size name (``vit_small`` ...) or ``custom`` with explicit sizes."""
    if arch == "custom":
        if None in (embed_dim, depth, num_heads):
            raise ValueError("arch='custom' needs embed_dim, depth and num_heads")
        dims = (embed_dim, depth, num_heads)
    elif arch in ARCHS:
        dims = ARCHS[arch]
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)} or 'custom'")
    if img_size % patch_size:
        raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
    spec = ViTSpec(
        embed_dim=dims[0],
        depth=dims[1],
        num_heads=dims[2],
        patch_size=patch_size,
        img_size=img_size,
        in_chans=in_chans,
        **kwargs,  # type: ignore[arg-type]
    )
    return VisionTransformer(spec)

