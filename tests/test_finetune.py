"""Fine-tuning (linear, full, LoRA; single- and multi-label), the classifier file, predict, and label errors.

A tiny pre-trained checkpoint (2-block, 32-px ViT, one epoch on demo data) and labelled indexes
cut from the demo generator are made once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_OVERRIDES

from cellvit_ssl import finetune as ft
from cellvit_ssl import load_classifier, load_encoder, read_embeddings
from cellvit_ssl import predict as predict_cli
from cellvit_ssl.checkpoint import load_checkpoint
from cellvit_ssl.config import load_config
from cellvit_ssl.data.synthetic import DemoSpec, generate_demo
from cellvit_ssl.distributed import DistInfo
from cellvit_ssl.errors import CheckpointError, ConfigError, DataError
from cellvit_ssl.labels import read_labels, scores, select_thresholds
from cellvit_ssl.lora import LoRA, LoRASpec, SplitQKV, fused_state_dict, split_qkv
from cellvit_ssl.models import build_model
from cellvit_ssl.train import run as pretrain

CHANNELS = ["nucleus", "microtubules", "er", "protein"]
FAST = ["train.epochs=3", "data.batch_size=4", "data.num_workers=0", "train.device=cpu", "train.progress=false",
        "train.warmup_epochs=0", "train.base_lr=0.05"]


def labelled_index(folder: Path, localisations: int = 1, n_images: int = 6, seed: int = 3) -> Path:
    """Demo cells with a split column stratified by label: every class has training rows."""
    index = generate_demo(folder, DemoSpec(n_images=n_images, image_size=96, cells_per_image=6, seed=seed,
                                           localisations=localisations))
    table = pd.read_csv(index).drop(columns=["split"])
    split = np.array(["train"] * len(table), dtype=object)
    for _, rows in table.groupby("label").groups.items():
        rows = np.sort(np.asarray(rows))
        if len(rows) >= 3:
            split[rows[-1]] = "test"
            split[rows[-2]] = "val"
    table["split"] = split
    out = folder / "labelled.csv"
    table.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(load_config(None, TINY_OVERRIDES + [f"data.demo.cache_dir={tmp / 'demo'}",
                                                            f"train.output_dir={tmp / 'run'}", "train.progress=false",
                                                            "train.tensorboard=false"]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return labelled_index(tmp_path_factory.mktemp("cells"))


def finetune(teacher: Path, index: Path, out: Path, *extra: str) -> Path:
    assert ft.main([str(teacher), "--index", str(index), "--out", str(out), *FAST, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(teacher, cells, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("finetune")
    out = {}
    for mode in ("linear", "lora", "full"):
        extra = ["finetune.lora.rank=2", "finetune.lora.dropout=0.1"] if mode == "lora" else []
        out[mode] = finetune(teacher, cells, tmp / mode, f"finetune.mode={mode}", *extra)
    return out


# ----------------------------------------------------------------------------- the three modes
def test_each_mode_trains_its_part_and_the_file_reproduces_the_held_out_scores(runs, teacher, cells):
    base = load_encoder(teacher, device="cpu").model.state_dict()
    sizes = {}
    for mode, out in runs.items():
        clf = load_classifier(out / "classifier.pt", device="cpu")
        evaluation = json.loads((out / "evaluation.json").read_text())
        assert clf.mode == mode and evaluation["mode"] == mode and clf.metrics == {
            k: v for k, v in evaluation.items() if k != "classifier_bytes"}
        assert {"macro_f1", "accuracy", "per_class"} <= set(evaluation["test"])
        counts = clf.count_parameters()
        head = sum(p.numel() for p in clf.head.parameters())
        backbone = {k: v for k, v in clf.model.state_dict().items()}
        if mode == "linear":
            assert counts["trainable"] == head
            assert all(torch.equal(backbone[k], v) for k, v in base.items())  # frozen: the teacher's weights
        elif mode == "full":
            assert counts["trainable"] == counts["total"]
            assert not torch.equal(backbone["backbone.blocks.0.attn.qkv.weight"],
                                   base["backbone.blocks.0.attn.qkv.weight"])
        else:
            adapters = clf.lora.adapter_parameters()
            assert counts["trainable"] == head + sum(p.numel() for p in adapters)
            assert {n.split(".")[-4] for n, _ in clf.model.named_parameters() if ".lora_" in n} == {"q", "v"}
            b = [p for n, p in clf.model.named_parameters() if ".lora_B." in n]
            assert b and all(p.abs().sum() > 0 for p in b)  # trained away from peft's zero init
            without_adapters = fused_state_dict(backbone)  # the pre-trained weights are untouched ...
            assert without_adapters.keys() == base.keys()
            assert all(torch.equal(without_adapters[k], v) for k, v in base.items())
            merged = clf.lora.merged_state_dict()  # ... the update lives in the adapters
            assert not torch.equal(merged["backbone.blocks.0.attn.qkv.weight"],
                                   base["backbone.blocks.0.attn.qkv.weight"])
        sizes[mode] = (out / "classifier.pt").stat().st_size
        # the classifier, loaded in a fresh object, scores the test rows as fine-tuning reported
        table = pd.read_csv(cells)
        test = np.flatnonzero(table["split"] == "test")
        tmp_out = out / "test.h5ad"
        test_index = out / "test.csv"
        table.iloc[test].to_csv(test_index, index=False)
        assert predict_cli.main([str(out / "classifier.pt"), "--index", str(test_index), "--out", str(tmp_out),
                                 "--no-progress", "--device", "cpu", "data.root=" + str(cells.parent)]) == 0
        pred = read_embeddings(tmp_out)
        labels = read_labels(table.iloc[test], ["label"], False, classes=clf.classes)
        rescored = scores(labels, np.arange(len(test)), pred.X)
        assert rescored["macro_f1"] == pytest.approx(evaluation["test"]["macro_f1"], abs=1e-6)
        assert list(pred.var_names) == clf.classes
        np.testing.assert_allclose(pred.obs[[f"prob_{c}" for c in clf.classes]].to_numpy(), pred.X, atol=1e-7)
        assert (pred.obs["predicted"].to_numpy() == np.asarray(clf.classes)[pred.X.argmax(1)]).all()
        np.testing.assert_allclose(pred.X.sum(1), 1, atol=1e-5)  # softmax
    # a linear or LoRA file keeps its head (and adapters) and refers to the checkpoint; full holds the backbone
    teacher_bytes = teacher.stat().st_size
    assert sizes["linear"] < 0.2 * teacher_bytes and sizes["lora"] < 0.3 * teacher_bytes
    assert sizes["full"] > 0.9 * teacher_bytes


def test_predict_on_arrays_equals_predict_on_the_index_rows(runs, cells, tmp_path):
    """``load_classifier(...).predict(images, channels=...)`` sees what the index path sees."""
    from cellvit_ssl.data.readers import open_stack
    from cellvit_ssl.data.samples import Box, read_region

    out = tmp_path / "p.h5ad"
    assert predict_cli.main([str(runs["lora"] / "classifier.pt"), "--index", str(cells), "--out", str(out),
                             "--no-progress", "--device", "cpu", "--chunk-rows", "8"]) == 0
    pred = read_embeddings(out)
    clf = load_classifier(runs["lora"] / "classifier.pt", device="cpu")
    for i in (0, len(pred) - 1):
        row = pred.obs.iloc[i]
        stack = open_stack(cells.parent / row["path"])
        box = Box(*(int(row[k]) for k in ("sample_y0", "sample_x0", "sample_y1", "sample_x1")))
        crop = read_region(stack.read(), box).astype(np.float32)
        p = clf.predict(crop, channels=stack.channel_names)
        np.testing.assert_allclose(p.probabilities[0], pred.X[i], atol=1e-5)
        assert p.labels[0] == row["predicted"]
    with pytest.raises(DataError, match="channel"):
        clf.predict(crop[:3], channels=CHANNELS[:3])
    # a finished output is not computed again; another classifier's output is refused
    assert predict_cli.main([str(runs["lora"] / "classifier.pt"), "--index", str(cells), "--out", str(out),
                             "--no-progress", "--device", "cpu", "--chunk-rows", "8"]) == 0
    assert predict_cli.main([str(runs["linear"] / "classifier.pt"), "--index", str(cells), "--out", str(out),
                             "--no-progress", "--device", "cpu"]) == 2


def test_a_referenced_checkpoint_is_found_checked_and_can_be_given_anew(runs, teacher, tmp_path):
    moved = tmp_path / "moved.pt"
    moved.write_bytes((runs["linear"] / "classifier.pt").read_bytes())
    payload = load_checkpoint(moved, expect=("cellvit_ssl.classifier",))
    payload["base"] = {**payload["base"], "path": str(tmp_path / "gone" / "teacher.pt")}
    torch.save(payload, moved)
    with pytest.raises(CheckpointError, match="is not there. Pass it"):
        load_classifier(moved, device="cpu")
    assert load_classifier(moved, device="cpu", base=teacher).base["path"] == str(teacher.resolve())
    with pytest.raises(CheckpointError, match="is not the checkpoint"):
        load_classifier(moved, device="cpu", base=runs["full"] / "classifier.pt")
    (tmp_path / "gone").mkdir()
    (tmp_path / "teacher.pt").write_bytes(teacher.read_bytes())  # a copy beside the classifier is found
    assert load_classifier(moved, device="cpu").predict(np.ones((4, 32, 32), np.float32), CHANNELS).labels.size == 1


def _index_embeddings(encoder, index: Path, rows: np.ndarray) -> np.ndarray:
    """Embeddings of some index rows as ``embed`` computes them (no augmentation)."""
    from cellvit_ssl.config import DataConfig
    from cellvit_ssl.embed import encoder_featurizer, featurize_rows, sample_reader

    table = pd.read_csv(index)
    data = DataConfig(sample_size=encoder.crop_size, channels=list(encoder.channels))
    reader = sample_reader(table, None, data, encoder, allow_missing=False, mask_background=False,
                           source=str(index), default_root=index.parent)
    return featurize_rows(reader, [int(r) for r in rows], encoder_featurizer(encoder, None, 64))[0]


def test_the_head_standardises_by_the_training_rows_pretrained_embedding_and_loading_applies_it(runs, teacher,
                                                                                              cells):
    """Every mode's head is a linear probe's: the embedding standardised by the training rows' mean / std."""
    assert ft.FinetuneConfig().standardize  # the default
    table = pd.read_csv(cells)
    train, test = (np.flatnonzero(table["split"] == s) for s in ("train", "test"))
    z = _index_embeddings(load_encoder(teacher, device="cpu"), cells, train).astype(np.float64)
    for mode, out in runs.items():
        clf = load_classifier(out / "classifier.pt", device="cpu")
        np.testing.assert_allclose(clf.head.mean.numpy(), z.mean(0), rtol=1e-4, atol=1e-5, err_msg=mode)
        np.testing.assert_allclose(clf.head.inv_std.numpy(), 1 / (z.std(0) + 1e-6), rtol=1e-3, err_msg=mode)
        # predict / napari (Classifier.probabilities) apply it: softmax(W (z - mean) / std + b)
        e = _index_embeddings(clf, cells, test)
        w, b = clf.head.linear.weight.detach().numpy(), clf.head.linear.bias.detach().numpy()
        logits = ((e - clf.head.mean.numpy()) * clf.head.inv_std.numpy()) @ w.T + b
        expected = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(clf.probabilities(e), expected / expected.sum(1, keepdims=True), atol=1e-5)


