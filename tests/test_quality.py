"""The representation-quality suite: plumbing (fast, ``--quick``) and the issue-13 gates (slow)."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality
from cellvit_ssl.data.generators import GENERATOR_NAMES

PROTOCOL_KEYS = {"1nn", "knn", "linear"}
FEATURES = {"trained", "random-init", "raw-pixels"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    out = tmp / "quality.json"
    code = quality.main(["--quick", "--generators", "hpa", "--variants", "boc", "fixed", "--jobs", "2",
                         "--workdir", str(tmp / "work"), "--json", str(out)])
    return code, json.loads(out.read_text())


def test_quick_run_writes_the_table_and_json(quick, capsys):
    code, payload = quick
    assert code == 0
    assert payload["benchmark"] == "quality" and payload["quick"] is True
    assert payload["gates"] == quality.GATES and payload["default_variant"] == "boc"
    assert payload["steps"] == 2 and payload["wall_s"] > 0 and payload["jobs"] == 2
    assert {"cpu_count", "loadavg_before", "loadavg_after"} <= set(payload["machine"])
    assert [(r["generator"], r["variant"]) for r in payload["rows"]] == [("hpa", "boc"), ("hpa", "fixed")]
    for row in payload["rows"]:
        # held-out cells only: the hpa generator holds out a third of every class
        assert row["n_test"] == 24 and row["n_classes"] == 8
        assert set(row["scores"]) == {"cv", "lobo"}  # hpa has imaging sessions as batches
        for proto in row["scores"].values():
            assert set(proto) == FEATURES
            for scores in proto.values():
                assert set(scores) == PROTOCOL_KEYS
                assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert set(row["gates"]) == set(quality.GATES)
        assert row["pass"] == all(g["pass"] for g in row["gates"].values())
    boc, fixed = payload["rows"]
    # a bag-of-channels embedding is also scored one channel block at a time; a fixed model has no blocks
    assert set(boc["blocks"]) == {f"{f}/{c}" for f in ("trained", "random-init")
                                  for c in ("nucleus", "microtubules", "er", "protein")}
    assert "blocks" not in fixed
    assert all({"knn", "linear", "spread", "separation"} <= set(b) for b in boc["blocks"].values())
    # one raw-pixel baseline per generator: identical for every variant
    assert boc["scores"]["cv"]["raw-pixels"] == fixed["scores"]["cv"]["raw-pixels"]


def test_gates_are_the_issue_margins():
    def scores(trained_knn, trained_lin, rand_knn, rand_lin, raw_knn, raw_lin):
        return {"trained": {"knn": trained_knn, "linear": trained_lin},
                "random-init": {"knn": rand_knn, "linear": rand_lin},
                "raw-pixels": {"knn": raw_knn, "linear": raw_lin}}

    ok = quality.gates(scores(0.80, 0.80, 0.65, 0.70, 0.75, 0.75))
    assert all(g["pass"] for g in ok.values())
    low = quality.gates(scores(0.79, 0.80, 0.65, 0.70, 0.75, 0.76))
    assert not low["knn_over_raw"]["pass"] and not low["linear_over_baselines"]["pass"]
    assert not quality.gates(scores(0.80, 0.90, 0.66, 0.70, 0.70, 0.70))["knn_over_random"]["pass"]


def test_channel_blocks_cut_the_embedding_in_model_order():
    import numpy as np

    x = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)
    blocks = quality.channel_blocks(x, ["nucleus", "er", "protein"])
    assert list(blocks) == ["nucleus", "er", "protein"]
    assert blocks["er"].tolist() == [[2, 3], [8, 9]]


def test_block_geometry_tells_a_label_block_from_a_spread_out_noise_block():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 16))
    signal = centres[labels] + 0.5 * rng.normal(size=(120, 16))  # clustered by label
    noise = np.pad(rng.normal(size=(120, 2)), ((0, 0), (0, 14)))  # label-free, spread around a circle
    sig, noi = quality.block_geometry(signal, labels), quality.block_geometry(noise, labels)
    assert sig["separation"] > 1.0 and abs(noi["separation"]) < 0.1
    assert noi["spread"] > sig["spread"]
    # equal-norm blocks: the concatenation's cosine is the mean of the blocks' cosines
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    both = np.concatenate([unit(signal), unit(noise)], axis=1)
    np.testing.assert_allclose(unit(both) @ unit(both).T,
                               (unit(signal) @ unit(signal).T + unit(noise) @ unit(noise).T) / 2, atol=1e-6)
    # the quick run records both numbers for every block
    assert {"spread", "separation"} <= set(quality.block_geometry(signal[:10], labels[:10]))


@pytest.mark.slow
@pytest.mark.parametrize("generator", GENERATOR_NAMES)
def test_default_recipe_passes_the_gates(generator, tmp_path):
    """The default variant under the suite's config, end to end (tens of minutes on 2 cores each)."""
    out = tmp_path / "quality.json"
    quality.main(["--generators", generator, "--variants", quality.DEFAULT_VARIANT,
                  "--workdir", str(tmp_path / "work"), "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    cv = row["scores"]["cv"]
    print(json.dumps(cv))
    assert cv["trained"]["knn"] >= cv["raw-pixels"]["knn"] + 0.05
    assert cv["trained"]["knn"] >= cv["random-init"]["knn"] + 0.15
    assert cv["trained"]["linear"] >= max(cv["raw-pixels"]["linear"], cv["random-init"]["linear"]) + 0.05
