import numpy as np
import pytest
import tifffile
import zarr

from cellvit_ssl import DataError, open_stack

NAMES = ["nucleus", "microtubules", "er", "protein"]


def _image(c=4, h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, (c, h, w), dtype=np.uint16)


def test_ome_tiff_round_trip(tmp_path):
    img = _image()
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, img, ome=True, metadata={"axes": "CYX", "Channel": {"Name": NAMES}})
    stack = open_stack(path)
    assert stack.channel_names == NAMES
    assert stack.shape == (4, 40, 50)
    np.testing.assert_array_equal(stack.read(), img)
    np.testing.assert_array_equal(stack.read((3, 4, 10, 20)), img[:, 3:13, 4:24])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_round_trip(tmp_path, version):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    img = _image(c=3)
    fmt = FormatV04() if version == "0.4" else FormatV05()
    path = tmp_path / "a.ome.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    write_image(img, root, axes="cyx", fmt=fmt, scale_factors=[2],
                omero={"channels": [{"label": n, "color": "FFFFFF", "active": True,
                                     "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}
                                    for n in NAMES[:3]]})
    stack = open_stack(path)
    assert stack.channel_names == NAMES[:3]
    assert stack.metadata["version"] == version
    np.testing.assert_array_equal(stack.read(), img)
    assert open_stack(path, level=1).shape == (3, 20, 25)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_needs_and_takes_names(tmp_path, zarr_format):
    img = _image(c=5)
    path = tmp_path / "plain.zarr"
    arr = zarr.create_array(str(path), shape=img.shape, dtype=img.dtype, chunks=(1, 16, 16),
                            zarr_format=zarr_format)
    arr[:] = img
    with pytest.raises(DataError, match="plain.zarr.*does not name"):
        open_stack(path)
    names = ["nucleus", "rna", "er", "agp", "mito"]
    stack = open_stack(path, channel_names=names)
    assert stack.channel_names == names
    np.testing.assert_array_equal(stack.read((0, 0, 8, 8)), img[:, :8, :8])


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.ome.tif"
    with pytest.raises(DataError, match="nope.ome.tif"):
        open_stack(missing)


def test_wrong_channel_count_names_file(tmp_path):
    path = tmp_path / "three.ome.tif"
    tifffile.imwrite(path, _image(c=3), ome=True, metadata={"axes": "CYX", "Channel": {"Name": NAMES[:3]}})
    with pytest.raises(DataError, match=r"three.ome.tif.*3 channels but 4"):
        open_stack(path, channel_names=NAMES)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, _image(c=1)[0])
    with pytest.raises(DataError, match="flat.tif.*no channel axis"):
        open_stack(path)
