"""GPU-side multi-crop: shapes, exact ops, and the same view distribution as the CPU transform.

The distribution tests run both paths on a *probe tile* whose channel 0 holds each pixel's
column and channel 1 its row. Crop-resize is linear, so from any view the crop's box and the
flip / rotation applied can be read back, identically for both paths, and compared with
two-sample KS and chi-square tests (fixed seeds; p-value floors of 1e-3). Each test family
also checks that it rejects a deliberately wrong configuration, so the tests can fail.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from cellvit_ssl.config import load_config
from cellvit_ssl.errors import ConfigError
from cellvit_ssl.gpu_views import GPUMultiCrop, crop_resize, flip_rotate, jitter_params, sample_crop_boxes
from cellvit_ssl.transforms import MultichannelDINOTransform

H, W = 40, 56  # wider than 4:3, so the central-crop fallback is exercised too
N_CALLS = 1000
P_FLOOR = 1e-3
#: The ops after the geometry and the jitter off, so that views show their crop and orientation
#: (tests/test_device_views.py compares each of those ops on its own).
GEOMETRY_ONLY = ("views.gamma=0", "views.blur_prob=[0,0,0]", "views.noise=none", "views.standardize=false",
                 "views.channel_drop_prob=0", "views.channel_mode=joint")


def views_cfg(*overrides: str):
    base = ["views.global_crop_size=32", "views.local_crop_size=16", "views.n_local_views=4", "model.patch_size=8",
            *GEOMETRY_ONLY]
    return load_config(None, base + list(overrides)).views


def probe_tile() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([cols, rows])


def cpu_views(cfg, tile: torch.Tensor, n_calls: int = N_CALLS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    transform = MultichannelDINOTransform(cfg)
    glob, loc = [], []
    for _ in range(n_calls):
        views = transform(tile)
        glob += views[:2]
        loc += views[2:]
    return torch.stack(glob), torch.stack(loc)


def gpu_views(cfg, tile: torch.Tensor, n_calls: int = N_CALLS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    glob, loc = GPUMultiCrop(cfg).packed(tile.expand(n_calls, *tile.shape).contiguous(), generator=g)
    return glob.flatten(0, 1), loc.flatten(0, 1)


def read_probe(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Box (in tile pixels) and orientation code of probe-tile views ``(n, 2, s, s)``."""
    s = views.shape[-1]
    m = s // 4
    x, y = views[:, 0], views[:, 1]

    def change(ramp):
        along_cols = (ramp[:, :, s - 1 - m] - ramp[:, :, m]).mean(-1)
        along_rows = (ramp[:, s - 1 - m, :] - ramp[:, m, :]).mean(-1)
        return along_cols, along_rows

    x_c, x_r = change(x)
    y_c, y_r = change(y)
    x_on_cols = x_c.abs() > x_r.abs()
    dx = torch.where(x_on_cols, x_c, x_r)
    dy = torch.where(x_on_cols, y_r, y_c)
    stretch = s / (s - 1 - 2 * m)
    # Box sides are whole pixels and centres half pixels: rounding removes the small bias of
    # torchvision's antialiasing filter on the CPU path so both paths land on the same lattice.
    width, height = torch.round(dx.abs() * stretch), torch.round(dy.abs() * stretch)
    code = x_on_cols.long() * 4 + (dx > 0).long() * 2 + (dy > 0).long()
    return {
        "width": width.numpy(),
        "height": height.numpy(),
        "area": (width * height / (H * W)).numpy(),
        "log_aspect": torch.log(width / height).numpy(),
        "centre_x": (torch.round(2 * x.mean((-2, -1)) + 1) / 2).numpy(),
        "centre_y": (torch.round(2 * y.mean((-2, -1)) + 1) / 2).numpy(),
        "code": code.numpy(),
    }


