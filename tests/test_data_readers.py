"""Every supported format is written in a temp folder, read back and compared exactly."""

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from cellvit_ssl.data.readers import open_stack

NAMES = ["nucleus", "microtubules", "er", "protein"]


def _rand(shape, seed=0, dtype=np.uint16, high=4000):
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def test_imagej_hyperstack_names_max_projection_slice_and_frame(tmp_path):
    data = _rand((2, 3, 4, 20, 30))  # T Z C Y X
    path = tmp_path / "hyper.tif"
    labels = [f"{n}" for _ in range(6) for n in NAMES]  # one label per plane, C fastest
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX", "Labels": labels})
    stack = open_stack(path)
    assert stack.channel_names == NAMES
    assert stack.shape == (4, 20, 30)
    assert stack.metadata["format"] == "imagej-tiff"
    np.testing.assert_array_equal(stack.read(), data[0].max(axis=0))  # t=0, max over Z
    chosen = open_stack(path, z=2, t=1)
    np.testing.assert_array_equal(chosen.read((1, 2, 5, 6), [3, 1]), data[1, 2][[3, 1], 1:6, 2:8])
    framed_max = open_stack(path, t=1)
    np.testing.assert_array_equal(framed_max.read(channels=[0]), data[1, :, 0].max(axis=0)[None])


def test_ome_tiff_with_z_and_names(tmp_path):
    data = _rand((3, 4, 16, 18))  # Z C Y X
    path = tmp_path / "z.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "ZCYX", "Channel": {"Name": NAMES}})
    stack = open_stack(path)
    assert stack.channel_names == NAMES and stack.metadata["format"] == "ome-tiff"
    np.testing.assert_array_equal(stack.read(), data.max(axis=0))
    np.testing.assert_array_equal(open_stack(path, z=1).read(), data[1])


def test_pyramidal_ome_tiff_levels(tmp_path):
    data = _rand((2, 64, 64))
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        opts = {"tile": (16, 16), "photometric": "minisblack"}
        tif.write(data, subifds=1, metadata={"axes": "CYX", "Channel": {"Name": NAMES[:2]}}, **opts)
        tif.write(data[:, ::2, ::2], subfiletype=1, **opts)
    stack0, stack1 = open_stack(path), open_stack(path, level=1)
    assert stack0.metadata["levels"] == 2 and stack1.shape == (2, 32, 32)
    np.testing.assert_array_equal(stack1.read(), data[:, ::2, ::2])
    np.testing.assert_array_equal(stack0.read((8, 8, 8, 8)), data[:, 8:16, 8:16])


@pytest.mark.parametrize("n", [3, 4, 5])
def test_plain_3d_tiff_is_cyx_with_given_names(tmp_path, n):
    data = _rand((n, 12, 14))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data)
    names = ["nucleus", "rna", "er", "agp", "mito"][:n]
    stack = open_stack(path, channel_names=names)
    assert stack.channel_names == names
    np.testing.assert_array_equal(stack.read(), data)


def test_list_of_single_channel_tiffs_is_one_stack(tmp_path):
    data = _rand((5, 24, 20))
    paths = []
    for i, plane in enumerate(data):
        paths.append(tmp_path / f"site1-ch{i + 1}.tiff")
        tifffile.imwrite(paths[-1], plane)
    names = ["nucleus", "rna", "er", "agp", "mito"]
    stack = open_stack(paths, channel_names=names)
    assert stack.shape == (5, 24, 20) and stack.channel_names == names
    np.testing.assert_array_equal(stack.read(), data)
    np.testing.assert_array_equal(stack.read((3, 4, 10, 8), [4, 0]), data[[4, 0], 3:13, 4:12])
    joined = open_stack(";".join(str(p) for p in paths), channel_names=names)
    np.testing.assert_array_equal(joined.read(), data)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_with_axes_attribute(tmp_path, zarr_format):
    data = _rand((3, 2, 20, 22))  # Z C Y X
    path = tmp_path / "zc.zarr"
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 1, 8, 8),
                            zarr_format=zarr_format)
    arr[:] = data
    arr.attrs.update({"axes": ["z", "c", "y", "x"], "channel_names": NAMES[:2]})
    stack = open_stack(path)
    assert stack.channel_names == NAMES[:2] and stack.shape == (2, 20, 22)
    np.testing.assert_array_equal(stack.read(), data.max(axis=0))


def test_zarr_v3_dimension_names(tmp_path):
    data = _rand((18, 16, 3))  # Y X C: channels last
    path = tmp_path / "yxc.zarr"
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(8, 8, 1),
                            dimension_names=["y", "x", "c"])
    arr[:] = data
    stack = open_stack(path, channel_names=["nucleus", "membrane", "protein"])
    np.testing.assert_array_equal(stack.read(), np.moveaxis(data, -1, 0))


