"""Channel-adaptive variants: shapes, gradients, channel permutations, absent channels, BoC ≡ HA at init."""

import pytest
import torch

from cellvit_ssl.channels import VOCABULARY, channel_ids
from cellvit_ssl.config import load_config
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.models import build_model, sample_channel_subsets
from tests.conftest import TINY_OVERRIDES

FIVE = ["nucleus", "microtubules", "er", "protein", "rna"]


def tiny_model(variant, channels=FIVE, *extra, seed=0):
    # LayerScale 0.5, not 1e-5: with 2 blocks at 1e-5 a CLS token is nearly blind to the pixels
    cfg = load_config(None, TINY_OVERRIDES + [f"model.variant={variant}", "model.layerscale_init=0.5", *extra])
    torch.manual_seed(seed)
    return build_model(cfg.model, channels).eval()


def ids_for(channels, batch):
    return torch.tensor([channel_ids(channels)] * batch)


def randomise_channel_parts(model):
    """Give channel embeddings and cross-channel LayerScale non-zero values."""
    with torch.no_grad():
        model.channel_embed.normal_(std=0.5)
        for block in getattr(model, "cross_blocks", []):
            block.ls.gamma.fill_(0.5)


@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
@pytest.mark.parametrize("c", [1, 3, 4, 5])
def test_every_variant_runs_forward_backward(variant, c):
    channels = list(VOCABULARY[:c])
    model = tiny_model(variant, channels, "model.num_register_tokens=1").train()
    x, ids = torch.randn(2, c, 32, 32), ids_for(channels, 2)
    s, n = model.sample_shape(x, ids)
    masks = torch.zeros(s, n, dtype=torch.bool)
    masks[:, ::3] = True
    out = model.forward_features(x, ids, masks=masks)
    assert out["x_norm_clstoken"].shape == (s, model.embed_dim)
    assert out["x_norm_patchtokens"].shape == (s, n, model.embed_dim)
    (out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean()).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert grads["backbone.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["backbone.mask_token"].abs().sum() > 0  # the iBOT mask reached the tokens
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert model.embed(x, ids).shape == (2, model.output_dim)


def test_boc_permuted_channels_give_permuted_blocks():
    model = tiny_model("boc", FIVE, "model.pool_patch_tokens=true")
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    z = model.embed(x, ids)
    block = 2 * model.embed_dim
    assert z.shape == (2, 5 * block)
    perm = [3, 0, 4, 1, 2]
    torch.testing.assert_close(model.embed(x[:, perm], ids[:, perm]), z)
    moved = model.embed(x[:, perm], ids).reshape(2, 5, block)
    torch.testing.assert_close(moved, z.reshape(2, 5, block)[:, perm])


def test_boc_absent_channel_is_a_zero_block_and_changes_nothing_else():
    model = tiny_model("boc")
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    full = model.embed(x, ids).reshape(2, 5, -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 2] = False
    part = model.embed(x, ids, mask).reshape(2, 5, -1)
    assert torch.count_nonzero(part[0, 2]) == 0
    keep = mask.clone()
    torch.testing.assert_close(part[keep], full[keep])
    # the same image given without that channel at all: the same blocks
    x3 = x[:1, [0, 1, 3, 4]]
    torch.testing.assert_close(model.embed(x3, ids[:1, [0, 1, 3, 4]]), part[:1].flatten(1))


@pytest.mark.parametrize("variant", ["hierarchical", "channelvit"])
def test_joint_variants_are_permutation_invariant_and_see_channel_ids(variant):
    model = tiny_model(variant)
    randomise_channel_parts(model)
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    z = model.embed(x, ids)
    assert z.shape == (2, model.embed_dim)
    perm = [4, 2, 0, 3, 1]
    torch.testing.assert_close(model.embed(x[:, perm], ids[:, perm]), z, atol=1e-5, rtol=1e-4)
    only_ids = model.embed(x, ids[:, perm])
    assert (only_ids - z).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["hierarchical", "channelvit"])
def test_joint_variants_ignore_absent_channels(variant):
    model = tiny_model(variant)
    randomise_channel_parts(model)
    x, ids = torch.randn(3, 5, 32, 32), ids_for(FIVE, 3)
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    z = model.embed(x, ids, mask)
    noisy = x.clone()
    noisy[~mask] = 100.0  # whatever the absent channels hold
    torch.testing.assert_close(model.embed(noisy, ids, mask), z)
    # the same as giving each image only its present channels
    for b in range(3):
        alone = model.embed(x[b : b + 1, mask[b]], ids[b : b + 1, mask[b]])
        torch.testing.assert_close(alone, z[b : b + 1], atol=1e-5, rtol=1e-4)
    # and an image's embedding does depend on its present channels
    assert (model.embed(x[:1, [0, 2]], ids[:1, [0, 2]]) - z[:1]).abs().max() > 1e-3