def expected_codes(size: int, hflip: float, vflip: float, rot90: bool) -> np.ndarray:
    """Probability of each orientation code, enumerating the CPU transform's flip / rotation law."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
    ramp = torch.stack([cols, rows])
    probs = np.zeros(8)
    for h, v, k in itertools.product((0, 1), (0, 1), range(4) if rot90 else (0,)):
        p = (hflip if h else 1 - hflip) * (vflip if v else 1 - vflip) / (4 if rot90 else 1)
        img = ramp.flip(-1) if h else ramp
        img = img.flip(-2) if v else img
        img = torch.rot90(img, k, dims=(-2, -1))
        probs[read_probe(img[None])["code"][0]] += p
    return probs


def chi2_p(codes: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(codes, minlength=8).astype(float)
    keep = probs > 0
    assert counts[~keep].sum() == 0, f"impossible orientations seen: {counts}"
    return stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


# ----- shapes, devices, reproducibility ------------------------------------------------------


def test_shapes_dtype_device_and_order():
    cfg = views_cfg("views.n_local_views=3")
    images = torch.rand(5, 4, 48, 64)
    views = GPUMultiCrop(cfg)(images, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(5, 4, 32, 32)] * 2 + [(5, 4, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and v.device == images.device for v in views)
    # Views of tile b come from tile b: a tile of constant c gives views near c (jitter aside).
    flat = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 40, 40).contiguous()
    no_jitter = GPUMultiCrop(views_cfg("views.jitter_prob=0.0"))(flat)
    for v in no_jitter:
        torch.testing.assert_close(v, flat[:, :, :v.shape[-2], :v.shape[-1]])


def test_rejects_non_float_or_wrong_rank():
    crops = GPUMultiCrop(views_cfg())
    with pytest.raises(ValueError, match="floating-point tiles"):
        crops(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))
    with pytest.raises(ValueError, match="floating-point tiles"):
        crops(torch.rand(3, 40, 40))


def test_same_seed_same_views_and_new_draws_each_call():
    crops = GPUMultiCrop(views_cfg())
    images = torch.rand(6, 3, 48, 48)
    a = crops(images, generator=torch.Generator().manual_seed(7))
    b = crops(images, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g = torch.Generator().manual_seed(7)
    first, second = crops(images, generator=g), crops(images, generator=g)
    assert not torch.equal(first[0], second[0])
    other = crops(images, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a[2], other[2])


# ----- the batched ops are the CPU ops -----------------------------------------------------


def test_flip_rotate_matches_torch_ops_for_all_16_codes():
    x = torch.rand(16, 3, 8, 8)
    h, v, k = (torch.arange(16) % 2).bool(), (torch.arange(16) // 2 % 2).bool(), torch.arange(16) // 4
    out = flip_rotate(x, h, v, k)
    for i in range(16):
        ref = x[i].flip(-1) if h[i] else x[i]
        ref = ref.flip(-2) if v[i] else ref
        assert torch.equal(out[i], torch.rot90(ref, int(k[i]), dims=(-2, -1))), i


def test_crop_resize_matches_torchvision_resized_crop():
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([torch.sin(6 * cols) * torch.cos(4 * rows), cols, rows**2])
    cases = [((10, 2, 20, 13), 32), ((7, 9, 30, 30), 16), ((3, 5, 40, 50), 32), ((0, 0, 64, 64), 24)]
    for box, size in cases:
        got = crop_resize(img[None], torch.zeros(1, dtype=torch.long), torch.tensor([box], dtype=torch.float32),
                          size)[0]
        ref = TF.resized_crop(img, *box, [size, size], antialias=True)
        # Inside the outermost ring (where roi_align reads the neighbouring tile pixels instead of
        # repeating the crop's edge): exact when enlarging, a slightly different filter when shrinking.
        inner = (got - ref)[:, 2:-2, 2:-2].abs().max().item()
        assert inner < (1e-5 if box[2] <= size and box[3] <= size else 0.01), (box, size, inner)
        assert (got - ref).abs().mean().item() < 0.005


def test_probe_reads_back_the_sampled_boxes():
    g = torch.Generator().manual_seed(3)
    boxes = sample_crop_boxes(200, H, W, (0.05, 1.0), generator=g)
    views = crop_resize(probe_tile()[None], torch.zeros(200, dtype=torch.long), boxes, 16)
    got = read_probe(views)
    top, left, height, width = boxes.numpy().T
    np.testing.assert_allclose(got["width"], width, atol=0.05)
    np.testing.assert_allclose(got["height"], height, atol=0.05)
    np.testing.assert_allclose(got["centre_x"], left + width / 2, atol=0.05)
    np.testing.assert_allclose(got["centre_y"], top + height / 2, atol=0.05)


@pytest.mark.parametrize(("scale", "height", "width", "fallback", "min_share"), [
    ((0.9, 1.0), 40, 56, (0, 1, 40, 53), 0.2),  # wider than 4:3: a 40x53 central crop
    ((0.9, 1.0), 64, 30, (12, 0, 40, 30), 0.2),  # taller than 3:4: a 40x30 central crop
    ((0.05, 0.4), 40, 56, (0, 1, 40, 53), 0.0),
])
def test_crop_boxes_follow_torchvision_sampler(scale, height, width, fallback, min_share):
    n = 3000
    ours = sample_crop_boxes(n, height, width, scale, generator=torch.Generator().manual_seed(0))
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert torch.equal(ours, ours.round())
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(8, scale=scale)
    tile = torch.zeros(1, height, width)
    ref = torch.tensor([[p["top"], p["left"], p["height"], p["width"]] for p in
                        (rrc.make_params([tile]) for _ in range(n))], dtype=torch.float32)
    for col in range(4):
        assert stats.ks_2samp(ours[:, col].numpy(), ref[:, col].numpy()).pvalue > P_FLOOR, col
    # The central fallback after ten failed attempts (frequent for near-full-area crops of a
    # tile wider than 4:3) comes out as often as in torchvision.
    box = torch.tensor(fallback, dtype=torch.float32)
    share = lambda b: (b == box).all(1).float().mean().item()  # noqa: E731
    both = (share(ours) + share(ref)) / 2
    assert share(ref) >= min_share
    assert abs(share(ours) - share(ref)) <= 4 * np.sqrt(max(both * (1 - both), 1e-4) * 2 / n)


# ----- same distribution as the CPU transform ----------------------------------------------


@pytest.fixture(scope="module")
def geometry():
    cfg = views_cfg("views.jitter_prob=0.0", "views.hflip_prob=0.3", "views.vflip_prob=0.6")
    tile = probe_tile()
    cpu_g, cpu_l = cpu_views(cfg, tile)
    gpu_g, gpu_l = gpu_views(cfg, tile)
    wrong = views_cfg("views.jitter_prob=0.0", "views.hflip_prob=0.3", "views.vflip_prob=0.6",
                      "views.rot90=false", "views.local_crop_scale=[0.05,0.3]")
    wrong_g, wrong_l = gpu_views(wrong, tile, seed=2)
    return {
        "cfg": cfg,
        "cpu": {"global": read_probe(cpu_g), "local": read_probe(cpu_l)},
        "gpu": {"global": read_probe(gpu_g), "local": read_probe(gpu_l)},
        "wrong": {"global": read_probe(wrong_g), "local": read_probe(wrong_l)},
    }


@pytest.mark.parametrize("kind", ["global", "local"])
@pytest.mark.parametrize("stat", ["area", "log_aspect", "centre_x", "centre_y", "width", "height"])
def test_crop_distribution_matches_cpu(geometry, kind, stat):
    cpu, gpu = geometry["cpu"][kind][stat], geometry["gpu"][kind][stat]
    assert stats.ks_2samp(cpu, gpu).pvalue > P_FLOOR


def test_crop_area_follows_the_configured_scale(geometry):
    cfg = geometry["cfg"]
    for kind, (lo, hi) in (("global", cfg.global_crop_scale), ("local", cfg.local_crop_scale)):
        area = geometry["gpu"][kind]["area"]
        # Pixel rounding of w and h moves the area a little past the nominal range.
        assert area.min() > lo * 0.85 and area.max() < min(hi * 1.1, 1.0 + 1e-6)
        assert np.median(area) > lo and np.median(area) < hi


def test_crop_ratio_holds_for_both_view_makers():
    tile = probe_tile()
    square = views_cfg("views.jitter_prob=0.0", "views.crop_ratio=[1,1]")
    default = views_cfg("views.jitter_prob=0.0")
    for make in (cpu_views, gpu_views):
        for views in make(square, tile, n_calls=200):
            assert np.abs(read_probe(views)["log_aspect"]).max() < 0.05, make.__name__
        assert np.abs(read_probe(make(default, tile, n_calls=200)[0])["log_aspect"]).max() > 0.15, make.__name__


def test_crop_ratio_is_checked():
    with pytest.raises(ConfigError, match="views.crop_ratio"):
        views_cfg("views.crop_ratio=[1.2,1.0]")


def test_crop_test_detects_a_wrong_scale(geometry):
    assert stats.ks_2samp(geometry["cpu"]["local"]["area"], geometry["wrong"]["local"]["area"]).pvalue < P_FLOOR


def test_flip_and_rotation_frequencies_match(geometry):
    cfg = geometry["cfg"]
    for kind, size in (("global", cfg.global_crop_size), ("local", cfg.local_crop_size)):
        probs = expected_codes(size, cfg.hflip_prob, cfg.vflip_prob, cfg.rot90)
        assert chi2_p(geometry["cpu"][kind]["code"], probs) > P_FLOOR  # the harness reads the CPU law
        assert chi2_p(geometry["gpu"][kind]["code"], probs) > P_FLOOR
        cpu = np.bincount(geometry["cpu"][kind]["code"], minlength=8)
        gpu = np.bincount(geometry["gpu"][kind]["code"], minlength=8)
        assert stats.chi2_contingency(np.stack([cpu, gpu])).pvalue > P_FLOOR
    # views that are never rotated are caught
    assert chi2_p(geometry["wrong"]["global"]["code"], expected_codes(32, 0.3, 0.6, True)) < P_FLOOR


def test_flips_only_without_rot90():
    cfg = views_cfg("views.jitter_prob=0.0", "views.rot90=false", "views.hflip_prob=0.2", "views.vflip_prob=0.7")
    glob, _ = gpu_views(cfg, probe_tile(), n_calls=500)
    codes = read_probe(glob)["code"]
    probs = expected_codes(32, 0.2, 0.7, False)
    assert (probs > 0).sum() == 4
    assert chi2_p(codes, probs) > P_FLOOR


# ----- per-channel intensity jitter -----------------------------------------------------------


LEVELS = torch.tensor([0.2, 0.5, 0.8])


@pytest.fixture(scope="module")
def jitter():
    cfg = views_cfg("views.brightness=0.3", "views.contrast=0.4", "views.jitter_prob=0.7")
    tile = LEVELS.view(3, 1, 1).expand(3, H, W).contiguous()

    def level(views):
        out = torch.cat([v.mean((-2, -1)) for v in views])
        # Snap float noise of un-jittered views so both paths put that point mass at one value.
        return torch.where((out - LEVELS).abs() < 1e-5, LEVELS, out).numpy()

    wrong = views_cfg("views.brightness=0.3", "views.contrast=0.2", "views.jitter_prob=0.7")
    return {
        "cfg": cfg,
        "cpu": level(cpu_views(cfg, tile)),
        "gpu": level(gpu_views(cfg, tile)),
        "wrong": level(gpu_views(wrong, tile, seed=2)),
    }


def test_jittered_levels_match_cpu_per_channel(jitter):
    for c in range(3):
        assert stats.ks_2samp(jitter["cpu"][:, c], jitter["gpu"][:, c]).pvalue > P_FLOOR, c
    assert stats.ks_2samp(jitter["cpu"][:, 2], jitter["wrong"][:, 2]).pvalue < P_FLOOR


def test_jitter_moments_and_channel_independence(jitter):
    cfg, out = jitter["cfg"], jitter["gpu"]
    untouched = np.all(np.abs(out - LEVELS.numpy()) < 1e-5, axis=1)
    n = len(out)
    assert abs(untouched.mean() - (1 - cfg.jitter_prob)) < 4 * np.sqrt(0.21 / n)
    on = out[~untouched]
    for c, level in enumerate(LEVELS.tolist()):
        var = (level * cfg.contrast) ** 2 / 3 + cfg.brightness**2 / 3
        assert abs(on[:, c].mean() - level) < 4 * np.sqrt(var / len(on))
        assert abs(on[:, c].var() / var - 1) < 0.12
    corr = np.corrcoef(on.T)[np.triu_indices(3, 1)]
    assert np.abs(corr).max() < 0.08


def test_jitter_params_law():
    scale, shift = jitter_params(20000, 4, brightness=0.25, contrast=0.5, p=0.6,
                                 generator=torch.Generator().manual_seed(0))
    on = (shift != 0).any(1)
    assert torch.equal(on, (scale != 1).any(1))  # one coin per view
    assert abs(on.float().mean().item() - 0.6) < 0.015
    s, b = scale[on], shift[on]
    assert s.min() >= 0.5 and s.max() <= 1.5 and b.abs().max() <= 0.25
    for c in range(4):
        assert stats.kstest(s[:, c].numpy(), stats.uniform(0.5, 1.0).cdf).pvalue > P_FLOOR
        assert stats.kstest(b[:, c].numpy(), stats.uniform(-0.25, 0.5).cdf).pvalue > P_FLOOR
    corr = np.corrcoef(torch.cat([s, b], 1).T.numpy())[np.triu_indices(8, 1)]
    assert np.abs(corr).max() < 0.05


# ----- on a GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["joint", "boc"])
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_cuda_views_with_every_op_without_host_syncs(mode, noise):
    channels = ["nucleus", "microtubules", "er", "protein"]
    drop = ["views.channel_drop_prob=0.3", "views.protected_channels=[protein]"] if mode == "joint" else []
    cfg = load_config(None, ["views.global_crop_size=32", "views.local_crop_size=16", "views.n_local_views=4",
                             "model.patch_size=8", f"views.channel_mode={mode}", f"views.noise={noise}",
                             "views.standardize=true", *drop]).views
    crops = GPUMultiCrop(cfg, channels)
    images = torch.rand(8, 4, 48, 48, device="cuda")
    padding = torch.zeros(8, 4, dtype=torch.bool, device="cuda")
    padding[:2, 3] = True
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        views = crops(images, generator=g, padding=padding)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda and v.shape[:2] == (8, 4) for v in views)
    assert all(torch.isfinite(v).all() and (v[:2, 3] == 0).all() for v in views)
    cpu = crops(images.cpu(), generator=torch.Generator().manual_seed(0), padding=padding.cpu())
    assert [v.shape for v in views] == [v.shape for v in cpu]


@pytest.mark.gpu
def test_cuda_views_have_the_cpu_law(geometry):
    cfg = geometry["cfg"]
    g = torch.Generator(device="cuda").manual_seed(0)
    tile = probe_tile().cuda()
    glob, loc = GPUMultiCrop(cfg).packed(tile.expand(N_CALLS, *tile.shape).contiguous(), generator=g)
    for kind, views in (("global", glob), ("local", loc)):
        got = read_probe(views.flatten(0, 1).cpu())
        for stat in ("area", "log_aspect", "centre_x", "centre_y"):
            assert stats.ks_2samp(geometry["cpu"][kind][stat], got[stat]).pvalue > P_FLOOR, (kind, stat)
        cpu = np.bincount(geometry["cpu"][kind]["code"], minlength=8)
        assert stats.chi2_contingency(np.stack([cpu, np.bincount(got["code"], minlength=8)])).pvalue > P_FLOOR


def _holds_centre(probe: dict[str, np.ndarray]) -> np.ndarray:
    """Whether each probe view's box holds the tile's centre point (half a pixel of read-back slack)."""
    holds = np.ones_like(probe["width"], dtype=bool)
    for centre, side, length in (("centre_x", "width", W), ("centre_y", "height", H)):
        low = probe[centre] - probe[side] / 2
        holds &= (low <= length / 2 + 0.5) & (low + probe[side] >= length / 2 - 0.5)
    return holds


def test_centre_anchor_keeps_the_centre_in_every_crop_of_both_view_makers():
    tile = probe_tile()
    anchored = views_cfg("views.jitter_prob=0.0", "views.crop_anchor=centre")
    anywhere = views_cfg("views.jitter_prob=0.0")
    probes = {}
    for make in (cpu_views, gpu_views):
        glob, loc = make(anchored, tile, n_calls=300)
        probes[make.__name__] = read_probe(loc)
        for views in (glob, loc):
            assert _holds_centre(read_probe(views)).all(), make.__name__
        # Without the anchor, small local crops often miss the centre: the check above can fail.
        assert _holds_centre(read_probe(make(anywhere, tile, n_calls=300)[1])).mean() < 0.7, make.__name__
    for stat in ("centre_x", "centre_y", "area"):
        assert stats.ks_2samp(probes["cpu_views"][stat], probes["gpu_views"][stat]).pvalue > P_FLOOR, stat


def test_centre_offsets_are_uniform_over_the_windows_holding_the_centre():
    from cellvit_ssl.transforms import centre_offset_range

    for length, crop in ((48, 10), (47, 10), (16, 16), (9, 1)):
        low, high = centre_offset_range(length, crop)
        ok = [o for o in range(length - crop + 1) if o <= length / 2 <= o + crop]
        assert (low, high) == (ok[0], ok[-1])
        t_low, t_high = centre_offset_range(length, torch.tensor([float(crop)]))
        assert (t_low.item(), t_high.item()) == (low, high)


def test_crop_anchor_is_checked():
    with pytest.raises(ConfigError, match="crop_anchor"):
        views_cfg("views.crop_anchor=middle")
