"""benchmarks.gram_drift: patch-similarity drift of a quality-suite run from an earlier checkpoint."""

from __future__ import annotations

import pytest

from benchmarks import gram_drift, quality
from cellvit_ssl.errors import DataError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    code = quality.main(["--quick", "--generators", "hpa", "--variants", "boc", "--workdir", str(tmp / "work"),
                         "--json", str(tmp / "q.json"), "--set", "train.epochs=2", "train.max_steps=4"])
    assert code == 0
    return tmp / "work" / "runs" / "hpa" / "boc"


def test_drift_is_zero_against_the_final_checkpoint_and_positive_against_an_earlier_one(run):
    assert (run / "checkpoint_00000002.pt").is_file() and (run / "checkpoint_00000004.pt").is_file()
    assert gram_drift.drift(run, 4) < 1e-12  # teacher.pt is the step-4 teacher
    assert gram_drift.drift(run, 2) > 1e-10  # two warm-up steps later: small, not zero


def test_a_missing_checkpoint_is_a_named_error(run, capsys):
    with pytest.raises(DataError, match="checkpoint_00000099.pt"):
        gram_drift.drift(run, 99)
    assert gram_drift.main([str(run), "--step", "99"]) == 2
    assert "checkpoint_00000099.pt" in capsys.readouterr().err


def test_knn_scores_the_earlier_checkpoint_as_the_suite_scores_a_teacher(run, tmp_path, capsys):
    scores = gram_drift.checkpoint_scores(run, 2)
    assert set(scores) == {"1nn", "knn", "linear"} and all(0.0 <= v <= 1.0 for v in scores.values())
    out = tmp_path / "drift.json"
    assert gram_drift.main([str(run), "--step", "2", "--knn", "--json", str(out)]) == 0
    assert "step-2 checkpoint 10-NN" in capsys.readouterr().out
    import json

    saved = json.loads(out.read_text())[str(run)]
    assert saved["early"] == scores and saved["drift"] == gram_drift.drift(run, 2)
