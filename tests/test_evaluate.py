"""``python -m cellvit_ssl.evaluate``: hand-checked scores, protocols, baselines."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import cellvit_ssl.embed as embed_cli
import cellvit_ssl.evaluate as ev
from cellvit_ssl import chammi
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
    assert set(res) == {"1nn_cosine", "1nn_l2", "10nn_cosine", "10nn_l2", "logreg", "sgd"}


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
    tasks = chammi.build_chammi_tasks(obs)
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
    blocks = {f"trained[{c}]" for c in ("nucleus", "microtubules", "er", "protein")}  # boc: one block per channel
    assert {r["features"] for r in report["results"]} == {"trained", "random-init", "raw-pixels", *blocks}
    trained = {r["classifier"]: r["macro_f1"] for r in report["results"] if r["features"] == "trained"}
    random_init = {r["classifier"]: r["macro_f1"] for r in report["results"] if r["features"] == "random-init"}
    assert trained == random_init
    assert report["summary"]["classifier"] == "3nn_cosine" and report["summary"]["metric"] == "macro_f1"
    summary = report["summary"]["scores"]["leave-one-image_id-out"]
    assert set(summary) == {"trained", "random-init", "raw-pixels", *blocks}
    assert summary["trained"] == trained["3nn_cosine"]
    # a block is the slice of X for that channel, scored like any feature set
    adata_x = np.asarray(adata.X)
    d = adata_x.shape[1] // 4
    protein = ev.evaluate_features("p", adata_x[:, 3 * d :], adata.obs["label"].astype(str).to_numpy(),
                                   ev.build_tasks(adata.obs.reset_index(drop=True),
                                                  adata.obs["label"].astype(str).to_numpy(), None, None,
                                                  "image_id", {}, None), 3, 0)
    by_classifier = {r.classifier: r.macro_f1 for r in protein}
    block = {r["classifier"]: r["macro_f1"] for r in report["results"] if r["features"] == "trained[protein]"}
    assert block == by_classifier


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


# ----------------------------------------------------------------------------- CHAMMI reference
# Every embedding is (x, 1): the L2 distance between two rows is |x1 - x2|, so the 1-NN (L2) prediction is the
# training row with the nearest x. (dataset, split, label, x, group); group = cell_type (HPA) or Plate (CP).
REFERENCE = [
    ("Allen", "Train", "a", 0, ""), ("Allen", "Train", "b", 10, ""),
    ("Allen", "Task_one", "a", 1, ""), ("Allen", "Task_one", "b", 9, ""), ("Allen", "Task_one", "a", 6, ""),
    ("Allen", "Task_two", "a", 2, ""), ("Allen", "Task_two", "b", 4, ""), ("Allen", "Task_two", "b", 8, ""),
    ("Allen", "Task_two", "b", 12, ""),
    ("HPA", "Train", "p", 0, "A"), ("HPA", "Train", "q", 10, "A"),
    ("HPA", "Task_one", "p", 1, "A"), ("HPA", "Task_one", "q", 11, "A"),
    ("HPA", "Task_two", "p", 4, "A"), ("HPA", "Task_two", "q", 6, "A"), ("HPA", "Task_two", "q", 3, "A"),
    ("HPA", "Task_three", "r", 20, "A"), ("HPA", "Task_three", "r", 22, "B"), ("HPA", "Task_three", "p", 13, "B"),
    ("CP", "Train", "u", 0, "P0"), ("CP", "Train", "v", 10, "P0"),
    ("CP", "Task_one", "u", 2, "P0"), ("CP", "Task_one", "v", 7, "P0"),
    ("CP", "Task_two", "u", 6, "P0"), ("CP", "Task_two", "v", 9, "P0"),
    ("CP", "Task_three", "u", 1, "P0"), ("CP", "Task_three", "u", 4, "P0"), ("CP", "Task_three", "v", 4, "P0"),
    ("CP", "Task_four", "w", 30, "P1"), ("CP", "Task_four", "v", 12, "P1"), ("CP", "Task_four", "w", 33, "P2"),
    ("CP", "Task_four", "u", 20, "P2"),
]


def _chammi_embeddings(tmp_path, drop=()):
    ds, split, label, x, group = zip(*REFERENCE)
    obs = pd.DataFrame({"dataset": ds, "train_test_split": split, "label": label,
                        "cell_type": [g if d == "HPA" else "" for d, g in zip(ds, group)],
                        "Plate": [g if d == "CP" else "" for d, g in zip(ds, group)]})
    for task in ("Task_one", "Task_two", "Task_three", "Task_four"):
        obs[task] = obs["train_test_split"].eq(task)
    emb = np.stack([np.asarray(x, float), np.ones(len(x))], axis=1)
    return _write(tmp_path, emb, obs.drop(columns=list(drop)), "chammi.h5ad")


def test_chammi_reference_scores_computed_by_hand(tmp_path, capsys):
    # 1-NN, L2 (the benchmark's classifier); macro-F1 over the labels present in the task's test rows.
    # WTC T1: a@1->a  b@9->b  a@6->b (4 from b@10 < 6 from a@0); truth a b a, pred a b b:
    #         F1(a) = 2*1*(1/2)/(3/2) = 2/3, F1(b) = 2*(1/2)*1/(3/2) = 2/3                 -> 2/3
    # WTC T2: a@2->a  b@4->a  b@8->b  b@12->b; F1(a): P 1/2 R 1 = 2/3, F1(b): P 1 R 2/3 = 4/5 -> (2/3+4/5)/2 = 11/15
    # HPA T1: p@1->p  q@11->q                                                                  -> 1
    # HPA T2: p@4->p  q@6->q  q@3->p; F1(p) = 2/3, F1(q) = 2/3                                  -> 2/3
    # HPA T3, leave one cell_type out, predictions pooled:
    #   hold A: fit Train + B {r@22, p@13}: r@20 -> r@22 (2)                                    r ok
    #   hold B: fit Train + A {r@20}:       r@22 -> r@20 (2); p@13 -> q@10 (3 < 7 to r@20)     r ok, p wrong
    #   truth r r p, pred r r q: F1(r) = 1, F1(p) = 0 (q is not a test label, so not averaged)  -> 1/2
    #   (fitted on Train alone, r could never be predicted: 0)
    # CP T1: u@2->u  v@7->v                                                                    -> 1
    # CP T2: u@6->v (4 < 6)  v@9->v; F1(u) = 0, F1(v): P 1/2 R 1 = 2/3                          -> 1/3
    # CP T3: u@1->u  u@4->u  v@4->u; F1(u): P 2/3 R 1 = 4/5, F1(v) = 0                          -> 2/5
    # CP T4, leave one Plate out:
    #   hold P1: fit Train + P2 {w@33, u@20}: w@30 -> w@33 (3), v@12 -> v@10 (2)                 both ok
    #   hold P2: fit Train + P1 {w@30, v@12}: w@33 -> w@30 (3), u@20 -> v@12 (8 < 10)            w ok, u wrong
    #   truth w v w u, pred w v w v: F1(w) = 1, F1(v): P 1/2 R 1 = 2/3, F1(u) = 0                -> 5/9
    # CHAMMI = WTC2/3 + (HPA2 + HPA3)/6 + (CP2 + CP3 + CP4)/9
    #        = (11/15)/3 + (2/3 + 1/2)/6 + (1/3 + 2/5 + 5/9)/9 = 11/45 + 7/36 + 58/405 = 943/1620 (0.58210)
    # WTC+HPA = (WTC2 + (HPA2 + HPA3)/2)/2 = (11/15 + 7/12)/2 = 79/120 (0.65833)
    from fractions import Fraction as Fr

    expected = {"WTC T1": Fr(2, 3), "WTC T2": Fr(11, 15), "HPA T1": Fr(1), "HPA T2": Fr(2, 3), "HPA T3": Fr(1, 2),
                "CP T1": Fr(1), "CP T2": Fr(1, 3), "CP T3": Fr(2, 5), "CP T4": Fr(5, 9)}
    chammi_by_hand = expected["WTC T2"] / 3 + (expected["HPA T2"] + expected["HPA T3"]) / 6 + (
        expected["CP T2"] + expected["CP T3"] + expected["CP T4"]) / 9
    assert chammi_by_hand == Fr(943, 1620)
    path = _chammi_embeddings(tmp_path)
    out = tmp_path / "r.json"
    assert ev.main([str(path), "--label-key", "label", "--no-baselines", "--json", str(out)]) == 0  # auto-detected
    captured = capsys.readouterr()
    assert "detected CHAMMI layout" in captured.err and "Task_three leave-one-cell_type-out" in captured.err
    report = json.loads(out.read_text())
    assert report["protocol"] == "chammi" and report["summary"]["classifier"] == "1nn_l2"
    assert report["summary"]["metric"] == "macro_f1"
    bench = report["summary"]["chammi"]
    row = next(r for r in bench["rows"] if r["features"] == "trained" and r["classifier"] == "1nn_l2")
    assert bench["benchmark_classifier"] == "1nn_l2" and row["benchmark_choice"]
    assert list(row["macro_f1"]) == list(expected)
    for task, value in expected.items():
        assert row["macro_f1"][task] == pytest.approx(float(value), abs=1e-12), task
    assert row["chammi_score"] == pytest.approx(943 / 1620, abs=1e-12)
    assert row["chammi_score_wtc_hpa"] == pytest.approx(79 / 120, abs=1e-12)
    assert bench["score"] == {"trained": row["chammi_score"]}
    # per-class terms of HPA T3 (pooled over the two folds): p never predicted, r always right
    hpa3 = next(r for r in report["results"]
                if (r["dataset"], r["task"], r["classifier"]) == ("HPA", "Task_three", "1nn_l2"))
    assert hpa3["per_class"] == {"p": {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 1},
                                 "r": {"f1": 1.0, "precision": 1.0, "recall": 1.0, "support": 2}}
    assert hpa3["accuracy"] == pytest.approx(2 / 3) and hpa3["n_test"] == 3
    # printed first: the benchmark table as papers print it, in percent
    lines = captured.out.splitlines()
    assert lines[0].startswith("CHAMMI benchmark: macro-F1 (%)")
    assert lines[1].split() == ["features", "classifier", "WTC", "T1", "WTC", "T2", "HPA", "T1", "HPA", "T2",
                                "HPA", "T3", "CP", "T1", "CP", "T2", "CP", "T3", "CP", "T4", "CHAMMI", "WTC+HPA"]
    assert lines[3].split() == ["trained", "1nn_l2", "*", "66.7", "73.3", "100.0", "66.7", "50.0", "100.0", "33.3",
                                "40.0", "55.6", "58.2", "65.8"]
    assert [ln.split()[1] for ln in lines[3:6]] == ["1nn_l2", "1nn_cosine", "sgd"]
    assert "headline CHAMMI score (CHAMMI-75), 1nn_l2 (1-nearest neighbour, L2 distance), macro-F1: trained 58.2" \
        in captured.out
    assert "headline CHAMMI score (WTC+HPA only)" in captured.out and "trained 65.8" in captured.out
    assert "  logreg: logistic regression on standardised features" in captured.out
    assert "not MorphEm's SGD classifier" in report["classifiers"]["logreg"]
    assert "SGDClassifier(alpha=0.001, max_iter=100" in report["classifiers"]["sgd"]


def test_chammi_leave_out_without_its_group_column_is_an_error(tmp_path, capsys):
    for column, task in (("cell_type", "HPA T3 (HPA Task_three)"), ("Plate", "CP T4 (CP Task_four)")):
        path = _chammi_embeddings(tmp_path, drop=[column])
        assert ev.main([str(path), "--label-key", "label", "--no-baselines"]) == 2
        err = capsys.readouterr().err
        assert task in err and f"no {column!r} column" in err and "python -m cellvit_ssl.data.index chammi" in err
    # an explicit group column for the task is used instead
    path = _chammi_embeddings(tmp_path, drop=["Plate"])
    obs = anndata.read_h5ad(path).obs.reset_index(drop=True)
    obs["plate_id"] = [g for *_, g in REFERENCE]
    tasks = chammi.build_chammi_tasks(obs, leave_out={"Task_four": "plate_id"})
    assert tasks[-1].kind == "leave-one-plate_id-out" and len(tasks[-1].folds) == 2


def test_chammi_without_dataset_column_is_an_error(tmp_path, capsys):
    path = _chammi_embeddings(tmp_path, drop=["dataset"])
    assert ev.main([str(path), "--label-key", "label", "--no-baselines", "--protocol", "chammi"]) == 2
    err = capsys.readouterr().err
    assert "no 'dataset' column" in err and "--dataset-key" in err and "--protocol generic" in err
    # the generic protocol scores the split as given (no CHAMMI rules), when asked for
    assert ev.main([str(path), "--label-key", "label", "--no-baselines", "--protocol", "generic",
                    "--split-key", "train_test_split"]) == 0
    report = json.loads(path.with_suffix(".eval.json").read_text())
    assert report["protocol"] == "generic" and report["summary"]["classifier"] == "10nn_cosine"
    assert {t["protocol"] for t in report["tasks"]} == {"train/test"}


def test_chammi_score_needs_every_ood_task():
    scores = {"WTC T2": 0.5, "HPA T2": 0.25, "HPA T3": 0.75}
    s = chammi.chammi_score(scores)
    assert s.chammi is None and s.missing == ("CP T2", "CP T3", "CP T4")
    assert s.wtc_hpa == pytest.approx((0.5 + 0.5) / 2) and s.subsets == {"WTC": 0.5, "HPA": 0.5, "CP": None}
    table = chammi.format_benchmark_table([chammi.BenchmarkRow("trained", "1nn_l2", scores)], "1nn_l2", "note")
    assert "no CHAMMI score: no scores for CP T2, CP T3, CP T4" in table and "* note" in table


def test_headline_is_chosen_and_named(tmp_path, capsys):
    x = [[10, 0], [1, 1], [-1, -1], [2, 0.1], [9, 1], [1.2, 1.1], [-2, -2.5], [0.1, -0.2]]
    obs = pd.DataFrame({"label": list("ABC") + list("AABCC"), "split": ["train"] * 3 + ["test"] * 5})
    path = _write(tmp_path, x, obs)
    base = [str(path), "--label-key", "label", "--split-key", "split", "--no-baselines"]
    assert ev.main(base + ["--headline", "1nn_l2", "--headline-metric", "accuracy"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "headline accuracy, 1nn_l2 (1-nearest neighbour, L2 distance), test: trained 0.800"
    summary = json.loads(path.with_suffix(".eval.json").read_text())["summary"]
    assert (summary["classifier"], summary["metric"], summary["scores"]) == ("1nn_l2", "accuracy",
                                                                             {"test": {"trained": 0.8}})
    assert ev.main(base + ["--headline", "5nn_cosine"]) == 2
    assert "'5nn_cosine' is not scored" in capsys.readouterr().err
    chammi_path = _chammi_embeddings(tmp_path)
    assert ev.main([str(chammi_path), "--label-key", "label", "--no-baselines", "--headline-metric", "accuracy"]) == 2
    assert "macro-F1, the benchmark's metric" in capsys.readouterr().err
    assert ev.main([str(chammi_path), "--label-key", "label", "--no-baselines", "--group-key", "Plate",
                    "--split-key", "train_test_split"]) == 2
    assert "does not apply to the CHAMMI protocol" in capsys.readouterr().err


def test_chammi_from_the_download_layout_to_the_table(tmp_path, tiny_overrides, capsys):
    """The README's three commands on a CHAMMI-layout root: index chammi -> embed -> evaluate (auto-detected)."""
    from PIL import Image

    from cellvit_ssl.config import load_config
    from cellvit_ssl.data import index as index_cli

    root = tmp_path / "CHAMMI"
    rng = np.random.default_rng(0)
    spec = {"Allen": (3, 16, ["Train", "Task_one", "Task_two"], None),
            "HPA": (4, 16, ["Train", "Task_one", "Task_two", "Task_three"], "cell_type"),
            "CP": (5, 16, ["Train", "Task_one", "Task_two", "Task_three", "Task_four"], "Plate")}
    for sub, (c, w, splits, group) in spec.items():
        rows = []
        for i in range(4 * len(splits)):
            rel = f"{sub}/images/cell_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate(list(rng.integers(1, 255, (c, w, w), dtype=np.uint8)), axis=1)).save(
                root / rel)
            split = splits[i // 4]
            row = {"file_path": rel, "channel_width": w, "Label": f"{sub}-{'xy'[i % 2]}", "train_test_split": split,
                   **{t: split == t for t in splits[1:]}}
            if group:
                row[group] = f"g{i % 4 // 2}"
            rows.append(row)
        pd.DataFrame(rows).to_csv(root / sub / "enriched_meta.csv", index=False)
    index = tmp_path / "chammi.csv"
    assert index_cli.main(["chammi", str(root), "-o", str(index)]) == 0
    cfg = load_config(None, tiny_overrides + ["data.channels=[nucleus,membrane,protein,microtubules,er,rna,agp,mito]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, list(cfg.data.channels))
    ckpt = save_checkpoint({"format": ENCODER_FORMAT, "config": config_to_dict(cfg), "backbone": model.state_dict()},
                           tmp_path / "teacher.pt")
    out = tmp_path / "chammi.h5ad"
    assert embed_cli.main([str(ckpt), "--index", str(index), "--root", str(root), "--out", str(out),
                           "--allow-missing", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert ev.main([str(out), "--label-key", "label", "--no-baselines"]) == 0
    captured = capsys.readouterr()
    assert "detected CHAMMI layout" in captured.err and "Task_four leave-one-Plate-out" in captured.err
    assert captured.out.startswith("CHAMMI benchmark: macro-F1 (%)")
    report = json.loads(out.with_suffix(".eval.json").read_text())
    assert [(t["dataset"], t["task"], t["folds"]) for t in report["tasks"]] == [
        ("Allen", "Task_one", 1), ("Allen", "Task_two", 1), ("HPA", "Task_one", 1), ("HPA", "Task_two", 1),
        ("HPA", "Task_three", 2), ("CP", "Task_one", 1), ("CP", "Task_two", 1), ("CP", "Task_three", 1),
        ("CP", "Task_four", 2)]
    row = report["summary"]["chammi"]["rows"][0]
    assert row["classifier"] == "1nn_l2" and row["missing"] == [] and 0 <= row["chammi_score"] <= 1


def test_protocol_selection(tmp_path, capsys):
    path = _chammi_embeddings(tmp_path)
    obs = anndata.read_h5ad(path).obs.reset_index(drop=True)
    assert ev.select_protocol("auto", obs) == ("chammi", "train_test_split")
    assert ev.select_protocol("auto", obs, group_key="Plate") == ("generic", None)  # the user asked for groups
    assert ev.select_protocol("auto", obs.drop(columns="train_test_split")) == ("generic", None)
    assert ev.select_protocol("generic", obs, "train_test_split") == ("generic", "train_test_split")
    with pytest.raises(ev.DataError, match=r"split column 'dataset' holds \['Allen', 'HPA', 'CP'\], not Train"):
        ev.select_protocol("chammi", obs, "dataset")
    assert ev.main([str(path), "--label-key", "label", "--no-baselines", "--train-value", "train"]) == 2
    assert "fits on 'Train' rows" in capsys.readouterr().err