def test_hierarchical_at_init_equals_boc_per_channel_features():
    boc = tiny_model("boc", FIVE, "model.num_register_tokens=2", seed=0)
    ha = tiny_model("hierarchical", FIVE, "model.num_register_tokens=2", seed=1)
    ha.backbone.load_state_dict(boc.backbone.state_dict())
    assert torch.count_nonzero(ha.channel_embed) == 0
    assert all(torch.count_nonzero(b.ls.gamma) == 0 for b in ha.cross_blocks)
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, [0, 3]] = False
    ref = boc.forward_features(x, ids, mask)
    got = ha.per_channel_features(x, ids, mask)
    torch.testing.assert_close(got["x_norm_clstoken"][mask], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["x_norm_patchtokens"][mask], ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-4)
    # pooled image features are the mean of the BoC channel features
    pooled = ha.forward_features(x, ids, mask)["x_norm_clstoken"]
    torch.testing.assert_close(pooled[1], ref["x_norm_clstoken"][5:].mean(0), atol=1e-5, rtol=1e-4)
    # once cross-channel attention is on, channels talk to each other and the features change
    randomise_channel_parts(ha)
    moved = ha.per_channel_features(x, ids, mask)["x_norm_clstoken"][mask]
    assert (moved - ref["x_norm_clstoken"]).abs().max() > 1e-3


def test_fixed_reorders_channels_by_id_and_zero_fills_absent():
    model = tiny_model("fixed")
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    perm = [2, 4, 0, 1, 3]
    z = model.embed(x, ids)
    torch.testing.assert_close(model.embed(x[:, perm], ids[:, perm]), z)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 1] = False
    zeroed = x.clone()
    zeroed[:, 1] = 0
    torch.testing.assert_close(model.embed(x, ids, mask), model.embed(zeroed, ids))
    assert (model.embed(x, ids, mask) - z).abs().max() > 1e-4


def test_channel_sampling_draws_counts_uniformly_and_never_empties():
    gen = torch.Generator().manual_seed(0)
    present = torch.ones(4000, 5, dtype=torch.bool)
    present[:2000, 4] = False  # half the images have 4 channels
    sampled = sample_channel_subsets(present, generator=gen)
    assert not (sampled & ~present).any()
    counts = sampled.sum(1)
    assert counts.min() >= 1
    for rows, c in ((slice(0, 2000), 4), (slice(2000, None), 5)):
        freq = torch.bincount(counts[rows], minlength=c + 1)[1:].float() / 2000
        assert freq.numel() == c and (freq - 1 / c).abs().max() < 0.04  # k uniform in 1..C
    # every channel equally likely given k: channel 0 is kept in about (C+1)/(2C) of draws
    assert abs(sampled[2000:, 0].float().mean() - 0.6) < 0.04
    with pytest.raises(ValueError, match="no channel"):
        sample_channel_subsets(torch.tensor([[True, False], [False, False]]))


def test_a_model_refuses_an_image_without_channels_and_unknown_ids():
    model = tiny_model("hierarchical")
    x, ids = torch.randn(2, 5, 32, 32), ids_for(FIVE, 2)
    with pytest.raises(ValueError, match=r"images \[1\]"):
        model.embed(x, ids, torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="not among the model's channels"):
        model.embed(x, torch.tensor([[0, 1, 2, 3, 9]] * 2))


@pytest.mark.parametrize(
    "override, key",
    [("model.ffn_layer=geglu", "model.ffn_layer"), ("model.attn_backend=flash", "model.attn_backend"),
     ("model.arch=vit_huge", "model.arch")],
)
def test_bad_model_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):  # refused when the config is loaded, before anything is built
        load_config(None, TINY_OVERRIDES + [override])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fixed", "boc", "hierarchical", "channelvit"])
def test_variants_run_in_bf16_on_gpu(variant):
    model = tiny_model(variant).cuda().train()
    x, ids = torch.randn(2, 5, 32, 32, device="cuda"), ids_for(FIVE, 2).cuda()
    mask = sample_channel_subsets(torch.ones(2, 5, dtype=torch.bool, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.forward_features(x, ids, mask)
    out["x_norm_clstoken"].float().square().mean().backward()
    assert torch.isfinite(out["x_norm_patchtokens"].float()).all()
