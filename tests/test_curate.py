"""``python -m cellvit_ssl.curate``: duplicates, hierarchical balancing, retrieval, resuming, configuration."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

import cellvit_ssl.curate as cur
from cellvit_ssl.curate_features import FeaturesMismatchError, PixelFeatures, dihedral_poses
from cellvit_ssl.curate_search import faiss_available, make_search
from cellvit_ssl.curate_select import (
    FeatureMatrix,
    Hierarchy,
    balanced_sample,
    even_split,
    find_duplicates,
    hierarchical_kmeans,
    retrieve,
)
from cellvit_ssl.embed_io import table_sha256
from cellvit_ssl.errors import ConfigError, DataError

BACKENDS = ["sklearn", *(["faiss"] if faiss_available() else [])]


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _features_with_copies(n=600, dim=24, copies=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    src = rng.choice(n - copies, size=copies, replace=False)
    x[n - copies :] = x[src] + 0.02 * rng.normal(size=(copies, dim))
    return _unit(x), src


def _write_embeddings(folder, dim=32, seed=0, classes=(300, 25, 25, 25, 25)):
    """An index and an aligned embed-style .h5ad with a 12:1 imbalance of separable classes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), classes)
    centres = rng.normal(size=(len(classes), dim))
    subs = centres[:, None] + 0.7 * rng.normal(size=(len(classes), 4, dim))
    x = (subs[labels, rng.integers(0, 4, len(labels))] + 0.5 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    x[-10:] = x[:10] + 0.001  # ten near-copies of the first rows
    index = pd.DataFrame({"path": [f"f{i // 10}.tif" for i in range(len(labels))], "cell_id": np.arange(len(labels)),
                          "centroid_y": 5.0, "centroid_x": 5.0, "label": np.array(list("abcde"))[labels],
                          "plate": np.array(["P1", "P2"])[np.arange(len(labels)) % 2]})
    path = folder / "index.csv"
    index.to_csv(path, index=False)
    obs = index.copy()
    obs.index = obs.index.astype(str)
    h5 = folder / "emb.h5ad"
    anndata.AnnData(X=x, obs=obs, uns={"embed": {"fingerprint": json.dumps({"index_sha256": table_sha256(index)})}}
                    ).write_h5ad(h5)
    return path, h5, labels


def _args(index, features, out, *extra):
    return [f"data.index={index}", f"curate.features={features}", f"curate.out={out}", "curate.progress=false",
            *extra]


# ----------------------------------------------------------------------------- selection pieces
def test_even_split_fills_small_groups_and_shares_the_rest_evenly():
    assert even_split(np.array([2, 50, 50]), 30).tolist() == [2, 14, 14]
    assert even_split(np.array([5, 5]), 100).tolist() == [5, 5]
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 30, size=int(rng.integers(1, 12)))
        total = int(rng.integers(0, 200))
        got = even_split(sizes, total)
        assert got.sum() == min(total, sizes.sum()) and (got <= sizes).all()
        open_groups = got < sizes  # groups with room left differ by at most one
        if open_groups.any():
            assert got[open_groups].max() - got[open_groups].min() <= 1
            assert got[open_groups].min() >= got[~open_groups].max(initial=0)