def test_without_standardisation_and_in_a_version_1_file_the_head_is_a_bare_linear_layer(runs, teacher, cells,
                                                                                         tmp_path):
    out = finetune(teacher, cells, tmp_path / "plain", "finetune.standardize=false", "train.epochs=1")
    clf = load_classifier(out / "classifier.pt", device="cpu")
    assert torch.equal(clf.head.mean, torch.zeros_like(clf.head.mean))
    assert torch.equal(clf.head.inv_std, torch.ones_like(clf.head.inv_std))
    # a file from before the standardisation (version 1: the head is an nn.Linear's weight and bias)
    payload = load_checkpoint(runs["linear"] / "classifier.pt", expect=("cellvit_ssl.classifier",))
    linear = {k.removeprefix("linear."): v for k, v in payload["head"].items() if k.startswith("linear.")}
    old = tmp_path / "v1.pt"
    torch.save({**payload, "version": 1, "head": linear}, old)
    clf = load_classifier(old, device="cpu")
    assert torch.equal(clf.head.mean, torch.zeros_like(clf.head.mean))
    z = np.random.default_rng(0).normal(size=(3, clf.head.mean.numel())).astype(np.float32)
    logits = z @ linear["weight"].numpy().T + linear["bias"].numpy()
    np.testing.assert_allclose(clf.probabilities(z), torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- LoRA
def _tiny_backbone(variant: str = "boc"):
    cfg = load_config(None, ["model.arch=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                             "model.patch_size=8", "model.img_size=32", "model.layerscale_init=null",
                             f"model.variant={variant}"])
    return build_model(cfg.model, CHANNELS[:2])


def test_split_qkv_computes_the_fused_projection_and_fuses_back():
    torch.manual_seed(0)
    fused = torch.nn.Linear(32, 96)
    split = SplitQKV(fused)
    x = torch.randn(5, 7, 32)
    torch.testing.assert_close(split(x), fused(x), rtol=0, atol=1e-6)
    back = split.fused()
    assert torch.equal(back.weight, fused.weight) and torch.equal(back.bias, fused.bias)


@pytest.mark.parametrize("variant", ["boc", "hierarchical"])
def test_lora_adapts_q_and_v_only_and_merged_equals_unmerged(variant):
    torch.manual_seed(0)
    net = _tiny_backbone(variant).eval()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(3, 2, 32, 32)
    ids = torch.tensor([net.vocabulary.ids(CHANNELS[:2])] * 3)
    before = net.embed(x, ids)
    lora = LoRA(net, LoRASpec(rank=4, alpha=8, target="qv"))
    torch.testing.assert_close(net.embed(x, ids), before, rtol=0, atol=1e-6)  # B starts at zero
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in net.named_parameters() if ".lora_" in n}
    blocks = len(net.transformer_blocks())
    assert sorted({a.rsplit(".", 1)[-1] for a in adapted}) == ["q", "v"] and len(adapted) == 2 * blocks
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        n for n, _ in net.named_parameters() if ".lora_" in n]
    for p in lora.adapter_parameters():
        torch.nn.init.normal_(p, std=0.3)
    unmerged = net.embed(x, ids)
    assert (unmerged - before).abs().max() > 1e-2
    q = next(m for n, m in net.named_modules() if n.endswith("blocks.0.attn.qkv.q"))
    width = q.base_layer.weight.shape[0]
    pretrained_q = original[next(k for k in original if k.endswith("blocks.0.attn.qkv.weight"))][:width]
    assert torch.equal(q.base_layer.weight, pretrained_q)
    lora.merge()
    assert lora.merged  # the update now lives in the weight itself
    torch.testing.assert_close(q.base_layer.weight, pretrained_q + q.get_delta_weight("default"), rtol=0, atol=1e-6)
    torch.testing.assert_close(net.embed(x, ids), unmerged, rtol=0, atol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(q.base_layer.weight, pretrained_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(net.embed(x, ids), unmerged, rtol=0, atol=1e-5)
    fresh = _tiny_backbone(variant).eval()
    fresh.load_state_dict(lora.merged_state_dict())  # the original layout, the update folded in
    torch.testing.assert_close(fresh.embed(x, ids), unmerged, rtol=0, atol=1e-5)
    lora.unload()
    assert sorted(net.state_dict()) == sorted(original)
    torch.testing.assert_close(net.embed(x, ids), unmerged, rtol=0, atol=1e-5)


def test_lora_all_targets_every_linear_layer_of_the_blocks():
    net = _tiny_backbone("hierarchical")
    LoRA(net, LoRASpec(rank=2, target="all"))
    adapted = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, _ in net.named_parameters() if ".lora_" in n}
    assert adapted == {"q", "k", "v", "proj", "fc1", "fc2"}
    assert split_qkv(net) == 0  # already split


def test_a_loaded_lora_classifier_merges_unmerges_and_saves_merged(runs, tmp_path):
    clf = load_classifier(runs["lora"] / "classifier.pt", device="cpu")
    images = np.random.default_rng(0).random((6, 4, 40, 40)).astype(np.float32) * 1000
    unmerged = clf.predict_proba(images, CHANNELS)
    clf.merge_lora()
    assert clf.lora_merged
    np.testing.assert_allclose(clf.predict_proba(images, CHANNELS), unmerged, atol=1e-5)
    clf.unmerge_lora()
    np.testing.assert_allclose(clf.predict_proba(images, CHANNELS), unmerged, atol=1e-5)
    standalone = clf.save(tmp_path / "merged.pt", standalone=True)
    again = load_classifier(standalone, device="cpu")
    assert again.lora is None and again.mode == "lora"
    np.testing.assert_allclose(again.predict_proba(images, CHANNELS), unmerged, atol=1e-5)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        again.merge_lora()


# ----------------------------------------------------------------------------- multi-label
def test_select_thresholds_maximises_each_classes_f1_by_brute_force():
    rng = np.random.default_rng(0)
    probs = rng.random((40, 3))
    truth = probs + rng.normal(0, 0.3, (40, 3)) > 0.6
    truth[:, 2] = False
    chosen = select_thresholds(probs, truth)
    assert chosen[2] == 0.5  # no positive row: the default
    for k in range(2):
        def f1(t, k=k):
            pred = probs[:, k] >= t
            tp = (pred & truth[:, k]).sum()
            return 2 * tp / (pred.sum() + truth[:, k].sum())
        best = max(f1(t) for t in np.unique(probs[:, k]))
        assert f1(chosen[k]) == pytest.approx(best)


def test_multi_label_trains_with_bce_and_picks_thresholds_on_validation(teacher, tmp_path):
    index = labelled_index(tmp_path / "multi", localisations=2, n_images=8)
    table = pd.read_csv(index)
    assert table["label"].str.contains(";").all()
    cfg, payload = ft.load([str(teacher), "--index", str(index), "--out", str(tmp_path / "ft"), *FAST,
                            "finetune.task=multi_label", "finetune.class_weights=balanced", "finetune.mode=lora",
                            "finetune.lora.rank=2"])
    trainer = ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload)
    labels = trainer.splits.labels
    assert labels.multi_label and labels.targets.shape[1] == len(labels.classes) and (labels.targets.sum(1) == 2).all()
    # the loss is BCE on logits with per-class positive weights (n - n_k) / n_k from the training rows
    assert isinstance(trainer.loss_fn, torch.nn.BCEWithLogitsLoss)
    n_k = labels.targets[trainer.splits.train].sum(0)
    torch.testing.assert_close(trainer.loss_fn.pos_weight,
                               torch.as_tensor((len(trainer.splits.train) - n_k) / n_k, dtype=torch.float32))
    logits, target = torch.randn(5, len(labels.classes)), torch.as_tensor(labels.targets[:5])
    weight = trainer.loss_fn.pos_weight
    manual = -(weight * target * torch.nn.functional.logsigmoid(logits)
               + (1 - target) * torch.nn.functional.logsigmoid(-logits)).mean()
    torch.testing.assert_close(trainer.loss_fn(logits, target), manual)
    path = trainer.fit()

    clf = load_classifier(path, device="cpu")
    evaluation = json.loads((tmp_path / "ft" / "evaluation.json").read_text())
    assert clf.multi_label and {"mAP", "macro_f1", "micro_f1"} <= set(evaluation["test"])
    assert all("average_precision" in v for v in evaluation["test"]["per_class"].values() if v["support"])
    # thresholds are the best-F1 cut of each class on the validation rows, from the kept weights
    val = trainer.splits.val
    probs = trainer.probabilities(val)
    np.testing.assert_allclose(clf.thresholds, select_thresholds(probs, labels.indicators(val)), atol=1e-6)
    assert not np.allclose(clf.thresholds, 0.5)
    p = clf.predictions(probs)
    assert (p.chosen == (probs >= clf.thresholds)).all()
    assert not np.allclose(probs.sum(1), 1)  # sigmoid per class, not a softmax
    assert set(p.table().columns) >= {"predicted", *(f"predicted_{c}" for c in clf.classes)}


