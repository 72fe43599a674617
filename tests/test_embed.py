"""Encoder API: embed, patch_features, embed_cells on a tiny random bag-of-channels ViT."""

import numpy as np
import pytest
import torch

from cellvit_ssl import DataError, Encoder, load_encoder
from cellvit_ssl.channels import channel_ids
from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict
from cellvit_ssl.data.normalize import normalize_percentiles
from cellvit_ssl.data.samples import Box, read_region
from cellvit_ssl.models.channels import build_model

CHANNELS = ["nucleus", "microtubules", "er", "protein"]


@pytest.fixture
def encoder(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, CHANNELS)
    with torch.no_grad():  # LayerScale at its 1e-5 init would leave the CLS token all but blind to the image
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    return Encoder(model, tiny_cfg, torch.device("cpu"))


@pytest.fixture
def images():
    return np.random.default_rng(0).gamma(2.0, 100.0, size=(5, 4, 40, 40)).astype(np.float32)


def _cells_image(rng, size=64):
    image = rng.gamma(2.0, 50.0, size=(4, size, size)).astype(np.float32)
    labels = np.zeros((size, size), np.int32)
    labels[4:20, 6:22] = 3
    labels[30:50, 30:44] = 7
    labels[55:64, 0:10] = 12  # touches the border: the crop is zero-padded
    return image, labels


