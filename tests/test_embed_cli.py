"""``python -m cellvit_ssl.embed``: AnnData / Zarr output, provenance, resuming without duplicates."""

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

import cellvit_ssl.embed as cli
from cellvit_ssl import load_encoder
from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict
from cellvit_ssl.data.samples import Box, read_region
from cellvit_ssl.embed_io import SAMPLE_COLUMNS, ResumableWriter
from cellvit_ssl.models.channels import build_model

CHANNELS = ["nucleus", "microtubules", "er", "protein"]


@pytest.fixture
def checkpoint(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, CHANNELS)
    return save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(tiny_cfg),
                            "backbone": model.state_dict()}, tmp_path / "teacher.pt")


@pytest.fixture
def dataset(tmp_path):
    """Two 4-channel OME-TIFF fields (channels stored in another order) + masks + a cell index."""
    rng = np.random.default_rng(0)
    rows = []
    for f in range(2):
        image = rng.poisson(50, size=(4, 64, 64)).astype(np.uint16)
        labels = np.zeros((64, 64), np.int32)
        for k, (y, x) in enumerate([(10, 12), (40, 20), (30, 50), (55, 55)], start=1):
            labels[max(y - 5, 0) : y + 5, max(x - 5, 0) : x + 5] = k + 10 * f
            image[:, max(y - 5, 0) : y + 5, max(x - 5, 0) : x + 5] += np.uint16(30 * k)
        stored = ["er", "nucleus", "protein", "microtubules"]
        perm = [CHANNELS.index(c) for c in stored]
        tifffile.imwrite(tmp_path / f"f{f}.ome.tif", image[perm], ome=True,
                         metadata={"axes": "CYX", "Channel": {"Name": stored}})
        tifffile.imwrite(tmp_path / f"f{f}_labels.tif", labels)
        for k in np.unique(labels)[1:]:
            ys, xs = np.nonzero(labels == k)
            rows.append({"path": f"f{f}.ome.tif", "centroid_y": ys.mean(), "centroid_x": xs.mean(),
                         "label": f"class{k % 3}", "plate": f"P{f}", "split": "train" if k % 2 else "test"})
    index = tmp_path / "index.csv"
    pd.DataFrame(rows).to_csv(index, index=False)
    return index


def test_index_to_h5ad_with_obs_columns_provenance_and_exact_embeddings(checkpoint, dataset, tmp_path):
    out = tmp_path / "cells.h5ad"
    assert cli.main([str(checkpoint), "--index", str(dataset), "--out", str(out), "--no-progress"]) == 0
    adata = anndata.read_h5ad(out)
    index = pd.read_csv(dataset)
    assert adata.n_obs == len(index) == 8
    assert list(adata.obs.columns) == list(index.columns) + list(SAMPLE_COLUMNS) + ["sample_kind"]
    assert adata.obs["label"].tolist() == index["label"].tolist()
    assert adata.uns["model"]["variant"] == "boc" and list(adata.uns["model"]["channels"]) == CHANNELS
    assert adata.uns["embed"]["sample_size"] == 32 and "model" in adata.uns["config"]
    assert "normalize" in adata.uns["preprocess"]
    # row 5 by hand: its crop around the centroid, channels reordered by name, embedded by the API
    enc = load_encoder(checkpoint, device="cpu")
    row = index.iloc[5]
    image = tifffile.imread(tmp_path / row["path"])
    crop = read_region(image, Box.around((row["centroid_y"], row["centroid_x"]), 32))
    ref = enc.embed(crop, ["er", "nucleus", "protein", "microtubules"])
    np.testing.assert_allclose(adata.X[5], ref[0], atol=1e-5, rtol=0)
    box = Box.around((row["centroid_y"], row["centroid_x"]), 32)
    assert adata.obs.iloc[5][list(SAMPLE_COLUMNS)].tolist() == list(box.as_tuple())
    assert set(adata.obs["sample_kind"]) == {"cells"}


def test_interrupted_run_resumes_without_duplicates(checkpoint, dataset, tmp_path, monkeypatch):
    args = [str(checkpoint), "--index", str(dataset), "--chunk-rows", "3", "--no-progress"]
    full = tmp_path / "full.h5ad"
    assert cli.main(args + ["--out", str(full)]) == 0

    out = tmp_path / "cells.h5ad"
    saves = []
    real_save = ResumableWriter.save

    def save_then_die(self, start, x, boxes, kinds):
        if len(saves) == 1:
            raise KeyboardInterrupt
        saves.append(start)
        real_save(self, start, x, boxes, kinds)

    monkeypatch.setattr(ResumableWriter, "save", save_then_die)
    assert cli.main(args + ["--out", str(out)]) == 130
    assert not out.exists() and len(list((tmp_path / "cells.h5ad.partial").glob("chunk_*.npz"))) == 1
    monkeypatch.setattr(ResumableWriter, "save", real_save)

    embedded = []
    real_featurize = cli.featurize_rows
    monkeypatch.setattr(cli, "featurize_rows",
                        lambda r, rows, f, w: embedded.extend(rows) or real_featurize(r, rows, f, w))
    assert cli.main(args + ["--out", str(out)]) == 0
    assert embedded == [3, 4, 5, 6, 7]  # only the rows the first run had not saved
    a, b = anndata.read_h5ad(out), anndata.read_h5ad(full)
    assert a.n_obs == 8 and a.obs.index.is_unique
    np.testing.assert_array_equal(a.X, b.X)
    assert not (tmp_path / "cells.h5ad.partial").exists()

    embedded.clear()
    mtime = out.stat().st_mtime_ns
    assert cli.main(args + ["--out", str(out)]) == 0  # complete: nothing appended, nothing recomputed
    assert embedded == [] and out.stat().st_mtime_ns == mtime
    assert anndata.read_h5ad(out).n_obs == 8