def test_one_column_per_class_is_a_multi_label_index(tmp_path):
    table = pd.DataFrame({"path": ["a"] * 3, "nuclear": [1, 0, 1], "punctate": ["true", "1", "0"]})
    labels = read_labels(table, ["nuclear", "punctate"], multi_label=True)
    assert labels.classes == ["nuclear", "punctate"]
    assert labels.targets.tolist() == [[1, 1], [0, 1], [1, 0]]


# ----------------------------------------------------------------------------- errors and settings
@pytest.mark.parametrize("case", ["absent_from_train", "nan", "missing_column", "not_0_1", "no_split_column",
                                  "unknown_class"])
def test_bad_labels_are_named_errors(case, teacher, cells, tmp_path, capsys):
    table = pd.read_csv(cells)
    extra = []
    if case == "absent_from_train":
        test_row = int(np.flatnonzero(table["split"] == "test")[0])
        table.loc[test_row, "label"] = "golgi"
        expected = f"class 'golgi' has 1 test row(s) (first: row {test_row}) but no training row"
    elif case == "nan":
        table.loc[4, "label"] = np.nan
        expected = "row 4: label column 'label' is empty (NaN)"
    elif case == "missing_column":
        extra = ["--labels", "localisation"]
        expected = "no label column 'localisation'"
    elif case == "not_0_1":
        table["nuclear"] = (table["label"] == "nuclear").astype(int)
        table["other"] = 1 - table["nuclear"]
        table.loc[2, "other"] = 2
        extra = ["--labels", "nuclear,other", "finetune.task=multi_label"]
        expected = "row 2: column 'other' holds '2'; a per-class label column holds 0 or 1"
    elif case == "no_split_column":
        extra = ["--split-column", "fold"]
        expected = "no split column 'fold'"
    else:
        extra = ["finetune.classes=[nuclear,cytoplasmic]"]
        bad = next(i for i, v in enumerate(table["label"]) if v not in ("nuclear", "cytoplasmic"))
        expected = f"row {bad}: label {table['label'][bad]!r} in column 'label' is not one of finetune.classes"
    index = tmp_path / "bad.csv"
    table.to_csv(index, index=False)
    out = tmp_path / "out"
    assert ft.main([str(teacher), "--index", str(index), "--out", str(out), *FAST, f"data.root={cells.parent}",
                    *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not out.exists()  # nothing written for bad data


def test_a_wrong_root_fails_before_the_run_folder_is_made_and_a_root_column_is_used(teacher, cells, tmp_path,
                                                                                     capsys):
    out = tmp_path / "out"
    assert ft.main([str(teacher), "--index", str(cells), "--out", str(out), *FAST,
                    f"data.root={tmp_path / 'elsewhere'}"]) == 2
    err = capsys.readouterr().err
    assert "elsewhere" in err and "data.root" in err, err
    assert not out.exists()
    # an index kept away from its images: its root column says where the paths start
    table = pd.read_csv(cells)
    table["root"] = str(cells.parent)
    moved = tmp_path / "moved" / "cells.csv"
    moved.parent.mkdir()
    table.to_csv(moved, index=False)
    cfg, payload = ft.load([str(teacher), "--index", str(moved), "--out", str(out), *FAST])
    trainer = ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload)
    assert trainer.reader.roots()["recorded"] == [str(cells.parent)]


def test_the_checkpoints_contract_cannot_be_changed_and_views_default_to_its_own(teacher, cells):
    with pytest.raises(ConfigError, match="data.sample_size is part of the model's preprocessing contract"):
        ft.load([str(teacher), "--index", str(cells), "data.sample_size=48"])
    with pytest.raises(ConfigError, match="views.global_crop_size"):
        ft.load([str(teacher), "--index", str(cells), "views.global_crop_size=64"])
    cfg, payload = ft.load([str(teacher), "--index", str(cells), "views.hflip_prob=0.1"])
    assert cfg.views.n_local_views == payload["config"]["views"]["n_local_views"] == 2  # the checkpoint's
    assert cfg.views.hflip_prob == 0.1 and cfg.data.sample_size == 32
    with pytest.raises(ConfigError, match="finetune.lora.target"):
        ft.load([str(teacher), "--index", str(cells), "finetune.lora.target=qk"])
    # one view per sample, cut in the loader's workers: pre-training's views.device is not inherited
    pretrained_on_device = {**payload, "config": {**payload["config"],
                                                  "views": {**payload["config"]["views"], "device": "device"}}}
    assert "device" not in ft.checkpoint_defaults(pretrained_on_device, [])[0][1]["views"]
    with pytest.raises(ConfigError, match="views.device=device"):
        ft.load([str(teacher), "--index", str(cells), "views.device=device"])


def test_full_mode_groups_decay_by_layer_below_a_scaled_backbone(teacher, cells, tmp_path):
    cfg, payload = ft.load([str(teacher), "--index", str(cells), "--out", str(tmp_path / "x"), *FAST,
                            "finetune.mode=full", "train.layer_decay=0.5", "finetune.backbone_lr_scale=0.1"])
    trainer = ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload)
    scale = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    net = trainer.net
    assert scale[id(net.head.linear.weight)] == 1.0
    assert scale[id(net.backbone.backbone.norm.weight)] == pytest.approx(0.1)
    assert scale[id(net.backbone.backbone.blocks[1].mlp.fc1.weight)] == pytest.approx(0.1 * 0.5)
    assert scale[id(net.backbone.backbone.blocks[0].mlp.fc1.weight)] == pytest.approx(0.1 * 0.25)
    assert scale[id(net.backbone.backbone.patch_embed.proj.weight)] == pytest.approx(0.1 * 0.125)


