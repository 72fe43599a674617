"""benchmarks/quality_ceiling.py scores any checkpoint exactly as the quality suite scores its teachers."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality, quality_ceiling


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ceiling")
    code = quality.main(["--quick", "--generators", "hpa", "--variants", "boc", "--workdir", str(tmp / "work"),
                         "--json", str(tmp / "quality.json")])
    assert code in (0, 1)  # 1: the gates fail, as they must for a 2-step run
    return tmp, json.loads((tmp / "quality.json").read_text())["rows"][0]


def test_a_teacher_scores_as_the_suite_scored_it(quick, capsys):
    tmp, row = quick
    run = tmp / "work" / "runs" / "hpa" / "boc"
    out = tmp / "ceiling.json"
    assert quality_ceiling.main([str(run / "heldout.h5ad"), str(run / "teacher.pt"), "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    scored = payload["checkpoints"][str(run / "teacher.pt")]
    for proto in row["scores"]:
        assert scored["scores"][proto] == pytest.approx(row["scores"][proto]["trained"], abs=1e-9)
        for name in ("random-init", "raw-pixels"):
            assert payload["baselines"][name][proto] == pytest.approx(row["scores"][proto][name], abs=1e-9)
    assert scored["gates"] == row["gates"]
    assert payload["command"].startswith("python -m benchmarks.quality_ceiling") and payload["n"] == row["n_test"]
    assert "teacher.pt" in capsys.readouterr().out


def test_a_fine_tuned_classifier_is_scored_by_its_backbone_embedding(quick):
    from cellvit_ssl import finetune
    from cellvit_ssl.classifier import Classifier

    tmp, _ = quick
    run = tmp / "work" / "runs" / "hpa" / "boc"
    labelled = next((tmp / "work" / "data").glob("hpa_seed0*")) / "index.csv"  # the generator's labels and splits
    assert finetune.main([str(run / "teacher.pt"), "--index", str(labelled), "--mode", "full", "--labels", "label",
                          "--out", str(tmp / "ft"), "train.epochs=1", "train.device=cpu", "--no-progress"]) == 0
    classifier = quality_ceiling.load_any(tmp / "ft" / "classifier.pt")
    assert isinstance(classifier, Classifier) and classifier.mode == "full"
    payload = quality_ceiling.run(run / "heldout.h5ad", [tmp / "ft" / "classifier.pt", run / "teacher.pt"],
                                  "label", "batch", 10, 0)
    tuned, plain = (payload["checkpoints"][str(p)]["scores"]["cv"] for p in (tmp / "ft" / "classifier.pt",
                                                                            run / "teacher.pt"))
    assert set(tuned) == {"1nn", "knn", "linear"} and tuned != plain  # the fine-tuned weights, not the teacher's


def test_a_missing_label_column_is_named(quick, capsys):
    tmp, _ = quick
    run = tmp / "work" / "runs" / "hpa" / "boc"
    assert quality_ceiling.main([str(run / "heldout.h5ad"), str(run / "teacher.pt"), "--label-key", "phenotype"]) == 2
    assert "'phenotype'" in capsys.readouterr().err
