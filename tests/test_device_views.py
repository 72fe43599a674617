"""Device views (GPUMultiCrop) against the CPU transform, one op at a time, on CPU tensors.

Each test switches on one op of the CPU transform (gamma, blur, Gaussian / Poisson noise,
standardisation with contrast / brightness, channel drop with protected channels, the bag of
channels) with everything else off and every crop the whole tile (tile side = view side, crop
scale 1, so both paths cut identity crops), makes many views with both paths, reduces each view
to a statistic that carries the op's random parameters (a level, a spread, a kept-channel
pattern), and compares the two samples with two-sample KS or chi-square tests (fixed seeds,
p-value floor 1e-3). Each test also shows that it rejects the device path with a wrong setting.
Geometry (crops, flips, rotations) and contrast / brightness alone are in tests/test_gpu_views.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms.v2 import functional as TF

from cellvit_ssl.channels import PAD_CHANNEL_ID
from cellvit_ssl.config import load_config
from cellvit_ssl.data.collate import collate_channels
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.gpu_views import GPUMultiCrop, gaussian_blur_per_channel
from cellvit_ssl.transforms import MultichannelDINOTransform

S = 16  # tile side = view side
N = 1200  # calls per path
P_FLOOR = 1e-3
CHANNELS = ["nucleus", "microtubules", "er", "protein"]
ALL_OFF = [
    f"views.global_crop_size={S}", f"views.local_crop_size={S}", "views.n_local_views=1", "model.patch_size=8",
    "views.global_crop_scale=[1.0,1.0]", "views.local_crop_scale=[1.0,1.0]",
    "views.hflip_prob=0", "views.vflip_prob=0", "views.rot90=false", "views.gamma=0", "views.blur_prob=[0,0,0]",
    "views.noise=none", "views.standardize=false", "views.jitter_prob=0", "views.channel_drop_prob=0",
]


def only(*overrides: str):
    return load_config(None, [f"data.channels=[{','.join(CHANNELS)}]", *ALL_OFF, *overrides]).views


def cpu_views(cfg, tile: torch.Tensor, n: int = N, seed: int = 0) -> list[torch.Tensor]:
    """Per view slot (global 1, global 2, local), the stacked views of ``n`` calls: ``(n, C, S, S)``."""
    torch.manual_seed(seed)
    transform = MultichannelDINOTransform(cfg, CHANNELS[: tile.shape[0]])
    calls = [transform(tile) for _ in range(n)]
    return [torch.stack(slot) for slot in zip(*calls)]


def device_views(cfg, tile: torch.Tensor, n: int = N, seed: int = 1) -> list[torch.Tensor]:
    crops = GPUMultiCrop(cfg, CHANNELS[: tile.shape[0]])
    return crops(tile.expand(n, *tile.shape).contiguous(), generator=torch.Generator().manual_seed(seed))


def constant_tile(levels) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1).expand(-1, S, S).contiguous()


def ks(a, b) -> float:
    return stats.ks_2samp(np.asarray(a), np.asarray(b)).pvalue


def rate_close(k_a: int, k_b: int, n: int) -> bool:
    """Two binomial counts of ``n`` trials agree (two-proportion z-test at the p-value floor)."""
    p = (k_a + k_b) / (2 * n)
    if p in (0.0, 1.0):
        return k_a == k_b
    z = abs(k_a - k_b) / n / np.sqrt(2 * p * (1 - p) / n)
    return 2 * stats.norm.sf(z) > P_FLOOR


# ----- gamma ---------------------------------------------------------------------------------


def test_identity_settings_make_identity_views_on_both_paths():
    tile = torch.rand(3, S, S)
    for views in (cpu_views(only(), tile, n=3), device_views(only(), tile, n=3)):
        for v in views:
            torch.testing.assert_close(v, tile.expand_as(v))


LEVELS = [0.2, 0.5, 0.8]


@pytest.mark.parametrize("gamma", [0.5])
def test_gamma_matches_cpu(gamma):
    cfg = only(f"views.gamma={gamma}", "views.jitter_prob=0.7", "views.brightness=0", "views.contrast=0")
    tile = constant_tile(LEVELS)
    cpu = torch.cat(cpu_views(cfg, tile))[:, :, 0, 0]  # (3N, C) levels
    dev = torch.cat(device_views(cfg, tile))[:, :, 0, 0]
    wrong = torch.cat(device_views(only("views.gamma=0.3", "views.jitter_prob=0.7"), tile))[:, :, 0, 0]
    for c in range(3):
        assert ks(cpu[:, c], dev[:, c]) > P_FLOOR, c
        assert ks(cpu[:, c], wrong[:, c]) < P_FLOOR, c
    # one coin per view: a view is gamma-corrected in every channel or in none
    untouched = (dev - torch.tensor(LEVELS)).abs() < 1e-6
    assert (untouched.all(1) | ~untouched.any(1)).all()
    assert rate_close(int(untouched.all(1).sum()), int(((cpu - torch.tensor(LEVELS)).abs() < 1e-6).all(1).sum()),
                      len(dev))
    # exponents drawn per channel: log-exponents of two channels are uncorrelated
    log_g = torch.log(dev[~untouched.any(1)]) / torch.log(torch.tensor(LEVELS))
    assert abs(np.corrcoef(torch.log(log_g).T.numpy())[0, 1]) < 0.1


# ----- blur ----------------------------------------------------------------------------------


def impulse_tile(c: int = 2) -> torch.Tensor:
    tile = torch.zeros(c, S, S)
    tile[:, S // 2, S // 2] = 1.0
    return tile


@pytest.mark.parametrize(("size", "sigma"), [(16, [0.3, 0.9, 1.7, 2.0]), (5, [0.2, 0.8, 1.5, 2.0]),
                                             (24, [0.1, 0.5, 1.2, 3.0])])
def test_blur_is_torchvision_gaussian_blur_with_each_channels_own_kernel(size, sigma):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, size, size, generator=g)
    sig = torch.tensor(sigma).expand(3, 4).contiguous()
    apply = torch.tensor([[True, True, False, True]] * 3)
    got = gaussian_blur_per_channel(x, sig, apply, max(sigma))
    for i in range(3):
        for c in range(4):
            if not apply[i, c]:
                assert torch.equal(got[i, c], x[i, c])
                continue
            s = float(sig[i, c])
            k = min(2 * int(np.ceil(3 * s)) + 1, 2 * ((size - 1) // 2) + 1)  # the CPU transform's kernel size
            ref = TF.gaussian_blur(x[i, c : c + 1], [k, k], [s, s])[0]
            torch.testing.assert_close(got[i, c], ref, atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def blurred():
    settings = ("views.blur_prob=[0.7,0.2,0.5]", "views.blur_sigma=[0.1,2.0]")
    tile = impulse_tile()
    centre = lambda views: [v[:, :, S // 2, S // 2] for v in views]  # noqa: E731  (1 when not blurred)
    return {"cpu": centre(cpu_views(only(*settings), tile)), "device": centre(device_views(only(*settings), tile)),
            "wrong": centre(device_views(only("views.blur_prob=[0.7,0.2,0.5]", "views.blur_sigma=[0.1,1.0]"), tile))}


@pytest.mark.parametrize(("slot", "p"), [(0, 0.7), (1, 0.2), (2, 0.5)])
def test_blur_probability_per_view_and_channel_matches_cpu(blurred, slot, p):
    cpu, dev = blurred["cpu"][slot] < 1 - 1e-6, blurred["device"][slot] < 1 - 1e-6
    for c in range(2):
        assert rate_close(int(cpu[:, c].sum()), int(dev[:, c].sum()), N), (slot, c)
        assert abs(dev[:, c].float().mean().item() - p) < 4 * np.sqrt(p * (1 - p) / N)
    # a coin per channel: the two channels of a view are blurred independently
    both = (dev[:, 0] & dev[:, 1]).float().mean().item()
    assert abs(both - p * p) < 4 * np.sqrt(p * p * (1 - p * p) / N)


def test_blur_sigma_matches_cpu(blurred):
    # The impulse's centre after blurring is the squared centre tap: a monotone function of sigma.
    cpu, dev, wrong = (torch.cat(blurred[k]).flatten() for k in ("cpu", "device", "wrong"))
    cpu, dev, wrong = cpu[cpu < 1 - 1e-6], dev[dev < 1 - 1e-6], wrong[wrong < 1 - 1e-6]
    assert ks(cpu, dev) > P_FLOOR
    assert ks(cpu, wrong) < P_FLOOR


# ----- noise ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "poisson"])
def test_noise_matches_cpu(kind):
    level = ("views.noise_std=[0.02,0.2]", "views.noise_photons=[5,500]")
    wrong_level = ("views.noise_std=[0.02,0.1]", "views.noise_photons=[5,100]")
    cfg = only(f"views.noise={kind}", "views.noise_prob=0.6", *level)
    tile = constant_tile(LEVELS)

    def spread(views):
        v = torch.cat(views)  # (3N, C, S, S)
        return v.std(dim=(-2, -1)), v.mean(dim=(-2, -1))

    (cpu_sd, cpu_mean), (dev_sd, dev_mean) = spread(cpu_views(cfg, tile)), spread(device_views(cfg, tile))
    wrong_sd, _ = spread(device_views(only(f"views.noise={kind}", "views.noise_prob=0.6", *wrong_level), tile))
    for c in range(3):
        assert ks(cpu_sd[:, c], dev_sd[:, c]) > P_FLOOR, c
        assert ks(cpu_mean[:, c], dev_mean[:, c]) > P_FLOOR, c
        assert ks(cpu_sd[:, c], wrong_sd[:, c]) < P_FLOOR, c
    # one coin per view: noise in every channel or in none, at the configured rate
    clean = dev_sd < 1e-7
    assert (clean.all(1) | ~clean.any(1)).all()
    assert rate_close(int(clean.all(1).sum()), int((cpu_sd < 1e-7).all(1).sum()), len(clean))
    # the level is drawn per channel
    noisy = ~clean.any(1)
    rel = dev_sd[noisy] if kind == "gaussian" else dev_sd[noisy] ** 2 / torch.tensor(LEVELS)  # s or 1 / photons
    assert abs(np.corrcoef(rel.T.numpy())[0, 1]) < 0.1


# ----- standardisation, then contrast / brightness -------------------------------------------


def test_standardize_then_jitter_matches_cpu():
    cfg = only("views.standardize=true", "views.jitter_prob=0.8", "views.brightness=0.3", "views.contrast=0.4")
    tile = torch.rand(3, S, S, generator=torch.Generator().manual_seed(0)) * torch.tensor(LEVELS).view(3, 1, 1)

    def moments(views):
        v = torch.cat(views)
        return v.mean(dim=(-2, -1)), v.std(dim=(-2, -1), unbiased=False)

    (cpu_m, cpu_s), (dev_m, dev_s) = moments(cpu_views(cfg, tile)), moments(device_views(cfg, tile))
    wrong_m, wrong_s = moments(device_views(only("views.standardize=false", "views.jitter_prob=0.8",
                                                 "views.brightness=0.3", "views.contrast=0.4"), tile))
    for c in range(3):
        assert ks(cpu_m[:, c], dev_m[:, c]) > P_FLOOR and ks(cpu_s[:, c], dev_s[:, c]) > P_FLOOR, c
        assert ks(cpu_s[:, c], wrong_s[:, c]) < P_FLOOR, c
    # un-jittered views are exactly standardised
    plain = torch.cat(device_views(only("views.standardize=true"), tile, n=4))
    torch.testing.assert_close(plain.mean(dim=(-2, -1)), torch.zeros(12, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.std(dim=(-2, -1), unbiased=False), torch.ones(12, 3), atol=1e-4, rtol=0)


# ----- channel drop --------------------------------------------------------------------------


def kept_patterns(views) -> np.ndarray:
    kept = torch.cat(views)[:, :, 0, 0] != 0  # (3N, C)
    return (kept.long() * (2 ** torch.arange(kept.shape[1]))).sum(1).numpy()


@pytest.mark.parametrize(("p", "protected"), [(0.5, "[protein]"), (0.8, "[]")])
def test_channel_drop_matches_cpu(p, protected):
    cfg = only(f"views.channel_drop_prob={p}", f"views.protected_channels={protected}")
    tile = torch.ones(4, S, S)
    cpu, dev = kept_patterns(cpu_views(cfg, tile)), kept_patterns(device_views(cfg, tile))
    assert (dev > 0).all(), "never every channel"
    if protected == "[protein]":
        assert (dev & 8).all(), "never the protected channel"
    table = np.stack([np.bincount(cpu, minlength=16), np.bincount(dev, minlength=16)])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > P_FLOOR
    wrong = kept_patterns(device_views(only(f"views.channel_drop_prob={p - 0.15}",
                                            f"views.protected_channels={protected}"), tile))
    table = np.stack([np.bincount(cpu, minlength=16), np.bincount(wrong, minlength=16)])
    assert stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue < P_FLOOR


# ----- bag of channels -----------------------------------------------------------------------


def ramp_tile(height: int = 40, width: int = 56) -> torch.Tensor:
    """Channel 0: each pixel's column; channel 1: its row."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([cols, rows])


