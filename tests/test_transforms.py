"""Multichannel DINO views: counts, sizes, per-channel ops, channel drop, BoC mode, seeds."""

import pytest
import torch

from cellvit_ssl import ConfigError, load_config
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.transforms import (
    MultichannelDINOTransform,
    PerChannelGamma,
    PerChannelGaussianBlur,
    PerChannelIntensityJitter,
    PerChannelNoise,
    RandomChannelDrop,
    _view,
)

CHANNELS = ["nucleus", "microtubules", "er", "protein", "rna"]
VIEWS = ["views.global_crop_size=32", "views.local_crop_size=16", "views.n_local_views=3"]


def views_cfg(*overrides, channels=CHANNELS):
    chans = "[" + ",".join(channels) + "]"
    return load_config(None, [f"data.channels={chans}", "model.patch_size=8", *VIEWS, *overrides]).views


def textured(c: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((c, size, size), generator=g)


@pytest.mark.parametrize("mode", ["joint", "boc"])
@pytest.mark.parametrize("c", [1, 3, 4, 5])
def test_views_have_configured_count_size_and_channels(mode, c):
    cfg = views_cfg(f"views.channel_mode={mode}", "views.noise=poisson")
    views = MultichannelDINOTransform(cfg)(textured(c))
    assert [tuple(v.shape) for v in views] == [(c, 32, 32)] * 2 + [(c, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_intensity_jitter_is_drawn_per_channel():
    # Channel 0 constant, channel 1 textured: each gets its own scale and shift, and the
    # constant channel never picks up texture from its neighbour.
    x = torch.stack([torch.full((16, 16), 0.5), textured(1, 16)[0]])
    jitter = PerChannelIntensityJitter(brightness=0.3, contrast=0.3, p=1.0)
    torch.manual_seed(0)
    const, tex_scale = [], []
    for _ in range(300):
        y = jitter(x)
        assert y[0].std() < 1e-6
        const.append(y[0, 0, 0].item())
        tex_scale.append((y[1].std() / x[1].std()).item())
    const, tex_scale = torch.tensor(const), torch.tensor(tex_scale)
    assert const.std() > 0.1 and tex_scale.std() > 0.1  # both channels are jittered
    r = torch.corrcoef(torch.stack([const, tex_scale]))[0, 1]
    assert abs(r) < 0.2  # ... independently


@pytest.mark.parametrize(
    "op",
    [PerChannelGamma(0.5, p=1.0), PerChannelGaussianBlur((0.5, 2.0), p=0.5),
     PerChannelNoise("gaussian", (0.01, 0.2), p=1.0), PerChannelNoise("poisson", photons=(5, 500), p=1.0)],
    ids=["gamma", "blur", "gaussian-noise", "poisson-noise"],
)
def test_intensity_ops_act_on_each_channel_on_its_own(op):
    # Two identical channels come out different: parameters are drawn per channel.
    x = textured(1, 24).expand(2, -1, -1).clone()
    torch.manual_seed(1)
    assert any(not torch.allclose(y[0], y[1]) for y in (op(x) for _ in range(10)))
    # A constant channel stays constant under gamma and blur (no mixing across channels).
    if isinstance(op, (PerChannelGamma, PerChannelGaussianBlur)):
        y = op(torch.stack([torch.full((24, 24), 0.3), x[0]]))
        assert y[0].std() < 1e-5


def test_full_view_keeps_a_constant_channel_constant():
    cfg = views_cfg("views.noise=none", "views.blur_prob=[1.0,1.0,1.0]", "views.channel_mode=joint")
    x = torch.cat([torch.full((1, 48, 48), 0.4), textured(2)])
    torch.manual_seed(0)
    for v in MultichannelDINOTransform(cfg)(x):
        assert v[0].std() < 1e-5 and v[1:].std() > 0.01


def test_standardize_gives_zero_mean_unit_variance_per_channel():
    cfg = views_cfg("views.standardize=true", "views.jitter_prob=0.0", "views.channel_mode=joint")
    x = textured(3) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1)
    for v in MultichannelDINOTransform(cfg)(x):
        torch.testing.assert_close(v.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(v.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_channel_drop_never_empties_and_never_drops_the_protected_channel():
    cfg = views_cfg("views.channel_mode=joint", "views.channel_drop_prob=0.9", "views.protected_channels=[protein]")
    t = MultichannelDINOTransform(cfg, channels=CHANNELS)
    x = textured(5) + 0.1
    torch.manual_seed(0)
    dropped_any = False
    for _ in range(40):
        for v in t(x):
            alive = v.flatten(1).abs().amax(dim=1) > 0
            assert alive[CHANNELS.index("protein")]
            dropped_any |= not alive.all()
    assert dropped_any


def test_channel_drop_without_protection_keeps_one_channel():
    drop = RandomChannelDrop(p=0.99)
    torch.manual_seed(0)
    kept = torch.stack([drop.keep_mask(4) for _ in range(500)])
    assert kept.any(dim=1).all()
    assert (kept.sum(dim=1) == 1).float().mean() > 0.9  # nearly always only the forced one


def test_channel_drop_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="views.protected_channels.*golgi"):
        views_cfg("views.protected_channels=[golgi]")
    cfg = views_cfg("views.channel_drop_prob=0.5", "views.protected_channels=[protein]")
    with pytest.raises(ConfigError, match="channels=data.channels"):
        MultichannelDINOTransform(cfg)
    with pytest.raises(ConfigError, match="views.channel_drop_prob"):
        MultichannelDINOTransform(views_cfg("views.channel_drop_prob=0.5", "views.channel_mode=boc"))
    with pytest.raises(ConfigError, match="views.channel_mode"):
        load_config(None, ["views.channel_mode=boc", "model.variant=hierarchical"])


def test_boc_mode_makes_each_channel_its_own_sample():
    cfg = views_cfg("views.channel_mode=boc")
    x = textured(4)
    torch.manual_seed(3)
    views = MultichannelDINOTransform(cfg)(x)
    # Replaying the RNG: channel c of every view is the 1-channel view pipeline on channel c alone.
    torch.manual_seed(3)
    blur = list(cfg.blur_prob)
    pipes = [_view(32, cfg.global_crop_scale, blur[0], cfg, None), _view(32, cfg.global_crop_scale, blur[1], cfg, None)]
    pipes += [_view(16, cfg.local_crop_scale, blur[2], cfg, None)] * 3
    for v, pipe in zip(views, pipes):
        for c in range(4):
            torch.testing.assert_close(v[c : c + 1], pipe(x[c : c + 1]))
    # Identical channels get different crops: the samples are independent.
    same = x[:1].expand(4, -1, -1).clone()
    v0 = MultichannelDINOTransform(cfg)(same)[0]
    assert not torch.allclose(v0[0], v0[1])
    # The boc model turns a batch of such views into B * C single-channel samples.
    model_cfg = load_config(None, ["model.arch=custom", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
                                   "model.patch_size=8", "model.img_size=32"]).model
    model = build_model(model_cfg, CHANNELS[:4])
    batch = torch.stack([views[0], views[0]])
    ids = torch.tensor([channel_ids(CHANNELS[:4])] * 2)
    assert model.sample_shape(batch, ids) == (8, 16)
    assert model.forward_features(batch, ids)["x_norm_clstoken"].shape == (8, 16)


@pytest.mark.parametrize("mode", ["joint", "boc"])
def test_same_seed_same_views(mode):
    t = MultichannelDINOTransform(views_cfg(f"views.channel_mode={mode}", "views.noise=poisson"))
    x = textured(3)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(t(x))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