def test_reader_workers_give_the_same_rows(checkpoint, dataset, tmp_path):
    a, b = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    base = [str(checkpoint), "--index", str(dataset), "--no-progress", "--chunk-rows", "5"]
    assert cli.main(base + ["--out", str(a)]) == 0
    assert cli.main(base + ["--out", str(b), "--workers", "2"]) == 0
    np.testing.assert_array_equal(anndata.read_h5ad(a).X, anndata.read_h5ad(b).X)
    assert anndata.read_h5ad(b).obs.equals(anndata.read_h5ad(a).obs)


def test_changed_inputs_do_not_mix_with_an_existing_output(checkpoint, dataset, tmp_path, capsys):
    out = tmp_path / "cells.h5ad"
    base = [str(checkpoint), "--index", str(dataset), "--out", str(out), "--no-progress"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--crop-size", "24"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(base + ["--crop-size", "24", "--overwrite"]) == 0
    assert anndata.read_h5ad(out).uns["embed"]["sample_size"] == 24


def test_images_with_masks_give_one_row_per_cell_and_zarr_output(checkpoint, dataset, tmp_path):
    out = tmp_path / "cells.zarr"
    images = [str(tmp_path / "f0.ome.tif"), str(tmp_path / "f1.ome.tif")]
    masks = [str(tmp_path / "f0_labels.tif"), str(tmp_path / "f1_labels.tif")]
    code = cli.main([str(checkpoint), "--images", *images, "--labels", *masks, "--mask-background",
                     "--out", str(out), "--no-progress"])
    assert code == 0
    adata = anndata.read_zarr(out)
    assert adata.obs["cell_label"].tolist() == [1, 2, 3, 4, 11, 12, 13, 14]
    enc = load_encoder(checkpoint, device="cpu")
    image = tifffile.imread(images[1])
    z, ids = enc.embed_cells(image, tifffile.imread(masks[1]), ["er", "nucleus", "protein", "microtubules"],
                             mask_background=True)
    assert ids.tolist() == [11, 12, 13, 14]
    np.testing.assert_allclose(adata.X[4:], z, atol=1e-5, rtol=0)


def test_whole_images_and_user_errors(checkpoint, dataset, tmp_path, capsys):
    out = tmp_path / "fields.h5ad"
    images = [str(tmp_path / "f0.ome.tif"), str(tmp_path / "f1.ome.tif")]
    assert cli.main([str(checkpoint), "--images", *images, "--out", str(out), "--no-progress"]) == 0
    adata = anndata.read_h5ad(out)
    # fields without a centroid, for a model trained in auto mode: the mean over the image's grid of tiles
    assert adata.n_obs == 2 and adata.obs[list(SAMPLE_COLUMNS)].values.tolist() == [[0, 0, 64, 64]] * 2
    assert adata.obs["sample_kind"].tolist() == ["tiles", "tiles"]
    assert cli.main([str(checkpoint), "--images", *images, "--labels", images[0], "--out",
                     str(tmp_path / "x.h5ad")]) == 2
    assert "one per image" in capsys.readouterr().err
    assert cli.main([str(checkpoint), "--index", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert cli.main([str(checkpoint), "--index", str(dataset), "--out", str(tmp_path / "x.csv")]) == 2
    assert ".h5ad or .zarr" in capsys.readouterr().err


def test_ome_zarr_label_images_are_found(tmp_path):
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image, write_labels

    from cellvit_ssl.data.readers import open_labels

    labels = np.zeros((32, 32), np.int32)
    labels[4:10, 4:10] = 5
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=3)
    write_image(np.zeros((2, 32, 32), np.uint16), root, axes="cyx", fmt=FormatV05())
    write_labels(labels, root, name="cells", axes="yx", fmt=FormatV05())
    for path in ("img.ome.zarr", "img.ome.zarr/labels", "img.ome.zarr/labels/cells"):
        np.testing.assert_array_equal(np.asarray(open_labels(tmp_path / path)), labels)


def test_pooling_a_named_channel_writes_that_block(checkpoint, dataset, tmp_path):
    out, full = tmp_path / "protein.h5ad", tmp_path / "all.h5ad"
    base = [str(checkpoint), "--index", str(dataset), "--no-progress"]
    assert cli.main(base + ["--out", str(full)]) == 0
    assert cli.main(base + ["--out", str(out), "embed.pooling=protein"]) == 0
    a, b = anndata.read_h5ad(out), anndata.read_h5ad(full)
    d = b.uns["model"]["channel_dim"]
    assert a.X.shape == (8, d) and a.uns["embed"]["pooling"] == "protein"
    np.testing.assert_allclose(a.X, b.X[:, 3 * d : 4 * d], atol=1e-6, rtol=0)  # protein is the model's 4th channel
    assert cli.main(base + ["--out", str(tmp_path / "x.h5ad"), "--pooling", "golgi"]) == 2