def test_lora_b_matrices_learn_lr_ratio_times_faster_than_a_by_default(teacher, cells, tmp_path):
    cfg, payload = ft.load([str(teacher), "--index", str(cells), "--out", str(tmp_path / "x"), *FAST,
                            "finetune.mode=lora", "train.layer_decay=0.5"])
    assert cfg.finetune.lora.lr_ratio == 16  # LoRA+'s default ratio
    trainer = ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), payload)
    scale = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = {n: p for n, p in trainer.net.backbone.named_parameters() if ".lora_" in n}
    assert adapters
    for name, p in adapters.items():
        if ".lora_B." in name:
            twin = adapters[name.replace(".lora_B.", ".lora_A.")]
            assert scale[id(p)] == pytest.approx(16 * scale[id(twin)]), name
            assert scale[id(twin)] in (pytest.approx(0.5), pytest.approx(0.25))  # layer-wise decay still applies
    assert scale[id(trainer.net.head.linear.weight)] == 1.0
    with pytest.raises(ConfigError, match="finetune.lora.lr_ratio"):
        ft.load([str(teacher), "--index", str(cells), "finetune.mode=lora", "finetune.lora.lr_ratio=0"])


def test_finetune_and_predict_are_commands_with_help(capsys):
    from cellvit_ssl.cli import COMMANDS
    from cellvit_ssl.cli import main as cli_main

    assert {"finetune", "predict"} <= set(COMMANDS)
    with pytest.raises(SystemExit):
        cli_main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "finetune.lora.target=qv" in text and "query and value projections" in text
    assert "train.layer_decay=0.75" in text and "data.index=null" in text
    with pytest.raises(SystemExit):
        cli_main(["predict", "--help"])
    assert "predict.base=null" in capsys.readouterr().out