def extent_and_axis(views: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per view and channel: the crop's extent along the channel's ramp, and whether the ramp runs along columns."""
    s = views.shape[-1]
    m = s // 4
    along_cols = (views[..., :, s - 1 - m] - views[..., :, m]).mean(-1)
    along_rows = (views[..., s - 1 - m, :] - views[..., m, :]).mean(-1)
    extent = torch.round(torch.maximum(along_cols.abs(), along_rows.abs()) * s / (s - 1 - 2 * m))
    return extent.numpy(), (along_cols.abs() > along_rows.abs()).numpy()


@pytest.fixture(scope="module")
def bags():
    common = [*ALL_OFF, "views.global_crop_size=16", "views.local_crop_size=8", "views.n_local_views=2",
              "views.hflip_prob=0.5", "views.vflip_prob=0.5", "views.rot90=true", "views.gamma=1.0",
              "views.jitter_prob=0.6", "views.brightness=0", "views.contrast=0"]
    boc = load_config(None, [*common, "views.channel_mode=boc"]).views
    joint = load_config(None, common).views
    ramps, flat = ramp_tile(), torch.full((2, 40, 56), 0.5)
    return {"cpu": cpu_views(boc, ramps, n=800), "device": device_views(boc, ramps, n=800),
            "joint": device_views(joint, ramps, n=800),
            "cpu_flat": cpu_views(boc, flat, n=800), "device_flat": device_views(boc, flat, n=800),
            "joint_flat": device_views(joint, flat, n=800)}


def test_boc_cuts_each_channel_as_its_own_sample_like_cpu(bags):
    for slot in (0, 2):  # a global and a local view
        cpu, dev, joint = (extent_and_axis(bags[k][slot]) for k in ("cpu", "device", "joint"))
        for c in range(2):
            assert ks(cpu[0][:, c], dev[0][:, c]) > P_FLOOR, (slot, c)
        # own orientation per channel: the two ramps cross (as in the tile) half the time in a
        # bag of channels, always when the channels share one crop
        crossed = lambda axes: int((axes[:, 0] != axes[:, 1]).sum())  # noqa: E731
        assert rate_close(crossed(cpu[1]), crossed(dev[1]), len(dev[1]))
        assert abs(crossed(dev[1]) / len(dev[1]) - 0.5) < 0.08
        assert crossed(joint[1]) == len(joint[1])


def test_boc_draws_intensity_per_channel_sample_like_cpu(bags):
    # gamma moves a flat 0.5 channel unless its sample's coin spares it
    for slot in (0, 2):
        cpu, dev, joint = ((bags[k][slot][:, :, 0, 0] - 0.5).abs() > 1e-6
                           for k in ("cpu_flat", "device_flat", "joint_flat"))
        for c in range(2):
            assert rate_close(int(cpu[:, c].sum()), int(dev[:, c].sum()), len(dev)), (slot, c)
        same = lambda x: int((x[:, 0] == x[:, 1]).sum())  # noqa: E731
        assert rate_close(same(cpu), same(dev), len(dev))
        # a coin per channel sample (p = 0.6): the channels agree 0.6² + 0.4² = 52 % of the time;
        # one coin per view (joint) makes them agree always
        assert abs(same(dev) / len(dev) - 0.52) < 0.08
        assert same(joint) == len(joint)


# ----- everything at once, padding, errors ---------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "boc"])
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_every_option_at_once_is_accepted_and_finite(mode, noise):
    drop = ["views.channel_drop_prob=0.3", "views.protected_channels=[protein]"] if mode == "joint" else []
    cfg = load_config(None, ["views.global_crop_size=32", "views.local_crop_size=16", "views.n_local_views=3",
                             "model.patch_size=8", f"views.channel_mode={mode}", f"views.noise={noise}",
                             "views.standardize=true", *drop]).views
    views = GPUMultiCrop(cfg, CHANNELS)(torch.rand(5, 4, 48, 48), generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(5, 4, 32, 32)] * 2 + [(5, 4, 16, 16)] * 3
    assert all(torch.isfinite(v).all() for v in views)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of 2, 4 and 3 channels collated to 4 (mixed channel sets), and where the padding is."""
    items = [{"image": torch.rand(c, 24, 24) + 0.5, "channel_ids": torch.arange(c)} for c in (2, 4, 3)]
    batch = collate_channels(items)
    return batch["image"], batch["channel_ids"] == PAD_CHANNEL_ID


@pytest.mark.parametrize("mode", ["joint", "boc"])
def test_batch_padding_stays_zero_like_the_cpu_path(mode):
    """Collate pads after the CPU views and before the device views: both give zero planes."""
    cfg = load_config(None, ["views.global_crop_size=16", "views.local_crop_size=8", "views.n_local_views=1",
                             "model.patch_size=8", f"views.channel_mode={mode}"]).views
    images, padding = padded_batch()
    views = GPUMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(0), padding=padding)
    for v in views:
        assert (v[padding] == 0).all()
        assert (v[~padding].abs().amax((-2, -1)) > 0).all()


def test_channel_drop_keeps_a_real_channel_not_padding():
    cfg = load_config(None, ["views.global_crop_size=16", "views.local_crop_size=8", "views.n_local_views=1",
                             "model.patch_size=8", "views.channel_drop_prob=0.95"]).views
    images, padding = padded_batch()
    for seed in range(10):  # at p = 0.95 most views keep the one forced channel: always a real one
        for v in GPUMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(seed), padding=padding):
            assert all(v[i][~padding[i]].abs().amax((-2, -1)).gt(0).any() for i in range(3))


def test_config_errors_are_the_cpu_transforms():
    boc_drop = load_config(None, ["views.channel_drop_prob=0.5", "views.channel_mode=boc"]).views
    protect = load_config(None, ["views.channel_drop_prob=0.5", "views.protected_channels=[protein]"]).views
    for cfg, channels, match in ((boc_drop, CHANNELS, "views.channel_drop_prob"),
                                 (protect, ["nucleus", "er"], "protein"),
                                 (protect, None, "channels=data.channels")):
        for maker in (MultichannelDINOTransform, GPUMultiCrop):
            with pytest.raises(ConfigError, match=match):
                maker(cfg, channels)