def _write_ome_zarr(path, data, names, version="0.5", levels=2, chunks=(1, 16, 16)):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    omero = {"channels": [{"label": n, "color": "FFFFFF", "window": {"start": 0, "end": 1, "min": 0, "max": 1}}
                          for n in names]}
    write_image(data, root, axes="cyx", fmt=fmt, scale_factors=[2] * (levels - 1), omero=omero,
                storage_options={"chunks": chunks})
    return root


def _level_path(path, level):
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    return attrs.get("ome", attrs)["multiscales"][0]["datasets"][level]["path"]


def _level_array(path, level):
    return zarr.open_group(str(path), mode="r")[_level_path(path, level)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_pyramid_two_levels(tmp_path, version):
    data = _rand((4, 64, 48))
    path = tmp_path / "img.ome.zarr"
    _write_ome_zarr(path, data, NAMES, version, levels=2)
    full, half = open_stack(path), open_stack(path, level=1)
    assert full.channel_names == NAMES == half.channel_names
    assert full.metadata["levels"] == 2 and half.shape == (4, 32, 24)
    np.testing.assert_array_equal(full.read(), data)
    expected_half = np.asarray(_level_array(path, 1))
    np.testing.assert_array_equal(half.read(), expected_half)
    np.testing.assert_array_equal(half.read((4, 4, 8, 8), [2]), expected_half[[2], 4:12, 4:12])


def test_bioformats2raw_container(tmp_path):
    data = _rand((3, 32, 32))
    path = tmp_path / "plate.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    _write_ome_zarr(path / "0", data, NAMES[:3], levels=1)
    stack = open_stack(path)
    assert stack.channel_names == NAMES[:3]
    np.testing.assert_array_equal(stack.read(), data)


@pytest.mark.parametrize("dtype,high", [(np.uint8, 255), (np.uint16, 65535)])
def test_chammi_png_tape_folds_channels(tmp_path, dtype, high):
    cells = _rand((4, 30, 28), dtype=dtype, high=high)  # HPA-like: 4 channels of width 28
    tape = np.concatenate(list(cells), axis=1)
    path = tmp_path / "cell.png"
    Image.fromarray(tape).save(path)
    names = ["microtubules", "protein", "nucleus", "er"]
    stack = open_stack(path, channel_names=names, channel_width=28)
    assert stack.shape == (4, 30, 28) and stack.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stack.read(), cells)
    np.testing.assert_array_equal(stack.read((2, 3, 10, 10), [2]), cells[[2], 2:12, 3:13])


def test_square_tape_needs_no_width_and_tiff_tape(tmp_path):
    cells = _rand((3, 20, 20), dtype=np.uint8, high=255)
    Image.fromarray(np.concatenate(list(cells), axis=1)).save(tmp_path / "sq.png")
    np.testing.assert_array_equal(open_stack(tmp_path / "sq.png", ["nucleus", "membrane", "protein"]).read(), cells)
    tifffile.imwrite(tmp_path / "tape.tif", np.concatenate(list(cells), axis=1))
    stack = open_stack(tmp_path / "tape.tif", ["nucleus", "membrane", "protein"], channel_width=20)
    np.testing.assert_array_equal(stack.read(), cells)


def test_channel_width_is_ignored_for_a_tiff_that_is_already_a_stack(tmp_path):
    data = _rand((3, 20, 20))
    tifffile.imwrite(tmp_path / "cell.ome.tiff", data, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["nucleus", "membrane", "protein"]}})
    stack = open_stack(tmp_path / "cell.ome.tiff", channel_width=20)
    assert stack.metadata["format"] == "ome-tiff"
    np.testing.assert_array_equal(stack.read(), data)


def test_region_read_of_20k_ome_zarr_touches_only_overlapping_chunks(tmp_path):
    # A 4 x 20000 x 20000 OME-Zarr (256-px chunks) of which only the chunks around the crop exist
    # on disk: reading any other chunk would raise (missing chunks are errors), and the store
    # wrapper counts exactly the chunks read.
    path = tmp_path / "big.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}],
        "omero": {"channels": [{"label": n} for n in NAMES]}}
    arr = root.create_array("0", shape=(4, 20000, 20000), chunks=(1, 256, 256), dtype="uint16")
    patch = _rand((4, 256, 512), high=50) + 1
    arr[:, 256:512, 256:768] = patch  # chunk row 1, chunk columns 1 and 2
    stack = open_stack(path)
    assert stack.shape == (4, 20000, 20000) and stack.channel_names == NAMES
    stack.store.reset_counts()
    # a 224-px crop at (260, 500): rows 260..483 (chunk row 1), columns 500..723 (chunk columns 1, 2)
    crop = stack.read((260, 500, 224, 224))
    np.testing.assert_array_equal(crop, patch[:, 4:228, 244:468])
    assert stack.store.chunk_reads == 4 * 1 * 2  # of 4 * 79 * 79 chunks
    assert sorted(stack.store.chunk_keys) == sorted(f"0/c/{c}/1/{x}" for c in range(4) for x in (1, 2))
    stack.store.reset_counts()
    stack.read((300, 300, 10, 10), channels=[2])
    assert stack.store.chunk_keys == ["0/c/2/1/1"]  # one channel, one chunk
