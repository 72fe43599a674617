"""DINOv2-style Vision Transformer backbone.

Parameter names follow the official DINOv2 layout (``cls_token``, ``pos_embed``,
``register_tokens``, ``mask_token``, ``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.ls1.gamma``, ``norm``, ...) so published checkpoints map onto it with few renames
(see :mod:`cellvit_ssl.models.pretrained`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellvit_ssl.models.layers import (
    Attention,
    DropPath,
    LayerScale,
    build_ffn,
    resolve_attn_backend,
)

#: Backbone sizes by DINOv2's names: (embed_dim, depth, num_heads), MLP ratio 4. ``vit_giant2`` is
#: DINOv2's ViT-g/14 (64-wide heads; its official weights use ``ffn_layer="swiglu"``). The original
#: ViT-g (1408 wide, 40 deep, 16 heads, MLP ratio 48/11) has no name here: build it as ``custom``
#: with ``mlp_ratio=4.3636``.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


@dataclass(frozen=True)
class ViTSpec:
    """Everything needed to build a :class:`VisionTransformer`.

    Attributes:
        interpolate_offset: 0 resizes the position embedding to exactly the patch grid; a
            positive value resizes by the scale factor ``(grid + offset) / native_grid``
            instead. To reproduce a DINOv2 checkpoint's features at other input sizes use
            0.1 without antialiasing for DINOv2's models without registers, 0 with
            antialiasing for its register models (timm does the latter for all of them).
        interpolate_antialias: Antialias the bicubic position-embedding resize. torch's
            antialiased bicubic kernel differs from the plain one also when enlarging.
        ffn_layer: ``mlp`` or ``swiglu`` (see :func:`cellvit_ssl.models.layers.build_ffn`).
        attn_backend: ``sdpa`` (default) or ``xformers`` (only used when installed, on CUDA).
    """

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
    ffn_layer: str = "mlp"
    attn_backend: str = "sdpa"
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False


def resample_grid(
    patch_pos: Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    offset: float = 0.0,
    antialias: bool = False,
) -> Tensor:
    """Bicubic resize of patch position embeddings ``(1, gh·gw, D)`` to ``new_grid``.

    Args:
        patch_pos: Position embeddings of the patch tokens only (no CLS), row-major.
        old_grid: Their grid ``(gh, gw)``.
        new_grid: Target grid ``(h, w)``; rectangles are fine.
        offset: 0 = resize to exactly ``new_grid``; > 0 = DINOv2's scale-factor resize
            ``(new + offset) / old``.
        antialias: Antialias the resize (useful when shrinking a lot).

    Returns:
        ``(1, h·w, D)``; the input itself when the grids are equal.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return patch_pos
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    if offset:
        scale = ((new_grid[0] + offset) / old_grid[0], (new_grid[1] + offset) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=antialias, align_corners=False)
    if tuple(grid.shape[-2:]) != new_grid:
        raise ValueError(f"position-embedding resize gave grid {tuple(grid.shape[-2:])}, expected {new_grid}")
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(patch_pos.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C, H, W)`` → ``(B, h·w, D)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth."""

    def __init__(self, spec: ViTSpec, drop_path: float) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, spec.num_heads, spec.qkv_bias, spec.attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = build_ffn(spec.ffn_layer, dim, spec.mlp_ratio)
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
        spec = ViTSpec(**{**spec.__dict__, "attn_backend": resolve_attn_backend(spec.attn_backend)})
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

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, which precede the patch tokens."""
        return 1 + self.num_register_tokens

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an input of ``height x width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> Tensor:
        """Position embedding ``(1, 1 + h·w, D)`` resampled to the patch grid ``grid``.

        At the native grid this returns the stored embedding unchanged. The resize follows
        ``spec.interpolate_offset`` / ``spec.interpolate_antialias`` (see :class:`ViTSpec`).
        """
        grid = tuple(grid)
        if grid == self.native_grid:
            return self.pos_embed
        patch_pos = resample_grid(
            self.pos_embed[:, 1:], self.native_grid, grid,
            offset=self.spec.interpolate_offset, antialias=self.spec.interpolate_antialias,
        )
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def embed_patches(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens ``(B, h·w, D)`` of ``x``, True entries of ``masks`` replaced by the mask token.

        No position embedding is added.
        """
        tokens, grid = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks of shape {tuple(masks.shape)}, expected {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return tokens, grid

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Patch-embed ``x`` and add CLS, position embedding and register tokens.

        Args:
            x: Images ``(B, in_chans, H, W)``; H and W multiples of the patch size.
            masks: Optional boolean ``(B, h·w)``; True patches are replaced by the mask token.

        Returns:
            Tokens ``(B, 1 + R + h·w, D)`` and the patch grid ``(h, w)``.
        """
        tokens, grid = self.embed_patches(x, masks)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_encoding(grid)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens, grid

    def split_tokens(self, tokens: Tensor) -> dict[str, Tensor]:
        """Normalise a token sequence and split it into CLS, register and patch tokens."""
        tokens = self.norm(tokens)
        r = self.num_prefix_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1:r],
            "x_norm_patchtokens": tokens[:, r:],
        }

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Run the ViT and split the normalised output into CLS, register and patch tokens.

        Args:
            x: Images ``(B, in_chans, H, W)``, or a list of such batches of different sizes
                (e.g. global and local crops), which gives a list of outputs.
            masks: Boolean ``(B, h·w)`` iBOT masks (True = replaced by the mask token), or one
                per batch (or None) when ``x`` is a list.
        """
        if not isinstance(x, Tensor):
            crops = list(x)
            crop_masks = [None] * len(crops) if masks is None else list(masks)
            if len(crop_masks) != len(crops):
                raise ValueError(f"{len(crops)} crop batches but {len(crop_masks)} masks")
            return [self.forward_features(c, m) for c, m in zip(crops, crop_masks)]
        tokens, _ = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self.split_tokens(tokens)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens (and optionally CLS tokens) after some blocks, as in DINOv2.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            n: The last ``n`` blocks, or explicit block indices.
            reshape: Return patch tokens as feature maps ``(B, D, h, w)`` instead of ``(B, h·w, D)``.
            return_class_token: Return ``(patch_tokens, cls_token)`` pairs.
            norm: Apply the final norm to each output.

        Returns:
            A tuple with one entry per selected block, in block order.
        """
        depth = len(self.blocks)
        take = list(range(depth - n, depth)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in take if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {depth}")
        tokens, grid = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        r = self.num_prefix_tokens
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, r:] for o in outputs]
        if reshape:
            patches = [p.reshape(p.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)

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
    """Build a ViT by size name (``vit_small`` ...) or ``custom`` with explicit sizes.

    Extra keyword arguments are :class:`ViTSpec` fields (``ffn_layer``, ``num_register_tokens``, ...).
    """
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
