"""Sampling modes, normalisation, channel padding + masks, the mixed-channel collate."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellvit_ssl.channels import channel_ids
from cellvit_ssl.config import load_config
from cellvit_ssl.data.collate import PAD_CHANNEL_ID, collate_channels
from cellvit_ssl.data.dataset import IndexDataset, build_dataset
from cellvit_ssl.data.normalize import ChannelStats, normalize_percentiles
from cellvit_ssl.errors import ConfigError

NAMES = ["nucleus", "microtubules", "er", "protein"]


def _ome_tiff(path, data, names=NAMES):
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(names)}})


def _field(size=96, spot=(10, 70), seed=0):
    """Dark noisy background with one bright 16-px square (the only foreground)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 110, (4, size, size)).astype(np.uint16)
    y, x = spot
    data[:, y : y + 16, x : x + 16] = 3000
    return data


def test_cells_mode_centres_the_crop_and_pads_borders(tmp_path):
    data = np.arange(4 * 40 * 40, dtype=np.uint16).reshape(4, 40, 40) + 1
    _ome_tiff(tmp_path / "a.ome.tif", data)
    table = pd.DataFrame([{"path": "a.ome.tif", "centroid_y": 20, "centroid_x": 10},
                          {"path": "a.ome.tif", "box_y0": 0, "box_x0": 0, "box_y1": 8, "box_x1": 8}])
    ds = IndexDataset(table, NAMES, root=tmp_path, sample_size=16, normalize="none")
    np.testing.assert_array_equal(ds.load(0).numpy(), data[:, 12:28, 2:18])
    corner = ds.load(1).numpy()  # box centre (4, 4): 12 px of the 16 lie outside -> zeros
    np.testing.assert_array_equal(corner[:, 4:, 4:], data[:, :12, :12])
    assert (corner[:, :4] == 0).all() and (corner[:, :, :4] == 0).all()


def test_tiles_mode_skips_background_by_foreground_threshold(tmp_path):
    _ome_tiff(tmp_path / "f.ome.tif", _field())
    table = pd.DataFrame([{"path": "f.ome.tif"}])
    picky = IndexDataset(table, NAMES, root=tmp_path, sample_size=24, mode="tiles", normalize="none",
                         min_foreground=0.2, foreground_threshold=0.5, tile_attempts=200)
    rng = np.random.default_rng(0)
    for _ in range(10):
        tile = picky.load(0, rng).numpy()
        assert (tile[0] >= 3000).mean() >= 0.2
    lax = IndexDataset(table, NAMES, root=tmp_path, sample_size=24, mode="tiles", normalize="none")
    fractions = [(lax.load(0, rng).numpy()[0] >= 3000).mean() for _ in range(20)]
    assert min(fractions) < 0.2  # without the threshold, background tiles do come


def test_image_mode_resizes_long_side_and_pads(tmp_path):
    cells = np.random.default_rng(0).integers(1, 255, (3, 40, 20), dtype=np.uint8)
    Image.fromarray(np.concatenate(list(cells), axis=1)).save(tmp_path / "c.png")
    table = pd.DataFrame([{"path": "c.png", "channels": "nucleus;membrane;protein", "channel_width": 20}])
    ds = IndexDataset(table, ["nucleus", "membrane", "protein"], root=tmp_path, sample_size=20)
    assert ds.reader.kind(0) == "image"  # auto: a tape is a whole single-cell image
    img = ds.load(0)
    assert img.shape == (3, 20, 20)
    assert (img[:, :, :5] == 0).all() and (img[:, :, 15:] == 0).all()  # 40x20 -> 20x10, centred
    native = IndexDataset(table, ["nucleus", "membrane", "protein"], root=tmp_path, sample_size=0,
                          normalize="none").load(0)
    np.testing.assert_array_equal(native.numpy(), cells.astype(np.float32))
    with pytest.raises(ConfigError, match="data.sample_size=0; tiles mode"):
        IndexDataset(table, ["nucleus", "membrane", "protein"], root=tmp_path, sample_size=0, mode="tiles").load(0)


def test_channels_are_selected_and_ordered_by_name(tmp_path):
    data = np.random.default_rng(0).integers(1, 4000, (4, 32, 32), dtype=np.uint16)
    _ome_tiff(tmp_path / "a.ome.tif", data, ["DAPI", "Tubulin", "ER", "Antibody"])
    table = pd.DataFrame([{"path": "a.ome.tif"}])
    ds = IndexDataset(table, ["protein", "nucleus"], root=tmp_path, mode="image", sample_size=32, normalize="none")
    np.testing.assert_array_equal(ds.load(0).numpy(), data[[3, 0]].astype(np.float32))
    item = ds[0]
    assert item["channel_ids"].tolist() == channel_ids(["protein", "nucleus"])


def test_percentile_normalisation_matches_reference():
    x = np.random.default_rng(0).gamma(2.0, 300.0, (3, 50, 50)).astype(np.float32)
    out = normalize_percentiles(x, 2.0, 98.0)
    for c in range(3):
        lo, hi = np.percentile(x[c], [2.0, 98.0])
        np.testing.assert_allclose(out[c], np.clip((x[c] - lo) / (hi - lo), 0, 1), rtol=1e-5, atol=1e-6)


