"""Inference sees what training saw: the parity matrix of the one sample path and the preprocessing contract.

For every ``data.mode`` x ``data.normalize`` x format (OME-TIFF with Z, OME-Zarr pyramid, Zarr v3, one TIFF per
channel, CHAMMI tape with non-square channels) x row kind (centroid, centroid at the border, box, whole image),
the tensor the *training* dataset yields before augmentation (built from the run config, as the trainer builds
it) is compared with what ``python -m cellvit_ssl.embed`` actually feeds the model for the same row (captured at
the model's input), to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from cellvit_ssl import embed as embed_cli
from cellvit_ssl.channels import ChannelVocabulary
from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict, load_config
from cellvit_ssl.data.dataset import build_dataset
from cellvit_ssl.models.channels import BagOfChannelsViT, build_model
from cellvit_ssl.preprocess import Preprocess
from tests.conftest import TINY_OVERRIDES

MODEL = ["nucleus", "microtubules", "er", "protein"]
STORED = ["er", "nucleus", "protein", "microtubules"]  # file order differs from the model's
H, W = 52, 44  # not square, not a multiple of the 32-px sample


def _pixels(seed: int, shape=(4, H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.gamma(2.0, 200.0, size=shape).astype(np.float32) + 50
    return data.astype(np.uint16)


def _rows(path: str, extra: dict | None = None) -> list[dict]:
    base = {"path": path, **(extra or {})}
    return [
        {**base, "kind": "centroid", "centroid_y": 25.3, "centroid_x": 20.6},
        {**base, "kind": "border", "centroid_y": 3.0, "centroid_x": 40.0},
        {**base, "kind": "box", "box_y0": 5, "box_x0": 8, "box_y1": 45, "box_x1": 30},
        {**base, "kind": "whole"},
    ]


def _write(fmt: str, root) -> pd.DataFrame:
    """One image of the format and its rows; returns the index table."""
    if fmt == "ome-tiff-z":  # (Z, C, Y, X): Z is read by max projection or by one slice
        data = np.stack([_pixels(s) for s in (1, 2, 3)])[:, [MODEL.index(c) for c in STORED]]
        tifffile.imwrite(root / "z.ome.tif", data, ome=True, metadata={"axes": "ZCYX", "Channel": {"Name": STORED}})
        return pd.DataFrame(_rows("z.ome.tif"))
    if fmt == "ome-zarr-pyramid":
        from ome_zarr.format import FormatV05
        from ome_zarr.writer import write_image

        group = zarr.open_group(str(root / "p.ome.zarr"), mode="w", zarr_format=3)
        omero = {"channels": [{"label": c, "color": "FFFFFF", "window": {"start": 0, "end": 4000, "min": 0,
                                                                          "max": 65535}} for c in STORED]}
        data = _pixels(4, (4, 2 * H, 2 * W))[[MODEL.index(c) for c in STORED]]
        write_image(data, group, axes="cyx", fmt=FormatV05(), scale_factors=[2], omero=omero)
        return pd.DataFrame(_rows("p.ome.zarr"))
    if fmt == "zarr-v3":
        arr = zarr.create_array(str(root / "a.zarr"), shape=(4, H, W), chunks=(1, 16, 16), dtype="uint16",
                                dimension_names=("c", "y", "x"), attributes={"channel_names": STORED})
        arr[:] = _pixels(5)[[MODEL.index(c) for c in STORED]]
        return pd.DataFrame(_rows("a.zarr"))
    if fmt == "tiff-per-channel":
        data = _pixels(6)
        for c, plane in zip(MODEL, data):
            tifffile.imwrite(root / f"site_{c}.tif", plane)
        files = ";".join(f"site_{c}.tif" for c in STORED)
        return pd.DataFrame(_rows(files, {"channels": ";".join(STORED)}))
    assert fmt == "chammi-tape"  # 4 channels side by side, each 20 wide and 36 high: not square
    data = _pixels(7, (4, 36, 20)).astype(np.uint8)
    Image.fromarray(np.concatenate(list(data[[MODEL.index(c) for c in STORED]]), axis=1)).save(root / "t.png")
    tape = {"channels": ";".join(STORED), "channel_width": 20}
    return pd.DataFrame([{"path": "t.png", "kind": "whole", **tape},
                         {"path": "t.png", "kind": "box", "box_y0": 2, "box_x0": 3, "box_y1": 30, "box_x1": 17,
                          **tape}])


KINDS_BY_MODE = {"cells": {"centroid", "border", "box"}, "image": {"box", "whole"}, "tiles": {"whole"},
                 "auto": {"centroid", "border", "box", "whole"}}
FORMATS = ["ome-tiff-z", "ome-zarr-pyramid", "zarr-v3", "tiff-per-channel", "chammi-tape"]
READ_OPTIONS = {"ome-tiff-z": ["data.z_projection=slice", "data.z_slice=1"], "ome-zarr-pyramid": ["data.level=1"]}


def _capture(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = BagOfChannelsViT.embed

    def spy(self, x, channel_ids, channel_mask=None):
        seen.extend(x.detach().clone())
        return real(self, x, channel_ids, channel_mask)

    monkeypatch.setattr(BagOfChannelsViT, "embed", spy)
    return seen


@pytest.mark.parametrize("normalize", ["percentile", "dataset", "none"])
@pytest.mark.parametrize("mode", ["cells", "image", "tiles", "auto"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_feeds_the_model_what_training_samples(tmp_path, monkeypatch, fmt, mode, normalize):
    table = _write(fmt, tmp_path)
    table = table[table["kind"].isin(KINDS_BY_MODE[mode])].reset_index(drop=True)
    if table.empty or (fmt == "chammi-tape" and mode in ("cells", "tiles")):
        pytest.skip(f"no {mode} rows for a {fmt} (a tape is one whole cell)")
    table.to_csv(tmp_path / "index.csv", index=False)
    cfg = load_config(None, [*TINY_OVERRIDES, "data.demo.enabled=false", f"data.index={tmp_path / 'index.csv'}",
                             f"data.mode={mode}", f"data.normalize={normalize}", "views.global_crop_size=40",
                             f"data.stats_cache={tmp_path / 'stats.json'}", *READ_OPTIONS.get(fmt, [])])
    dataset = build_dataset(cfg.data)  # the training path: transform=None gives the sample before the views
    torch.manual_seed(0)
    model = build_model(cfg.model, MODEL)
    contract = Preprocess.from_config(cfg, dataset.stats)  # what the trainer stores with the model
    ckpt = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict(),
                            "preprocess": contract.to_dict(),
                            "vocabulary": ChannelVocabulary.from_config(cfg.data).to_dict()}, tmp_path / "teacher.pt")
    (tmp_path / "stats.json").unlink(missing_ok=True)  # inference must not need the training machine's cache

    seen = _capture(monkeypatch)
    out = tmp_path / "out.h5ad"
    argv = [str(ckpt), "--index", str(tmp_path / "index.csv"), "--out", str(out), "--no-progress",
            "--batch-size", "3"]
    assert embed_cli.main(argv) == 0

    expected = []
    for i in range(len(table)):
        if dataset.reader.kind(i) == "tiles":  # embed covers the field with a grid of training-sized tiles
            rng = np.random.default_rng(i)
            raw = dataset.raw(i, rng)  # a random training tile reads exactly the pixels of its box
            again = dataset.reader.read(i, box=raw.box)
            np.testing.assert_array_equal(again.pixels, raw.pixels)
            samples = [dataset.sample(dataset.reader.read(i, box=b)) for b in dataset.reader.tile_boxes(i)]
        else:
            samples = [dataset.load(i)]
        expected += [contract.model_input(s[None])[0] for s in samples]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert got.shape == want.shape == (4, 40, 40)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_parity_matrix_notices_a_reader_that_ignores_a_read_option(tmp_path, monkeypatch):
    """The matrix would fail if embed read another Z slice than training (here: the option dropped)."""
    table = _write("ome-tiff-z", tmp_path)
    table = table[table["kind"] == "centroid"]
    table.to_csv(tmp_path / "index.csv", index=False)
    cfg = load_config(None, [*TINY_OVERRIDES, "data.demo.enabled=false", f"data.index={tmp_path / 'index.csv'}",
                             "data.mode=cells", "data.z_projection=slice", "data.z_slice=1"])
    dataset = build_dataset(cfg.data)
    model = build_model(cfg.model, MODEL)
    ckpt = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict()},
                           tmp_path / "teacher.pt")
    real = embed_cli.sample_reader

    def forgetful(table, root, data, encoder, **kw):
        import dataclasses

        return real(table, root, dataclasses.replace(data, z_projection="max"), encoder, **kw)

    monkeypatch.setattr(embed_cli, "sample_reader", forgetful)
    seen = _capture(monkeypatch)
    assert embed_cli.main([str(ckpt), "--index", str(tmp_path / "index.csv"), "--out", str(tmp_path / "o.h5ad"),
                           "--no-progress"]) == 0
    want = Preprocess.from_config(cfg).model_input(dataset.load(0)[None])[0]
    assert not torch.allclose(seen[0], want, atol=1e-3)
