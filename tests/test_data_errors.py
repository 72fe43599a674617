"""Every bad input raises DataError naming the file; skip_bad skips and counts, never feeds it."""

import logging
import os
import re

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from cellvit_ssl.data.dataset import IndexDataset
from cellvit_ssl.data.readers import open_stack
from cellvit_ssl.errors import DataError

NAMES = ["nucleus", "microtubules", "er", "protein"]


def _img(c=4, h=32, w=32, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(1, 4000, (c, h, w)).astype(dtype)


def _ome_tiff(path, data, names=NAMES):
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX", "Channel": {"Name": list(names)}})
    return path


def _names(match_path):
    return re.escape(str(match_path))


def _dataset(tmp_path, rows, **kw):
    kw.setdefault("sample_size", 16)
    return IndexDataset(pd.DataFrame(rows), kw.pop("channels", NAMES), root=tmp_path, **kw)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.ome.tif"
    with pytest.raises(DataError, match=_names(missing) + ".*no such file"):
        open_stack(missing)
    with pytest.raises(DataError, match="nope.ome.tif"):
        _dataset(tmp_path, [{"path": "nope.ome.tif"}]).load(0)


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(DataError, match=_names(path) + ".*not a readable TIFF"):
        open_stack(path)


def test_truncated_tiff(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _img(h=256, w=256), tile=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=_names(path) + ".*(truncated|not a readable)"):
        open_stack(path, channel_names=NAMES).read()


def test_truncated_png_tape(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 256), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stack = open_stack(path, channel_names=NAMES, channel_width=64)  # the header is intact
    with pytest.raises(DataError, match=_names(path) + ".*truncated"):
        stack.read()


def test_missing_zarr_chunk(tmp_path):
    path = tmp_path / "holey.zarr"
    arr = zarr.create_array(str(path), shape=(4, 32, 32), chunks=(1, 16, 16), dtype="uint16")
    arr[:] = _img()
    os.remove(path / "c" / "2" / "1" / "0")
    stack = open_stack(path, channel_names=NAMES)
    stack.read((0, 0, 16, 16))  # chunks that exist still read
    with pytest.raises(DataError, match=_names(path) + ".*chunk 'c/2/1/0' is missing"):
        stack.read()
    filled = open_stack(path, channel_names=NAMES, missing_chunks="fill").read()  # opt-in: absent = fill value
    assert (filled[2, 16:, :16] == 0).all()


def test_unknown_channel_name(tmp_path):
    _ome_tiff(tmp_path / "odd.ome.tif", _img(), ["nucleus", "microtubules", "er", "frobnicin"])
    with pytest.raises(DataError, match=r"odd.ome.tif.*unknown channel name 'frobnicin'"):
        _dataset(tmp_path, [{"path": "odd.ome.tif"}]).load(0)
    ds = _dataset(tmp_path, [{"path": "odd.ome.tif"}], channel_map={"frobnicin": "protein"})
    assert ds.load(0).shape == (4, 16, 16)  # a user mapping fixes it


def test_unknown_channel_name_in_config(tmp_path):
    _ome_tiff(tmp_path / "a.ome.tif", _img())
    with pytest.raises(DataError, match="data.channels: unknown channel name 'nucleous'"):
        _dataset(tmp_path, [{"path": "a.ome.tif"}], channels=["nucleous", "er"])


def test_wrong_number_of_channel_names(tmp_path):
    path = _ome_tiff(tmp_path / "three.ome.tif", _img(c=3), NAMES[:3])
    with pytest.raises(DataError, match=_names(path) + ".*3 channels but 4 channel names"):
        _dataset(tmp_path, [{"path": "three.ome.tif", "channels": ";".join(NAMES)}]).load(0)


def test_index_names_contradicting_the_file(tmp_path):
    _ome_tiff(tmp_path / "a.ome.tif", _img(), ["DAPI", "Tubulin", "ER", "Antibody"])
    swapped = "er;microtubules;nucleus;protein"
    with pytest.raises(DataError, match=r"a.ome.tif: the file names its channels .* but the index says"):
        _dataset(tmp_path, [{"path": "a.ome.tif", "channels": swapped}]).load(0)
    agreeing = _dataset(tmp_path, [{"path": "a.ome.tif", "channels": "nucleus;microtubules;er;protein"}])
    assert agreeing.load(0).shape == (4, 16, 16)
    _ome_tiff(tmp_path / "b.ome.tif", _img(), ["C0", "C1", "C2", "C3"])  # placeholder names: the index decides
    assert _dataset(tmp_path, [{"path": "b.ome.tif", "channels": swapped}]).load(0).shape == (4, 16, 16)


def test_channel_count_differs_from_config(tmp_path):
    _ome_tiff(tmp_path / "three.ome.tif", _img(c=3), NAMES[:3])
    with pytest.raises(DataError, match=r"three.ome.tif: has 3 channels .* config asks for 4 .*missing \['protein'\]"):
        _dataset(tmp_path, [{"path": "three.ome.tif"}]).load(0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_pixels(tmp_path, bad):
    data = _img().astype(np.float32)
    data[1, 5, 5] = bad
    _ome_tiff(tmp_path / "nan.ome.tif", data)
    with pytest.raises(DataError, match=r"nan.ome.tif: the image holds 1 NaN or Inf"):
        _dataset(tmp_path, [{"path": "nan.ome.tif"}], mode="image").load(0)


def test_empty_image(tmp_path):
    path = tmp_path / "empty.zarr"
    zarr.create_array(str(path), shape=(4, 0, 32), chunks=(1, 16, 16), dtype="uint16")
    with pytest.raises(DataError, match=_names(path) + ".*is empty"):
        open_stack(path, channel_names=NAMES)


def test_blank_image(tmp_path):
    _ome_tiff(tmp_path / "blank.ome.tif", np.zeros((4, 32, 32), np.uint16))
    with pytest.raises(DataError, match=r"blank.ome.tif: .*blank"):
        _dataset(tmp_path, [{"path": "blank.ome.tif"}], mode="image").load(0)
    with pytest.raises(DataError, match=r"blank.ome.tif: .*tiles were all blank"):
        _dataset(tmp_path, [{"path": "blank.ome.tif"}], mode="tiles", tile_attempts=3).load(0)


def test_2d_image_where_channels_expected(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _img(c=1)[0])
    with pytest.raises(DataError, match=_names(path) + ".*no channel axis"):
        open_stack(path)
    zpath = tmp_path / "flat.zarr"
    zarr.create_array(str(zpath), shape=(32, 32), chunks=(16, 16), dtype="uint16")
    with pytest.raises(DataError, match=_names(zpath) + ".*without axis names"):
        open_stack(zpath)


def test_tape_width_not_a_multiple_of_channel_width(tmp_path):
    path = tmp_path / "tape.png"
    Image.fromarray(np.zeros((20, 50), np.uint8)).save(path)
    with pytest.raises(DataError, match=_names(path) + ".*not a multiple of channel_width=20"):
        open_stack(path, channel_names=NAMES[:2], channel_width=20)


def test_skip_bad_skips_counts_and_never_feeds_corrupt_data(tmp_path, caplog):
    good = _img(seed=1)
    _ome_tiff(tmp_path / "good.ome.tif", good)
    bad = _img(seed=2).astype(np.float32)
    bad[0, 0, 0] = np.nan
    _ome_tiff(tmp_path / "bad.ome.tif", bad)
    rows = [{"path": "good.ome.tif"}, {"path": "bad.ome.tif"}, {"path": "missing.ome.tif"}]
    strict = _dataset(tmp_path, rows, mode="image", sample_size=32, normalize="none")
    with pytest.raises(DataError, match="bad.ome.tif"):
        strict[1]
    ds = _dataset(tmp_path, rows, mode="image", sample_size=32, normalize="none", skip_bad=True)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in (1, 2, 1, 0)]
    for item in items:  # every item is the good image, never the NaN one nor zeros
        assert item["index"] == 0
        torch.testing.assert_close(item["image"], torch.from_numpy(good.astype(np.float32)))
    assert ds.bad_samples >= 3
    assert "bad.ome.tif" in caplog.text and "missing.ome.tif" in caplog.text
    n = ds.end_epoch()
    assert n >= 3 and ds.bad_samples == 0
    assert f"skipped {n} bad samples this epoch" in caplog.text


def test_skip_bad_counts_across_loader_workers(tmp_path):
    _ome_tiff(tmp_path / "good.ome.tif", _img(seed=1))
    rows = [{"path": "good.ome.tif"}] + [{"path": "missing.ome.tif"}] * 3
    ds = _dataset(tmp_path, rows, mode="image", skip_bad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 4
    assert all((b["index"] == 0).all() for b in batches)
    assert ds.end_epoch() >= 3  # counted in the worker processes, read in the main one


def test_skip_bad_gives_up_when_everything_is_bad(tmp_path):
    ds = _dataset(tmp_path, [{"path": "missing.ome.tif"}] * 3, mode="image", skip_bad=True)
    with pytest.raises(DataError, match="bad samples in a row"):
        ds[0]