def test_balanced_sample_splits_evenly_down_the_hierarchy():
    # level 0: 6 clusters (sizes 500, 500, 500, 500, 20, 20) under 2 top clusters (4 big ones | 2 small ones)
    sizes0 = [500, 500, 500, 500, 20, 20]
    labels0 = np.repeat(np.arange(6), sizes0)
    parents = np.array([0, 0, 0, 0, 1, 1])
    h = Hierarchy([labels0, parents[labels0]], [parents], [6, 2])
    picked = balanced_sample(h, 200, seed=0)
    assert len(picked) == len(np.unique(picked)) == 200
    top = np.bincount(parents[labels0[picked]])
    assert top.tolist() == [160, 40]  # the small top cluster gives all its 40 rows
    assert np.bincount(labels0[picked]).tolist() == [40, 40, 40, 40, 20, 20]
    assert balanced_sample(h, 10_000).tolist() == list(range(len(labels0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_name_an_earlier_kept_row_within_the_threshold(backend):
    x, src = _features_with_copies()
    dup = find_duplicates(FeatureMatrix(x), make_search(backend), threshold=0.95, partitions=6, probe=2)
    copies = np.arange(len(x) - len(src), len(x))
    assert (dup.duplicate_of[copies] == src).all()
    dropped = np.flatnonzero(dup.duplicate_of >= 0)
    assert set(dropped) == set(copies)
    reps = dup.duplicate_of[dropped]
    assert (reps < dropped).all() and (dup.duplicate_of[reps] == -1).all()
    np.testing.assert_allclose(dup.similarity[dropped], np.sum(x[dropped] * x[reps], axis=1), atol=1e-5)
    assert np.nanmin(dup.nearest) > -1 and np.isnan(dup.similarity[dup.duplicate_of < 0]).all()


def test_no_chaining_through_dropped_rows():
    # a ~ b (0.96), b ~ c (0.96), a ~ c (0.85): b is dropped for a, c stays (it is not close to a)
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.28), np.sin(0.28), 0.0])
    c = np.array([np.cos(0.56), np.sin(0.56), 0.0])
    x = _unit(np.stack([a, b, c]))
    dup = find_duplicates(FeatureMatrix(x), make_search("sklearn"), threshold=0.95)
    assert dup.duplicate_of.tolist() == [-1, 0, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partitioned_search_finds_what_a_single_partition_finds(backend):
    x, _ = _features_with_copies(n=800, copies=60, seed=3)
    search = make_search(backend)
    whole = find_duplicates(FeatureMatrix(x), search, 0.95, partitions=1)
    parts = find_duplicates(FeatureMatrix(x), search, 0.95, partitions=8, probe=2)
    assert parts.partitions == 8
    np.testing.assert_array_equal(parts.duplicate_of, whole.duplicate_of)


def test_poses_catch_flips_and_rotations_of_pixel_thumbnails():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    crops = ndimage.gaussian_filter(rng.random((30, 3, 32, 32)), (0, 0, 3, 3)) * 4000
    crops[:, :, 4:14, 6:20] += 100  # an asymmetric block, so that no crop is its own flip
    flipped = np.stack([crops[0][:, :, ::-1], crops[1][:, ::-1], np.rot90(crops[2], 1, axes=(1, 2))])
    from cellvit_ssl.data.samples import Box, RawSample

    px = PixelFeatures(pd.DataFrame({"path": []}), ".", 32, size=8, blur=1.0)
    samples = [RawSample(np.ascontiguousarray(c, np.float32), ["nucleus", "er", "protein"], np.ones(3, bool),
                         Box(0, 0, 32, 32), "cells", "test", i) for i, c in enumerate(np.concatenate([crops, flipped]))]
    raw = px.thumbnails(samples)
    poses = dihedral_poses(3, 8)
    mean = np.mean([raw.mean(0)[p] for p in poses], axis=0)  # centred as curate does: on the pose-averaged mean
    x = _unit(raw - mean)
    with_poses = find_duplicates(FeatureMatrix(x, poses), make_search("sklearn"), threshold=0.99)
    assert with_poses.duplicate_of[30:].tolist() == [0, 1, 2]
    without = find_duplicates(FeatureMatrix(x), make_search("sklearn"), threshold=0.99)
    assert (without.duplicate_of[30:] == -1).all()  # the poses are what catches them


def test_dihedral_poses_are_the_flips_and_rotations():
    img = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    poses = dihedral_poses(2, 4)
    flat = img.ravel()
    got = {tuple(flat[p]) for p in poses}
    want = set()
    for k in range(4):
        r = np.rot90(img, k, axes=(1, 2))
        want |= {tuple(r.ravel()), tuple(r[:, :, ::-1].ravel())}
    assert got == want and len(got) == 8 and (poses[0] == np.arange(32)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hierarchy_is_consistent_and_balances_separable_classes(backend, tmp_path):
    _, h5, labels = _write_embeddings(tmp_path)
    x = _unit(anndata.read_h5ad(h5).X)
    h = hierarchical_kmeans(FeatureMatrix(x), np.arange(len(x)), [40, 10, 5], make_search(backend), seed=0)
    assert h.sizes == [40, 10, 5]
    assert (h.labels[1] == h.parents[0][h.labels[0]]).all() and (h.labels[2] == h.parents[1][h.labels[1]]).all()
    counts = np.bincount(labels[balanced_sample(h, 100, seed=0)], minlength=5)
    assert counts.max() / max(counts.min(), 1) <= 3, counts  # 12:1 in the input


def test_retrieval_takes_turns_across_seeds():
    rng = np.random.default_rng(0)
    dense = _unit(np.array([1.0, 0, 0]) + 0.05 * rng.normal(size=(50, 3)))  # many rows near seed 0
    sparse = _unit(np.array([0, 1.0, 0]) + 0.05 * rng.normal(size=(5, 3)))  # few near seed 1
    x = np.concatenate([dense, sparse, _unit(np.array([[0, 0, 1.0]]))])
    seeds = np.array([0, 50])
    rows, sims = retrieve(FeatureMatrix(x), np.arange(1, len(x)), seeds, 8, make_search("sklearn"))
    near_sparse = np.isin(rows, np.arange(50, 55))
    assert len(rows) == 8 and near_sparse.sum() == 4  # 4 turns: one row of each seed per turn
    assert 55 not in rows
    only_close, _ = retrieve(FeatureMatrix(x), np.arange(1, len(x)), seeds, 100, make_search("sklearn"),
                             min_similarity=0.5)
    assert 55 not in only_close and len(only_close) == 54


# ----------------------------------------------------------------------------- the command
def test_command_writes_curated_index_all_rows_and_summary(tmp_path, capsys):
    index, h5, labels = _write_embeddings(tmp_path)
    out = tmp_path / "out" / "cur.csv"
    assert cur.main(_args(index, h5, out, "curate.target_size=100", "curate.clusters=[40,10,5]",
                          "curate.retrieval.quota=5", "curate.retrieval.seed_label=label=e", "--backend",
                          "sklearn")) == 0
    full = pd.read_csv(tmp_path / "out" / "cur.all.csv", keep_default_na=False)
    curated = pd.read_csv(out, keep_default_na=False)
    assert len(full) == 400 and list(full.columns[:6]) == ["path", "cell_id", "centroid_y", "centroid_x", "label",
                                                            "plate"]
    for column in ("source_row", "cluster_0", "cluster_1", "cluster_2", "duplicate_of", "selected_by", "dropped_by"):
        assert column in curated.columns
    assert full["source_row"].tolist() == list(range(400))
    dups = full[full.dropped_by == "duplicate"]
    assert dups.source_row.tolist() == list(range(390, 400)) and dups.duplicate_of.tolist() == list(range(10))
    # a duplicate carries its representative's clusters
    assert (full.loc[390:, "cluster_0"].to_numpy() == full.loc[:9, "cluster_0"].to_numpy()).all()
    assert (curated.selected_by.value_counts().to_dict() == {"balanced": 100, "retrieval": 5})
    assert set(curated.source_row) == set(full.source_row[full.selected_by != ""])
    assert (full.dropped_by[full.selected_by == ""] != "").all()
    assert curated.path.str.startswith("../").all()  # relative to the curated index's folder
    summary = json.loads((tmp_path / "out" / "cur.summary.json").read_text())
    assert summary["rows"] == {"input": 400, "duplicates": 10, "deduplicated": 390, "balanced": 100, "retrieved": 5,
                               "selected": 105}
    assert summary["rows_matched_by"] == "index fingerprint" and summary["backend"] == "sklearn"
    assert [lv["clusters"] for lv in summary["levels"]] == [40, 10, 5]
    groups = pd.read_csv(tmp_path / "out" / "cur.groups.csv")
    assert set(groups.column) == {"plate", "label"} and groups[groups.column == "label"].input.sum() == 400
    clusters = pd.read_csv(tmp_path / "out" / "cur.clusters.csv")
    assert clusters[clusters.level == 0].selected.sum() == 105
    assert not (tmp_path / "out" / "cur.csv.partial").exists()
    err = capsys.readouterr().err
    assert "curated 105 of 400 rows" in err and "per 'label'" in err and "wrote" in err
    # a finished output is not recomputed; other settings need overwrite
    assert cur.main(_args(index, h5, out, "curate.target_size=100", "curate.clusters=[40,10,5]",
                          "curate.retrieval.quota=5", "curate.retrieval.seed_label=label=e", "--backend",
                          "sklearn", "curate.progress=true")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert cur.main(_args(index, h5, out, "curate.target_size=50")) == 2
    assert "curate.overwrite=true" in capsys.readouterr().err
    assert cur.main(_args(index, h5, out, "curate.target_size=50", "--overwrite", "--backend", "sklearn")) == 0
    assert len(pd.read_csv(out)) == 50


def test_embeddings_of_another_index_are_refused(tmp_path):
    index, h5, _ = _write_embeddings(tmp_path)
    table = pd.read_csv(index)
    shorter = tmp_path / "shorter.csv"
    table.iloc[:-1].to_csv(shorter, index=False)
    with pytest.raises(FeaturesMismatchError, match="399"):
        cur.run(cur.load_curate_config(None, _args(shorter, h5, tmp_path / "a.csv")))
    swapped = tmp_path / "swapped.csv"
    table.assign(path=table.path[::-1].to_numpy()).to_csv(swapped, index=False)
    with pytest.raises(FeaturesMismatchError, match="row 0 has path="):
        cur.run(cur.load_curate_config(None, _args(swapped, h5, tmp_path / "b.csv")))
    # another index whose rows are the same crops (a column added) is accepted by its crop columns
    relabelled = tmp_path / "relabelled.csv"
    table.assign(extra=1).to_csv(relabelled, index=False)
    result = cur.run(cur.load_curate_config(None, _args(relabelled, h5, tmp_path / "c.csv")))
    assert result.summary["rows_matched_by"] == "columns path, centroid_y, centroid_x, cell_id"


def test_interrupted_run_resumes_from_its_stages(tmp_path, monkeypatch):
    index, h5, _ = _write_embeddings(tmp_path)
    argv = _args(index, h5, tmp_path / "cur.csv", "curate.target_size=80", "curate.clusters=[30,6]",
                 "curate.backend=sklearn", "curate.block_rows=64")
    reference = tmp_path / "ref.csv"
    assert cur.main(_args(index, h5, reference, *argv[4:])) == 0

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cur, "hierarchical_kmeans", interrupt)
    assert cur.main(argv) == 130
    partial = tmp_path / "cur.csv.partial"
    manifest = json.loads((partial / "manifest.json").read_text())
    assert manifest["features"]["rows_done"] == 400 and "duplicates" in manifest
    monkeypatch.undo()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr(cur, "find_duplicates", must_not_run)
    assert cur.main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cur.csv"), pd.read_csv(reference))


def test_configuration_errors_name_the_key():
    ok = ["data.index=a.csv", "curate.features=pixels", "curate.out=b.csv"]
    with pytest.raises(ConfigError, match="did you mean 'curate.target_size'"):
        cur.load_curate_config(None, [*ok, "curate.target_siz=5"])
    with pytest.raises(ConfigError, match="did you mean 'curate.dedup.threshold'"):
        cur.load_curate_config(None, [*ok, "curate.treshold=0.9"])
    with pytest.raises(ConfigError, match="curate.backend"):
        cur.load_curate_config(None, [*ok, "curate.backend=gpu"])
    with pytest.raises(ConfigError, match="curate.out is required"):
        cur.load_curate_config(None, ok[:2])
    with pytest.raises(ConfigError, match="each level smaller"):
        cur.load_curate_config(None, [*ok, "curate.clusters=[10,20]"])
    with pytest.raises(ConfigError, match="no seeds"):
        cur.load_curate_config(None, [*ok, "curate.retrieval.quota=5"])
    with pytest.raises(DataError, match="curate.features='x.npy'"):
        cur.load_curate_config(None, [*ok[:1], "curate.features=x.npy", ok[2]])
    with pytest.raises(ConfigError, match="did you mean '--index'"):
        cur.COMMAND_LINE.parse(["--indx", "a.csv"])
    flags = cur.COMMAND_LINE.load(cur.COMMAND_LINE.parse(["--index", "a.csv", "--target-size=9", "--overwrite",
                                                          "--features", "pixels", "--out", "b.csv"]))
    keys = cur.load_curate_config(None, [*ok, "curate.target_size=9", "curate.overwrite=true"])
    assert flags == keys and keys.data.index == "a.csv" and keys.curate.overwrite
    cfg = cur.load_curate_config(None, [*ok, "curate.backend=faiss", "curate.clusters=[100,10]"]).curate
    assert cfg.backend is cur.Backend.faiss and cfg.clusters == [100, 10]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "curate.yaml"
    path.write_text("data:\n  index: a.csv\ncurate:\n  features: pixels\n  out: b.csv\n  target_size: 10\n"
                    "  dedup:\n    threshold: 0.9\n")
    cfg = cur.load_curate_config(path, ["curate.target_size=20"]).curate
    assert cfg.target_size == 20 and cfg.dedup.threshold == 0.9 and cfg.pixels.size == 16
    path.write_text("curate:\n  dedupe:\n    threshold: 0.9\n")
    with pytest.raises(ConfigError, match="did you mean 'curate.dedup'"):
        cur.load_curate_config(path)


def test_auto_levels():
    assert cur.auto_clusters(1_000_000) == [1000, 200, 40, 8]
    assert cur.auto_clusters(2400) == [49, 10]
    assert cur.auto_clusters(30) == [5]


# ----------------------------------------------------------------------------- feature sources
def _tiny_screen(tmp_path, copies=True):
    """Four 4-channel fields of textured blobs; rows 24.. are a flipped and a 1-px shifted copy."""
    rng = np.random.default_rng(0)
    from scipy import ndimage

    rows = []
    for f in range(4):
        clean = ndimage.gaussian_filter(rng.random((4, 96, 96)).astype(np.float32), (0, 2, 2)) * 600
        yy, xx = np.mgrid[0:96, 0:96]
        for cy, cx in [(24, 24), (24, 70), (70, 24), (70, 70), (47, 47), (30, 50)]:
            clean[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 40] += rng.uniform(100, 300)
            rows.append({"path": f"f{f}.ome.tif", "centroid_y": float(cy), "centroid_x": float(cx)})
        image = rng.poisson(clean + 20).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"f{f}.ome.tif", image, ome=True,
                         metadata={"axes": "CYX", "Channel": {"Name": ["nucleus", "microtubules", "er", "protein"]}})
        if f == 0:
            tifffile.imwrite(tmp_path / "flipped.ome.tif", np.ascontiguousarray(image[:, :, ::-1]), ome=True,
                             metadata={"axes": "CYX", "Channel": {"Name": ["nucleus", "microtubules", "er",
                                                                           "protein"]}})
    if copies:
        rows.append({"path": "flipped.ome.tif", "centroid_y": 24.0, "centroid_x": 96.0 - 24})  # row 0 flipped
        rows.append({"path": "f1.ome.tif", "centroid_y": 25.0, "centroid_x": 70.0})  # row 7 moved by 1 px
    index = tmp_path / "index.csv"
    pd.DataFrame(rows).to_csv(index, index=False)
    return index


def test_pixel_features_catch_flipped_and_shifted_copies(tmp_path):
    index = _tiny_screen(tmp_path)
    out = tmp_path / "cur.csv"
    cfg = cur.load_curate_config(None, _args(index, "pixels", out, "data.sample_size=32", "curate.clusters=[4,2]",
                                             "curate.dedup.threshold=0.95", "curate.pixels.chunk_rows=7"))
    result = cur.run(cfg)
    full = pd.read_csv(result.files["all_rows"], keep_default_na=False)
    assert full.duplicate_of.tolist()[-2:] == [0, 7]
    assert (full.duplicate_of[:24] == -1).all()
    assert result.summary["rows_matched_by"] == "computed from the index"


def test_an_index_that_remembers_its_root_is_curated_from_anywhere(tmp_path, monkeypatch):
    """The index builder's ``root`` column: curation reads the images there (not beside the index) and
    the curated index still points at them."""
    from cellvit_ssl.data.samples import SampleReader

    images = tmp_path / "images"
    images.mkdir()
    table = pd.read_csv(_tiny_screen(images, copies=False))
    table["root"] = str(images)
    elsewhere = tmp_path / "indexes"
    elsewhere.mkdir()
    index = elsewhere / "index.csv"
    table.to_csv(index, index=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "cur.csv"
    result = cur.run(cur.load_curate_config(None, _args(index, "pixels", out, "data.sample_size=32",
                                                        "curate.clusters=[4,2]", "curate.dedup.enabled=false")))
    curated = pd.read_csv(result.files["index"])
    assert set(curated["root"]) == {str(images.resolve())} and set(curated["path"]) <= set(table["path"])
    SampleReader(curated, default_root=out.parent).check_files(range(len(curated)))


def _random_teacher(tmp_path, tiny_cfg, channels):
    """A ``teacher.pt`` of the tiny model with random weights, and the model."""
    from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
    from cellvit_ssl.config import config_to_dict
    from cellvit_ssl.models.channels import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, channels)
    ckpt = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(tiny_cfg),
                            "backbone": model.state_dict()}, tmp_path / "teacher.pt")
    return ckpt, model


