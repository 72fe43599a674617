"""The backbone against a reference implementation: timm's DINOv2 ViT with random weights.

Each test builds a tiny timm ``VisionTransformer`` configured like timm's
``vit_small_patch14_dinov2`` / ``vit_small_patch14_reg4_dinov2`` / ``vit_giant_patch14_dinov2``
(no download), writes its weights to a local ``.pth`` in the *official DINOv2 key layout*
(the inverse of timm's ``_convert_dinov2``), loads that file into our model through
:func:`cellvit_ssl.models.pretrained.load_pretrained` and compares the normalised CLS,
register and patch tokens.

Position embeddings at other input sizes: timm resizes them to exactly the new grid with
antialiased bicubic interpolation (``resample_abs_pos_embed``: ``size=``, ``antialias=True``),
which our ``interpolate_offset=0, interpolate_antialias=True`` reproduces; that is also what
the official DINOv2 code does for its register models. The official DINOv2 models without
registers resize by the scale factor ``(grid + 0.1) / native_grid`` without antialiasing
(our ``interpolate_offset=0.1``); timm does not implement that, so that case is checked against
timm run at the target size with the position embedding resized the DINOv2 way by
:func:`dinov2_resize` below (written from DINOv2's description, independent of our code).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from cellvit_ssl.models.channels import BagOfChannelsViT
from cellvit_ssl.models.pretrained import load_pretrained
from cellvit_ssl.models.vit import VisionTransformer, ViTSpec

DIM, DEPTH, HEADS, PATCH, NATIVE = 32, 2, 2, 14, 56  # native grid 4x4
ATOL = 1e-5


def timm_dinov2(registers: int = 0, swiglu: bool = False, img_size: int = NATIVE, in_chans: int = 3,
                seed: int = 0) -> TimmViT:
    """A tiny timm DINOv2 ViT (LayerScale, optional registers / SwiGLU) with every weight randomised."""
    torch.manual_seed(seed)
    kw = dict(
        img_size=img_size, patch_size=PATCH, in_chans=in_chans, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        init_values=1e-5, num_classes=0, dynamic_img_size=True,
    )
    if registers:  # as timm's *_reg4_dinov2: neither CLS nor registers carry a position embedding
        kw.update(reg_tokens=registers, no_embed_class=True)
    if swiglu:  # as timm's vit_giant_patch14_dinov2: fused w12 packed in fc1, hidden = DINOv2's rounding
        hidden = (int(DIM * 4 * 2 / 3) + 7) // 8 * 8
        kw.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * hidden / DIM)
    model = TimmViT(**kw).eval()
    with torch.no_grad():  # far from the init (LayerScale 1e-5 would hide the blocks)
        for name, p in model.named_parameters():
            scale_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("gamma") else 0.2) + (1.0 if scale_weight else 0.0))
    return model


def to_dinov2_layout(model: TimmViT, chunks: int = 0, seed: int = 1) -> dict[str, torch.Tensor]:
    """timm's state dict written in the official DINOv2 key layout (inverse of ``_convert_dinov2``).

    Args:
        model: A timm ViT built by :func:`timm_dinov2`.
        chunks: Write block keys FSDP-chunked as DINOv2 does (``blocks.<chunk>.<i>.*``).
        seed: For the CLS slot of the position embedding of register models, which timm folds
            into ``cls_token`` (any value works; a random one checks the split is undone).
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if model.num_reg_tokens:
        cls_pos = torch.randn(1, 1, DIM, generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    out["mask_token"] = torch.zeros(1, DIM)
    swiglu = isinstance(model.blocks[0].mlp, GluMlp)
    per_chunk = -(-DEPTH // chunks) if chunks else 0
    for key, value in sd.items():
        if swiglu:  # DINOv2's fused SwiGLU is mlp.w12 / mlp.w3, timm's packed one mlp.fc1 / mlp.fc2
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        if chunks and (m := re.match(r"^blocks\.(\d+)\.(.+)$", key)):
            key = f"blocks.{int(m[1]) // per_chunk}.{m[1]}.{m[2]}"
        out[key] = value
    return out


def dinov2_resize(patch_pos: torch.Tensor, grid: tuple[int, int], offset: float = 0.1) -> torch.Tensor:
    """DINOv2's position-embedding resize for its models without registers.

    Bicubic, no antialiasing, by the scale factor ``(new + offset) / old`` per axis, with the
    output size implied by that factor (DINOv2 asserts it is the new grid).
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = int(n**0.5)
    square = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + offset) / side, (grid[1] + offset) / side)
    out = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    assert tuple(out.shape[-2:]) == tuple(grid)
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)


def our_vit(registers: int = 0, swiglu: bool = False, img_size: int = NATIVE, in_chans: int = 3,
            offset: float = 0.0, antialias: bool = True) -> VisionTransformer:
    spec = ViTSpec(
        embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, img_size=img_size, in_chans=in_chans,
        num_register_tokens=registers, ffn_layer="swiglu" if swiglu else "mlp",
        interpolate_offset=offset, interpolate_antialias=antialias,
    )
    torch.manual_seed(123)  # a different init from the reference, so nothing matches by accident
    return VisionTransformer(spec).eval()


def load_from_file(model, state: dict[str, torch.Tensor], tmp_path) -> None:
    """Load ``state`` into ``model`` the way a user does: a local .pth through ``load_pretrained``."""
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(state, path)
    report = load_pretrained(model, path)
    assert report.missing == [] and report.unexpected == []


def reference_tokens(model: TimmViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = model.forward_features(x)
    r = model.num_prefix_tokens
    return {"x_norm_clstoken": out[:, 0], "x_norm_regtokens": out[:, 1:r], "x_norm_patchtokens": out[:, r:]}


def assert_same_tokens(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert ours[key].shape == ref[key].shape, key
        torch.testing.assert_close(ours[key], ref[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


SIZES = [(56, 56), (84, 84), (28, 28), (42, 98)]  # native, larger, smaller, rectangular (grids 4², 6², 2², 3x7)


@pytest.mark.parametrize("registers, swiglu, chunks", [(0, False, 0), (4, False, 2), (0, True, 2), (4, True, 0)])
def test_tokens_match_timm_dinov2_at_every_input_size(tmp_path, registers, swiglu, chunks):
    ref = timm_dinov2(registers=registers, swiglu=swiglu)
    state = to_dinov2_layout(ref, chunks=chunks)
    if chunks:
        assert "blocks.1.1.attn.qkv.weight" in state and "blocks.1.attn.qkv.weight" not in state
    ours = our_vit(registers=registers, swiglu=swiglu, offset=0.0, antialias=True)
    load_from_file(ours, state, tmp_path)
    torch.manual_seed(7)
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(2, 3, h, w)
            assert_same_tokens(ours.forward_features(x), reference_tokens(ref, x))


def test_the_layout_helper_round_trips_through_timms_own_dinov2_filter():
    """``to_dinov2_layout`` is the inverse of timm's mapping: timm's filter gives its weights back."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    for registers, swiglu in [(0, False), (4, True)]:
        ref = timm_dinov2(registers=registers, swiglu=swiglu)
        back = checkpoint_filter_fn(to_dinov2_layout(ref), ref)
        want = ref.state_dict()
        assert sorted(back) == sorted(want)
        for key, value in want.items():
            torch.testing.assert_close(back[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_offset_resize_matches_dinov2(tmp_path, registers):
    """``interpolate_offset=0.1`` (no antialias): DINOv2's resize for its models without registers."""
    base = timm_dinov2(registers=registers)
    ours = our_vit(registers=registers, offset=0.1, antialias=False)
    load_from_file(ours, to_dinov2_layout(base), tmp_path)
    n_pos_prefix = 0 if registers else 1  # timm's register models keep no CLS slot in pos_embed
    torch.manual_seed(7)
    with torch.no_grad():
        for h, w in SIZES[1:]:
            grid = (h // PATCH, w // PATCH)
            pos = base.pos_embed
            resized = torch.cat([pos[:, :n_pos_prefix], dinov2_resize(pos[:, n_pos_prefix:], grid)], dim=1)
            ref = timm_dinov2(registers=registers, img_size=(h, w))
            ref.load_state_dict({**base.state_dict(), "pos_embed": resized})
            x = torch.randn(2, 3, h, w)
            assert_same_tokens(ours.forward_features(x), reference_tokens(ref, x))


def test_checkpoint_grid_resampled_at_load_matches_timm_at_that_size(tmp_path):
    """A checkpoint for a 4x4 grid loaded into a 6x6-native model, as a 518-px DINOv2 into a 224-px one."""
    ref = timm_dinov2(registers=4)
    ours = our_vit(registers=4, img_size=84)
    load_from_file(ours, to_dinov2_layout(ref), tmp_path)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert_same_tokens(ours.forward_features(x), reference_tokens(ref, x))


@pytest.mark.parametrize("size", [(56, 56), (42, 98)])
def test_grey_bag_of_channels_matches_rgb_reference_on_grey_rgb(tmp_path, size):
    """The RGB kernels folded to 1 channel: a grey channel gives what the RGB model gives for grey RGB."""
    ref = timm_dinov2(registers=4)
    boc = BagOfChannelsViT(our_vit(registers=4, in_chans=1), ["nucleus", "protein"]).eval()
    load_from_file(boc, to_dinov2_layout(ref), tmp_path)
    grey = torch.rand(2, 2, *size)
    ids = torch.tensor([[0, 3]] * 2)
    with torch.no_grad():
        feats = boc.forward_features(grey, ids)  # one sample per (image, channel)
        rgb = grey.reshape(4, 1, *size).expand(-1, 3, -1, -1)
        assert_same_tokens(feats, reference_tokens(ref, rgb))
        emb = boc.embed(grey, ids)
    torch.testing.assert_close(emb, reference_tokens(ref, rgb)["x_norm_clstoken"].reshape(2, 2 * DIM),
                               atol=ATOL, rtol=0)


def test_intermediate_layers_match_timm_forward_intermediates(tmp_path):
    ref = timm_dinov2(registers=4, swiglu=True)
    ours = our_vit(registers=4, swiglu=True)
    load_from_file(ours, to_dinov2_layout(ref), tmp_path)
    x = torch.randn(2, 3, 42, 98)
    with torch.no_grad():
        mine = ours.get_intermediate_layers(x, n=[0, 1], reshape=True, return_class_token=True)
        theirs = ref.forward_intermediates(x, indices=[0, 1], norm=True, return_prefix_tokens=True,
                                           intermediates_only=True)
    assert len(mine) == len(theirs) == 2
    for (patches, cls), (ref_patches, ref_prefix) in zip(mine, theirs):
        assert patches.shape == ref_patches.shape == (2, DIM, 3, 7)
        torch.testing.assert_close(patches, ref_patches, atol=ATOL, rtol=0)
        torch.testing.assert_close(cls, ref_prefix[:, 0], atol=ATOL, rtol=0)
