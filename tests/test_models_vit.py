"""The DINOv2-family ViT backbone: position embeddings, FFNs, crops lists, intermediate layers."""

import warnings

import pytest
import torch

from cellvit_ssl.models.layers import build_ffn, xformers_ops
from cellvit_ssl.models.vit import VisionTransformer, ViTSpec, build_vit, resample_grid


def tiny_vit(**kw):
    torch.manual_seed(0)
    spec = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32, layerscale_init=0.5)
    return VisionTransformer(ViTSpec(**{**spec, **kw})).eval()


@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_pos_embed_is_identity_at_native_size_and_resizes_rectangles(offset):
    vit = tiny_vit(interpolate_offset=offset)
    assert vit.interpolate_pos_encoding((4, 4)) is vit.pos_embed
    # resizing to the native grid through the resampler is the identity too
    same = resample_grid(vit.pos_embed[:, 1:], (4, 4), (4, 4), offset=offset)
    torch.testing.assert_close(same, vit.pos_embed[:, 1:])
    rect = vit.interpolate_pos_encoding((3, 7))
    assert rect.shape == (1, 1 + 21, 32)
    torch.testing.assert_close(rect[:, :1], vit.pos_embed[:, :1])
    out = vit.forward_features(torch.randn(2, 1, 24, 56))
    assert out["x_norm_patchtokens"].shape == (2, 21, 32)


def test_pos_embed_resize_keeps_rows_and_columns_apart_and_offset_differs():
    torch.manual_seed(0)
    grid = torch.randn(1, 6 * 6, 8)
    up = resample_grid(grid, (6, 6), (12, 12))
    # a field that varies along x only still varies along x only, on a rectangle
    ramp = torch.arange(6.0).repeat(6).reshape(1, 36, 1)
    rect = resample_grid(ramp, (6, 6), (3, 10)).reshape(3, 10)
    torch.testing.assert_close(rect, rect[:1].expand(3, 10))
    assert (rect[0].diff() > 0).all()
    offset = resample_grid(grid, (6, 6), (12, 12), offset=0.1)
    assert offset.shape == up.shape and (offset - up).abs().max() > 1e-3


def test_list_of_crops_equals_separate_forwards():
    vit = tiny_vit(num_register_tokens=2)
    a, b = torch.randn(2, 1, 32, 32), torch.randn(3, 1, 16, 24)
    outs = vit.forward_features([a, b])
    for crop, out in zip((a, b), outs):
        ref = vit.forward_features(crop)
        for key in ref:
            torch.testing.assert_close(out[key], ref[key])
    assert outs[1]["x_norm_regtokens"].shape == (3, 2, 32)


def test_intermediate_layers_end_with_the_final_features():
    vit = tiny_vit()
    x = torch.randn(2, 1, 32, 40)
    feats = vit.forward_features(x)
    layers = vit.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(layers) == 2 and layers[-1][0].shape == (2, 32, 4, 5)
    torch.testing.assert_close(layers[-1][1], feats["x_norm_clstoken"])
    torch.testing.assert_close(layers[-1][0].flatten(2).transpose(1, 2), feats["x_norm_patchtokens"])
    first = vit.get_intermediate_layers(x, n=[0])[0]
    assert (first - feats["x_norm_patchtokens"]).abs().max() > 1e-3


def test_mask_token_replaces_masked_patches_only():
    vit = tiny_vit()
    x = torch.randn(1, 1, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 5] = True
    tokens, _ = vit.prepare_tokens(x, masks)
    plain, _ = vit.prepare_tokens(x)
    pos = vit.pos_embed
    torch.testing.assert_close(tokens[0, 1 + 5], vit.mask_token[0] + pos[0, 1 + 5])
    keep = torch.ones(17, dtype=torch.bool)
    keep[6] = False
    torch.testing.assert_close(tokens[0, keep], plain[0, keep])


def test_swiglu_has_dinov2_widths_and_names():
    ffn = build_ffn("swiglu", 1536, 4.0)  # DINOv2 ViT-g/14: hidden 4096
    assert ffn.w12.weight.shape == (2 * 4096, 1536) and ffn.w3.weight.shape == (1536, 4096)
    vit = tiny_vit(ffn_layer="swiglu")
    assert "blocks.0.mlp.w12.weight" in vit.state_dict()
    assert torch.isfinite(vit(torch.randn(2, 1, 32, 32))).all()


def test_sizes_by_name_and_stochastic_depth():
    vit = build_vit("vit_small", patch_size=14, img_size=56)
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (384, 12, 6)
    deep = tiny_vit(drop_path_rate=0.9).train()
    x = torch.randn(8, 1, 32, 32)
    torch.manual_seed(1)
    a = deep(x)
    torch.manual_seed(2)
    assert (deep(x) - a).abs().max() > 1e-4  # branches dropped at random while training
    deep.eval()
    torch.testing.assert_close(deep(x), deep(x))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        deep(torch.randn(1, 1, 30, 32))


@pytest.mark.skipif(xformers_ops() is not None, reason="checks the fallback when xformers is absent")
def test_xformers_asked_for_without_it_falls_back_to_sdpa():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit = tiny_vit(attn_backend="xformers")
    assert any("xformers is not installed" in str(w.message) for w in caught)
    assert vit.blocks[0].attn.backend == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(xformers_ops() is None, reason="needs xformers")
def test_xformers_matches_sdpa_on_gpu():
    vit = tiny_vit(attn_backend="xformers").cuda()
    ref = tiny_vit().cuda()
    ref.load_state_dict(vit.state_dict())
    x = torch.randn(2, 1, 32, 32, device="cuda")
    torch.testing.assert_close(vit(x), ref(x), atol=1e-4, rtol=1e-3)