def test_finetune_and_predict_report_user_errors_with_status_2_and_run_once(tmp_path, capsys):
    import subprocess
    import sys

    from test_import import RUN_AS_MAIN

    assert ft.main([str(tmp_path / "x.pt"), "finetune.mod=lora"]) == 2
    assert "did you mean 'finetune.mode'" in capsys.readouterr().err
    assert predict_cli.main([str(tmp_path / "c.pt"), "--outt", "p.h5ad"]) == 2
    assert "did you mean '--out'" in capsys.readouterr().err
    for module in ("cellvit_ssl.finetune", "cellvit_ssl.predict"):
        out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", RUN_AS_MAIN, module],
                             capture_output=True, text=True)
        assert out.returncode == 0, (module, out.stderr)
        assert out.stdout.strip().splitlines()[-1] == "once", module


def test_the_shipped_finetune_config_parses():
    cfg = ft.COMMAND_LINE.load(ft.COMMAND_LINE.parse(["configs/finetune_demo.yaml"]))
    assert cfg.finetune.mode == "lora" and cfg.finetune.checkpoint == "runs/demo/teacher.pt"
    assert cfg.data.index.endswith("index_ome-zarr.csv") and cfg.train.output_dir == "runs/demo_lora"


@pytest.mark.gpu
def test_gpu_finetune_runs_under_bf16_autocast_and_predicts_like_the_cpu(teacher, cells, tmp_path):
    cfg, payload = ft.load([str(teacher), "--index", str(cells), "--out", str(tmp_path / "gpu"), *FAST,
                            "train.device=cuda", "finetune.mode=lora", "finetune.lora.rank=2"])
    trainer = ft.FinetuneTrainer(cfg, DistInfo(0, 1, 0, torch.device("cuda")), payload)
    assert trainer.bf16
    path = trainer.fit()
    images = np.random.default_rng(0).random((4, 4, 32, 32)).astype(np.float32)
    on_gpu = load_classifier(path, device="cuda").predict_proba(images, CHANNELS)
    on_cpu = load_classifier(path, device="cpu").predict_proba(images, CHANNELS)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-2)