def test_dataset_statistics_computed_once_and_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(3):
        scale = np.array([1, 10, 100, 1000])[:, None, None] * (i + 1)
        _ome_tiff(tmp_path / f"{i}.ome.tif", (rng.random((4, 24, 24)) * scale).astype(np.float32))
    table = pd.DataFrame([{"path": f"{i}.ome.tif"} for i in range(3)])
    cache = tmp_path / "stats.json"
    kw = dict(root=tmp_path, mode="image", sample_size=24, normalize="dataset", stats_cache=cache,
              percentiles=(0.0, 100.0))
    ds = IndexDataset(table, NAMES, **kw)
    stats = ChannelStats.load(cache)
    assert stats.n_samples == 3 and stats.key
    assert stats.high["protein"] == pytest.approx(3000, rel=0.01)  # max over the dataset, not per image
    assert stats.high["nucleus"] == pytest.approx(3, rel=0.01)
    x = ds.load(0)  # image 0 is 1/3 as bright as image 2: stays ~1/3 of the range
    assert 0.25 < x[3].max() < 0.34

    def fail(*a, **k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(IndexDataset, "_compute_stats", fail)
    again = IndexDataset(table, NAMES, **kw)
    assert again.stats == ds.stats
    monkeypatch.undo()
    other = IndexDataset(table.iloc[:2], NAMES, **kw)  # different data: recomputed, not reused
    assert other.stats.high["protein"] == pytest.approx(2000, rel=0.01)


def test_missing_channels_pad_with_mask(tmp_path):
    _ome_tiff(tmp_path / "three.ome.tif", np.random.default_rng(0).integers(1, 9, (3, 16, 16)).astype(np.uint16),
              ["nucleus", "er", "protein"])
    ds = IndexDataset(pd.DataFrame([{"path": "three.ome.tif"}]), NAMES, root=tmp_path, mode="image",
                      sample_size=16, missing_channels="pad")
    item = ds[0]
    assert item["channel_mask"].tolist() == [True, False, True, True]
    assert item["channel_ids"].tolist() == channel_ids(NAMES)
    assert (item["image"][1] == 0).all() and item["image"][0].max() == 1.0


def test_collate_pads_mixed_channel_sets():
    a = {"image": torch.ones(3, 8, 8), "channel_ids": torch.tensor([0, 7, 3]), "index": 0}
    b = {"image": torch.full((5, 8, 8), 2.0), "channel_ids": torch.tensor([0, 4, 2, 5, 6]), "index": 1,
         "channel_mask": torch.tensor([True, True, False, True, True])}
    out = collate_channels([a, b])
    assert out["image"].shape == (2, 5, 8, 8)
    assert (out["image"][0, 3:] == 0).all() and (out["image"][0, :3] == 1).all()
    assert out["channel_ids"].tolist() == [[0, 7, 3, PAD_CHANNEL_ID, PAD_CHANNEL_ID], [0, 4, 2, 5, 6]]
    assert out["channel_mask"].tolist() == [[True, True, True, False, False], [True, True, False, True, True]]
    assert out["index"].tolist() == [0, 1]


def test_mixed_datasets_through_a_loader_with_views(tmp_path, tiny_cfg):
    from cellvit_ssl.transforms import MultichannelDINOTransform

    rng = np.random.default_rng(0)
    hpa = rng.integers(1, 255, (4, 40, 40), dtype=np.uint8)
    wtc = rng.integers(1, 255, (3, 40, 40), dtype=np.uint8)
    Image.fromarray(np.concatenate(list(hpa), axis=1)).save(tmp_path / "hpa.png")
    Image.fromarray(np.concatenate(list(wtc), axis=1)).save(tmp_path / "wtc.png")
    table = pd.DataFrame([
        {"path": "hpa.png", "channels": "microtubules;protein;nucleus;er", "channel_width": 40, "label": "a"},
        {"path": "wtc.png", "channels": "nucleus;membrane;protein", "channel_width": 40, "label": "b"},
    ])
    ds = IndexDataset(table, None, root=tmp_path, sample_size=40, metadata_columns=["label"],
                      transform=MultichannelDINOTransform(tiny_cfg.views))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_channels)))
    assert [tuple(v.shape) for v in batch["views"]] == [(2, 4, 32, 32)] * 2 + [(2, 4, 16, 16)] * 2
    assert batch["channel_mask"].tolist() == [[True] * 4, [True, True, True, False]]
    assert batch["channel_ids"][1, :3].tolist() == channel_ids(["nucleus", "membrane", "protein"])
    assert batch["metadata"]["label"] == ["a", "b"]


def test_build_dataset_from_config(tmp_path):
    _ome_tiff(tmp_path / "z.ome.tif", _field(size=48))
    pd.DataFrame([{"path": "z.ome.tif", "plate": "P1"}]).to_csv(tmp_path / "index.csv", index=False)
    cfg = load_config(None, [f"data.index={tmp_path / 'index.csv'}", "data.mode=tiles", "data.sample_size=16",
                             "data.metadata_columns=[plate]", "data.skip_bad=true"])
    ds = build_dataset(cfg.data)
    item = ds[0]
    assert item["image"].shape == (4, 16, 16) and item["metadata"] == {"plate": "P1"}
    assert ds.skip_bad and ds.reader.mode == "tiles"
    with pytest.raises(ConfigError, match="data.mode.*'tile'.*expected one of"):  # refused at load time
        load_config(None, [f"data.index={tmp_path / 'index.csv'}", "data.mode=tile"])


def test_open_stacks_are_bounded_per_worker(tmp_path, monkeypatch):
    import cellvit_ssl.data.samples as samples_module

    monkeypatch.setattr(samples_module, "STACK_CACHE_SIZE", 2)
    for i in range(4):
        _ome_tiff(tmp_path / f"{i}.ome.tif", _field(size=32, spot=(4, 4), seed=i))
    ds = IndexDataset(pd.DataFrame([{"path": f"{i}.ome.tif"} for i in range(4)]), NAMES, root=tmp_path,
                      mode="image", sample_size=32)
    for i in (0, 1, 0, 2, 3):
        ds.load(i)
    assert [Path(k[0]).name for k in ds.reader._stacks] == ["2.ome.tif", "3.ome.tif"]
