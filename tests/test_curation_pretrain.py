"""Pre-training on a curated vs the uncurated index (benchmarks/curation_pretrain.py): the plumbing, ``--quick``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks import curation_pretrain as cp

CLASSES = {"nuclear", "nucleoli", "cytosol", "er", "golgi", "mitochondria", "vesicles", "plasma_membrane"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curation_pretrain")
    out = tmp / "curation_pretrain.json"
    code = cp.main(["--quick", "--workdir", str(tmp / "work"), "--json", str(out)])
    return code, json.loads(out.read_text()), tmp / "work" / "curation_pretrain" / "hpa_seed0"


def test_quick_run_trains_every_index_alike_and_scores_rare_and_common(quick):
    code, payload, _ = quick
    assert code == 0 and payload["benchmark"] == "curation_pretrain" and payload["quick"] is True
    assert payload["steps"] == 2 and payload["wall_s"] > 0
    assert {"cpu_count", "loadavg_before", "loadavg_after"} <= set(payload["machine"])
    assert list(payload["runs"]) == ["uncurated", "curated_pixels", "curated_teacher"]
    for run in payload["runs"].values():
        knn = run["knn"]
        assert set(knn["per_class"]) == CLASSES
        assert all(0.0 <= knn[k] <= 1.0 for k in ("macro_f1", "rare_f1", "rare_recall", "common_f1", "common_recall"))
        # every run trains on the same number of rows per epoch, so on the same steps
        assert len(pd.read_csv(run["train_index"])) == payload["epoch_rows"]


def test_pool_is_imbalanced_and_holds_repeats_but_no_labels(quick):
    _, payload, runs = quick
    pool = payload["pool"]
    assert len(pool["common"]) == 3 and set(pool["common"]) | set(pool["rare"]) == CLASSES
    # quick: 6 training cells per class; common classes whole, rare ones cut 3-fold, a fifth of common rows repeated
    assert all(pool["per_class"][c] == 2 for c in pool["rare"])
    assert sum(pool["per_class"][c] for c in pool["common"]) == 18 + pool["injected_copies"]
    assert pool["injected_copies"] == 4 and pool["rows"] == 32
    for name in ("pool.csv", "uncurated/train.csv", "curated_pixels/curated.csv", "curated_pixels/train.csv"):
        assert not {"label", "label_id", "injected_copy"} & set(pd.read_csv(runs / name).columns), name


def test_curated_index_is_curation_output_without_repeats(quick):
    _, payload, runs = quick
    pixels = payload["runs"]["curated_pixels"]
    after = pixels["composition"]
    assert after["rows"] == payload["target_size"] == 16  # balanced sampling cut the 28 distinct cells to the target
    assert after["selected_by"] == ["balanced"]
    assert after["repeats_selected"] == 0 and after["duplicates_dropped"] >= payload["pool"]["injected_copies"]
    assert sum(after["per_class"].values()) == 16
    curated = pd.read_csv(runs / "curated_pixels" / "curated.csv")
    assert len(curated) == 16 and curated["path"].is_unique
    # the curated run trains on the curated rows only (resampled)
    assert set(pd.read_csv(pixels["train_index"])["path"]) <= set(curated["path"])
    teacher = payload["runs"]["curated_teacher"]["composition"]
    assert 0 < teacher["rows"] <= 16 and teacher["repeats_selected"] == 0
    assert "curate.features=" in payload["runs"]["curated_teacher"]["curate_command"]
    assert payload["runs"]["curated_teacher"]["curate_command"].split("curate.features=")[1].split()[0].endswith(
        "teacher.pt")


def test_build_pool_cuts_rare_classes_and_adds_repeats():
    train = pd.DataFrame({"path": [f"c{i}.tif" for i in range(120)], "label": ["a"] * 40 + ["b"] * 40 + ["c"] * 40})
    pool, comp = cp.build_pool(train, "label", n_common=1, ratio=20, copies=0.5, seed=0)
    common = comp["common"][0]
    assert comp["per_class"][common] == 60 and all(comp["per_class"][c] == 2 for c in comp["rare"])
    assert pool["injected_copy"].sum() == 20 and pool.loc[pool["injected_copy"], "label"].eq(common).all()
    assert pool.loc[pool["injected_copy"], "path"].isin(pool.loc[~pool["injected_copy"], "path"]).all()


def test_curation_features_can_be_pooled_on_the_channel_of_the_question():
    args = ("pool.csv", "curated.csv", 80, [], 0.995, 0, 48)
    teacher = cp.curate_argv(args[0], "run/teacher.pt", *args[1:], pooling="protein", pixel_channels=["protein"])
    pixels = cp.curate_argv(args[0], "pixels", *args[1:], pooling="protein", pixel_channels=["protein", "er"])
    assert "curate.embed.pooling=protein" in teacher and not any("pixels.channels" in a for a in teacher)
    assert "curate.pixels.channels=[protein,er]" in pixels and not any("embed.pooling" in a for a in pixels)
    plain = cp.curate_argv(args[0], "run/teacher.pt", *args[1:])
    assert not any("pooling" in a or "pixels.channels" in a for a in plain)


def test_oracle_keeps_every_rare_cell_and_shares_the_rest_evenly_without_repeats():
    train = pd.DataFrame({"path": [f"c{i}.tif" for i in range(200)], "label": [c for c in "abcde" for _ in range(40)]})
    pool, comp = cp.build_pool(train, "label", n_common=2, ratio=20, copies=0.5, seed=0)
    chosen = cp.oracle_selection(pool, "label", target=40, seed=0)
    counts = chosen["label"].value_counts().to_dict()
    assert len(chosen) == 40 and not chosen["injected_copy"].any() and chosen["path"].is_unique
    assert all(counts[c] == 2 for c in comp["rare"])  # every rare cell (2 each) is kept
    assert all(counts[c] == 17 for c in comp["common"])  # the other 34 split evenly
    assert len(cp.oracle_selection(pool, "label", target=1000, seed=0)) == (~pool["injected_copy"]).sum()