def test_checkpoint_features_go_through_the_embed_command(tmp_path, tiny_cfg):
    ckpt, _ = _random_teacher(tmp_path, tiny_cfg, ["nucleus", "microtubules", "er", "protein"])
    index = _tiny_screen(tmp_path, copies=False)
    out = tmp_path / "out" / "cur.csv"
    # random weights embed every crop alike: no deduplication here, this is about the embed path
    result = cur.run(cur.load_curate_config(None, _args(index, ckpt, out, "curate.clusters=[4,2]",
                                                        "curate.embed.device=cpu", "curate.dedup.enabled=false")))
    emb = anndata.read_h5ad(result.files["embeddings"])
    assert result.files["embeddings"] == tmp_path / "out" / "cur.embeddings.h5ad"
    assert emb.n_obs == 24 and result.summary["rows_matched_by"] == "index fingerprint"
    assert len(pd.read_csv(out)) == 24


def test_checkpoint_features_take_the_embed_pooling(tmp_path, tiny_cfg):
    """``curate.embed.pooling`` picks the channel blocks the clusters are made of, as ``embed --pooling``."""
    from cellvit_ssl.errors import DataError

    channels = ["nucleus", "microtubules", "er", "protein"]
    ckpt, model = _random_teacher(tmp_path, tiny_cfg, channels)
    index = _tiny_screen(tmp_path, copies=False)
    base = ("curate.clusters=[4,2]", "curate.embed.device=cpu", "curate.dedup.enabled=false")
    widths = {}
    for pooling in ("default", "protein"):
        out = tmp_path / pooling / "cur.csv"
        argv = _args(index, ckpt, out, *base, f"curate.embed.pooling={pooling}")
        result = cur.run(cur.load_curate_config(None, argv))
        widths[pooling] = anndata.read_h5ad(result.files["embeddings"]).n_vars
    assert widths == {"default": model.output_dim, "protein": model.output_dim // len(channels)}
    with pytest.raises(DataError, match="pooling='golgi'"):
        cur.run(cur.load_curate_config(None, _args(index, ckpt, tmp_path / "bad" / "cur.csv", *base,
                                                   "curate.embed.pooling=golgi")))


def test_cluster_columns_are_colourable_features_in_the_inspector(tmp_path):
    """The inspector keeps a Labels layer's own columns, so a curated index's cluster_* colour the map."""
    pytest.importorskip("qtpy")
    from napari_plugin.analysis import build_features
    from napari_plugin.plot import _colourable

    index, h5, _ = _write_embeddings(tmp_path)
    result = cur.run(cur.load_curate_config(None, _args(index, h5, tmp_path / "cur.csv", "curate.clusters=[20,4]")))
    curated = pd.read_csv(result.files["all_rows"])
    image = curated[curated.path == "f3.tif"]  # the cells of one image, keyed by their label id
    existing = image.rename(columns={"cell_id": "index"})[["index", "cluster_0", "cluster_1", "duplicate_of"]]
    ids = existing["index"].to_numpy()
    labels = np.zeros((8, 8), np.int64)
    features = build_features(ids, np.ones((len(ids), 3), np.float32), np.zeros((len(ids), 2)), "PCA",
                              np.zeros(len(ids), int), None, [], labels, existing=existing)
    for column in ("cluster_0", "cluster_1"):
        assert column in features.columns and _colourable(features[column])
        assert features.set_index("index")[column].to_dict() == existing.set_index("index")[column].to_dict()


# ----------------------------------------------------------------------------- acceptance (issue gates)
@pytest.mark.slow
def test_acceptance_on_the_synthetic_screen(tmp_path):
    from benchmarks.curation import acceptance

    result = acceptance(tmp_path, target=500, clusters=[[100, 20, 5]], backend="sklearn")
    pixels = result["pixels"]["runs"][0]
    assert pixels["copies_removed_pct"] >= 95 and pixels["distinct_removed_pct"] <= 1
    assert all(v["caught"] > 0 for v in pixels["by_kind"].values())
    assert result["embedded"]["runs"][0]["balanced"]["ratio"] <= 3