def test_embed_is_deterministic_batch_invariant_and_order_preserving(encoder, images):
    z = encoder.embed(images, CHANNELS)
    assert z.shape == (5, encoder.output_dim) and z.dtype == np.float32
    np.testing.assert_array_equal(encoder.embed(images, CHANNELS), z)
    for bs in (1, 2, 3):
        np.testing.assert_allclose(encoder.embed(images, CHANNELS, batch_size=bs), z, atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoder.embed(images[::-1], CHANNELS), z[::-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(encoder.embed(images[2], CHANNELS), z[2:3], atol=1e-5, rtol=0)
    assert not np.allclose(z[0], z[1])  # different images, different embeddings


def test_embed_is_the_model_on_the_training_preprocessing(encoder, images):
    """Percentile clip per image and channel, then the training crops' antialiased resize to the crop size."""
    from torchvision.transforms.v2 import functional as TF

    low, high = encoder.config.data.normalize_percentiles
    assert (low, high) != (0.0, 100.0) and images.shape[-1] > encoder.input_size  # both steps matter here
    lo = np.percentile(images, low, axis=(2, 3), keepdims=True)
    hi = np.percentile(images, high, axis=(2, 3), keepdims=True)
    clipped = torch.from_numpy(np.clip((images - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))
    x = TF.resize(clipped, [encoder.input_size] * 2, antialias=True)  # what RandomResizedCrop does in training
    ids = torch.tensor([channel_ids(CHANNELS)] * len(images))
    with torch.no_grad():
        want = encoder.model.embed(x, ids).numpy()
    np.testing.assert_allclose(encoder.embed(images, CHANNELS), want, atol=1e-5, rtol=0)


def test_samples_are_resized_to_the_view_size_the_model_trained_on(tiny_overrides):
    """48-px samples seen through 32-px views: the model input is the sample shrunk with antialiasing."""
    from torchvision.transforms.v2 import functional as TF

    from cellvit_ssl.config import load_config

    cfg = load_config(None, tiny_overrides + ["data.sample_size=48", "views.global_crop_size=32",
                                              "model.layerscale_init=0.5"])
    torch.manual_seed(0)
    enc = Encoder(build_model(cfg.model, CHANNELS), cfg, torch.device("cpu"))
    assert (enc.crop_size, enc.input_size) == (48, 32)
    samples = np.random.default_rng(3).gamma(2.0, 100.0, size=(2, 4, 48, 48)).astype(np.float32)
    norm = torch.from_numpy(np.stack([normalize_percentiles(s, *cfg.data.normalize_percentiles) for s in samples]))
    x = TF.resize(norm, [32, 32], antialias=True)
    with torch.no_grad():
        want = enc.model.embed(x, torch.tensor([channel_ids(CHANNELS)] * 2)).numpy()
    np.testing.assert_allclose(enc.embed(samples, CHANNELS), want, atol=1e-5, rtol=0)


def test_embed_matches_channels_by_name_not_position(encoder, images):
    z = encoder.embed(images, CHANNELS)
    perm = [3, 1, 0, 2]
    np.testing.assert_allclose(encoder.embed(images[:, perm], [CHANNELS[i] for i in perm]), z, atol=1e-5, rtol=0)
    # aliases name the same channels
    np.testing.assert_allclose(encoder.embed(images, ["DAPI", "tubulin", "ER", "antibody"]), z, atol=1e-5, rtol=0)


def test_channel_name_errors_list_what_the_model_knows(encoder, images):
    with pytest.raises(DataError, match=r"golgi.*knows \['nucleus', 'microtubules', 'er', 'protein'\]"):
        encoder.embed(images, ["nucleus", "microtubules", "er", "golgi"])
    with pytest.raises(DataError, match="not_a_channel.*knows"):
        encoder.embed(images, ["nucleus", "microtubules", "er", "not_a_channel"])
    with pytest.raises(DataError, match="4 channels but 3"):
        encoder.embed(images, CHANNELS[:3])
    with pytest.raises(DataError, match=r"lack the model's channels \['protein'\].*allow_missing"):
        encoder.embed(images[:, :3], CHANNELS[:3])
    with pytest.raises(DataError, match="give the name of every image channel"):
        encoder.embed(images, None)
    with pytest.raises(DataError, match=r"\(C, H, W\) or \(B, C, H, W\)"):
        encoder.embed(images[0, 0], CHANNELS)
    with pytest.raises(DataError, match="empty"):
        encoder.embed(images[:0], CHANNELS)


def test_allow_missing_leaves_the_absent_channel_block_zero(encoder, images):
    d = encoder.output_dim // 4
    full = encoder.embed(images, CHANNELS).reshape(5, 4, d)
    part = encoder.embed(images[:, [0, 1, 3]], ["nucleus", "microtubules", "protein"], allow_missing=True)
    part = part.reshape(5, 4, d)
    assert np.all(part[:, 2] == 0)
    np.testing.assert_allclose(part[:, [0, 1, 3]], full[:, [0, 1, 3]], atol=1e-5, rtol=0)


def test_lazy_zarr_and_dask_inputs_equal_numpy(encoder, images, tmp_path):
    import dask.array as da
    import zarr

    z = encoder.embed(images, CHANNELS, batch_size=2)
    store = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=images.shape, chunks=(1, 4, 40, 40),
                            dtype=images.dtype)
    store[:] = images
    np.testing.assert_allclose(encoder.embed(store, CHANNELS, batch_size=2), z, atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(da.from_array(images, chunks=(2, 4, 40, 40)), CHANNELS, batch_size=2),
                               z, atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(torch.from_numpy(images), CHANNELS, batch_size=2), z, atol=1e-6, rtol=0)


def test_progress_callback_sees_every_image(encoder, images):
    seen = []
    encoder.embed(images, CHANNELS, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_patch_features_grid_is_the_per_channel_backbone_tokens(encoder, images):
    x = images[:2, :, :36, :40]  # 36 is not a multiple of the 8-px patch: padded to 40
    grid = encoder.patch_features(x, CHANNELS)
    d = encoder.model.embed_dim
    assert encoder.patch_dim == 4 * d
    assert grid.shape == (2, 4 * d, 5, 5) and grid.dtype == np.float32
    # reference: channel k of image 1 alone through the shared 1-channel backbone
    norm = normalize_percentiles(x[1], *encoder.config.data.normalize_percentiles)
    padded = np.zeros((4, 40, 40), np.float32)
    padded[:, :36] = norm
    with torch.inference_mode():
        tokens = encoder.model.backbone.forward_features(torch.from_numpy(padded[2:3, None][0:1]))
    ref = tokens["x_norm_patchtokens"][0].T.reshape(d, 5, 5).numpy()
    np.testing.assert_allclose(grid[1, 2 * d : 3 * d], ref, atol=1e-5, rtol=0)


def test_patch_features_channel_order_batch_size_and_absent_channels(encoder, images):
    grid = encoder.patch_features(images, CHANNELS, batch_size=5)
    np.testing.assert_allclose(encoder.patch_features(images, CHANNELS, batch_size=2), grid, atol=1e-5, rtol=0)
    perm = [2, 0, 3, 1]
    np.testing.assert_allclose(encoder.patch_features(images[:, perm], [CHANNELS[i] for i in perm]), grid,
                               atol=1e-5, rtol=0)
    d = encoder.model.embed_dim
    part = encoder.patch_features(images[:, 1:], CHANNELS[1:], allow_missing=True)
    assert np.all(part[:, :d] == 0)
    np.testing.assert_allclose(part[:, d:], grid[:, d:], atol=1e-5, rtol=0)
    resized = encoder.patch_features(images[:1], CHANNELS, size=16)
    assert resized.shape == (1, 4 * d, 2, 2)


def test_embed_cells_one_row_per_label_matching_manual_crops(encoder):
    image, labels = _cells_image(np.random.default_rng(1))
    z, ids = encoder.embed_cells(image, labels, CHANNELS, crop_size=24, batch_size=2)
    assert ids.tolist() == [3, 7, 12]
    assert z.shape == (3, encoder.output_dim) and z.dtype == np.float32
    # reference for cell 7: its 24-px crop around the centroid, embedded as an image
    ys, xs = np.nonzero(labels == 7)
    crop = read_region(image, Box.around((ys.mean(), xs.mean()), 24))
    np.testing.assert_allclose(z[1], encoder.embed(crop, CHANNELS)[0], atol=1e-5, rtol=0)
    # channel order by name, batch size invariance
    z2, ids2 = encoder.embed_cells(image[::-1], labels, CHANNELS[::-1], crop_size=24, batch_size=64)
    assert ids2.tolist() == ids.tolist()
    np.testing.assert_allclose(z2, z, atol=1e-5, rtol=0)


def test_embed_cells_background_masking(encoder):
    image, labels = _cells_image(np.random.default_rng(2))
    kept, _ = encoder.embed_cells(image, labels, CHANNELS, crop_size=32)
    masked, ids = encoder.embed_cells(image, labels, CHANNELS, crop_size=32, mask_background=True)
    assert not np.allclose(kept, masked)
    crops = dict(encoder.cell_crops(image, labels, crop_size=32, mask_background=True))
    box = Box.around(np.argwhere(labels == 3).mean(0), 32)
    outside = read_region(labels, box) != 3
    assert np.all(crops[3][:, outside] == 0) and crops[3][:, ~outside].max() > 0
    # masked raw pixels, then the preprocessing contract (percentiles over the masked crop)
    norm = normalize_percentiles(crops[3], *encoder.config.data.normalize_percentiles)
    with torch.inference_mode():
        t = torch.nn.functional.interpolate(torch.from_numpy(norm[None]), size=32, mode="bilinear",
                                            antialias=True, align_corners=False)
        ref = encoder.model.embed(t, torch.tensor([channel_ids(CHANNELS)])).numpy()
    np.testing.assert_allclose(masked[0], ref[0], atol=1e-5, rtol=0)


def test_embed_cells_lazy_image_empty_mask_and_errors(encoder, tmp_path):
    import zarr

    image, labels = _cells_image(np.random.default_rng(3))
    z, ids = encoder.embed_cells(image, labels, CHANNELS)
    arr = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=image.shape, chunks=(1, 16, 16),
                          dtype=image.dtype)
    arr[:] = image
    z_lazy, ids_lazy = encoder.embed_cells(arr, labels, CHANNELS)
    np.testing.assert_allclose(z_lazy, z, atol=1e-6, rtol=0)
    assert ids_lazy.tolist() == ids.tolist()
    empty, none = encoder.embed_cells(image, np.zeros_like(labels), CHANNELS)
    assert empty.shape == (0, encoder.output_dim) and none.shape == (0,)
    with pytest.raises(DataError, match="label mask has shape"):
        encoder.embed_cells(image, labels[:10], CHANNELS)
    with pytest.raises(DataError, match="integer label"):
        encoder.embed_cells(image, labels.astype(np.float32), CHANNELS)
    with pytest.raises(DataError, match="one \\(C, H, W\\) image"):
        encoder.embed_cells(image[None], labels, CHANNELS)


def test_load_encoder_from_export_keeps_weights_and_provenance(encoder, tiny_cfg, tmp_path, images):
    path = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(tiny_cfg),
                            "backbone": encoder.model.state_dict()}, tmp_path / "teacher.pt")
    loaded = load_encoder(path, device="cpu")
    assert loaded.source == str(path) and loaded.channels == CHANNELS
    np.testing.assert_allclose(loaded.embed(images, CHANNELS), encoder.embed(images, CHANNELS), atol=1e-6, rtol=0)