def test_unloading_lora_gives_the_pretrained_layout_and_the_same_predictions(runs, teacher):
    clf = load_classifier(runs["lora"] / "classifier.pt", device="cpu")
    images = np.random.default_rng(1).random((3, 4, 32, 32)).astype(np.float32)
    before = clf.predict_proba(images, CHANNELS)
    clf.merge_lora(unload=True)
    assert clf.lora is None and clf.mode == "lora"
    assert clf.model.state_dict().keys() == load_encoder(teacher, device="cpu").model.state_dict().keys()
    np.testing.assert_allclose(clf.predict_proba(images, CHANNELS), before, atol=1e-5)
    with pytest.raises(CheckpointError, match="only be saved standalone"):
        clf.save(runs["lora"] / "unused.pt", standalone=False)


def test_the_inspector_predicts_from_the_classifiers_own_embedding_whatever_the_maps_pooling(runs):
    from napari_plugin.analysis import analyse

    clf = load_classifier(runs["lora"] / "classifier.pt", device="cpu")
    image = np.random.default_rng(2).random((4, 64, 64)).astype(np.float32)
    labels = np.zeros((64, 64), np.int32)
    for k, (y, x) in enumerate([(2, 2), (2, 34), (34, 2), (34, 34)], start=1):
        labels[y:y + 26, x:x + 26] = k
    expected, ids = clf.predict_cells(image, labels, CHANNELS)
    steps = analyse(clf, image, CHANNELS, labels=labels, pooling="protein", map_method="pca", n_clusters=2)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result = stop.value
            break
    assert result.embeddings.shape[1] == clf.channel_dim  # the map shows the protein block
    assert result.features["index"].tolist() == ids.tolist()
    np.testing.assert_allclose(result.features[[f"prob_{c}" for c in clf.classes]].to_numpy(),
                               expected.probabilities, atol=1e-5)  # the head saw its own (default) embedding


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


