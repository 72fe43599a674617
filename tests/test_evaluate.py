"""``python -m cellvit_ssl.evaluate``: hand-checked scores, protocols, baselines."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import cellvit_ssl.embed as embed_cli
import cellvit_ssl.evaluate as ev
from cellvit_ssl.checkpoint import ENCODER_FORMAT, save_checkpoint
from cellvit_ssl.config import config_to_dict
from cellvit_ssl.models.channels import build_model
from cellvit_ssl.train import resolve_index


def _write(tmp_path, x, obs, name="emb.h5ad"):
    path = tmp_path / name
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    anndata.AnnData(X=np.asarray(x, np.float32), obs=obs).write_h5ad(path)
    return path


def test_one_nn_macro_f1_matches_hand_computation(tmp_path):
    # train: A=(10,0), B=(1,1), C=(-1,-1). Test points chosen so that L2 and cosine disagree:
    #   (2,.1) true A: L2 -> B, cosine -> A;  (.1,-.2) true C: L2 -> C, cosine -> A.
    x = [[10, 0], [1, 1], [-1, -1], [2, 0.1], [9, 1], [1.2, 1.1], [-2, -2.5], [0.1, -0.2]]
    obs = pd.DataFrame({"label": list("ABC") + list("AABCC"), "split": ["train"] * 3 + ["test"] * 5})
    path = _write(tmp_path, x, obs)
    out = tmp_path / "r.json"
    assert ev.main([str(path), "--label-key", "label", "--split-key", "split", "--no-baselines",
                    "--json", str(out)]) == 0
    res = {r["classifier"]: r for r in json.loads(out.read_text())["results"]}
    # L2 predictions B A B C C: F1 A = 2/3, B = 2/3, C = 1; accuracy 4/5
    assert res["1nn_l2"]["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert res["1nn_l2"]["accuracy"] == pytest.approx(0.8)
    # cosine predictions A A B C A: F1 A = 0.8, B = 1, C = 2/3
    assert res["1nn_cosine"]["macro_f1"] == pytest.approx((0.8 + 1 + 2 / 3) / 3)
    assert res["1nn_cosine"]["n_train"] == 3 and res["1nn_cosine"]["n_test"] == 5
    assert set(res) == {"1nn_cosine", "1nn_l2", "10nn_cosine", "10nn_l2", "linear"}


def test_leave_one_group_out_holds_each_group_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 6)
    groups = np.tile(["p1", "p2", "p3"], 4)
    x = np.where(labels[:, None] == "a", 5.0, -5.0) + rng.normal(0, 0.1, (12, 3))
    tasks = ev.build_tasks(pd.DataFrame({"plate": groups}), labels, group_key="plate")
    assert [t.kind for t in tasks] == ["leave-one-group-out"] and len(tasks[0].folds) == 3
    for train, test in tasks[0].folds:
        assert len(set(groups[test])) == 1 and set(groups[test]).isdisjoint(groups[train])
        assert len(train) + len(test) == 12
    path = _write(tmp_path, x, pd.DataFrame({"label": labels, "plate": groups}))
    assert ev.main([str(path), "--label-key", "label", "--group-key", "plate", "--no-baselines", "--k", "3"]) == 0
    table = capsys.readouterr().out
    assert "leave-one-plate-out" in table and "1nn_cosine" in table
    report = json.loads(path.with_suffix(".eval.json").read_text())
    assert all(r["macro_f1"] == 1.0 and r["n_test"] == 12 for r in report["results"])
    zarr_path = tmp_path / "emb.zarr"
    anndata.read_h5ad(path).write_zarr(zarr_path)  # the Zarr flavour of the same content
    assert ev.main([str(zarr_path), "--label-key", "label", "--group-key", "plate", "--no-baselines"]) == 0
    assert json.loads(zarr_path.with_suffix(".eval.json").read_text())["results"][0]["n_test"] == 12


def test_chammi_protocol_task_columns_and_leave_out(tmp_path):
    obs = pd.DataFrame({
        "train_test_split": ["Train"] * 4 + ["Task_one"] * 2 + ["Task_two"] * 2 + ["Task_three"] * 4,
        "dataset": "HPA",
        "cell_type": ["u2os"] * 8 + ["hela", "hela", "a431", "a431"],
    })
    obs["Task_one"] = obs["train_test_split"].eq("Task_one")
    obs["Task_two"] = obs["train_test_split"].eq("Task_two")
    obs.loc[0, "Task_two"] = True  # MorphEm: task membership comes from the boolean column
    obs["Task_three"] = obs["train_test_split"].eq("Task_three")
    labels = np.array(list("abab") * 3)
    tasks = ev.build_tasks(obs, labels, split_key="train_test_split", dataset_key="dataset")
    by_name = {t.name: t for t in tasks}
    assert list(by_name) == ["Task_one", "Task_two", "Task_three"]
    assert by_name["Task_one"].folds[0][1].tolist() == [4, 5]
    assert by_name["Task_two"].folds[0][1].tolist() == [0, 6, 7]
    three = by_name["Task_three"]
    assert three.kind == "leave-one-cell_type-out" and len(three.folds) == 2
    train, test = three.folds[0]
    assert test.tolist() == [8, 9] and train.tolist() == [0, 1, 2, 3, 10, 11]
    with pytest.raises(ev.DataError, match="'Plate' is not in"):
        ev.build_tasks(obs, labels, split_key="train_test_split", group_key="Plate")
    # through the CLI: the 'dataset' column is found and HPA's Task_three is scored by cell type
    x = np.where(labels[:, None] == "a", 1.0, -1.0) + np.eye(12)[:, :3]
    path = _write(tmp_path, x, obs.assign(label=labels))
    out = tmp_path / "chammi.json"
    assert ev.main([str(path), "--label-key", "label", "--split-key", "train_test_split", "--no-baselines",
                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(t["dataset"], t["task"], t["protocol"], t["folds"]) for t in report["tasks"]] == [
        ("HPA", "Task_one", "train/test", 1), ("HPA", "Task_two", "train/test", 1),
        ("HPA", "Task_three", "leave-one-cell_type-out", 2)]
    assert {r["n_test"] for r in report["results"] if r["task"] == "Task_three"} == {4}


@pytest.fixture
def demo_embeddings(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, list(tiny_cfg.data.channels))
    ckpt = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(tiny_cfg),
                            "backbone": model.state_dict()}, tmp_path / "teacher.pt")
    index, _ = resolve_index(tiny_cfg)
    out = tmp_path / "cells.h5ad"
    assert embed_cli.main([str(ckpt), "--index", str(index), "--out", str(out), "--no-progress"]) == 0
    return out


def test_baselines_reread_the_same_crops(demo_embeddings, tmp_path):
    adata = anndata.read_h5ad(demo_embeddings)
    # the checkpoint is itself the seed-0 random init, so the random-init baseline must reproduce it
    np.testing.assert_allclose(ev.random_init_features(adata, seed=0, device="cpu"), adata.X, atol=1e-5, rtol=0)
    assert not np.allclose(ev.random_init_features(adata, seed=1, device="cpu"), adata.X, atol=1e-3)
    pixels = ev.raw_pixel_features(adata, pixel_size=4, pca=5)
    assert pixels.shape == (adata.n_obs, 5) and np.isfinite(pixels).all()
    out = tmp_path / "r.json"
    assert ev.main([str(demo_embeddings), "--label-key", "label", "--group-key", "image_id", "--k", "3",
                    "--pixel-size", "4", "--pca", "5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["features"] for r in report["results"]} == {"trained", "random-init", "raw-pixels"}
    trained = {r["classifier"]: r["macro_f1"] for r in report["results"] if r["features"] == "trained"}
    random_init = {r["classifier"]: r["macro_f1"] for r in report["results"] if r["features"] == "random-init"}
    assert trained == random_init
    summary = report["summary"]["leave-one-image_id-out"]
    assert set(summary) == {"trained", "random-init", "raw-pixels"} and summary["trained"] == trained["3nn_cosine"]


def test_baselines_refused_when_the_index_changed_since_embedding(demo_embeddings, capsys):
    index = anndata.read_h5ad(demo_embeddings).uns["embed"]["index"]
    table = pd.read_csv(index)
    table.loc[0, "centroid_y"] += 5  # e.g. regenerated data: obs no longer names the crops on disk
    table.to_csv(index, index=False)
    args = [str(demo_embeddings), "--label-key", "label", "--group-key", "image_id", "--k", "3"]
    assert ev.main(args + ["--pixel-size", "4", "--pca", "5"]) == 2
    err = capsys.readouterr().err
    assert str(index) in err and "changed" in err and "--no-baselines" in err
    assert ev.main(args + ["--no-baselines"]) == 0


def test_user_errors_name_the_problem(tmp_path, capsys):
    path = _write(tmp_path, np.zeros((4, 2)), pd.DataFrame({"label": list("abab"), "split": ["train"] * 4}))
    assert ev.main([str(path), "--label-key", "cls", "--no-baselines"]) == 2
    assert "'cls'" in capsys.readouterr().err
    assert ev.main([str(path), "--label-key", "label", "--split-key", "split", "--no-baselines"]) == 2
    assert "nothing to test on" in capsys.readouterr().err
    assert ev.main([str(path), "--label-key", "label"]) == 2  # baselines need the run's config in uns
    assert "--no-baselines" in capsys.readouterr().err
    assert ev.main([str(tmp_path / "missing.h5ad"), "--label-key", "label"]) == 2
    assert "missing.h5ad" in capsys.readouterr().err