def test_standardize_views_are_matched_at_inference(tiny_overrides, images):
    from cellvit_ssl.config import load_config

    cfg = load_config(None, tiny_overrides + ["views.standardize=true"])
    torch.manual_seed(0)
    enc = Encoder(build_model(cfg.model, CHANNELS), cfg, torch.device("cpu"))
    z = enc.embed(images[:2], CHANNELS)
    norm = np.stack([normalize_percentiles(im, *cfg.data.normalize_percentiles) for im in images[:2]])
    t = torch.nn.functional.interpolate(torch.from_numpy(norm), size=32, mode="bilinear", antialias=True,
                                        align_corners=False)
    t = (t - t.mean(dim=(-2, -1), keepdim=True)) / t.std(dim=(-2, -1), keepdim=True, unbiased=False)
    with torch.inference_mode():
        ref = enc.model.embed(t, torch.tensor([channel_ids(CHANNELS)] * 2)).numpy()
    np.testing.assert_allclose(z, ref, atol=1e-5, rtol=0)
    grid = enc.patch_features(images[:1, :, :32, :32], CHANNELS)
    plain = Encoder(enc.model, load_config(None, tiny_overrides), torch.device("cpu"))  # same weights, no standardising
    assert not np.allclose(plain.patch_features(images[:1, :, :32, :32], CHANNELS), grid, atol=1e-3)