def test_a_finished_run_is_not_trained_again(runs, teacher, cells, capsys):
    out = runs["linear"]
    before = _snapshot(out)
    assert ft.main([str(teacher), "--index", str(cells), "--out", str(out), *FAST, "finetune.mode=linear"]) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert _snapshot(out) == before  # config.yaml included


def test_resuming_under_changed_settings_is_refused_naming_each_key_before_anything_is_written(
        runs, teacher, cells, tmp_path, capsys):
    out = tmp_path / "linear"
    shutil.copytree(runs["linear"], out)
    args = [str(teacher), "--index", str(cells), "--out", str(out), *FAST, "finetune.mode=linear"]
    before = _snapshot(out)
    capsys.readouterr()
    # more epochs would train on (patience is not spent): refused, as training refuses
    assert ft.main([*args, "train.epochs=5", "finetune.patience=4"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 3 -> 5" in err and "finetune.patience: 10 -> 4" in err and str(out) in err
    assert "train.allow_config_change=[finetune.patience,train.epochs]" in err
    assert _snapshot(out) == before
    # a key allowed by name and a free key (how it runs, not what it learns) pass; finished: nothing written
    assert ft.main([*args, "finetune.standalone=true", "train.allow_config_change=[finetune.standalone]",
                    "train.log_every=3"]) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert _snapshot(out) == before
    with pytest.raises(ConfigError, match=r"names 'finetune.patiense'.*'finetune.patience'"):
        ft.load([*args, "train.allow_config_change=[finetune.patiense]"])


@pytest.mark.slow
def test_the_benchmark_runs_every_mode_and_writes_its_checks(teacher, tmp_path):
    from benchmarks import finetune_modes

    report = finetune_modes.main(["--checkpoint", str(teacher), "--n-images", "10", "--tasks", "single", "--set",
                                  "train.epochs=1", "data.batch_size=4", "data.num_workers=0",
                                  "--json", str(tmp_path / "bench.json"), "--workdir", str(tmp_path / "work")])
    written = json.loads((tmp_path / "bench.json").read_text())
    result = written["tasks"]["single"]
    assert {"knn", "linear", "lora", "full", "checks"} <= set(result)
    assert set(result["checks"]) == {"linear > k-NN", "lora > k-NN", "full > k-NN", "lora trains <= 2%",
                                     "lora file <= 5% of full", "lora >= 90% of full"}
    assert report["tasks"]["single"]["lora"]["parameters"] == result["lora"]["parameters"]


def test_classifier_views_none_is_the_inference_input_and_geometric_only_turns_it():
    from cellvit_ssl.preprocess import Preprocess
    from cellvit_ssl.transforms import ClassifierView

    views = load_config(None, ["views.global_crop_size=32", "views.standardize=true"]).views
    contract = Preprocess(sample_size=48, input_size=32, standardize=True)
    x = torch.rand(4, 48, 48)
    expected = contract.model_input(x[None])[0]
    torch.testing.assert_close(ClassifierView(views, augment="none", model_input=contract.model_input)(x)[0],
                               expected, rtol=0, atol=0)
    turns = [torch.rot90(f, k, dims=(-2, -1)) for f in (expected, expected.flip(-1), expected.flip(-2),
                                                         expected.flip(-1).flip(-2)) for k in range(4)]
    geometric = ClassifierView(views, augment="geometric", model_input=contract.model_input)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = geometric(x)[0]
        match = [i for i, t in enumerate(turns) if torch.equal(out, t)]
        assert match, "a geometric view is a flip / 90° turn of the inference input"
        seen.add(match[0])
    assert len(seen) > 2
    crop = ClassifierView(views, augment="views")(x)[0]  # pre-training's: a random crop with intensity jitter
    assert crop.shape == expected.shape and not any(torch.allclose(crop, t) for t in turns)
    with pytest.raises(ConfigError, match="finetune.augment"):
        ClassifierView(views, augment="mixup")
