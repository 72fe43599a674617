"""Channel vocabulary, and index tables built from a folder and from a CHAMMI-layout root."""

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cellvit_ssl.channels import VOCABULARY, canonical_name, canonical_names, channel_id, preset
from cellvit_ssl.data.collate import collate_channels
from cellvit_ssl.data.dataset import IndexDataset, read_index
from cellvit_ssl.data.index import build_chammi_index, build_folder_index, main
from cellvit_ssl.errors import DataError


def test_presets_share_ids_and_keep_on_disk_order():
    assert preset("hpa") == ["microtubules", "protein", "nucleus", "er"]
    assert preset("wtc11") == preset("Allen") == ["nucleus", "membrane", "protein"]
    assert preset("cellpainting") == preset("CP") == ["nucleus", "rna", "er", "agp", "mito"]
    nucleus = {channel_id(preset(p)[preset(p).index("nucleus")]) for p in ("hpa", "wtc11", "cp")}
    assert nucleus == {VOCABULARY.index("nucleus")}
    assert channel_id("DNA") == channel_id("Hoechst 33342") == channel_id("dapi") == channel_id("nucleus")
    with pytest.raises(DataError, match="unknown channel preset 'jcb'"):
        preset("jcb")


def test_user_mapping_and_spelling_variants():
    assert canonical_name("Endoplasmic-Reticulum") == "er"
    assert canonical_name("Ch2", {"ch2": "RNA"}) == "rna"  # user names map to any spelling of a vocabulary name
    assert canonical_names(["w1", "w2"], {"w1": "dapi", "w2": "mito"}) == ["nucleus", "mito"]
    with pytest.raises(DataError, match=r"plate1.tif: .*same channel twice \(\['nucleus'\]"):
        canonical_names(["DAPI", "Hoechst"], source="plate1.tif")


def _tape(path, planes):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(planes), axis=1)).save(path)


@pytest.fixture
def chammi_root(tmp_path):
    """Three CHAMMI sub-datasets with PNG tapes and enriched_meta.csv (real column names)."""
    root = tmp_path / "CHAMMI"
    rng = np.random.default_rng(0)
    spec = {"Allen": (3, 24, ["M0", "M1M2"], ["Train", "Task_one"], {"Structure": ["a", "b"]}),
            "HPA": (4, 32, ["golgi", "nucleoplasm"], ["Train", "Task_three"], {"cell_type": ["U2OS", "BJ"]}),
            "CP": (5, 20, ["BRD-1", "DMSO"], ["Train", "Task_four"], {"Plate": ["BR1", "BR2"]})}
    for sub, (c, w, labels, splits, extra) in spec.items():
        rows = []
        for i in range(2):
            rel = f"{sub}/images/cell_{i}.png"
            _tape(root / rel, rng.integers(1, 255, (c, w, w), dtype=np.uint8))
            rows.append({"file_path": rel, "ID": f"{sub}{i}", "channel_width": w, "Label": labels[i],
                         "train_test_split": splits[i], **{k: v[i] for k, v in extra.items()}})
        pd.DataFrame(rows).to_csv(root / sub / "enriched_meta.csv", index=False)
    return root


def test_chammi_root_becomes_index_with_labels_and_splits(chammi_root):
    table = build_chammi_index(chammi_root)
    assert len(table) == 6
    assert table.groupby("dataset")["channels"].first().to_dict() == {
        "Allen": "nucleus;membrane;protein", "HPA": "microtubules;protein;nucleus;er",
        "CP": "nucleus;rna;er;agp;mito"}
    hpa = table[table.dataset == "HPA"]
    assert hpa["label"].tolist() == ["golgi", "nucleoplasm"]
    assert hpa["train_test_split"].tolist() == ["Train", "Task_three"]
    assert hpa["cell_type"].tolist() == ["U2OS", "BJ"]
    assert table[table.dataset == "CP"]["Plate"].tolist() == ["BR1", "BR2"]
    assert table[table.dataset == "Allen"]["channel_width"].tolist() == [24, 24]


def test_chammi_index_feeds_a_mixed_channel_loader(chammi_root, tmp_path):
    out = tmp_path / "chammi.csv"
    assert main(["chammi", str(chammi_root), "-o", str(out)]) == 0
    table = read_index(out)
    ds = IndexDataset(table, None, root=chammi_root, sample_size=16, metadata_columns=["dataset", "label"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=collate_channels)))
    assert batch["image"].shape == (6, 5, 16, 16)
    assert batch["channel_mask"].sum(1).tolist() == [3, 3, 4, 4, 5, 5]
    assert batch["metadata"]["label"][:2] == ["M0", "M1M2"]
    raw = IndexDataset(table, None, root=chammi_root, sample_size=0, normalize="none").load(2)
    tape = np.asarray(Image.open(chammi_root / table.loc[2, "path"]))
    np.testing.assert_array_equal(raw.numpy(), tape.reshape(32, 4, 32).transpose(1, 0, 2))