@pytest.mark.gpu
def test_cuda_bf16_embeddings_match_cpu(encoder, images):
    z_cpu = encoder.embed(images, CHANNELS)
    cuda = Encoder(encoder.model, encoder.config, torch.device("cuda"))
    z = cuda.embed(images, CHANNELS)
    assert z.dtype == np.float32
    cos = (z * z_cpu).sum(1) / (np.linalg.norm(z, axis=1) * np.linalg.norm(z_cpu, axis=1))
    assert cos.min() > 0.99
    grid = cuda.patch_features(images, CHANNELS)
    assert grid.dtype == np.float32 and grid.shape == (5, cuda.patch_dim, 5, 5)


def test_embed_tiles_cover_the_image_in_row_major_order(encoder):
    image, _ = _cells_image(np.random.default_rng(4), size=56)
    z, boxes = encoder.embed_tiles(image, CHANNELS, tile_size=24, batch_size=4)
    assert boxes.tolist() == [[y, x, 24, 24] for y in (0, 24, 48) for x in (0, 24, 48)]
    assert z.shape == (9, encoder.output_dim)
    last = np.zeros((4, 24, 24), np.float32)
    last[:, :8, :8] = image[:, 48:, 48:]  # the corner tile is zero-padded past the border
    np.testing.assert_allclose(z[8], encoder.embed(last, CHANNELS)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(z[1], encoder.embed(image[:, :24, 24:48], CHANNELS)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["fixed", "hierarchical", "channelvit"])
def test_other_variants_embed_and_give_one_patch_grid_per_image(tiny_overrides, images, variant):
    from cellvit_ssl.config import load_config

    cfg = load_config(None, tiny_overrides + [f"model.variant={variant}"])
    torch.manual_seed(0)
    enc = Encoder(build_model(cfg.model, CHANNELS), cfg, torch.device("cpu"))
    z = enc.embed(images[:3], CHANNELS)
    assert z.shape == (3, enc.output_dim)
    np.testing.assert_allclose(enc.embed(images[:3], CHANNELS, batch_size=1), z, atol=1e-5, rtol=0)
    perm = [1, 3, 0, 2]
    np.testing.assert_allclose(enc.embed(images[:3, perm], [CHANNELS[i] for i in perm]), z, atol=1e-5, rtol=0)
    grid = enc.patch_features(images[:2], CHANNELS)
    assert enc.patch_dim == enc.model.embed_dim and grid.shape == (2, enc.patch_dim, 5, 5)
    np.testing.assert_allclose(enc.patch_features(images[:2], CHANNELS, batch_size=1), grid, atol=1e-5, rtol=0)
    # the grid is the model's own per-image patch tokens
    norm = np.stack([normalize_percentiles(im, *cfg.data.normalize_percentiles) for im in images[:2]])
    with torch.inference_mode():
        tokens = enc.model.forward_features(torch.from_numpy(norm), torch.tensor([channel_ids(CHANNELS)] * 2))
    ref = tokens["x_norm_patchtokens"].transpose(1, 2).reshape(2, -1, 5, 5).numpy()
    np.testing.assert_allclose(grid, ref, atol=1e-5, rtol=0)


def test_per_channel_embeddings_and_pooling_choices(encoder, images):
    blocks, present = encoder.embed_channels(images, CHANNELS)
    d = encoder.channel_dim
    assert blocks.shape == (5, 4, d) and present.all()
    default = encoder.embed(images, CHANNELS)  # boc: the concatenated blocks
    np.testing.assert_allclose(blocks.reshape(5, -1), default, atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(images, CHANNELS, pooling="mean"), blocks.mean(1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(images, CHANNELS, pooling="protein"), blocks[:, 3], atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(images, CHANNELS, pooling="protein,er"),
                               np.concatenate([blocks[:, 3], blocks[:, 2]], 1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(encoder.embed(images, CHANNELS, pooling=["antibody"]), blocks[:, 3], atol=1e-6, rtol=0)
    assert encoder.pooled_dim("protein,er") == 2 * d and encoder.pooled_dim("mean") == d
    # an absent channel: a zero block, not counted in the mean
    part, where = encoder.embed_channels(images[:, :3], CHANNELS[:3], allow_missing=True)
    assert where[:, :3].all() and not where[:, 3].any() and np.all(part[:, 3] == 0)
    np.testing.assert_allclose(encoder.embed(images[:, :3], CHANNELS[:3], allow_missing=True, pooling="mean"),
                               part[:, :3].mean(1), atol=1e-6, rtol=0)
    with pytest.raises(DataError, match="pooling='golgi'.*expected one of"):
        encoder.embed(images, CHANNELS, pooling="golgi")
    cells, _ = encoder.embed_cells(*_cells_image(np.random.default_rng(5)), CHANNELS, pooling="protein")
    assert cells.shape == (3, d)


@pytest.mark.parametrize("variant", ["hierarchical", "channelvit"])
def test_per_channel_embeddings_of_the_joint_variants(tiny_overrides, images, variant):
    from cellvit_ssl.config import load_config

    cfg = load_config(None, tiny_overrides + [f"model.variant={variant}", "model.layerscale_init=0.5"])
    torch.manual_seed(0)
    enc = Encoder(build_model(cfg.model, CHANNELS), cfg, torch.device("cpu"))
    blocks, present = enc.embed_channels(images[:3], CHANNELS)
    assert blocks.shape == (3, 4, enc.channel_dim) and present.all()
    assert not np.allclose(blocks[:, 0], blocks[:, 3], atol=1e-4)  # channels differ after cross-channel attention
    perm = [2, 0, 3, 1]
    again, _ = enc.embed_channels(images[:3, perm], [CHANNELS[i] for i in perm])
    np.testing.assert_allclose(again, blocks, atol=1e-5, rtol=0)  # by name, in the model's channel order
    np.testing.assert_allclose(enc.embed(images[:3], CHANNELS, pooling="er"), blocks[:, 2], atol=1e-6, rtol=0)


def test_fixed_model_has_no_per_channel_embeddings(tiny_overrides, images):
    from cellvit_ssl.config import load_config

    cfg = load_config(None, tiny_overrides + ["model.variant=fixed"])
    enc = Encoder(build_model(cfg.model, CHANNELS), cfg, torch.device("cpu"))
    with pytest.raises(DataError, match="'fixed' has no per-channel embeddings"):
        enc.embed(images, CHANNELS, pooling="protein")