def test_chammi_errors_name_the_file(chammi_root):
    meta = chammi_root / "HPA" / "enriched_meta.csv"
    pd.read_csv(meta).drop(columns=["channel_width"]).to_csv(meta, index=False)
    with pytest.raises(DataError, match=r"HPA/enriched_meta.csv: has no columns \['channel_width'\]"):
        build_chammi_index(chammi_root)
    with pytest.raises(DataError, match="no CHAMMI sub-dataset"):
        build_chammi_index(chammi_root / "Allen")


def test_folder_index_reads_names_from_files_and_needs_them_otherwise(tmp_path):
    data = np.random.default_rng(0).integers(1, 99, (3, 16, 16), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", data, ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "Tubulin", "Antibody"]}})
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "sub" / "b.tif", data)
    with pytest.raises(DataError, match="b.tif: the file does not name its 3 channels.*--channels"):
        build_folder_index(tmp_path)
    table = build_folder_index(tmp_path, channels=["nucleus", "microtubules", "protein"])
    assert table["path"].tolist() == ["a.ome.tif", "sub/b.tif"]
    only_named = build_folder_index(tmp_path, recursive=False)
    assert only_named["channels"].tolist() == ["nucleus;microtubules;protein"]  # written canonical


def test_folder_index_groups_single_channel_tiffs_by_pattern(tmp_path, capsys):
    rng = np.random.default_rng(0)
    planes = {}
    for site in ("s1", "s2"):
        for ch in (1, 2, 3):
            planes[site, ch] = rng.integers(1, 99, (12, 12), dtype=np.uint16)
            tifffile.imwrite(tmp_path / f"r01c01{site}-ch{ch}.tiff", planes[site, ch])
    pattern = r"r(?P<row>\d+)c(?P<col>\d+)(?P<site>s\d)-(?P<channel>ch\d)"
    out = tmp_path / "idx.csv"
    code = main(["folder", str(tmp_path), "-o", str(out), "--pattern", pattern,
                 "--channel-map", "ch1=nucleus,ch2=rna,ch3=mito", "--channels", "mito,nucleus,rna"])
    assert code == 0 and "2 rows" in capsys.readouterr().out
    table = read_index(out)
    assert table["channels"].tolist() == ["mito;nucleus;rna"] * 2
    assert table["site"].tolist() == ["s1", "s2"]
    ds = IndexDataset(table, ["nucleus", "rna", "mito"], root=tmp_path, mode="image", sample_size=0,
                      normalize="none")
    expected = np.stack([planes["s2", 1], planes["s2", 2], planes["s2", 3]]).astype(np.float32)
    np.testing.assert_array_equal(ds.load(1).numpy(), expected)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["chammi", str(tmp_path), "-o", str(tmp_path / "x.csv")]) == 2
    assert "error: " in capsys.readouterr().err


def test_parquet_index_round_trip_or_clear_error(tmp_path):
    from cellvit_ssl.data.index import write_index

    table = pd.DataFrame({"path": ["a.tif"], "channels": ["nucleus;er"]})
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"idx.parquet: writing parquet needs pyarrow"):
            write_index(table, tmp_path / "idx.parquet")
    else:
        pd.testing.assert_frame_equal(read_index(write_index(table, tmp_path / "idx.parquet")), table)


def test_cells_from_mask_exact_centroids_and_boxes():
    from cellvit_ssl.data.samples import cells_from_mask

    mask = np.zeros((20, 30), np.uint16)
    mask[2:6, 3:9] = 1  # 4 x 6 block: centre (3.5, 5.5)
    mask[10:19, 20:21] = 7  # a vertical line: centre (14, 20)
    table = cells_from_mask(mask)
    assert table["cell_label"].tolist() == [1, 7]
    assert table[["centroid_y", "centroid_x"]].values.tolist() == [[3.5, 5.5], [14.0, 20.0]]
    assert table[["box_y0", "box_x0", "box_y1", "box_x1"]].values.tolist() == [[2, 3, 6, 9], [10, 20, 19, 21]]
    assert table["area"].tolist() == [24, 9]


@pytest.mark.parametrize("fmt,masks,include", [("ome-tiff", "_labels.tif", "*.ome.tif"),
                                               ("ome-zarr", "labels/cells", "*.ome.zarr")])
def test_folder_index_one_row_per_cell_from_masks(tmp_path, fmt, masks, include):
    from cellvit_ssl.data.synthetic import DemoSpec, generate_demo

    demo_index = generate_demo(tmp_path / "demo", DemoSpec(n_images=2, image_size=64, cells_per_image=3), fmt=fmt)
    demo = pd.read_csv(demo_index)
    table = build_folder_index(tmp_path / "demo" / "images", masks=masks, include=include)
    assert len(table) == len(demo)  # every generated cell, and no mask indexed as an image
    assert set(table["channels"]) == {"nucleus;microtubules;er;protein"}
    for (_, got), (_, want) in zip(table.iterrows(), demo.iterrows()):
        assert got["box_y0"] <= want["centroid_y"] < got["box_y1"]
        assert got["box_x0"] <= want["centroid_x"] < got["box_x1"]
    ds = IndexDataset(table, ["nucleus", "protein"], root=tmp_path / "demo" / "images", sample_size=16)
    assert ds.reader.kind(0) == "cells" and ds.load(0).shape == (2, 16, 16)
